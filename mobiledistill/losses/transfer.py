"""MobileBERT layer-wise knowledge transfer: feature maps, mean/variance statistics, attention maps.

All functions compute in float32 and stop gradients through the teacher. `attention_mask` is the
[B, S] int/bool/float mask of the batch (1 = real token, 0 = padding).

Reductions (SPEC §3), with `mask_padding=True` (default) padded tokens are left out of every mean;
`mask_padding=False` reproduces the official TF1 code, which averages over all positions:

- `feature_map_transfer`: mean over (batch, valid tokens, d) of (LN(T) - LN(S))^2.
- `mean_transfer` (beta): mean over (batch, valid tokens) of (mean_d T - mean_d S)^2.
- `variance_transfer` (gamma): mean over (batch, valid tokens) of |var_d T - var_d S|.
- `attention_transfer`: mean over (batch, heads, valid query rows) of KL(softmax(T) || softmax(S)).

Across widths and head counts (any teacher, any student):

- `projected_feature_map_transfer`: FMT of the student's feature map mapped to the teacher's width by a learned
  linear projection `S @ W + b` (TinyBERT's hidden-state loss); same reduction and masking as FMT. The projection's
  parameters belong to the training stage (`mobiledistill.strategies.projection`), not to the student.
- `attention_relation_transfer`: MiniLMv2 self-attention relations. Q, K and V ([B, S, d], any d) are re-split into
  R relation heads; relation `softmax(A_h A_h^T / sqrt(d / R))` for A in (Q, K, V); per relation type the mean over
  (batch, relation heads, valid query rows) of KL(R_T || R_S) over keys (padded keys masked), summed over the types.

LN is parameter-free with `ln_eps=1e-12` by default: that is the epsilon of the official code's
`tf.contrib.layers.layer_norm(trainable=False)` and of the models' LayerNorm. It stays finite in
float32 (a constant row gives 0 * 1e6), so gradients are finite even for constant activations.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp

from mobiledistill.losses._util import MASK_FLOOR, f32, field, masked_mean, teacher

DEFAULT_LN_EPS = 1e-12
DEFAULT_TRANSFER_WEIGHTS = {"fmt": 100.0, "at": 1.0, "beta": 5000.0, "gamma": 5.0}


def layer_norm(x: jax.Array, eps: float = DEFAULT_LN_EPS) -> jax.Array:
    """Parameter-free LayerNorm over the last axis (population variance), float32."""
    x = f32(x)
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + eps)


def _token_mask(attention_mask, mask_padding: bool):
    return None if (attention_mask is None or not mask_padding) else f32(attention_mask)


def feature_map_transfer(
    teacher_hidden: jax.Array,
    student_hidden: jax.Array,
    attention_mask: jax.Array | None = None,
    *,
    normalize: bool = True,
    mask_padding: bool = True,
    ln_eps: float = DEFAULT_LN_EPS,
) -> jax.Array:
    """FMT: mean over (batch, valid tokens, d) of (LN(T) - LN(S))^2; `normalize=False` is plain MSE.

    Inputs [B, S, d] (same d). Padded tokens are excluded when `mask_padding` and a mask is given.
    """
    t, s = teacher(teacher_hidden), f32(student_hidden)
    if normalize:
        t, s = layer_norm(t, ln_eps), layer_norm(s, ln_eps)
    per_token = jnp.mean(jnp.square(t - s), axis=-1)
    return masked_mean(per_token, _token_mask(attention_mask, mask_padding))


def _abs(x: jax.Array) -> jax.Array:
    # |x| with gradient sign(x), i.e. 0 at x = 0 like TF's Abs (jnp.abs has gradient 1 at 0), so
    # gamma is stationary when student == teacher.
    return x * jax.lax.stop_gradient(jnp.sign(x))


def _moments(x: jax.Array):
    mean = jnp.mean(x, axis=-1)
    var = jnp.mean(jnp.square(x - mean[..., None]), axis=-1)
    return mean, var


def mean_transfer(
    teacher_hidden: jax.Array,
    student_hidden: jax.Array,
    attention_mask: jax.Array | None = None,
    *,
    mask_padding: bool = True,
) -> jax.Array:
    """beta: mean over (batch, valid tokens) of (mean_d T - mean_d S)^2. Widths may differ."""
    (tm, _), (sm, _) = _moments(teacher(teacher_hidden)), _moments(f32(student_hidden))
    return masked_mean(jnp.square(tm - sm), _token_mask(attention_mask, mask_padding))


def variance_transfer(
    teacher_hidden: jax.Array,
    student_hidden: jax.Array,
    attention_mask: jax.Array | None = None,
    *,
    mask_padding: bool = True,
) -> jax.Array:
    """gamma: mean over (batch, valid tokens) of |var_d T - var_d S| (population variances)."""
    (_, tv), (_, sv) = _moments(teacher(teacher_hidden)), _moments(f32(student_hidden))
    return masked_mean(_abs(tv - sv), _token_mask(attention_mask, mask_padding))


def mean_transfer_official(
    teacher_hiddens: Sequence[jax.Array],
    student_hidden: jax.Array,
    attention_mask: jax.Array | None = None,
    *,
    mask_padding: bool = True,
) -> jax.Array:
    """beta as the official TF1 code computes it (a bug kept for exact replication).

    The official code takes `reduce_mean(teacher_hiddens, -1)` of the whole *list* of teacher hidden
    states (embedding output + every layer, L+1 entries), so the student layer's statistics are
    broadcast against all of them: the result is the mean over j of `mean_transfer(T_j, S_k)` for
    every teacher hidden state j passed in. Pass the full `hidden_states` tuple to replicate it.
    """
    return jnp.mean(
        jnp.stack(
            [mean_transfer(t, student_hidden, attention_mask, mask_padding=mask_padding) for t in teacher_hiddens]
        )
    )


def variance_transfer_official(
    teacher_hiddens: Sequence[jax.Array],
    student_hidden: jax.Array,
    attention_mask: jax.Array | None = None,
    *,
    mask_padding: bool = True,
) -> jax.Array:
    """gamma with the official broadcast bug: mean over all teacher hidden states j (see beta)."""
    return jnp.mean(
        jnp.stack(
            [variance_transfer(t, student_hidden, attention_mask, mask_padding=mask_padding) for t in teacher_hiddens]
        )
    )


def masked_log_softmax(scores: jax.Array, key_mask: jax.Array | None = None) -> jax.Array:
    """float32 log-softmax over the last axis that tolerates -inf/finfo.min entries.

    Scores are clamped at `MASK_FLOOR` (finite), and keys where `key_mask` (broadcastable) is 0 are
    set to it, so masked keys get probability exactly 0 and finite log-probabilities.
    """
    x = jnp.maximum(f32(scores), MASK_FLOOR)
    if key_mask is not None:
        x = jnp.where(key_mask > 0, x, MASK_FLOOR)
    return jax.nn.log_softmax(x, axis=-1)


def attention_transfer(
    teacher_scores: jax.Array,
    student_scores: jax.Array,
    attention_mask: jax.Array | None = None,
    *,
    mask_padding: bool = True,
    mask_keys: bool = True,
) -> jax.Array:
    """AT: mean over (batch, heads, valid query rows) of KL(softmax(T) || softmax(S)) over keys.

    Inputs are pre-softmax scores [B, heads, S, S] (finfo.min / -inf masking is fine). With a mask,
    `mask_keys` removes padded key columns from both distributions (they contribute 0 even in the
    official "-6" masking form) and `mask_padding` leaves padded query rows out of the mean. The
    official code uses cross-entropy over all rows instead: same gradient, value higher by H(T).
    """
    key_mask = None
    if attention_mask is not None and mask_keys:
        key_mask = f32(attention_mask)[:, None, None, :]
    log_t = jax.lax.stop_gradient(masked_log_softmax(teacher_scores, key_mask))
    log_s = masked_log_softmax(student_scores, key_mask)
    kl_rows = jnp.sum(jnp.exp(log_t) * (log_t - log_s), axis=-1)  # [B, heads, S]
    per_query = jnp.mean(kl_rows, axis=1)  # [B, S]
    return masked_mean(per_query, _token_mask(attention_mask, mask_padding))


def _layer_pairs(layers) -> list[tuple[int, int]]:
    pairs = []
    for item in layers:
        if isinstance(item, (tuple, list)):
            pairs.append((int(item[0]), int(item[1])))
        else:
            pairs.append((int(item), int(item)))
    return pairs


def _projection_of(student_out: Any, index: int) -> Mapping[str, jax.Array]:
    projections = field(student_out, "projections") if _has(student_out, "projections") else None
    if not projections or str(index) not in projections:
        have = sorted(projections) if projections else []
        raise ValueError(f"projected FMT: no projection for student hidden state {index} (have {have}); the stage "
                         f"must create one per projected layer (Stage.projections)")
    return projections[str(index)]


def _has(obj: Any, name: str) -> bool:
    return (name in obj) if isinstance(obj, Mapping) else (getattr(obj, name, None) is not None)


def layer_transfer_loss(
    teacher_out: Any,
    student_out: Any,
    layers: Sequence[int | tuple[int, int]],
    weights: Mapping[str, float] | None = None,
    attention_mask: jax.Array | None = None,
    *,
    normalize: bool = True,
    mask_padding: bool = True,
    mask_keys: bool = True,
    official_stats_bug: bool = False,
    ln_eps: float = DEFAULT_LN_EPS,
    layer_normalizer: int | None = None,
    projection: bool = False,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Weighted MobileBERT transfer loss for a set of active layers; returns (total, terms).

    `layers`: layer indices k (student k vs teacher k) or (teacher_k, student_k) pairs; layer k uses
    `hidden_states[k + 1]` and `attention_scores[k]` of the EncoderOutput-like inputs.
    `weights` (default fmt 100, at 1, beta 5000, gamma 5): terms with weight 0 are not computed.
    Each term is summed over the layers and divided by `layer_normalizer` (default: number of active
    layers, i.e. the mean). The official code divides by the total layer count L even when only one
    layer's gate is on (progressive): pass `layer_normalizer=L` to replicate that scale.
    `terms` holds the unweighted per-term values; total = sum(weights[k] * terms[k]).
    `official_stats_bug=True` computes beta/gamma against all teacher hidden states (see
    `mean_transfer_official`); for exact replication also pass `mask_padding=False`.
    `projection=True` (teacher and student of different widths): FMT maps student layer k's feature map with
    `student_out["projections"][str(k + 1)]` ({"kernel", "bias"}, keyed by hidden-state index; the stage puts its
    trained projections there) before comparing (`projected_feature_map_transfer`); beta and gamma compare the
    unprojected per-token statistics, which need no common width.
    """
    weights = dict(DEFAULT_TRANSFER_WEIGHTS if weights is None else weights)
    unknown = set(weights) - set(DEFAULT_TRANSFER_WEIGHTS)
    if unknown:
        raise ValueError(
            f"layer_transfer_loss: unknown weight keys {sorted(unknown)}; valid: {sorted(DEFAULT_TRANSFER_WEIGHTS)}"
        )
    pairs = _layer_pairs(layers)
    if not pairs:
        raise ValueError("layer_transfer_loss: `layers` is empty")
    t_hidden, s_hidden = field(teacher_out, "hidden_states"), field(student_out, "hidden_states")
    norm = float(layer_normalizer or len(pairs))
    terms: dict[str, jax.Array] = {}
    active = {k: float(w) for k, w in weights.items() if w != 0}
    for name in active:
        values = []
        for tk, sk in pairs:
            if name == "fmt" and projection:
                proj = _projection_of(student_out, sk + 1)
                values.append(
                    projected_feature_map_transfer(
                        t_hidden[tk + 1],
                        s_hidden[sk + 1],
                        proj["kernel"],
                        proj.get("bias"),
                        attention_mask,
                        normalize=normalize,
                        mask_padding=mask_padding,
                        ln_eps=ln_eps,
                    )
                )
            elif name == "fmt":
                values.append(
                    feature_map_transfer(
                        t_hidden[tk + 1],
                        s_hidden[sk + 1],
                        attention_mask,
                        normalize=normalize,
                        mask_padding=mask_padding,
                        ln_eps=ln_eps,
                    )
                )
            elif name == "at":
                values.append(
                    attention_transfer(
                        field(teacher_out, "attention_scores")[tk],
                        field(student_out, "attention_scores")[sk],
                        attention_mask,
                        mask_padding=mask_padding,
                        mask_keys=mask_keys,
                    )
                )
            else:
                if official_stats_bug:
                    fn = mean_transfer_official if name == "beta" else variance_transfer_official
                    values.append(fn(t_hidden, s_hidden[sk + 1], attention_mask, mask_padding=mask_padding))
                else:
                    fn = mean_transfer if name == "beta" else variance_transfer
                    values.append(fn(t_hidden[tk + 1], s_hidden[sk + 1], attention_mask, mask_padding=mask_padding))
        terms[name] = jnp.sum(jnp.stack(values)) / norm
    total = sum((active[k] * v for k, v in terms.items()), jnp.zeros((), jnp.float32))
    return total, terms


