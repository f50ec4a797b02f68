"""MobileBERT strategies as functions from a pipeline config to stages (SPEC §4).

teacher pre-training (or an hf: teacher's MLM-head adaptation) -> {progressive | joint | auxiliary} knowledge
transfer -> pre-training distillation, plus the same student trained from scratch for the PD budget (the baseline
the distilled student must beat).
"""

from __future__ import annotations

import math
import os
from typing import Any

from mobiledistill.losses.matching import match_layers
from mobiledistill.errors import ConfigError
from mobiledistill.models import EncoderConfig
from mobiledistill.optim import OptimizerConfig, progressive_lr_rules
from mobiledistill.strategies import projection
from mobiledistill.strategies.stage import Stage

TEACHER = "teacher"
TEACHER_HEAD = "teacher_head"
STRATEGIES = ("progressive", "joint", "auxiliary", "teacher")
# During layer-wise transfer only the encoder layers train: the embeddings and MLM/NSP heads come from the teacher
# and stay frozen, and parameters outside the transfer loss (a pooler) must not train either: with no gradient, LAMB
# turns weight decay into a decay of lr x the parameter per step (trust ratio 1/weight_decay), which erases them.
TRANSFER_TRAINS = (("^encoder/layers/", 1.0),)
# MLM-head adaptation: the teacher's MLM and NSP heads train, its encoder (embeddings, layers, pooler) is frozen.
HEAD_TRAINS = (("^mlm/", 1.0), ("^nsp/", 1.0))


def layer_map(teacher: EncoderConfig, student: EncoderConfig, matching: str = "uniform") -> list[tuple[int, int]]:
    """(teacher layer, student layer) 0-based pairs for layer-wise transfer, from `relations.match_layers` (the one
    layer mapping of every layer-wise term): 'uniform' (default) is the identity for equal depths and student layer
    k -> teacher round((k + 1) L_T / L_S) - 1 otherwise; 'emb+skip' / 'skip' / 'last' as for CKD (pairs with the
    embedding output are left out: it is the teacher's copy, not a layer). Any widths and head counts: unequal
    feature-map widths use learned projections, unequal head counts attention relations (`_transfer_losses`)."""
    lt, ls = teacher.num_hidden_layers, student.num_hidden_layers
    if ls > lt:
        raise ValueError(f"student has {ls} layers but the teacher only {lt}: layer-wise transfer needs a student "
                         f"no deeper than its teacher")
    ti, si = match_layers(lt, ls, matching)
    return [(t - 1, s - 1) for t, s in zip(ti, si) if t > 0 and s > 0]


def relation_heads(teacher: EncoderConfig, student: EncoderConfig, requested: int = 0) -> int:
    """Relation heads of MiniLMv2 attention transfer: `requested`, or (0) the larger of the two models' head counts
    that divides both attention widths, else their widths' greatest common divisor's largest divisor <= 64 heads."""
    dt, ds = teacher.true_hidden_size, student.true_hidden_size
    if requested:
        if dt % requested or ds % requested:
            raise ValueError(f"pkt.relation_heads={requested} must divide both attention widths (teacher {dt}, "
                             f"student {ds})")
        return int(requested)
    for h in sorted({teacher.num_attention_heads, student.num_attention_heads}, reverse=True):
        if dt % h == 0 and ds % h == 0:
            return h
    g = math.gcd(dt, ds)
    return max(h for h in range(1, min(g, 64) + 1) if g % h == 0)


def _loss_normalizer(c, pairs, student_layers: int) -> int | None:
    """`layer_normalizer` of a stage's transfer terms from `pkt.loss_normalizer` (see config.py)."""
    mode = c.pkt.get("loss_normalizer", "mean")
    if mode == "num_layers":
        return int(student_layers)
    if mode == "stage":
        return max(sk for _, sk in pairs) + 1
    return None


