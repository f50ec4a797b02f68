r"""Task-specific CKD (Park et al., 2021) on one GLUE task: configs/distill_task.py with ckd=1, i.e. logit KD at the
task's CKD temperature + WR_pair/WR_angle/LTR_pair/LTR_angle with the official per-task weights, lr and epochs.

  python -m mobiledistill.main --config=configs/ckd_glue.py:task=sst2,teacher=finetune:runs/t_sst2,\
init=stage:runs/mobilebert/pd --workdir=runs/ckd_sst2

`arg`: the keys of configs/distill_task.py (task, init, teacher, tokenizer, seeds, epochs, tiny); ckd is always on.
"""

import importlib.util
import os

_spec = importlib.util.spec_from_file_location("_distill_task", os.path.join(os.path.dirname(__file__),
                                                                              "distill_task.py"))
_distill_task = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_distill_task)


def get_config(arg=None):
    arg = ",".join(x for x in (arg or "").split(",") if x and not x.startswith("ckd="))
    return _distill_task.get_config(",".join(x for x in (arg, "ckd=1") if x))
