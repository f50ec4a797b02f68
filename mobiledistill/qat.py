"""Quantisation-aware training (QAT, issue #11): int8 fake quantisation of a task model's dense layers, whose ranges
the exported static-int8 ONNX file (`--quantize=int8`) uses, so the file computes what the fake-quant forward did.

What is fake-quantised, in every `nnx.Linear` of the model (embedding transformation, bottlenecks, Q/K/V, attention
output, FFNs, pooler, classifier / span head); embeddings, norms, softmax and the residual adds stay float:

- the kernel, symmetric int8 per output channel (`weights='per_channel'`; or one scale, 'per_tensor'):
  s_c = max |W[:, c]| / 127, q = clip(round(W / s_c), -127, 127), W~ = q s_c (onnxruntime's symmetric int8 grid);
- the input activation, asymmetric int8 per tensor with the layer's range [lo, hi] (a `qat_range` parameter of the
  Linear): s = (hi - lo) / 255, zp = clip(round(-128 - lo / s), -128, 127), q = clip(round(x / s) + zp, -128, 127),
  x~ = (q - zp) s: exactly ONNX QuantizeLinear -> DequantizeLinear (round half to even, saturate). [lo, hi] always
  contains 0, so 0 (padding, ReLU zeros) is exact.

Gradients (straight-through estimator): d x~ / d x = 1 where x is inside the representable range, 0 where it is
clipped; the weights' gradient is the identity (their grid covers them). With `range='learned'` the range gets
LSQ's gradients through the step s (round(x/s) - x/s inside, the clipped level outside); with `range='ema'` it is
frozen during training. Either way the ranges start from an exponential moving average (momentum
`ema_momentum`) of each layer's input min / max over `calibration_batches` training batches of the float model.
The forward value is exact (no `x + stop_gradient(q - x)` rounding): `v + stop_gradient(round(v) - v)` is round(v)
exactly in float32 for |v| <= 2^22, so the fake-quant forward and onnxruntime's int8 file see the same grid.

The attention mask: MobileBERT's int8 recipe masks with an additive -6 because it quantises the attention scores
(a -10000 mask would take the whole int8 range of that tensor). Here only dense-layer inputs are quantised: the
scores and probabilities stay float in training and in the file, so the mask never enters a quantised tensor and
the model keeps the usual mask (transformers' finfo.min, which the exported file computes; `save_hf` refuses other
mask values), so the ONNX file and the fake-quant forward agree.
"""

from __future__ import annotations

import json
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

QMIN, QMAX = -128, 127  # int8 activations (asymmetric)
WMAX = 127  # int8 weights, symmetric: [-127, 127]
RANGE = "qat_range"  # the [lo, hi] parameter added to each Linear
RANGES_FILE = "qat_ranges.json"
SETTINGS = ("bits", "weights", "activations", "range", "ema_momentum", "calibration_batches", "range_lr_scale")


def act_qparams(lo, hi):
    """(scale, zero_point) of the int8 grid for the range [lo, hi] (widened to contain 0); zp as a float integer."""
    lo, hi = jnp.minimum(lo, 0.0), jnp.maximum(hi, 0.0)
    scale = jnp.maximum((hi - lo) / (QMAX - QMIN), jnp.float32(1e-8))
    zp = jax.lax.stop_gradient(jnp.clip(jnp.round(QMIN - lo / scale), QMIN, QMAX))
    return scale, zp


def _ste_round(v):
    return v + jax.lax.stop_gradient(jnp.round(v) - v)


def fake_quant(x, lo, hi):
    """x -> (clip(round(x / s) + zp) - zp) s; STE: gradient 1 inside the range, 0 outside; LSQ gradients to lo/hi."""
    scale, zp = act_qparams(lo, hi)
    scale = scale.astype(x.dtype)
    q = _ste_round(x / scale) + zp
    inside = jax.lax.stop_gradient((q >= QMIN) & (q <= QMAX))
    q = jnp.where(inside, q, jax.lax.stop_gradient(jnp.clip(q, QMIN, QMAX)))
    return (q - zp) * scale


def weight_scale(w, per_channel: bool = True, levels: int = WMAX):
    """Symmetric scale of a kernel [in, out] for the grid [-levels, levels]: per output channel [out] or one scalar."""
    m = jnp.max(jnp.abs(w), axis=0) if per_channel else jnp.max(jnp.abs(w))
    return jax.lax.stop_gradient(jnp.maximum(m, 1e-12) / levels)


def fake_quant_weight(w, per_channel: bool = True, levels: int = WMAX):
    scale = weight_scale(w, per_channel, levels)
    q = _ste_round(w / scale)  # |q| <= levels by the choice of scale; the guard keeps the gradient 1 at the ends
    return jnp.where(jnp.abs(q) <= levels, q, jax.lax.stop_gradient(jnp.clip(q, -levels, levels))) * scale