def _transfer_losses(c, pairs, teacher: EncoderConfig, student: EncoderConfig) -> dict[str, dict[str, Any]]:
    """The weighted layer-wise terms of `pairs`. Unequal feature-map widths: FMT through the stage's learned
    projections (`projection=True`). Unequal head counts: the AT weight goes to MiniLMv2 attention relations
    (`attn_relation`, `pkt.relation_heads` heads, 0 = `relation_heads` auto). beta/gamma need no common width."""
    w = c.pkt.weights
    norm = _loss_normalizer(c, pairs, student.num_hidden_layers)
    opts = dict(layers=[list(p) for p in pairs], mask_padding=c.pkt.mask_padding,
                official_stats_bug=c.pkt.official_stats_bug, ln_eps=float(c.pkt.get("ln_eps", 1e-12)),
                layer_normalizer=norm)
    losses = {name: dict(weight=float(w[name]), **opts) for name in ("fmt", "at", "beta", "gamma") if w[name]}
    if "fmt" in losses and teacher.hidden_size != student.hidden_size:
        losses["fmt"]["projection"] = True
    if "at" in losses and teacher.num_attention_heads != student.num_attention_heads:
        del losses["at"]
        losses["attn_relation"] = dict(weight=float(w["at"]), layers=[list(p) for p in pairs],
                                       num_relation_heads=relation_heads(teacher, student,
                                                                         int(c.pkt.get("relation_heads", 0))),
                                       mask_padding=c.pkt.mask_padding, layer_normalizer=norm)
    return losses


def _projected(losses, pairs) -> tuple[int, ...]:
    """Student hidden-state indices that need a learned projection (layer k -> hidden state k + 1)."""
    return tuple(sk + 1 for _, sk in pairs) if projection.uses_projections(losses) else ()


def _with_projection_rule(rules, projected) -> tuple:
    return (projection.LR_RULE, *rules) if projected else tuple(rules)


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


def hf_checkpoint_heads(directory: str) -> tuple[str, ...] | None:
    """The pre-training heads ('mlm', 'nsp') that a transformers checkpoint holds (its tensor names only); None when
    there is no model.safetensors (a plan made without the file; loading the teacher then names what is missing)."""
    from safetensors import safe_open

    from mobiledistill.convert import PRETRAINING_HEADS
    path = os.path.join(directory, "model.safetensors")
    if not os.path.exists(path):
        return None
    try:
        with safe_open(path, "np") as f:
            names = list(f.keys())
    except Exception as e:  # safetensors has its own error types for missing / corrupt files
        raise ConfigError(f"teacher.source='hf:{directory}': cannot read {path} ({e}); valid: a transformers "
                          f"checkpoint directory with config.json and model.safetensors") from None
    return tuple(name for name, hf in PRETRAINING_HEADS if any(k.startswith(hf) for k in names))


def head_adaptation_steps(c) -> int:
    """Steps of the 'teacher_head' stage: `teacher.adapt_head_steps`, or (0, automatic) `pkt.steps_per_layer` for
    an hf: teacher whose checkpoint lacks MLM or NSP head; 0 = no stage."""
    if not c.teacher.source.startswith("hf:"):
        return 0
    steps = int(c.teacher.get("adapt_head_steps", 0))
    if steps:
        return steps
    heads = hf_checkpoint_heads(c.teacher.source[3:])
    return 0 if heads is None or len(heads) == 2 else int(c.pkt.steps_per_layer)


def teacher_head_adaptation(c) -> list[Stage]:
    """An hf: teacher's MLM + NSP heads trained on its frozen encoder (MLM + NSP loss, no dropout: the features the
    distillation stages will see). The checkpoint's encoder stays bit-identical; later stages use this stage's
    parameters as the teacher. AdamW, not LAMB: the trust ratio would tie a fresh head's steps to its small
    initial norm."""
    steps = head_adaptation_steps(c)
    if not steps:
        return []
    t = c.teacher
    opt = OptimizerConfig(name="adamw", learning_rate=float(t.get("adapt_head_lr", 1e-3)),
                          schedule="warmup_linear", warmup_steps=steps // 10, total_steps=steps,
                          lr_scales=HEAD_TRAINS, default_lr_scale=0.0)
    return [Stage(TEACHER_HEAD, steps, {"mlm": {}, "nsp": {}}, opt, trains="teacher", init="checkpoint",
                  init_from=t.source, eval="mlm")]


