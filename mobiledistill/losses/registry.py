"""Named loss terms: `fn(teacher_out, student_out, batch) -> scalar`, combined by weights.

A term is built by a registered factory from keyword parameters:

    LOSS_REGISTRY: dict[str, factory];  factory(**params) -> LossFn
    LossFn(teacher_out, student_out, batch) -> float32 scalar

`teacher_out` / `student_out` are EncoderOutput-like objects or dicts (attribute or key access)
with the fields a term needs: `hidden_states`, `attention_scores`, `qkv` (encoder; `attn_relation`),
`projections` (a stage's learned width projections; projected `fmt`), and, from the heads,
`mlm_logits` ([B, P, V] at the masked positions), `nsp_logits` [B, 2], `logits` (task head).
`batch` is a mapping: `attention_mask`, `masked_lm_ids`, `masked_lm_weights`,
`next_sentence_labels`, `labels`, optional `example_weights` [B] for task terms. Teacher-free
terms ignore `teacher_out` (it may be None).

New terms (CKD word / layer-transforming relations, PTP's 4-way CE, ...) are added with
`@register_loss("name")` without touching anything else; `build_loss` turns a config mapping

    {"fmt": {"weight": 100, "layers": [3]}, "at": {"weight": 1, "layers": [3]},
     "kd_last": {"loss": "logit_kd", "weight": 1, "temperature": 4}}

into `loss_fn(teacher_out, student_out, batch) -> (total, {term_name: unweighted value})`.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp

from mobiledistill.losses import distill, transfer
from mobiledistill.losses._util import field
from mobiledistill.losses.matching import match_layers

LossFn = Callable[[Any, Any, Mapping[str, Any]], jax.Array]
LOSS_REGISTRY: dict[str, Callable[..., LossFn]] = {}


def register_loss(name: str):
    """Decorator registering `factory(**params) -> LossFn` under `name`."""

    def deco(factory):
        if name in LOSS_REGISTRY:
            raise ValueError(f"loss {name!r} is already registered")
        LOSS_REGISTRY[name] = factory
        return factory

    return deco


def make_loss(name: str, **params) -> LossFn:
    if name not in LOSS_REGISTRY:
        raise ValueError(f"unknown loss {name!r}; registered: {sorted(LOSS_REGISTRY)}")
    try:
        return LOSS_REGISTRY[name](**params)
    except TypeError as e:
        raise ValueError(f"loss {name!r}: bad parameters {sorted(params)} ({e})") from None


def build_loss(spec: Mapping[str, Mapping[str, Any]]):
    """Config mapping {term: {weight, [loss], **params}} -> fn(t, s, batch) -> (total, terms).

    `loss` names the registered factory (default: the term name). Terms with weight 0 are dropped.
    """
    terms: list[tuple[str, float, LossFn]] = []
    for term, cfg in spec.items():
        cfg = dict(cfg)
        weight = float(cfg.pop("weight", 1.0))
        name = cfg.pop("loss", term)
        if weight != 0.0:
            terms.append((term, weight, make_loss(name, **cfg)))

    def loss_fn(teacher_out, student_out, batch):
        values = {term: fn(teacher_out, student_out, batch) for term, _, fn in terms}
        total = sum((w * values[t] for t, w, _ in terms), jnp.zeros((), jnp.float32))
        return total, values

    return loss_fn


def _transfer_term(term: str):
    def factory(layers, **kw) -> LossFn:
        def fn(t, s, batch):
            _, terms = transfer.layer_transfer_loss(t, s, layers, {term: 1.0}, batch.get("attention_mask"), **kw)
            return terms[term]

        return fn

    return factory


for _term in ("fmt", "at", "beta", "gamma"):
    register_loss(_term)(_transfer_term(_term))


@register_loss("attn_relation")
def _attn_relation(num_relation_heads: int, layers=None, matching: str = "uniform", relations=transfer.RELATION_TYPES,
                   mask_padding: bool = True, layer_normalizer: int | None = None) -> LossFn:
    """MiniLMv2 Q-Q / K-K / V-V relation transfer (`transfer.attention_relation_transfer`) for any two models.

    Reads the encoders' `qkv` outputs (run them with `return_qkv=True`). `layers`: (teacher layer, student layer)
    pairs of 0-based layer indices, or None to map them with `matching.match_layers(matching)` (pairs with the
    embedding output are skipped: it has no attention). Summed over the pairs, divided by `layer_normalizer`
    (default: the number of pairs, i.e. the mean).
    """

    fixed = None if layers is None else transfer._layer_pairs(layers)
    if fixed is not None and not fixed:
        raise ValueError("attn_relation: `layers` is empty")

    def fn(t, s, b):
        t_qkv, s_qkv = field(t, "qkv"), field(s, "qkv")
        if t_qkv is None or s_qkv is None:
            raise ValueError("attn_relation needs the encoders' Q/K/V: run them with return_qkv=True")
        pairs = fixed
        if pairs is None:
            ti, si = match_layers(len(t_qkv), len(s_qkv), matching)
            pairs = [(a - 1, c - 1) for a, c in zip(ti, si) if a > 0 and c > 0]
        values = [transfer.attention_relation_transfer(t_qkv[tk], s_qkv[sk], b.get("attention_mask"),
                                                       num_relation_heads=num_relation_heads, relations=relations,
                                                       mask_padding=mask_padding) for tk, sk in pairs]
        return jnp.sum(jnp.stack(values)) / float(layer_normalizer or len(pairs))

    return fn


@register_loss("mlm")
def _mlm() -> LossFn:
    return lambda t, s, b: distill.mlm_loss(field(s, "mlm_logits"), b["masked_lm_ids"], b["masked_lm_weights"])


@register_loss("mlm_distill")
def _mlm_distill(alpha: float = 0.5, temperature: float = 1.0) -> LossFn:
    """Against the teacher's `mlm_logits`, or its stored top k (`mlm_topk_values` / `mlm_topk_indices`, offline)."""
    def fn(t, s, b):
        topk = isinstance(t, Mapping) and "mlm_topk_values" in t
        return distill.mlm_distill_loss(
            field(s, "mlm_logits"), b["masked_lm_ids"], b["masked_lm_weights"],
            field(t, "mlm_topk_values" if topk else "mlm_logits"), alpha=alpha, temperature=temperature,
            teacher_indices=field(t, "mlm_topk_indices") if topk else None)
    return fn


