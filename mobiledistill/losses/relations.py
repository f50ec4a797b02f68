"""CKD relation losses (Park, Kim & Yang, EMNLP 2021) as named loss terms, and CKD's task-specific total.

The relation losses themselves, Word Relation (WR) and Layer Transforming Relation (LTR), their reductions and
mask handling, are pure functions in `losses.relations_core` (documented there) and re-exported here.

- Registered terms `wr_pair`, `wr_angle`, `ltr_pair`, `ltr_angle` (params: layers / matching, kind, window, ...);
  `ckd_relation_spec` gives their `build_loss` entries; `ckd_task_loss` builds the task-specific total
  `KD + w1*WR_pair + w2*WR_angle + w3*LTR_pair + w4*LTR_angle` with the official weights (`CKD_TASK_HPARAMS`).
"""

from __future__ import annotations

import re
from typing import Any, Mapping

from mobiledistill.losses._util import field
from mobiledistill.losses.matching import MATCHING_PRESETS, match_layers
from mobiledistill.losses.registry import LossFn, build_loss, register_loss
from mobiledistill.losses.relations_core import (
    DEFAULT_WINDOW,
    DISTANCE_LOSSES,
    NORM_EPS,
    REDUCTIONS,
    RELATION_KINDS,
    RELATION_TERMS,
    _check_kind,
    _check_official_window,
    _check_reduction,
    ltr_angle_loss,
    ltr_loss,
    ltr_pair_loss,
    official_window,
    window_bounds,
    wr_angle_loss,
    wr_loss,
    wr_pair_loss,
)

__all__ = [
    "CKD_TASK_HPARAMS",
    "DEFAULT_WINDOW",
    "DISTANCE_LOSSES",
    "MATCHING_PRESETS",
    "NORM_EPS",
    "REDUCTIONS",
    "RELATION_KINDS",
    "RELATION_TERMS",
    "ckd_relation_spec",
    "ckd_task_hparams",
    "ckd_task_loss",
    "ckd_task_loss_spec",
    "ltr_angle_loss",
    "ltr_loss",
    "ltr_pair_loss",
    "match_layers",
    "official_window",
    "window_bounds",
    "wr_angle_loss",
    "wr_loss",
    "wr_pair_loss",
]


# ----------------------------------------------------------------------------------------------------------------
# Registry terms and the CKD task-specific total
# ----------------------------------------------------------------------------------------------------------------

def _check_matching(layers, matching, ltr: bool):
    if layers is None and matching not in MATCHING_PRESETS:
        raise ValueError(f"unknown matching preset {matching!r}; valid: {MATCHING_PRESETS}")
    if ltr and layers is None and matching == "last":
        raise ValueError("LTR needs several matched layers; 'last' gives one")


def _term(loss_fn, relation: str, layers, matching, ltr: bool, **kwargs) -> LossFn:
    _check_matching(layers, matching, ltr)

    def fn(t, s, batch):
        return loss_fn(field(t, "hidden_states"), field(s, "hidden_states"), batch.get("attention_mask"),
                       relation=relation, layers=layers, matching=matching, **kwargs)
    return fn


@register_loss("wr_pair")
def _wr_pair_term(layers=None, matching: str = "emb+skip", kind: str = "cosine", distance_loss: str = "huber",
                  eps: float = NORM_EPS, reduction: str = "official") -> LossFn:
    _check_kind(kind, distance_loss)
    _check_reduction(reduction)
    return _term(wr_loss, "pair", layers, matching, False, kind=kind, distance_loss=distance_loss, eps=eps,
                 reduction=reduction)


@register_loss("wr_angle")
def _wr_angle_term(layers=None, matching: str = "emb+skip", window: int = DEFAULT_WINDOW,
                   chunk_size: int | None = None, eps: float = NORM_EPS, reduction: str = "official") -> LossFn:
    _check_reduction(reduction)
    if reduction == "official":
        _check_official_window(window)
    elif window < 1:
        raise ValueError(f"window={window}; need >= 1")
    return _term(wr_loss, "angle", layers, matching, False, window=window, chunk_size=chunk_size, eps=eps,
                 reduction=reduction)


@register_loss("ltr_pair")
def _ltr_pair_term(layers=None, matching: str = "emb+skip", kind: str = "cosine", distance_loss: str = "huber",
                   eps: float = NORM_EPS, reduction: str = "official") -> LossFn:
    _check_kind(kind, distance_loss)
    _check_reduction(reduction)
    return _term(ltr_loss, "pair", layers, matching, True, kind=kind, distance_loss=distance_loss, eps=eps,
                 reduction=reduction)


@register_loss("ltr_angle")
def _ltr_angle_term(layers=None, matching: str = "emb+skip", eps: float = NORM_EPS,
                    reduction: str = "official") -> LossFn:
    _check_reduction(reduction)
    return _term(ltr_loss, "angle", layers, matching, True, eps=eps, reduction=reduction)