# ----------------------------------------------------------------------------------------------------------------
# Any teacher, any student: projected feature maps and self-attention relations
# ----------------------------------------------------------------------------------------------------------------

def project(student_hidden: jax.Array, kernel: jax.Array, bias: jax.Array | None = None) -> jax.Array:
    """`S @ kernel + bias` in float32: a student feature map [B, S, d_s] mapped to the teacher's width d_t."""
    s, w = f32(student_hidden), f32(kernel)
    if w.ndim != 2 or s.shape[-1] != w.shape[0] or (bias is not None and tuple(bias.shape) != (w.shape[1],)):
        raise ValueError(f"projection: student width {s.shape[-1]} needs a kernel [{s.shape[-1]}, d_teacher] and a "
                         f"bias [d_teacher]; got kernel {tuple(w.shape)}, bias "
                         f"{None if bias is None else tuple(bias.shape)}")
    out = jnp.einsum("...i,io->...o", s, w)
    return out if bias is None else out + f32(bias)


def projected_feature_map_transfer(
    teacher_hidden: jax.Array,
    student_hidden: jax.Array,
    kernel: jax.Array,
    bias: jax.Array | None = None,
    attention_mask: jax.Array | None = None,
    *,
    normalize: bool = True,
    mask_padding: bool = True,
    ln_eps: float = DEFAULT_LN_EPS,
) -> jax.Array:
    """FMT across widths: mean over (batch, valid tokens, d_t) of (LN(T) - LN(S @ kernel + bias))^2.

    Teacher [B, S, d_t], student [B, S, d_s], kernel [d_s, d_t], bias [d_t] or None. The projection is learned with
    the stage (TinyBERT's W_h); gradients reach both the student and the projection, never the teacher.
    `normalize=False` is TinyBERT's plain MSE. Padding is masked exactly as in `feature_map_transfer`.
    """
    projected = project(student_hidden, kernel, bias)
    if projected.shape != teacher_hidden.shape:
        raise ValueError(f"projected FMT: projected student {tuple(projected.shape)} vs teacher "
                         f"{tuple(teacher_hidden.shape)}")
    return feature_map_transfer(teacher_hidden, projected, attention_mask, normalize=normalize,
                                mask_padding=mask_padding, ln_eps=ln_eps)


