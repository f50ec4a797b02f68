"""Residual-stream equalisation: int8 that survives NoNorm's outlier channels (issue #11, item 2).

NoNorm students (MobileBERT, MobileBERT_TINY) grow a few channels of the hidden_size-wide residual stream (the block
inputs/outputs, `hidden_states`) in the thousands. Per-tensor int8 activations (onnxruntime `quantize_dynamic`) then
spend their 255 levels on those channels and round every ordinary channel to a few levels or to zero.

NoNorm is a per-channel affine map `gamma * h + beta`, not a normalisation, so the residual stream can be expressed
in another diagonal basis `h' = h / s` EXACTLY (a change of basis; `s > 0` per channel):

- writers (each has the residual stream as output):
  embeddings `Norm(transform(e) + pos + type)`: `gamma' = gamma / s`, `beta' = beta / s`;
  a bottleneck block's `out = Norm(Dense(h) + x)`: the Dense's kernel columns and bias / s, `beta' = beta / s`
  (`gamma (Dense(h)/s + x/s) + beta/s = out/s`); without bottlenecks every residual `DenseNorm` of the block
  (attention output, each FFN output, the block output) is such a writer;
- readers (each Dense whose input is the residual stream): kernel rows * s (`(x/s) @ (s W) = x @ W`):
  the input bottleneck, MobileBERT's shared Q=K bottleneck and V (V reads x), IB-BERT's Q/K/V (all read x), without
  bottlenecks Q/K/V and the FFN intermediates; and the heads: the tanh pooler (or, when the pooled output is the
  [CLS] vector or the token mean, the classifier / NSP layer itself), the span head, the MLM transform.

Every task output is unchanged; `hidden_states` (and so an exported `last_hidden_state`) become `h / s`. The scales
are powers of two, so each rescaled parameter and each rescaled activation is exact in floating point (only the
exponent changes): the equalised float32 model computes the same head outputs as the original up to XLA's choice of
summation order. LayerNorm is not per-channel affine (it mixes channels through the mean and variance): models whose
residual norms are LayerNorm are refused.

Choosing s (`scales_from_ranges`), SmoothQuant's rule on the whole residual stream: with m_c = max |h_c| over every
residual tensor (all L+1 hidden states, real tokens of the calibration inputs) and w_c = max |W[c, :]| over the kernel
rows of every reader, s_c = m_c^alpha / w_c^(1 - alpha), taken relative to its median over channels, rounded to a
power of two and clipped to >= 1. So only channels that stand out are shrunk (ordinary channels keep their basis),
and alpha splits each outlier factor between the activations (per-tensor int8: one outlier sets the step of every
channel) and the readers' kernel rows (per-output-channel int8: one large row sets the step of its column). alpha =
0.5 (default, SmoothQuant's) balances the two; alpha = 1 flattens the activation ranges and ignores the weights. On
the fixtures of tests/test_quantize.py the two were equal where the readers' outlier rows are small (the outliers
carry little weight), and 0.5 was ~5x better on logits where they are not.
"""

from __future__ import annotations

import numpy as np

ALPHA = 0.5
CALIBRATION = 64  # sequences


class EqualizeError(ValueError):
    """The model cannot be equalised exactly (LayerNorm on the residual path, or an unknown head)."""


def check_equalizable(cfg) -> None:
    """Raises EqualizeError (one line) unless the residual-path norms are NoNorm."""
    if cfg.normalization_type != "no_norm":
        raise EqualizeError(f"residual equalisation needs normalization_type='no_norm' (NoNorm is per-channel "
                            f"affine); this model uses {cfg.normalization_type!r}, which mixes channels")


