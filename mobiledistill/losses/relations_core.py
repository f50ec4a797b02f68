"""CKD relation losses (Park, Kim & Yang, EMNLP 2021): Word Relation (WR) and Layer Transforming Relation (LTR).

A relation compares a model's representations with each other, so teacher and student widths may differ (no
projection). Everything is float32 inside; teacher inputs get no gradient; norms are safe (`x / max(|x|, eps)`, so
a zero vector has cosine 0 with everything and finite gradients); masked relation entries are set to the finite
`MASK_FLOOR` (never -inf); softmaxes are float32. `attention_mask` is [B, S] (1 = real token, 0 = padding).

- `wr_pair_loss`: cosine matrix between the tokens of one layer -> row softmax -> KL(teacher || student); or
  (`kind='distance'`) RKD distances normalised by their mean, compared with Huber / L1 / L2.
- `wr_angle_loss`: angles psi(i; j, k) = cos(r_j - r_i, r_k - r_i) with j, k in a window of W tokens around i;
  squared error. Memory O(B*S*W*H + B*S*W^2): the [S, S, S] tensor is never built.
- `ltr_pair_loss` / `ltr_angle_loss`: the same two relations among the n_l matched layers of each token.

Reductions (`reduction=`): 'official' (default) divides each summed relation exactly as the official code
(github GeondoPark/CKD, loss.py) does, since its published per-task weights (`CKD_TASK_HPARAMS`) were tuned at
those scales: WR pair / n^2 real (i, j) pairs (diagonal included), WR angle / W^2 per real centre (window clamped
into the padded sequence, padded neighbours kept), LTR pair / (tokens x n_l^2), LTR angle / (tokens x n_l^3).
'masked_mean' is a mean over the entries that carry information only (real rows; real, distinct neighbours; the
window kept inside the real span; triples with both ends distinct from the centre).
The official pair losses' forward value is NaN on every batch (`F.kl_div` of the -inf log-probability of a masked
entry, the diagonal included, against its zero target; padded rows softmax an all -inf row: loss.py:89-92,
105-110, 229-231), while their gradient is finite and equal to that of the KL summed over the unmasked entries
only; we return that sum, so the value is finite and the gradient is the official one.
- `match_layers` (from `losses.matching`): CKD layer-matching presets; `wr_loss` / `ltr_loss` average a relation
  over matched layers.

These are the pure functions; `losses.relations` registers them as named loss terms and holds CKD's per-task
hyper-parameters (`CKD_TASK_HPARAMS`), and is the module to import them from.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp

from mobiledistill.losses import _util
from mobiledistill.losses._util import MASK_FLOOR, f32
from mobiledistill.losses.matching import match_layers

NORM_EPS = 1e-8
DEFAULT_WINDOW = 21
RELATION_KINDS = ("cosine", "distance")
DISTANCE_LOSSES = ("huber", "l1", "l2")
RELATION_TERMS = ("wr_pair", "wr_angle", "ltr_pair", "ltr_angle")
REDUCTIONS = ("official", "masked_mean")
_HI = jax.lax.Precision.HIGHEST


# ----------------------------------------------------------------------------------------------------------------
# Primitives
# ----------------------------------------------------------------------------------------------------------------

def _normalize(x: jax.Array, eps: float) -> jax.Array:
    """x / max(||x||, eps) over the last axis: 0 for a zero vector, finite gradients everywhere."""
    sq = jnp.sum(jnp.square(x), axis=-1, keepdims=True)
    return x * jax.lax.rsqrt(jnp.maximum(sq, eps * eps))


def _valid(attention_mask, batch: int, seq: int) -> jax.Array:
    if attention_mask is None:
        return jnp.ones((batch, seq), bool)
    mask = jnp.asarray(attention_mask)
    if mask.shape != (batch, seq):
        raise ValueError(f"attention_mask shape {mask.shape} does not match hidden states [B, S] = {(batch, seq)}")
    return mask > 0


def _check_pair(t: jax.Array, s: jax.Array, name: str, rank: int):
    if t.ndim != rank or s.ndim != rank or t.shape[:-1] != s.shape[:-1]:
        raise ValueError(f"{name}: teacher {t.shape} and student {s.shape} must be rank {rank} and agree on all "
                         "axes but the last (the widths may differ)")


def _check_reduction(reduction: str):
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction={reduction!r}; valid: {REDUCTIONS}")


def _check_kind(kind: str, distance_loss: str):
    if kind not in RELATION_KINDS:
        raise ValueError(f"kind={kind!r}; valid: {RELATION_KINDS}")
    if distance_loss not in DISTANCE_LOSSES:
        raise ValueError(f"distance_loss={distance_loss!r}; valid: {DISTANCE_LOSSES}")


def _abs(x: jax.Array) -> jax.Array:
    # |x| with gradient sign(x) (0 at x = 0, unlike jnp.abs), so L1 is stationary when student == teacher.
    return x * jax.lax.stop_gradient(jnp.sign(x))


def _official_pair_count(valid: jax.Array) -> jax.Array:
    """The official divisor of a pair relation over sets valid [..., N]: sum of n^2, every real (i, j) pair of a set,
    diagonal included (`mask.sum()` in loss.py:123 and 270)."""
    n = jnp.sum(valid, axis=-1)
    return jnp.sum(n * n)


def _pair_cosine_kl(t: jax.Array, s: jax.Array, valid: jax.Array, eps: float):
    """Sum over valid rows of KL(P_T || P_S) and the number of valid rows, for sets t, s [..., N, H]."""
    n = t.shape[-2]
    keys = valid[..., None, :] & ~jnp.eye(n, dtype=bool)  # [..., N, N]: j real and j != i

    def log_p(x):
        x = _normalize(x, eps)
        c = jnp.einsum("...ih,...jh->...ij", x, x, precision=_HI)
        return jax.nn.log_softmax(jnp.where(keys, c, MASK_FLOOR), axis=-1)

    log_t, log_s = log_p(t), log_p(s)
    kl = jnp.sum(jnp.where(keys, jnp.exp(log_t) * (log_t - log_s), 0.0), axis=-1)
    return jnp.sum(jnp.where(valid, kl, 0.0)), jnp.sum(valid)


def _pair_distance(t: jax.Array, s: jax.Array, valid: jax.Array, eps: float, distance_loss: str):
    """Sum over valid pairs (i != j, both real) of loss(d_S - d_T) and the number of pairs; sets t, s [..., N, H].

    d_ij = ||x_i - x_j|| (Gram form, clamped at eps as RKD's pdist) divided by the mean of d over the valid pairs of
    the same set (a sequence for WR, a token's layers for LTR).
    """
    n = t.shape[-2]
    pairs = valid[..., :, None] & valid[..., None, :] & ~jnp.eye(n, dtype=bool)
    count_set = jnp.sum(pairs, axis=(-2, -1))

    def dist(x):
        sq = jnp.sum(jnp.square(x), axis=-1)
        gram = jnp.einsum("...ih,...jh->...ij", x, x, precision=_HI)
        d = jnp.sqrt(jnp.maximum(sq[..., :, None] + sq[..., None, :] - 2.0 * gram, eps * eps))
        d = jnp.where(pairs, d, 0.0)
        mean = jnp.sum(d, axis=(-2, -1)) / jnp.maximum(count_set, 1)
        return d / jnp.maximum(mean, eps)[..., None, None]

    diff = dist(s) - dist(t)
    if distance_loss == "huber":  # smooth L1 with beta = 1 (RKD / PyTorch default)
        err = jnp.where(_abs(diff) < 1.0, 0.5 * jnp.square(diff), _abs(diff) - 0.5)
    elif distance_loss == "l1":
        err = _abs(diff)
    else:
        err = jnp.square(diff)
    return jnp.sum(jnp.where(pairs, err, 0.0)), jnp.sum(pairs)


def _pair_loss(t, s, valid, kind, distance_loss, eps, reduction):
    _check_reduction(reduction)
    fn = _pair_cosine_kl if kind == "cosine" else functools.partial(_pair_distance, distance_loss=distance_loss)
    total, count = fn(t, s, valid, eps=eps)
    return _ratio(total, _official_pair_count(valid) if reduction == "official" else count)


def _angles(neighbours: jax.Array, center: jax.Array, eps: float) -> jax.Array:
    """cos(n_j - c, n_k - c): neighbours [..., K, H], center [..., H] -> [..., K, K] (0 where n_j == c)."""
    d = _normalize(neighbours - center[..., None, :], eps)
    return jnp.einsum("...jh,...kh->...jk", d, d, precision=_HI)


def _ratio(total, count) -> jax.Array:
    return total / jnp.maximum(f32(count), 1.0)


# ----------------------------------------------------------------------------------------------------------------
# Word Relation (tokens of one layer)
# ----------------------------------------------------------------------------------------------------------------

def wr_pair_loss(teacher_hidden: jax.Array, student_hidden: jax.Array, attention_mask: jax.Array | None = None, *,
                 kind: str = "cosine", distance_loss: str = "huber", eps: float = NORM_EPS,
                 reduction: str = "official") -> jax.Array:
    """Pair-wise word relation of one layer ([B, S, H_T] vs [B, S, H_S]).

    cosine: C_ij = <r^_i, r^_j>, the diagonal and padded j set to MASK_FLOOR, P = row softmax over j; the loss is
    the sum over real rows i of KL(P_T || P_S), divided by ('official', `WR_Dist` with distance='cos',
    lossfunc='kldiv': loss.py:84-123) the number of real (i, j) pairs of the batch, sum over sequences of n^2,
    or ('masked_mean') the number of real rows. A lone real token's row is all masked: KL 0.
    distance (RKD's form, not the official 'l2' variant, which compares squared distances): distances normalised
    by their per-sequence mean over real pairs; Huber (smooth L1, beta 1) / L1 / L2 of d_S - d_T summed over real
    pairs (i != j) and divided by sum n^2 ('official') or by the number of those pairs ('masked_mean').
    """
    _check_kind(kind, distance_loss)
    t, s = _util.teacher(teacher_hidden), f32(student_hidden)
    _check_pair(t, s, "wr_pair_loss", 3)
    valid = _valid(attention_mask, *s.shape[:2])
    return _pair_loss(t, s, valid, kind, distance_loss, eps, reduction)


def window_bounds(attention_mask: jax.Array | None, batch: int, seq: int, window: int = DEFAULT_WINDOW):
    """Window start [B, S] and width w = min(window, seq) of each center position.

    The window of center i is [start, start + w) with
        start = clip(min(max(i - window // 2, lo), hi - w), 0, seq - w),
    lo / hi = first / one-past-last real token of the sequence (0 / seq without a mask). So it is centred on i
    (|j - i| <= 10 for W = 21) away from the ends and shifted to stay inside the real span near them: it holds w
    real positions whenever the sequence has at least w real (contiguous) tokens, and the whole span otherwise.
    Right and left padding both work; holes inside the span are masked by the caller.
    """
    if window < 1:
        raise ValueError(f"window={window}; need >= 1")
    w = min(window, seq)
    valid = _valid(attention_mask, batch, seq)
    pos = jnp.arange(seq)
    any_real = jnp.any(valid, axis=-1)
    lo = jnp.where(any_real, jnp.argmax(valid, axis=-1), 0)
    hi = jnp.where(any_real, seq - jnp.argmax(valid[:, ::-1], axis=-1), seq)
    start = jnp.minimum(jnp.maximum(pos[None, :] - window // 2, lo[:, None]), hi[:, None] - w)
    return jnp.clip(start, 0, seq - w).astype(jnp.int32), w


def _wr_angle_piece(t, s, idx, ok, center_t, center_s, center_valid, eps):
    gather = jax.vmap(lambda x, i: x[i])  # x [S, H], i [C, W] -> [C, W, H]
    a_t = _angles(gather(t, idx), center_t, eps)
    a_s = _angles(gather(s, idx), center_s, eps)
    m = center_valid[..., None, None] & ok[..., :, None] & ok[..., None, :]
    return jnp.sum(jnp.where(m, jnp.square(a_s - a_t), 0.0)), jnp.sum(m)


def _check_official_window(window: int):
    if window < 1 or window % 2 != 1:
        raise ValueError(f"window={window}; the official WR angle window must be odd and >= 1 (e.g. 21)")


def official_window(batch: int, seq: int, window: int = DEFAULT_WINDOW) -> jax.Array:
    """Neighbour indices [B, S, W] of the official `window_index` (loss.py:29-38): i - (W-1)/2 .. i + (W-1)/2
    clamped into [0, S - 1] of the padded sequence, so windows near the ends repeat the edge position and
    windows near the end of a short sentence reach into its padding. W must be odd (loss.py:175)."""
    _check_official_window(window)
    offsets = jnp.arange(window, dtype=jnp.int32) - window // 2
    idx = jnp.clip(jnp.arange(seq, dtype=jnp.int32)[:, None] + offsets, 0, seq - 1)
    return jnp.broadcast_to(idx, (batch, seq, window))


def wr_angle_loss(teacher_hidden: jax.Array, student_hidden: jax.Array, attention_mask: jax.Array | None = None, *,
                  window: int = DEFAULT_WINDOW, chunk_size: int | None = None, eps: float = NORM_EPS,
                  reduction: str = "official") -> jax.Array:
    """Triple-wise (angle) word relation of one layer, windowed: O(B*S*W*H) memory, never [S, S, S].

    psi(i; j, k) = cos(r_j - r_i, r_k - r_i) for j, k in the window of i; squared error (psi_S - psi_T)^2.
    'official' (`WR_Angle_window`, lossfunc='l2loss': loss.py:171-203): the window of `official_window`, every
    real centre i with all W^2 (j, k) of its window, duplicates, padded neighbours and j = i (cos 0 in both
    models) included; loss = sum / (#real centres x W^2).
    'masked_mean': the window of `window_bounds` (kept inside the real span); a triple counts when i, j and k
    are real tokens and j != i, k != i (j == k kept); loss = sum over counted triples / their number.
    `chunk_size` processes the centers sequentially in chunks under `jax.checkpoint`: peak memory O(B*C*W*H) for
    C = chunk_size instead of O(B*S*W*H), same value, some recomputation in the backward pass.
    """
    _check_reduction(reduction)
    t, s = _util.teacher(teacher_hidden), f32(student_hidden)
    _check_pair(t, s, "wr_angle_loss", 3)
    batch, seq = s.shape[:2]
    valid = _valid(attention_mask, batch, seq)
    if reduction == "official":
        idx = official_window(batch, seq, window)
        ok = jnp.ones(idx.shape, bool)
    else:
        start, w = window_bounds(attention_mask, batch, seq, window)
        idx = start[..., None] + jnp.arange(w, dtype=jnp.int32)  # [B, S, w]
        ok = jnp.take_along_axis(valid, idx.reshape(batch, -1), axis=1).reshape(idx.shape)
        ok = ok & (idx != jnp.arange(seq)[None, :, None])
    piece = functools.partial(_wr_angle_piece, eps=eps)
    if chunk_size is None or chunk_size >= seq:
        return _ratio(*piece(t, s, idx, ok, t, s, valid))
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size}; need >= 1 or None")
    # Sequential chunks (lax.map) of centers under jax.checkpoint: only one chunk's [B, C, W, H] is alive, in the
    # backward pass too. Padded centers (to a multiple of chunk_size) are marked invalid.
    n_chunks = -(-seq // chunk_size)
    pad = n_chunks * chunk_size - seq

    def chunks(x):
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
        return jnp.swapaxes(x.reshape(batch, n_chunks, chunk_size, *x.shape[2:]), 0, 1)

    def body(args):
        return piece(t, s, *args)

    sums, counts = jax.lax.map(jax.checkpoint(body), tuple(chunks(x) for x in (idx, ok, t, s, valid)))
    return _ratio(jnp.sum(sums), jnp.sum(counts))


# ----------------------------------------------------------------------------------------------------------------
# Layer Transforming Relation (layers of one token)
# ----------------------------------------------------------------------------------------------------------------

def _stack_layers(teacher_layers, student_layers, name: str, min_layers: int):
    if len(teacher_layers) != len(student_layers):
        raise ValueError(f"{name}: {len(teacher_layers)} teacher vs {len(student_layers)} student layers; "
                         "need the same number")
    if len(teacher_layers) < min_layers:
        raise ValueError(f"{name}: needs at least {min_layers} matched layers, got {len(teacher_layers)} "
                         "(the 'last' preset gives one)")
    t = jnp.stack([_util.teacher(x) for x in teacher_layers], axis=2)  # [B, S, n_l, H_T]
    s = jnp.stack([f32(x) for x in student_layers], axis=2)
    _check_pair(t, s, name, 4)
    return t, s


def ltr_pair_loss(teacher_layers: Sequence[jax.Array], student_layers: Sequence[jax.Array],
                  attention_mask: jax.Array | None = None, *, kind: str = "cosine", distance_loss: str = "huber",
                  eps: float = NORM_EPS, reduction: str = "official") -> jax.Array:
    """Pair-wise layer transforming relation: per token, the relation among its n_l matched layers ([B, S, H] each).

    cosine: cosine matrix [n_l, n_l] between the token's layers, diagonal masked, row softmax, KL(P_T || P_S)
    summed over real tokens and layer rows, divided by ('official', `LTR_Dist` with distance='cos',
    lossfunc='kldiv': loss.py:211-270) real tokens x n_l^2, or ('masked_mean') real tokens x n_l.
    distance: per-token normalised distances, summed over (real tokens, l != m) and divided by real tokens x n_l^2
    ('official') or by the number of those pairs ('masked_mean'). Padded tokens are left out.
    """
    _check_kind(kind, distance_loss)
    t, s = _stack_layers(teacher_layers, student_layers, "ltr_pair_loss", 2)
    batch, seq, n = s.shape[:3]
    valid = jnp.broadcast_to(_valid(attention_mask, batch, seq)[..., None], (batch, seq, n))
    return _pair_loss(t, s, valid, kind, distance_loss, eps, reduction)


def _ltr_angle_piece(t, s, valid, center, eps: float):
    n = t.shape[2]
    a_t = _angles(t, t[:, :, center], eps)  # [B, S, n_l, n_l]
    a_s = _angles(s, s[:, :, center], eps)
    others = jnp.arange(n) != center
    m = valid[:, :, None, None] & others[:, None] & others[None, :]
    return jnp.sum(jnp.where(m, jnp.square(a_s - a_t), 0.0)), jnp.sum(m)


def ltr_angle_loss(teacher_layers: Sequence[jax.Array], student_layers: Sequence[jax.Array],
                   attention_mask: jax.Array | None = None, *, eps: float = NORM_EPS,
                   reduction: str = "official") -> jax.Array:
    """Triple-wise layer transforming relation: per token, psi(l; m, n) = cos(x_m - x_l, x_n - x_l) over its
    matched layers; squared error summed over real tokens and triples with m != l, n != l (m == n kept).

    'official' (`LTR_Angle`, loss='l2loss': loss.py:284-310) divides by real tokens x n_l^3, i.e. it counts the
    triples with m = l or n = l, whose cosine is 0 in both models; 'masked_mean' divides by the triples summed.
    The center layers l are processed sequentially (lax.map) under `jax.checkpoint`, so memory is O(B*S*n_l*H),
    not O(B*S*n_l^2*H).
    """
    _check_reduction(reduction)
    t, s = _stack_layers(teacher_layers, student_layers, "ltr_angle_loss", 3)
    valid = _valid(attention_mask, *s.shape[:2])
    body = jax.checkpoint(lambda c: _ltr_angle_piece(t, s, valid, c, eps))
    sums, counts = jax.lax.map(body, jnp.arange(s.shape[2]))
    if reduction == "official":
        return _ratio(jnp.sum(sums), jnp.sum(valid) * s.shape[2] ** 3)
    return _ratio(jnp.sum(sums), jnp.sum(counts))


# ----------------------------------------------------------------------------------------------------------------
# Layer matching and multi-layer wrappers
# ----------------------------------------------------------------------------------------------------------------

def _matched(teacher_states, student_states, layers, matching):
    if layers is None:
        ti, si = match_layers(len(teacher_states) - 1, len(student_states) - 1, matching)
    else:
        pairs = [(int(x[0]), int(x[1])) if isinstance(x, (tuple, list)) else (int(x), int(x)) for x in layers]
        if not pairs:
            raise ValueError("layers is empty")
        ti, si = (tuple(p) for p in zip(*pairs))
    for name, idx, states in (("teacher", ti, teacher_states), ("student", si, student_states)):
        bad = [i for i in idx if not -len(states) <= i < len(states)]
        if bad:
            raise ValueError(f"{name} hidden_states index {bad} out of range (it has {len(states)} entries)")
    return [teacher_states[i] for i in ti], [student_states[i] for i in si]


def wr_loss(teacher_states: Sequence[jax.Array], student_states: Sequence[jax.Array],
            attention_mask: jax.Array | None = None, *, relation: str = "pair", layers=None,
            matching: str = "emb+skip", **kwargs) -> jax.Array:
    """Word relation averaged over matched layers: mean over pairs of `wr_pair_loss` / `wr_angle_loss`.

    `teacher_states` / `student_states` are the full `hidden_states` tuples; `layers` (indices, or (teacher,
    student) pairs) overrides the `matching` preset. `kwargs` go to the per-layer loss.
    """
    fn = {"pair": wr_pair_loss, "angle": wr_angle_loss}.get(relation)
    if fn is None:
        raise ValueError(f"relation={relation!r}; valid: 'pair', 'angle'")
    ts, ss = _matched(teacher_states, student_states, layers, matching)
    return jnp.mean(jnp.stack([fn(t, s, attention_mask, **kwargs) for t, s in zip(ts, ss)]))


def ltr_loss(teacher_states: Sequence[jax.Array], student_states: Sequence[jax.Array],
             attention_mask: jax.Array | None = None, *, relation: str = "pair", layers=None,
             matching: str = "emb+skip", **kwargs) -> jax.Array:
    """Layer transforming relation over the matched layers (see `wr_loss` for `layers` / `matching`)."""
    fn = {"pair": ltr_pair_loss, "angle": ltr_angle_loss}.get(relation)
    if fn is None:
        raise ValueError(f"relation={relation!r}; valid: 'pair', 'angle'")
    ts, ss = _matched(teacher_states, student_states, layers, matching)
    return fn(ts, ss, attention_mask, **kwargs)
