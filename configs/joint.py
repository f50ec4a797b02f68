r"""MobileBERT with joint knowledge transfer: all layers' transfer losses in one stage (same step budget as PKT), then PD.

Paper scale: 240k transfer steps + 500k PD steps at batch 4096 on TPU (`--dry_run --devices=512` for the plan).

  python -m mobiledistill.main --config=configs/joint.py --workdir=gs://BUCKET/mobilebert-jkt
  python -m mobiledistill.main --config=configs/joint.py:local --workdir=/tmp/mobiledistill-jkt   # ~5 min on CPU
"""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

import progressive  # noqa: E402  (shares the paper defaults and the :local shrink)


def get_config(arg=None):
    c = progressive.get_config(arg)
    c.strategy = "joint"
    return c