class QATLinear(nnx.Linear):
    """An `nnx.Linear` whose kernel and input are fake-quantised (`convert` turns Linears into these in place:
    the parameter paths stay, `qat_range` is added). `qat_observe` (calibration) runs it in float and sows the
    input's (min, max)."""

    def __call__(self, inputs, out_sharding=None):
        kernel = self.kernel[...]
        bias = self.bias[...] if self.bias is not None else None
        inputs, kernel, bias = self.promote_dtype((inputs, kernel, bias), dtype=self.dtype)
        if self.qat_observe:
            self.sow(nnx.Intermediate, "qat_minmax", jnp.stack([jnp.min(inputs), jnp.max(inputs)]))
        else:
            lo_hi = self.qat_range[...]
            inputs = fake_quant(inputs, lo_hi[0], lo_hi[1])
            kernel = fake_quant_weight(kernel, self.qat_per_channel, self.qat_levels)
        y = self.dot_general(inputs, kernel, (((inputs.ndim - 1,), (0,)), ((), ())), precision=self.precision)
        if bias is not None:
            y += jnp.reshape(bias, (1,) * (y.ndim - 1) + (-1,))
        return y


def linears(model) -> dict[str, nnx.Linear]:
    """{'encoder/layers/0/query': Linear, ...}: every Linear of the model, once each (shared ones once)."""
    out, seen = {}, set()
    for path, m in nnx.iter_graph(model):
        if isinstance(m, nnx.Linear) and id(m) not in seen:
            seen.add(id(m))
            out["/".join(map(str, path))] = m
    return out


def weight_levels(reduce_range: bool) -> int:
    """The weights' grid [-levels, levels]: 127, or 63 with `reduce_range` (7 bits in int8 storage, see
    `qat_config`)."""
    return 63 if reduce_range else WMAX


def convert(model, per_channel: bool = True, levels: int = WMAX):
    """Turns every Linear of `model` into a QATLinear in place (ranges [0, 0] until calibrated); returns it."""
    for m in linears(model).values():
        if type(m) is nnx.Linear:
            object.__setattr__(m, "__class__", QATLinear)
            m.qat_range = nnx.Param(jnp.zeros((2,), jnp.float32))
        m.qat_per_channel = bool(per_channel)
        m.qat_levels = int(levels)
        m.qat_observe = False
    return model


def is_qat(model) -> bool:
    return any(isinstance(m, QATLinear) for m in linears(model).values())


def _set_observe(model, on: bool) -> None:
    for m in linears(model).values():
        if isinstance(m, QATLinear):
            m.qat_observe = on


def calibrate(graphdef, params, batches, forward, momentum: float = 0.9):
    """Params with every `qat_range` set to the EMA (momentum) over `batches` of each Linear's input (min, max)
    in the float model. `forward(model, batch)` runs the model (no dropout)."""
    model = nnx.merge(graphdef, params)
    _set_observe(model, True)
    obs_def, obs_state = nnx.split(model)

    @jax.jit
    def stats(state, batch):
        _, found = nnx.capture(forward, nnx.Intermediate)(nnx.merge(obs_def, state), batch)
        return {"/".join(map(str, p[:-1])): jnp.stack([jnp.min(jnp.stack([t[0] for t in v.get_value()])),
                                                        jnp.max(jnp.stack([t[1] for t in v.get_value()]))])
                for p, v in nnx.to_flat_state(found)}

    ema = None
    for batch in batches:
        s = {k: np.asarray(v, np.float64) for k, v in stats(obs_state, batch).items()}
        ema = s if ema is None else {k: momentum * ema[k] + (1 - momentum) * s[k] for k in ema}
    if ema is None:
        raise ValueError("QAT calibration needs at least one batch")
    model = nnx.merge(graphdef, params)
    for path, m in linears(model).items():
        if path not in ema:
            raise ValueError(f"QAT calibration: Linear {path} saw no input")
        m.qat_range.set_value(jnp.asarray(ema[path], jnp.float32))
    return nnx.split(model)[1]


def ranges(model) -> dict[str, dict[str, Any]]:
    """{Linear path: {lo, hi, scale, zero_point}} of a QAT model (the grid its input is quantised to)."""
    out = {}
    for path, m in linears(model).items():
        if isinstance(m, QATLinear):
            lo, hi = (float(v) for v in np.asarray(m.qat_range[...], np.float32))
            scale, zp = act_qparams(jnp.float32(lo), jnp.float32(hi))
            out[path] = {"lo": lo, "hi": hi, "scale": float(np.float32(scale)), "zero_point": int(zp)}
    return out


def strip(model):
    """(a float copy of `model` without the QAT parts, {'ranges': {path: range record}, 'per_channel',
    'weight_levels'}); for a float model (model itself, None)."""
    if not is_qat(model):
        return model, None
    first = next(m for m in linears(model).values() if isinstance(m, QATLinear))
    info = {"ranges": ranges(model), "per_channel": first.qat_per_channel, "weight_levels": first.qat_levels}
    new = nnx.clone(model)
    for m in linears(new).values():
        if isinstance(m, QATLinear):
            del m.qat_range, m.qat_per_channel, m.qat_levels, m.qat_observe
            object.__setattr__(m, "__class__", nnx.Linear)
    return new, info


def write_ranges(path, model, settings: dict) -> None:
    """`qat_ranges.json`: the settings and each Linear's input range and int8 grid (written atomically)."""
    import os

    levels = weight_levels(settings.get("reduce_range", False))
    record = {"settings": settings, "weights": f"symmetric int8 [-{levels}, {levels}], "
              f"{'per output channel' if settings.get('weights', 'per_channel') == 'per_channel' else 'per tensor'}",
              "activations": "asymmetric int8 [-128, 127] per tensor: q = clip(round(x / scale) + zero_point)",
              "ranges": ranges(model)}
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(record, f, indent=1)
    os.replace(tmp, path)
