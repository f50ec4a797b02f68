r"""Task-specific distillation (CKD task-specific / plain logit KD): a fine-tuned teacher -> a student, on one GLUE
task. The loss is logit KD at the task's CKD temperature (soft cross-entropy, no T^2; MSE for STS-B), plus
`--config.distill.ce_weight` x the hard-label loss; `ckd=1` adds CKD's word- and layer-transforming-relation terms with
the official per-task weights. KD-only runs cache the teacher's training-set logits (teacher_logits.npz).

  python -m mobiledistill.main --config=configs/finetune_glue.py:task=sst2,init=hf:/path/bert --workdir=runs/t_sst2
  python -m mobiledistill.main --config=configs/distill_task.py:task=sst2,teacher=finetune:runs/t_sst2,\
init=stage:runs/mobilebert/pd --workdir=runs/kd_sst2
  python -m mobiledistill.main --config=configs/distill_task.py:task=sst2,teacher=finetune:/tmp/t,tiny=1 \
      --workdir=/tmp/kd                                                  # seconds, after a tiny teacher run

`arg`: the keys of configs/finetune_glue.py (task, init, teacher, tokenizer, seeds, epochs, tiny) plus ckd=1.
task=custom (your own labels, local files; see configs/finetune_glue.py) distils at T=2 with the config's lr and
epochs (CKD has no official weights for it: ckd=1 is refused); from a `finetune:` teacher it takes the teacher's
label names, so class ids match.
`teacher` is required: finetune:<workdir of a finished fine-tuning run>[/seed_<s>] or hf:<fine-tuned transformers
dir>; the student shares the teacher's tokenizer (the student's init must have the same vocab).

Cost: the student's fine-tuning cost plus one teacher forward pass over the training set (cached), or a teacher
forward per step with ckd=1 (its relations need the teacher's hidden states).
"""

from mobiledistill.config import ConfigError
from mobiledistill.finetune import ARG_KEYS, apply_arg, finetune_config, parse_arg
from mobiledistill.losses.relations import ckd_relation_spec, ckd_task_hparams


def get_config(arg=None):
    c = finetune_config()
    args = parse_arg(arg, ARG_KEYS + ("ckd",))
    ckd = args.pop("ckd", "0") not in ("0", "")
    apply_arg(c, args)
    if not c.distill.teacher:
        raise ConfigError("distill_task.py needs teacher=finetune:<workdir> or teacher=hf:<fine-tuned dir>")
    if c.task == "custom" and ckd:
        raise ConfigError("distill_task.py: ckd=1 needs a GLUE task (CKD's official per-task weights); for "
                          "task=custom add relation terms with --config.distill.extra_losses")
    if c.task in ("wnli",):
        hp = {"temperature": 1.0, "lr": c.train.lr, "epochs": c.train.epochs}
    elif c.task == "custom":
        hp = {"temperature": 2.0, "lr": c.train.lr, "epochs": c.train.epochs}
    else:
        hp = ckd_task_hparams(c.task)
    c.distill.temperature = float(hp["temperature"])
    if ckd:
        c.distill.extra_losses = ckd_relation_spec({k: hp[k] for k in ("wr_pair", "wr_angle", "ltr_pair",
                                                                        "ltr_angle")})
    if "tiny" not in args:
        c.train.lr, c.train.epochs = float(hp["lr"]), int(hp["epochs"])
        if "epochs" in args:
            c.train.epochs = int(args["epochs"])
    return c