RELATION_TYPES = ("qq", "kk", "vv")


def _relation_log_probs(x: jax.Array, num_heads: int, key_mask) -> jax.Array:
    """[B, S, d] -> log-softmax over keys of the scaled dot products within each of `num_heads` heads [B, R, S, S]."""
    b, s, d = x.shape
    h = f32(x).reshape(b, s, num_heads, d // num_heads)
    scores = jnp.einsum("bqhd,bkhd->bhqk", h, h) * (d // num_heads) ** -0.5
    return masked_log_softmax(scores, key_mask)


def attention_relation_transfer(
    teacher_qkv: Sequence[jax.Array],
    student_qkv: Sequence[jax.Array],
    attention_mask: jax.Array | None = None,
    *,
    num_relation_heads: int,
    relations: Sequence[str] = RELATION_TYPES,
    mask_padding: bool = True,
) -> jax.Array:
    """MiniLMv2 multi-head self-attention relation transfer between any two models.

    `teacher_qkv` / `student_qkv`: one layer's (query, key, value) projections [B, S, d] before the head split (the
    encoder's `qkv` output); the widths of teacher and student may differ, and so may their head counts. Each of A in
    Q, K, V is re-split into `num_relation_heads` heads of width d / R; relation = row-softmax(A_h A_h^T / sqrt(d / R))
    with padded keys masked (probability 0). Loss: for each relation type in `relations` ('qq', 'kk', 'vv'), the mean
    over (batch, relation heads, valid query rows) of KL(relation_T || relation_S), summed over the types (MiniLMv2's
    L_QQ + L_KK + L_VV). `mask_padding=False` averages over all query rows.
    """
    unknown = [r for r in relations if r not in RELATION_TYPES]
    if unknown or not relations:
        raise ValueError(f"attention relations: relations={list(relations)}; valid: a non-empty subset of "
                         f"{list(RELATION_TYPES)}")
    if int(num_relation_heads) < 1:
        raise ValueError(f"attention relations: num_relation_heads={num_relation_heads} must be >= 1")
    dt, ds = int(teacher_qkv[0].shape[-1]), int(student_qkv[0].shape[-1])
    if dt % num_relation_heads or ds % num_relation_heads:
        raise ValueError(f"attention relations: num_relation_heads={num_relation_heads} must divide both Q/K/V "
                         f"widths (teacher {dt}, student {ds})")
    key_mask = None if attention_mask is None else f32(attention_mask)[:, None, None, :]
    total = jnp.zeros((), jnp.float32)
    for r in relations:
        i = RELATION_TYPES.index(r)
        log_t = jax.lax.stop_gradient(_relation_log_probs(teacher(teacher_qkv[i]), num_relation_heads, key_mask))
        log_s = _relation_log_probs(student_qkv[i], num_relation_heads, key_mask)
        kl_rows = jnp.sum(jnp.exp(log_t) * (log_t - log_s), axis=-1)  # [B, R, S]
        total = total + masked_mean(jnp.mean(kl_rows, axis=1), _token_mask(attention_mask, mask_padding))
    return total