def calibration_inputs(cfg, n: int, seq_len: int, batch: int = 16, cls_id: int | None = None,
                       sep_id: int | None = None, seed: int = 1000):
    """`n` sequences as batches of int64 (ids, mask, types): random tokens in two segments, rows after the first of
    each batch padded to other lengths (like `export_write.random_inputs`, other seeds: held out from --verify's
    inputs); with `cls_id`/`sep_id`, [CLS] first and [SEP] closing each segment, as real inputs have (outlier
    channels are often carried by those tokens)."""
    if n < 1:
        raise ValueError(f"calibration needs at least 1 sequence, got {n}")
    rng = np.random.default_rng(seed)
    out = []
    for start in range(0, n, batch):
        b = min(batch, n - start)
        ids = rng.integers(1, cfg.vocab_size, (b, seq_len)).astype(np.int64)
        lengths = np.full(b, seq_len)
        lengths[1:] = rng.integers(max(2, seq_len // 2), seq_len + 1, b - 1)
        mask = (np.arange(seq_len)[None, :] < lengths[:, None]).astype(np.int64)
        first = np.maximum(1, lengths // 2)  # tokens of segment A
        types = ((np.arange(seq_len)[None, :] >= first[:, None]) & (mask == 1)).astype(np.int64)
        ids[mask == 0] = cfg.pad_token_id
        if cls_id is not None and sep_id is not None:
            rows = np.arange(b)
            ids[:, 0] = cls_id
            ids[rows, first - 1] = np.where(first > 1, sep_id, ids[rows, first - 1])
            ids[rows, lengths - 1] = sep_id
        out.append((ids, mask, types))
    return out


def residual_channel_ranges(model, batches) -> np.ndarray:
    """Per-channel max |h| over every residual-stream tensor (embedding output and each block output) and every
    real token of `batches` (iterable of (ids, mask, types)) -> float64 [hidden_size]."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    encoder = getattr(model, "encoder", model)
    graphdef, state = nnx.split(encoder)

    @jax.jit
    def batch_max(state, ids, mask, types):
        out = nnx.merge(graphdef, state)(ids, types, mask)
        h = jnp.stack([x.astype(jnp.float32) for x in out.hidden_states])  # [L+1, B, S, H]
        real = (mask != 0)[None, :, :, None]
        return jnp.max(jnp.where(real, jnp.abs(h), 0.0), axis=(0, 1, 2))

    m = None
    for ids, mask, types in batches:
        b = np.asarray(batch_max(state, *(jnp.asarray(a, jnp.int32) for a in (ids, mask, types))), np.float64)
        m = b if m is None else np.maximum(m, b)
    if m is None:
        raise ValueError("no calibration batches")
    return m


def scales_from_ranges(ranges: np.ndarray, weight_ranges: np.ndarray | None = None,
                       alpha: float = ALPHA) -> np.ndarray:
    """SmoothQuant's s_c = m_c^alpha / w_c^(1 - alpha) (w = 1 when not given), relative to its median, rounded to
    a power of two and clipped to >= 1 (see the module docstring) -> float32 [H]."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha={alpha}; valid: 0..1")
    m = np.maximum(np.asarray(ranges, np.float64), 1e-30)
    w = np.ones_like(m) if weight_ranges is None else np.maximum(np.asarray(weight_ranges, np.float64), 1e-30)
    log_s = alpha * np.log2(m) - (1.0 - alpha) * np.log2(w)
    exponent = np.clip(np.round(log_s - np.median(log_s)), 0, 100)
    return np.exp2(exponent).astype(np.float32)


def residual_channel_scales(model, batches, alpha: float = ALPHA) -> np.ndarray:
    """Calibration: the per-channel scales s of `equalize_residual` from the residual ranges on `batches` and the
    readers' kernel rows."""
    check_equalizable(getattr(model, "encoder", model).cfg)
    return scales_from_ranges(residual_channel_ranges(model, batches), reader_row_ranges(model), alpha)


def _mul(var, factor) -> None:
    var.set_value(var.get_value() * factor)


def _sites(model):
    """(embedding norm, readers, writers) of the residual stream: the Linears whose input is the stream, and the
    `DenseNorm`s `Norm(Dense(y) + r)` whose residual `r` and output are the stream. Raises EqualizeError unless the
    model's heads are known and its residual norms are NoNorm."""
    from mobiledistill.models import Encoder, PreTrainingModel, SequenceClassificationModel, SpanModel

    if not isinstance(model, (Encoder, PreTrainingModel, SequenceClassificationModel, SpanModel)):
        raise EqualizeError(f"cannot equalise a {type(model).__name__}: its heads' inputs are unknown")
    encoder = model if isinstance(model, Encoder) else model.encoder
    cfg = encoder.cfg
    check_equalizable(cfg)
    readers, writers = [], []
    for layer in encoder.layers:  # an SPS plan reuses these layers: each one's parameters are listed once
        if cfg.use_bottleneck:
            readers.append(layer.bottleneck_input.dense)
            if cfg.key_query_shared_bottleneck:  # Q = K = Norm(Dense(x)), V from x
                readers += [layer.bottleneck_attention.dense, layer.value]
            elif not cfg.use_bottleneck_attention:  # IB-BERT: Q, K, V from x
                readers += [layer.query, layer.key, layer.value]
            writers.append(layer.output_bottleneck)
        else:  # the whole block lives in the residual basis
            readers += [layer.query, layer.key, layer.value]
            writers.append(layer.attention_output)
            for ffn in layer.ffn:
                readers.append(ffn.intermediate)
                writers.append(ffn.output)
            readers.append(layer.intermediate)
            writers.append(layer.output)
    pooler = bool(cfg.classifier_activation) and cfg.classifier_pooling == "cls"
    if pooler:
        readers.append(encoder.pooler)
    # Without the tanh pooler the pooled output is x[:, 0] or a token mean of x: in the residual basis too.
    if isinstance(model, SequenceClassificationModel) and not pooler:
        readers.append(model.classifier)
    elif isinstance(model, SpanModel):
        readers.append(model.qa_outputs)
    elif isinstance(model, PreTrainingModel):
        readers.append(model.mlm.transform)
        if not pooler:
            readers.append(model.nsp)
    return encoder.embeddings.norm, readers, writers


def reader_row_ranges(model) -> np.ndarray:
    """Per residual channel, max |kernel row| over every Linear that reads the residual stream -> float64 [H]."""
    _, readers, _ = _sites(model)
    return np.max([np.max(np.abs(np.asarray(r.kernel.get_value(), np.float64)), axis=1) for r in readers], axis=0)


def equalize_residual(model, s):
    """A copy of `model` (Encoder, SequenceClassificationModel, SpanModel or PreTrainingModel) whose residual
    stream is `h / s`: every head output is unchanged, `hidden_states` are divided by `s` (float32 [H], > 0;
    powers of two keep it exact). The original model is not modified."""
    from flax import nnx

    _sites(model)  # refusals before copying
    cfg = getattr(model, "encoder", model).cfg
    s = np.asarray(s, np.float32)
    if s.shape != (cfg.hidden_size,) or not np.all(np.isfinite(s)) or not np.all(s > 0):
        raise EqualizeError(f"scales must be {cfg.hidden_size} finite positive numbers, got shape {s.shape}")
    new = nnx.clone(model)
    emb, readers, writers = _sites(new)
    _mul(emb.scale, 1.0 / s)  # Norm(e) = gamma * e + beta with e not in the residual basis: gamma and beta / s
    _mul(emb.bias, 1.0 / s)
    for r in readers:  # (x / s) @ (s[:, None] * W) = x @ W
        _mul(r.kernel, s[:, None])
    for w in writers:  # gamma * (Dense(y) / s + r / s) + beta / s = out / s
        _mul(w.dense.kernel, 1.0 / s[None, :])
        _mul(w.dense.bias, 1.0 / s)
        _mul(w.norm.bias, 1.0 / s)
    return new


def summary(s: np.ndarray, ranges: np.ndarray, alpha: float, n: int) -> dict:
    """What export.json records about an equalisation."""
    s = np.asarray(s, np.float64)
    m = np.asarray(ranges, np.float64)
    after = m / s
    return {"alpha": alpha, "calibration_sequences": n, "scale_min": float(s.min()), "scale_max": float(s.max()),
            "channels_rescaled": int(np.sum(s > 1)), "channels": int(s.size),
            "range_ratio_before": float(m.max() / max(np.median(m), 1e-30)),
            "range_ratio_after": float(after.max() / max(np.median(after), 1e-30))}