def _w(pair: float, angle: float, temperature: float, lr: float, epochs: int) -> dict[str, float]:
    return {"wr_pair": pair, "wr_angle": angle, "ltr_pair": pair, "ltr_angle": angle,
            "temperature": temperature, "lr": lr, "epochs": epochs}


# Official CKD task-specific hyper-parameters (SPEC §3): relation weights (LTR = WR), KD temperature, learning
# rate, epochs. The official code looks the per-task LTR weights up under a wrong key and silently ignores them;
# we do not reproduce that bug: the LTR weights below are applied.
CKD_TASK_HPARAMS: dict[str, dict[str, float]] = {
    "cola": _w(1.0, 10.0, 3.0, 5e-5, 4),
    "sst2": _w(100.0, 1000.0, 4.0, 4e-5, 4),
    "rte": _w(1.0, 10.0, 3.0, 5e-5, 6),
    "qnli": _w(10.0, 1.0, 3.0, 4e-5, 4),
    "mrpc": _w(1.0, 1.0, 4.0, 3e-5, 4),
    "stsb": _w(0.1, 0.1, 1.0, 5e-5, 4),
    "mnli": _w(100.0, 1.0, 4.0, 4e-5, 4),
    "qqp": _w(10.0, 10.0, 2.0, 5e-5, 4),
}
_REGRESSION_TASKS = ("stsb",)
_TASK_ALIASES = {"sts": "stsb", "mnlim": "mnli", "mnlimm": "mnli", "mnlimatched": "mnli", "mnlimismatched": "mnli"}


def _task_key(task: str) -> str:
    key = re.sub(r"[-_\s]", "", str(task).lower())
    key = _TASK_ALIASES.get(key, key)
    if key not in CKD_TASK_HPARAMS:
        raise ValueError(f"unknown CKD task {task!r}; valid: {sorted(CKD_TASK_HPARAMS)}")
    return key


def ckd_task_hparams(task: str) -> dict[str, float]:
    """A copy of the official hyper-parameters of `task` (case, '-', '_' ignored: 'SST-2', 'sts_b', 'mnli-mm')."""
    return dict(CKD_TASK_HPARAMS[_task_key(task)])


def ckd_relation_spec(weights: Mapping[str, float], *, matching: str = "emb+skip", layers=None,
                      window: int = DEFAULT_WINDOW, kind: str = "cosine", chunk_size: int | None = None,
                      reduction: str = "official") -> dict[str, dict[str, Any]]:
    """`build_loss` entries of the four relation terms with `weights` {wr_pair, wr_angle, ltr_pair, ltr_angle}
    (missing = 0, dropped); all use the same `matching` preset or explicit `layers` and `reduction`. Also for
    task-agnostic use."""
    unknown = set(weights) - set(RELATION_TERMS)
    if unknown:
        raise ValueError(f"unknown relation weights {sorted(unknown)}; valid: {RELATION_TERMS}")
    _check_reduction(reduction)
    rel = {"matching": matching, "layers": layers, "reduction": reduction}
    spec = {
        "wr_pair": {"kind": kind, **rel},
        "wr_angle": {"window": window, "chunk_size": chunk_size, **rel},
        "ltr_pair": {"kind": kind, **rel},
        "ltr_angle": dict(rel),
    }
    return {k: {"weight": float(weights[k]), **v} for k, v in spec.items() if weights.get(k, 0.0)}


def ckd_task_loss_spec(task: str, *, regression: bool | None = None, t_squared: bool = False,
                       ce_weight: float = 0.0, **relation_kwargs) -> dict[str, dict[str, Any]]:
    """`build_loss` spec of CKD's task-specific total KD + w1 WR_pair + w2 WR_angle + w3 LTR_pair + w4 LTR_angle.

    KD is `logit_kd` (soft cross-entropy at the task's temperature, no T^2 as in CKD's code) or, for regression
    (STS-B unless `regression` says otherwise), `regression_kd` (MSE). `ce_weight` > 0 adds the hard-label term
    (not in the official recipe). `relation_kwargs` (matching, layers, window, kind, chunk_size, reduction) go to
    `ckd_relation_spec`; the default reduction 'official' is the scale `CKD_TASK_HPARAMS` were tuned at.
    """
    key = _task_key(task)
    hp = CKD_TASK_HPARAMS[key]
    if regression is None:
        regression = key in _REGRESSION_TASKS
    spec: dict[str, dict[str, Any]] = {
        "kd": ({"loss": "regression_kd", "weight": 1.0} if regression else
               {"loss": "logit_kd", "weight": 1.0, "temperature": hp["temperature"], "t_squared": t_squared}),
        **ckd_relation_spec({k: hp[k] for k in RELATION_TERMS}, **relation_kwargs),
    }
    if ce_weight:
        spec["ce"] = {"loss": "regression" if regression else "task_ce", "weight": float(ce_weight)}
    return spec


def ckd_task_loss(task: str, **kwargs):
    """`fn(teacher_out, student_out, batch) -> (total, terms)` for CKD task-specific distillation of `task`."""
    return build_loss(ckd_task_loss_spec(task, **kwargs))
