r"""Pea-KD (Cho & Kang) on one GLUE task: a fine-tuned teacher -> PTP stage -> PKD stage on an SPS student.

  python -m mobiledistill.main --config=configs/finetune_glue.py:task=rte,init=hf:/path/bert --workdir=runs/t_rte
  python -m mobiledistill.main --config=configs/peakd.py:task=rte,teacher=finetune:runs/t_rte,init=hf:/path/bert \
      --workdir=runs/peakd_rte                  # student: the first 3 layers of the init, paired SPS (6 effective)
  python -m mobiledistill.main --config=configs/peakd.py:task=rte,teacher=finetune:/tmp/t,tiny=1 --workdir=/tmp/p

`arg`: task (rte, mrpc, sst2, qnli: the official PTP thresholds), teacher (required), init, seeds, epochs, tiny, plus
layers (distinct student layers, default 3) and sps (paired | top3).
A recipe of two stages run by mobiledistill.engine (`--config.ptp.*`, `--config.pkd.*` override them).
PTP stage (`ptp/`, first seed): 4-way labels from the teacher's predictions, 4-way head, CE, lr 2e-5, 4 epochs, keeps
the best-dev-loss encoder. PKD stage (`pkd/`, all seeds): the PTP encoder with a fresh task head, loss
0.3·CE + 0.7·T²·KL (T 10; the KL averaged over batch x classes, as the official code) + 100·patience ([CLS] MSE,
student layers 1..L-1 -> teacher PKD-skip), lr 2e-5, batch 64, 6 epochs. The teacher runs every step (patience
needs its hidden states).
"""

import ml_collections

from mobiledistill.config import ConfigError
from mobiledistill.finetune import ARG_KEYS, apply_arg, finetune_config, parse_arg
from mobiledistill.strategies.peakd import ptp_thresholds


def get_config(arg=None):
    args = parse_arg(arg, ARG_KEYS + ("layers", "sps"))
    if not args.get("teacher"):
        raise ConfigError("peakd.py needs teacher=finetune:<workdir> or teacher=hf:<fine-tuned dir>")
    tiny = args.get("tiny", "0") not in ("0", "")
    task = args.get("task", "rte")
    t1, t2 = ptp_thresholds(task)
    teacher = args.pop("teacher")
    layers = int(args.pop("layers", "1" if tiny else "3"))
    sps = args.pop("sps", "paired")

    ptp = finetune_config()
    apply_arg(ptp, args)
    ptp.seeds = ptp.seeds[:1]
    ptp.sps = sps
    ptp.model.num_hidden_layers = layers
    ptp.tokenizer = args.get("tokenizer", "")  # the teacher's (tiny() would train one)
    ptp.ptp = ml_collections.ConfigDict({"teacher": teacher, "t1": t1, "t2": t2})
    if not tiny:
        ptp.train.lr, ptp.train.epochs = 2e-5, int(args.get("epochs", 4))

    pkd = finetune_config()
    apply_arg(pkd, {k: v for k, v in args.items() if k != "init"})
    pkd.init = ""  # the engine sets init=ptp:<workdir>/ptp/seed_<s> from init_from
    pkd.init_from = "ptp"
    pkd.auto_patience = True  # the patience layers are mapped once the PTP student's depth is known
    pkd.distill.teacher = teacher
    pkd.tokenizer = args.get("tokenizer", "")
    pkd.distill.kd_weight = 0.0  # the KL term below replaces the default soft cross-entropy
    pkd.distill.ce_weight = 0.3
    pkd.distill.extra_losses = ml_collections.ConfigDict({
        # official Pea-KD: nn.KLDivLoss(reduction='mean') x T^2, a mean over batch x classes (utils/KD_loss.py:12)
        "kl_kd": {"weight": 0.7, "temperature": 10.0, "t_squared": True, "reduction": "elementwise_mean"},
        "patience": {"weight": 100.0, "student_layers": [1], "teacher_layers": [1]}})
    if not tiny:
        pkd.train.lr, pkd.train.batch, pkd.train.epochs = 2e-5, 64, int(args.get("epochs", 6))

    c = ml_collections.ConfigDict()
    c.stages = ("ptp", "pkd")  # a recipe (mobiledistill.engine): <workdir>/ptp, then <workdir>/pkd
    c.ptp = ptp
    c.pkd = pkd
    return c
