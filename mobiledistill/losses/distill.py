"""Prediction-level losses: MLM/NSP (plain and distilled), task logit KD, regression KD, patient KD.

Everything is computed in float32; teacher inputs get no gradient. Logits are [..., C] and integer
labels [...]; `weights` (same shape as labels) select real predictions (0 = padding / ignore).
Out-of-range labels at weight-0 positions (e.g. -100 padding) are harmless.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

from mobiledistill.losses._util import f32, teacher

MLM_DENOMINATOR_EPS = 1e-5  # official: sum(weights) + 1e-5


def _at_label(values: jax.Array, labels: jax.Array) -> jax.Array:
    """values[..., label] (log-probabilities or logits); out-of-range labels are clipped (weight-0 padding)."""
    idx = jnp.clip(jnp.asarray(labels, jnp.int32), 0, values.shape[-1] - 1)
    return jnp.take_along_axis(values, idx[..., None], axis=-1)[..., 0]


def _soft_ce(logits: jax.Array, lse: jax.Array, p: jax.Array, ids: jax.Array | None = None) -> jax.Array:
    """-sum_j p_j log_softmax(logits)_{ids_j} = lse - sum_j p_j logits_{ids_j} (p sums to 1; every id if None)."""
    at = logits if ids is None else jnp.take_along_axis(logits, jnp.asarray(ids, jnp.int32), axis=-1)
    return lse - jnp.sum(p * at, axis=-1)


def _weighted_mean(values: jax.Array, weights: jax.Array | None, eps: float | None = None):
    """Mean over examples; with weights sum(w * v) / (sum(w) + eps), or / max(sum(w), 1e-12)."""
    if weights is None:
        return jnp.mean(values)
    w = jnp.broadcast_to(f32(weights), values.shape)
    num = jnp.sum(jnp.where(w != 0, w * values, 0.0))
    den = jnp.sum(w)
    return num / (den + eps) if eps is not None else num / jnp.maximum(den, 1e-12)


def mlm_distill_loss(
    student_logits: jax.Array,
    labels: jax.Array,
    weights: jax.Array,
    teacher_logits: jax.Array | None = None,
    *,
    alpha: float = 0.5,
    temperature: float = 1.0,
    teacher_indices: jax.Array | None = None,
) -> jax.Array:
    """Pre-training distillation MLM loss (official `get_masked_lm_output` with soft targets).

    target = alpha * onehot(label) + (1 - alpha) * softmax(teacher_logits / T); loss per prediction
    = -sum_v target_v * log_softmax(student_logits)_v (the student is not tempered, as in the
    official code); reduction sum(weights * loss) / (sum(weights) + 1e-5).
    Shapes: logits [B, P, V] gathered at the masked positions, labels / weights [B, P].
    `teacher_logits=None` requires alpha=1 (plain MLM). The one-hot is never materialised.
    Offline teacher (`teacher_indices` [B, P, k]): `teacher_logits` [B, P, k] are the teacher's k largest logits at
    those vocabulary ids; its soft target is their softmax (the mass outside the top k dropped and the rest
    renormalised); k = V with all ids gives the full loss.
    """
    # log_softmax(s)_v = s_v - logsumexp(s): never materialised over the vocabulary (at 1,024 positions x 30,522 the
    # [B, P, V] log-probabilities and their backward cost a third of the output layer; same values and gradients).
    s = f32(student_logits)
    lse = jax.nn.logsumexp(s, axis=-1)
    per = alpha * (lse - _at_label(s, labels)) if alpha != 0 else jnp.zeros(lse.shape)
    if alpha != 1.0:
        if teacher_logits is None:
            raise ValueError(f"mlm_distill_loss: alpha={alpha} < 1 needs teacher_logits")
        p_t = jax.nn.softmax(teacher(teacher_logits) / temperature, axis=-1)
        per = per + (1.0 - alpha) * _soft_ce(s, lse, p_t, teacher_indices)
    return _weighted_mean(per, weights, eps=MLM_DENOMINATOR_EPS)


def mlm_loss(logits: jax.Array, labels: jax.Array, weights: jax.Array) -> jax.Array:
    """Plain MLM cross-entropy (teacher pre-training): sum(w * CE) / (sum(w) + 1e-5)."""
    return mlm_distill_loss(logits, labels, weights, None, alpha=1.0)


def mlm_accuracy(logits: jax.Array, labels: jax.Array, weights: jax.Array) -> jax.Array:
    """Weighted MLM accuracy: sum(w * [argmax == label]) / (sum(w) + 1e-5), as the official code."""
    correct = (jnp.argmax(logits, axis=-1) == jnp.asarray(labels)).astype(jnp.float32)
    return _weighted_mean(correct, weights, eps=MLM_DENOMINATOR_EPS)


def cross_entropy(logits: jax.Array, labels: jax.Array, weights: jax.Array | None = None):
    """Hard-label cross-entropy, mean over examples (weighted mean if `weights`)."""
    log_p = jax.nn.log_softmax(f32(logits), axis=-1)
    return _weighted_mean(-_at_label(log_p, labels), weights)


def nsp_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Next-sentence prediction: hard-label cross-entropy over [B, 2] logits, mean over the batch."""
    return cross_entropy(logits, jnp.reshape(labels, (-1,)))


