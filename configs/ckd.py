r"""Task-agnostic CKD (Park et al., 2021): the MobileBERT pipeline of configs/progressive.py whose pre-training
distillation (PD) stage adds CKD's word- and layer-transforming relation terms (WR/LTR pair + angle, 'emb+skip'
layer matching) to MLM distillation + NSP. Relations need no projection, so teacher and student widths may differ.

  python -m mobiledistill.main --config=configs/ckd.py --workdir=gs://BUCKET/ckd
  python -m mobiledistill.main --config=configs/ckd.py:local --workdir=/tmp/ckd            # offline CPU demo
  python -m mobiledistill.main --config=configs/ckd.py:local --dry_run                     # the stage plan

Weights: `--config.pd.relations.wr_pair.weight=...` (0 drops a term). Follow with configs/ckd_glue.py per task.
"""

import ml_collections

from mobiledistill.config import pretraining_config
from mobiledistill.losses.relations import ckd_relation_spec

RELATION_WEIGHTS = {"wr_pair": 1.0, "wr_angle": 1.0, "ltr_pair": 1.0, "ltr_angle": 1.0}


def get_config(arg=None):
    import importlib.util
    import os

    spec = importlib.util.spec_from_file_location("_progressive", os.path.join(os.path.dirname(__file__),
                                                                               "progressive.py"))
    progressive = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(progressive)
    c = pretraining_config()
    if arg == "local":
        progressive.local(c)
    elif arg not in (None, "", "paper"):
        raise ValueError(f"configs/ckd.py: unknown variant {arg!r}; valid: paper (default), local")
    c.pd.relations = ml_collections.ConfigDict(ckd_relation_spec(RELATION_WEIGHTS, matching="emb+skip"))
    return c
