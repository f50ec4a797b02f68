"""The fine-tuning loss: span and cached-teacher loss terms (registered with the other terms) and the spec of a run."""

from __future__ import annotations

from mobiledistill.finetune.sources import Teacher
from mobiledistill.losses import distill
from mobiledistill.losses._util import field
from mobiledistill.losses.registry import register_loss

# Teacher terms that need only the teacher's head outputs: their teacher can be run once and cached.
LOGIT_ONLY_TERMS = ("logit_kd", "kl_kd", "regression_kd", "span_kd")


@register_loss("span_ce")
def _span_ce():
    """SQuAD: mean of the start and end position cross-entropies."""
    def fn(t, s, b):
        w = b.get("example_weights")
        return 0.5 * (distill.cross_entropy(field(s, "start_logits"), b["start_positions"], w)
                      + distill.cross_entropy(field(s, "end_logits"), b["end_positions"], w))
    return fn


@register_loss("span_kd")
def _span_kd(temperature: float = 1.0, t_squared: bool = False):
    """SQuAD KD: mean of the start and end soft cross-entropies against the teacher at `temperature`."""
    def fn(t, s, b):
        w = b.get("example_weights")
        return 0.5 * sum(distill.soft_cross_entropy(field(s, k), field(t, k), temperature, t_squared=t_squared,
                                                    weights=w) for k in ("start_logits", "end_logits"))
    return fn


def loss_spec(c, kind: str, num_labels: int, teacher: Teacher | None) -> tuple[dict, bool]:
    """(registry spec, whether the teacher's logits can be cached instead of running it every step)."""
    regression = kind == "classification" and num_labels == 1
    task_term = "span_ce" if kind == "span" else ("regression" if regression else "task_ce")
    if teacher is None:
        return {task_term: {"weight": 1.0}}, False
    d = c.distill
    kd = "span_kd" if kind == "span" else ("regression_kd" if regression else "logit_kd")
    kd_params = {} if regression else {"temperature": float(d.temperature), "t_squared": bool(d.t_squared)}
    spec = {kd: {"weight": float(d.kd_weight), **kd_params}}
    if d.ce_weight:
        spec[task_term] = {"weight": float(d.ce_weight)}
    for term, extra in d.extra_losses.items():
        spec[term] = dict(extra.to_dict() if hasattr(extra, "to_dict") else extra)
    teacher_terms = [dict(v).get("loss", k) for k, v in spec.items() if k != task_term]
    cacheable = bool(d.cache_teacher_logits) and all(t in LOGIT_ONLY_TERMS for t in teacher_terms)
    if cacheable:
        spec = {k: (v if k == task_term else {"loss": "batch_teacher", "inner": v.get("loss", k),
                                               **{p: q for p, q in v.items() if p != "loss"}})
                for k, v in spec.items()}
    return spec, cacheable
