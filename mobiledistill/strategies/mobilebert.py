"""MobileBERT strategies as functions from a pipeline config to stages (SPEC §4).

teacher pre-training -> {progressive | joint | auxiliary} knowledge transfer -> pre-training distillation, plus the
same student trained from scratch for the PD budget (the baseline the distilled student must beat).
"""

from __future__ import annotations

from typing import Any

from mobiledistill.models import EncoderConfig
from mobiledistill.optim import OptimizerConfig, progressive_lr_rules
from mobiledistill.strategies.stage import Stage

TEACHER = "teacher"
STRATEGIES = ("progressive", "joint", "auxiliary", "teacher")
# During layer-wise transfer only the encoder layers train: the embeddings and MLM/NSP heads come from the teacher
# and stay frozen, and parameters outside the transfer loss (a pooler) must not train either: with no gradient, LAMB
# turns weight decay into a decay of lr x the parameter per step (trust ratio 1/weight_decay), which erases them.
TRANSFER_TRAINS = (("^encoder/layers/", 1.0),)


def layer_map(teacher: EncoderConfig, student: EncoderConfig) -> list[tuple[int, int]]:
    """(teacher layer, student layer) pairs for layer-wise transfer: identity for equal depth, else uniform."""
    lt, ls = teacher.num_hidden_layers, student.num_hidden_layers
    if ls > lt:
        raise ValueError(f"student has {ls} layers but the teacher only {lt}: layer-wise transfer needs a student "
                         f"no deeper than its teacher")
    if teacher.hidden_size != student.hidden_size:
        raise ValueError(f"feature-map transfer needs equal feature-map widths: teacher hidden_size="
                         f"{teacher.hidden_size}, student hidden_size={student.hidden_size}")
    if teacher.num_attention_heads != student.num_attention_heads:
        raise ValueError(f"attention transfer needs equal head counts: teacher {teacher.num_attention_heads}, "
                         f"student {student.num_attention_heads}")
    return [((k + 1) * lt // ls - 1, k) for k in range(ls)]


def _loss_normalizer(c, pairs, student_layers: int) -> int | None:
    """`layer_normalizer` of a stage's transfer terms from `pkt.loss_normalizer` (see config.py)."""
    mode = c.pkt.get("loss_normalizer", "mean")
    if mode == "num_layers":
        return int(student_layers)
    if mode == "stage":
        return max(sk for _, sk in pairs) + 1
    return None


def _transfer_losses(c, pairs, student_layers: int) -> dict[str, dict[str, Any]]:
    w = c.pkt.weights
    opts = dict(layers=[list(p) for p in pairs], mask_padding=c.pkt.mask_padding,
                official_stats_bug=c.pkt.official_stats_bug, ln_eps=float(c.pkt.get("ln_eps", 1e-12)),
                layer_normalizer=_loss_normalizer(c, pairs, student_layers))
    return {name: dict(weight=float(w[name]), **opts) for name in ("fmt", "at", "beta", "gamma") if w[name]}


def _pd_losses(c) -> dict[str, dict[str, Any]]:
    """MLM distillation + NSP, plus any `c.pd.relations` terms ({name: {weight, ...}}: CKD's task-agnostic
    relations; empty by default)."""
    losses = {"mlm_distill": dict(alpha=c.pd.alpha, temperature=c.pd.temperature), "nsp": {}}
    relations = c.pd.get("relations") or {}
    for name, spec in relations.items():
        spec = dict(spec)
        if name in losses:
            raise ValueError(f"pd.relations.{name} would replace a PD loss term")
        if float(spec.get("weight", 1.0)):
            losses[name] = spec
    return losses


def _lamb(c_section, total_steps: int, schedule: str, **kw) -> OptimizerConfig:
    return OptimizerConfig(name="lamb", learning_rate=c_section.lr, schedule=schedule,
                           warmup_steps=min(c_section.warmup_steps, max(total_steps - 1, 0)),
                           total_steps=total_steps, bias_correction=c_section.bias_correction, **kw)


def teacher_pretraining(c) -> list[Stage]:
    """MLM + NSP from scratch (dropout on), LAMB, warm-up then linear decay."""
    if not c.teacher.source == "pretrain":
        return []
    t = c.teacher
    return [Stage(TEACHER, t.steps, {"mlm": {}, "nsp": {}},
                  _lamb(t, t.steps, "warmup_linear", end_lr_ratio=t.end_lr_ratio),
                  trains="teacher", init="fresh", dropout=True, eval="mlm")]


def _teacher_ref(c) -> str:
    return TEACHER if c.teacher.source == "pretrain" else c.teacher.source


def progressive(c, teacher: EncoderConfig, student: EncoderConfig) -> list[Stage]:
    """One stage per student layer k: only layer k's transfer loss; layer k at 1x, lower layers at
    `pkt.lower_layer_scale` (0 = hard freeze), everything else frozen; student and teacher run only up to layer k.

    With `pkt.official_stats_bug` the teacher runs in full: the official beta/gamma compare a student layer with the
    statistics of every teacher hidden state (the official TF1 graph always computes the whole teacher).
    """
    stages, previous = [], None
    for tk, sk in layer_map(teacher, student):
        name = f"pkt_{sk:02d}"
        rules = progressive_lr_rules(sk, c.pkt.lower_layer_scale)
        opt = _lamb(c.pkt, c.pkt.steps_per_layer, "constant", lr_scales=tuple(rules), default_lr_scale=0.0)
        losses = _transfer_losses(c, [(tk, sk)], student.num_hidden_layers)
        stages.append(Stage(name, c.pkt.steps_per_layer, losses, opt,
                            init="teacher_copy" if previous is None else "previous", init_from=previous,
                            teacher_from=_teacher_ref(c), num_layers=sk + 1,
                            teacher_num_layers=None if c.pkt.official_stats_bug else tk + 1))
        previous = name
    return stages


def joint(c, teacher: EncoderConfig, student: EncoderConfig) -> list[Stage]:
    """All layers' transfer losses together in one stage with the same total step budget."""
    steps = c.pkt.steps_per_layer * student.num_hidden_layers
    opt = _lamb(c.pkt, steps, "constant", lr_scales=TRANSFER_TRAINS, default_lr_scale=0.0)
    losses = _transfer_losses(c, layer_map(teacher, student), student.num_hidden_layers)
    return [Stage("jkt", steps, losses, opt, init="teacher_copy",
                  teacher_from=_teacher_ref(c))]


def auxiliary(c, teacher: EncoderConfig, student: EncoderConfig) -> list[Stage]:
    """One stage: all layers' transfer losses plus the pre-training distillation loss; all parameters train."""
    steps = c.pd.steps
    losses = {**_transfer_losses(c, layer_map(teacher, student), student.num_hidden_layers), **_pd_losses(c)}
    opt = _lamb(c.pd, steps, "warmup_linear", end_lr_ratio=c.pd.end_lr_ratio)
    return [Stage("akt", steps, losses, opt, init="teacher_copy", teacher_from=_teacher_ref(c), eval="mlm")]


def pretraining_distillation(c, init_from: str) -> Stage:
    """All student parameters train on alpha * MLM + (1 - alpha) * teacher soft labels, plus NSP."""
    opt = _lamb(c.pd, c.pd.steps, "warmup_linear", end_lr_ratio=c.pd.end_lr_ratio)
    return Stage("pd", c.pd.steps, _pd_losses(c), opt, init="previous", init_from=init_from,
                 teacher_from=_teacher_ref(c), eval="mlm")


def scratch_baseline(c) -> Stage:
    """The same student, no teacher: MLM + NSP from random initialisation for the PD step budget."""
    opt = _lamb(c.pd, c.pd.steps, "warmup_linear", end_lr_ratio=c.pd.end_lr_ratio)
    return Stage("scratch", c.pd.steps, {"mlm": {}, "nsp": {}}, opt, init="fresh", eval="mlm")


def build_stages(c, teacher: EncoderConfig, student: EncoderConfig) -> list[Stage]:
    """The ordered stage list of a pipeline config (`c.strategy` in STRATEGIES)."""
    if c.strategy not in STRATEGIES:
        raise ValueError(f"strategy={c.strategy!r}; valid: {', '.join(STRATEGIES)}")
    stages = teacher_pretraining(c)
    if c.strategy == "teacher":
        if not stages:
            raise ValueError("strategy='teacher' needs teacher.source='pretrain'")
        return stages
    transfer = {"progressive": progressive, "joint": joint, "auxiliary": auxiliary}[c.strategy]
    stages += transfer(c, teacher, student)
    if c.strategy != "auxiliary" and c.pd.steps > 0:
        stages.append(pretraining_distillation(c, stages[-1].name))
    if c.scratch_baseline:
        stages.append(scratch_baseline(c))
    return stages