@register_loss("batch_teacher")
def _batch_teacher(inner: str, **params) -> LossFn:
    """Runs term `inner` against teacher outputs carried in the batch as `teacher_<name>` (cached or stored
    offline: fine-tuning's teacher logits, PD's top-k teacher logits)."""
    fn = make_loss(inner, **params)

    def wrapped(t, s, b):
        return fn({k[len("teacher_"):]: v for k, v in b.items() if k.startswith("teacher_")}, s, b)
    return wrapped


@register_loss("nsp")
def _nsp() -> LossFn:
    return lambda t, s, b: distill.nsp_loss(field(s, "nsp_logits"), b["next_sentence_labels"])


@register_loss("task_ce")
def _task_ce() -> LossFn:
    return lambda t, s, b: distill.cross_entropy(field(s, "logits"), b["labels"], b.get("example_weights"))


@register_loss("logit_kd")
def _logit_kd(temperature: float = 1.0, t_squared: bool = False) -> LossFn:
    return lambda t, s, b: distill.logit_kd_loss(
        field(s, "logits"), field(t, "logits"), temperature, t_squared=t_squared, weights=b.get("example_weights")
    )


@register_loss("kl_kd")
def _kl_kd(temperature: float = 1.0, t_squared: bool = True, reduction: str = "batchmean") -> LossFn:
    return lambda t, s, b: distill.kl_divergence(
        field(s, "logits"),
        field(t, "logits"),
        temperature,
        t_squared=t_squared,
        weights=b.get("example_weights"),
        reduction=reduction,
    )


@register_loss("regression_kd")
def _regression_kd() -> LossFn:
    return lambda t, s, b: distill.mse_loss(field(s, "logits"), field(t, "logits"), b.get("example_weights"))


@register_loss("regression")
def _regression() -> LossFn:
    return lambda t, s, b: distill.mse_loss(
        jnp.reshape(field(s, "logits"), (-1,)), jnp.reshape(b["labels"], (-1,)), b.get("example_weights")
    )


@register_loss("patience")
def _patience(student_layers, teacher_layers) -> LossFn:
    """PKD [CLS] patience over `hidden_states` indices (0 = embeddings) mapped pair-wise."""

    def fn(t, s, b):
        sh, th = field(s, "hidden_states"), field(t, "hidden_states")
        return distill.cls_patience_loss([sh[i][:, 0] for i in student_layers], [th[i][:, 0] for i in teacher_layers])

    return fn
