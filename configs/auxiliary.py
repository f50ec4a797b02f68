r"""MobileBERT with auxiliary knowledge transfer: one stage whose loss is every layer's transfer loss plus the
pre-training distillation loss (all parameters train, PD's schedule and step budget).

  python -m mobiledistill.main --config=configs/auxiliary.py --workdir=gs://BUCKET/mobilebert-akt
  python -m mobiledistill.main --config=configs/auxiliary.py:local --workdir=/tmp/mobiledistill-akt   # ~4 min on CPU
"""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

import progressive  # noqa: E402


def get_config(arg=None):
    c = progressive.get_config(arg)
    c.strategy = "auxiliary"
    return c