def soft_cross_entropy(
    student_logits: jax.Array,
    teacher_logits: jax.Array,
    temperature: float = 1.0,
    *,
    t_squared: bool = False,
    weights: jax.Array | None = None,
) -> jax.Array:
    """-sum_c softmax(T_c / t) * log_softmax(S_c / t), mean over examples (x t^2 if `t_squared`).

    Differs from the KL by the teacher entropy (a constant): same gradient, minimum at S = T.
    """
    p_t = jax.nn.softmax(teacher(teacher_logits) / temperature, axis=-1)
    log_s = jax.nn.log_softmax(f32(student_logits) / temperature, axis=-1)
    loss = _weighted_mean(-jnp.sum(p_t * log_s, axis=-1), weights)
    return loss * temperature**2 if t_squared else loss


def kl_divergence(
    student_logits: jax.Array,
    teacher_logits: jax.Array,
    temperature: float = 1.0,
    *,
    t_squared: bool = False,
    weights: jax.Array | None = None,
    reduction: str = "batchmean",
) -> jax.Array:
    """KL(softmax(T/t) || softmax(S/t)), summed over classes; 0 exactly when S = T.

    `reduction`: 'batchmean' = mean over examples (the true KL); 'elementwise_mean' additionally
    divides by the number of classes, as PyTorch's `KLDivLoss(reduction='mean')` used by PKD's code.
    """
    log_t = jax.nn.log_softmax(teacher(teacher_logits) / temperature, axis=-1)
    log_s = jax.nn.log_softmax(f32(student_logits) / temperature, axis=-1)
    kl = _weighted_mean(jnp.sum(jnp.exp(log_t) * (log_t - log_s), axis=-1), weights)
    if reduction == "elementwise_mean":
        kl = kl / student_logits.shape[-1]
    elif reduction != "batchmean":
        raise ValueError(f"kl_divergence: reduction={reduction!r}; valid: 'batchmean', 'elementwise_mean'")
    return kl * temperature**2 if t_squared else kl


def logit_kd_loss(
    student_logits: jax.Array,
    teacher_logits: jax.Array,
    temperature: float = 1.0,
    *,
    t_squared: bool = False,
    weights: jax.Array | None = None,
) -> jax.Array:
    """Task logit KD: soft cross-entropy at temperature T, mean over examples.

    No T^2 factor by default (`t_squared=False`): that is CKD's official code, whose per-task
    relation weights (WR/LTR 1..1000) were tuned against this scale. PKD and DistilBERT multiply by
    T^2 (keeps gradient magnitudes independent of T): pass `t_squared=True`; `patient_kd_loss`
    always applies it, as its formula states.
    """
    return soft_cross_entropy(student_logits, teacher_logits, temperature, t_squared=t_squared, weights=weights)


def mse_loss(student: jax.Array, target: jax.Array, weights: jax.Array | None = None) -> jax.Array:
    """Regression KD / MSE: mean over all elements (or weighted mean over examples of the
    per-example mean when `weights` [B] is given). The target gets no gradient."""
    sq = jnp.square(f32(student) - teacher(target))
    per_example = jnp.mean(jnp.reshape(sq, (sq.shape[0], -1)), axis=-1) if sq.ndim > 1 else sq
    return _weighted_mean(per_example, weights)


def _l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    # torch.nn.functional.normalize: x / max(||x||, eps); safe gradient at x = 0.
    sq = jnp.sum(jnp.square(x), axis=-1, keepdims=True)
    return x * jax.lax.rsqrt(jnp.maximum(sq, eps * eps))


def cls_patience_loss(student_cls: Sequence[jax.Array], teacher_cls: Sequence[jax.Array]):
    """PKD patience term: MSE(normalise(h_S[CLS]), normalise(h_T[CLS])), a mean over
    (batch, mapped layers, hidden) as PKD's `F.mse_loss` on [B, n_layers, H]. Inputs: lists of
    [B, H] (already mapped, same length); padding does not apply ([CLS] is always real)."""
    if len(student_cls) != len(teacher_cls) or not student_cls:
        raise ValueError(
            f"cls_patience_loss: {len(student_cls)} student vs {len(teacher_cls)} "
            "teacher layers; need the same non-zero number"
        )
    s = _l2_normalize(jnp.stack([f32(x) for x in student_cls], axis=1))
    t = _l2_normalize(jnp.stack([teacher(x) for x in teacher_cls], axis=1))
    return jnp.mean(jnp.square(s - t))


def patient_kd_loss(
    student_logits: jax.Array,
    teacher_logits: jax.Array,
    labels: jax.Array,
    student_cls: Sequence[jax.Array],
    teacher_cls: Sequence[jax.Array],
    *,
    alpha: float = 0.7,
    temperature: float = 10.0,
    beta: float = 100.0,
    kl_reduction: str = "elementwise_mean",
    weights: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Patient KD (Pea-KD defaults alpha=0.7, T=10, beta=100); returns (total, terms).

    total = (1 - alpha) * CE(S, labels) + alpha * T^2 * KL(T/t || S/t) + beta * patience, with CE a mean
    over examples and patience = `cls_patience_loss` over the mapped layers' [CLS] vectors. The KL is,
    by default, the official Pea-KD / PKD form (cih23/PeaKD utils/KD_loss.py:7-20,
    `nn.KLDivLoss(reduction='mean')`): a mean over batch x classes, i.e. the true KL / C; the published
    Pea-KD numbers and its alpha = 0.7 were obtained at that scale. `kl_reduction='batchmean'` gives the
    true KL (mean over examples), C times larger.
    """
    ce = cross_entropy(student_logits, labels, weights)
    kl = kl_divergence(
        student_logits, teacher_logits, temperature, t_squared=True, weights=weights, reduction=kl_reduction
    )
    pt = cls_patience_loss(student_cls, teacher_cls)
    total = (1.0 - alpha) * ce + alpha * kl + beta * pt
    return total, {"ce": ce, "kd": kl, "patience": pt}