def _teacher_ref(c) -> str:
    """The stage (or checkpoint) the distillation stages read the teacher from."""
    if c.teacher.source == "pretrain":
        return TEACHER
    return TEACHER_HEAD if head_adaptation_steps(c) else c.teacher.source


def progressive(c, teacher: EncoderConfig, student: EncoderConfig) -> list[Stage]:
    """One stage per student layer k: only layer k's transfer loss; layer k at 1x, lower layers at
    `pkt.lower_layer_scale` (0 = hard freeze), everything else frozen; student and teacher run only up to layer k.

    With `pkt.official_stats_bug` the teacher runs in full: the official beta/gamma compare a student layer with the
    statistics of every teacher hidden state (the official TF1 graph always computes the whole teacher).
    """
    stages, previous = [], None
    for tk, sk in layer_map(teacher, student, c.pkt.get("matching", "uniform")):
        name = f"pkt_{sk:02d}"
        losses = _transfer_losses(c, [(tk, sk)], teacher, student)
        projected = _projected(losses, [(tk, sk)])
        rules = _with_projection_rule(progressive_lr_rules(sk, c.pkt.lower_layer_scale), projected)
        opt = _lamb(c.pkt, c.pkt.steps_per_layer, "constant", lr_scales=rules, default_lr_scale=0.0)
        stages.append(Stage(name, c.pkt.steps_per_layer, losses, opt,
                            init="teacher_copy" if previous is None else "previous", init_from=previous,
                            teacher_from=_teacher_ref(c), num_layers=sk + 1,
                            teacher_num_layers=None if c.pkt.official_stats_bug else tk + 1,
                            projections=projected))
        previous = name
    return stages


def joint(c, teacher: EncoderConfig, student: EncoderConfig) -> list[Stage]:
    """All layers' transfer losses together in one stage with the same total step budget."""
    steps = c.pkt.steps_per_layer * student.num_hidden_layers
    pairs = layer_map(teacher, student, c.pkt.get("matching", "uniform"))
    losses = _transfer_losses(c, pairs, teacher, student)
    projected = _projected(losses, pairs)
    opt = _lamb(c.pkt, steps, "constant", lr_scales=_with_projection_rule(TRANSFER_TRAINS, projected),
                default_lr_scale=0.0)
    return [Stage("jkt", steps, losses, opt, init="teacher_copy",
                  teacher_from=_teacher_ref(c), projections=projected)]


def auxiliary(c, teacher: EncoderConfig, student: EncoderConfig) -> list[Stage]:
    """One stage: all layers' transfer losses plus the pre-training distillation loss; all parameters train."""
    steps = c.pd.steps
    pairs = layer_map(teacher, student, c.pkt.get("matching", "uniform"))
    losses = {**_transfer_losses(c, pairs, teacher, student), **_pd_losses(c)}
    opt = _lamb(c.pd, steps, "warmup_linear", end_lr_ratio=c.pd.end_lr_ratio)
    return [Stage("akt", steps, losses, opt, init="teacher_copy", teacher_from=_teacher_ref(c), eval="mlm",
                  projections=_projected(losses, pairs))]


def pretraining_distillation(c, init_from: str) -> Stage:
    """All student parameters train on alpha * MLM + (1 - alpha) * teacher soft labels, plus NSP."""
    opt = _lamb(c.pd, c.pd.steps, "warmup_linear", end_lr_ratio=c.pd.end_lr_ratio)
    return Stage("pd", c.pd.steps, _pd_losses(c), opt, init="previous", init_from=init_from,
                 teacher_from=_teacher_ref(c), eval="mlm", teacher_top_k=int(c.pd.get("teacher_top_k", 0)),
                 teacher_topk_epochs=float(c.pd.get("teacher_topk_epochs", 1.0)))


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
    stages += teacher_head_adaptation(c)
    transfer = {"progressive": progressive, "joint": joint, "auxiliary": auxiliary}[c.strategy]
    stages += transfer(c, teacher, student)
    if c.strategy != "auxiliary" and c.pd.steps > 0:
        stages.append(pretraining_distillation(c, stages[-1].name))
    if c.scratch_baseline:
        stages.append(scratch_baseline(c))
    return stages
