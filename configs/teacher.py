r"""IB-BERT_LARGE teacher pre-training only (MLM + NSP, LAMB, batch 4096, 500k steps: ~470 EFLOP, about 11 hours on
a TPU v3-512 at 40% MFU). Its final checkpoint is `WORKDIR/teacher/`. configs/progressive.py runs this same stage
first; use this file to train (and evaluate) a teacher on its own.

  python -m mobiledistill.main --config=configs/teacher.py --workdir=gs://BUCKET/ibbert
  python -m mobiledistill.main --config=configs/teacher.py:local --workdir=/tmp/ibbert   # ~2 min on CPU
"""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

import progressive  # noqa: E402


def get_config(arg=None):
    c = progressive.get_config(arg)
    c.strategy = "teacher"
    c.scratch_baseline = False
    return c
