"""Quantisation-aware fine-tuning (`c.qat`; the fake quantisation itself is `mobiledistill.qat`).

A config opts in with a `qat` section (absent from plain configs, like Pea-KD's `ptp`):

    c.qat = qat_config()          # enabled=True
    c.init = 'finetune:<workdir>[/seed_<s>]'   # usually: start from a fine-tuned run (encoder and head), or in a
                                               # recipe `init_from='<finetune stage>'`

Each seed then converts its task model's Linears to fake-quant ones, calibrates every input range on
`calibration_batches` training batches (EMA of min / max, momentum `ema_momentum`), and fine-tunes as usual: the
ranges stay fixed (`range='ema'`) or are trained with LSQ gradients at `range_lr_scale` x the learning rate
(`range='learned'`). The ranges are parameters of the checkpoint (`.../qat_range`) and are also written, with their
int8 grids, to `seed_<s>/qat_ranges.json`; `python -m mobiledistill.export --quantize=int8` writes them into the
static-int8 ONNX file. model.json records the settings, so every reader of the run (export, teachers, mode='eval')
rebuilds the fake-quant model.
"""

from __future__ import annotations

import ml_collections

from mobiledistill import qat
from mobiledistill.config import ConfigError


def qat_config() -> ml_collections.ConfigDict:
    q = ml_collections.ConfigDict()
    q.enabled = True
    q.bits = 8  # the exported file is int8
    q.weights = "per_channel"  # symmetric, per output channel | 'per_tensor'
    q.activations = "per_tensor"  # asymmetric, one range per dense-layer input
    q.range = "ema"  # 'ema': calibrated then fixed | 'learned': trained (LSQ gradients) from the calibration
    q.ema_momentum = 0.9
    q.calibration_batches = 8  # training batches of the float model the ranges are calibrated on
    q.range_lr_scale = 100.0  # range='learned': the ranges' learning rate = this x train.lr
    # Weights on [-63, 63] (7 bits in int8), as onnxruntime's reduce_range: x86 without VNNI adds pairs of int8
    # products in int16 with saturation, and the int8 file then no longer computes the fake-quant forward.
    q.reduce_range = True
    return q


def enabled(c) -> bool:
    q = c.get("qat")
    return q is not None and bool(q.get("enabled", False))


def settings(c) -> dict:
    return {k: v for k, v in c.qat.to_dict().items()}


def check(c) -> None:
    """One-line ConfigErrors for a bad `qat` section (called by `validate` when the section exists)."""
    q = c.qat
    if not isinstance(q.get("enabled"), bool):
        raise ConfigError(f"qat.enabled={q.get('enabled')!r}; valid: True, False")
    if not q.enabled:
        return
    if q.get("bits") != 8:
        raise ConfigError(f"qat.bits={q.get('bits')!r}; valid: 8 (the exported ONNX file is int8)")
    if q.get("weights") not in ("per_channel", "per_tensor"):
        raise ConfigError(f"qat.weights={q.get('weights')!r}; valid: 'per_channel', 'per_tensor'")
    if q.get("activations") != "per_tensor":
        raise ConfigError(f"qat.activations={q.get('activations')!r}; valid: 'per_tensor' (per-token scales are "
                          f"computed at run time: that is --quantize=dynamic, no training needed)")
    if q.get("range") not in ("ema", "learned"):
        raise ConfigError(f"qat.range={q.get('range')!r}; valid: 'ema', 'learned'")
    if not 0.0 <= float(q.get("ema_momentum", -1)) < 1.0:
        raise ConfigError(f"qat.ema_momentum={q.get('ema_momentum')!r}; valid: 0 <= m < 1")
    if int(q.get("calibration_batches", 0)) < 1:
        raise ConfigError(f"qat.calibration_batches={q.get('calibration_batches')!r}; valid: >= 1")
    if float(q.get("range_lr_scale", -1)) < 0:
        raise ConfigError(f"qat.range_lr_scale={q.get('range_lr_scale')!r}; valid: >= 0")
    if not isinstance(q.get("reduce_range"), bool):
        raise ConfigError(f"qat.reduce_range={q.get('reduce_range')!r}; valid: True, False")
    if c.model.dtype != "float32":
        raise ConfigError(f"qat needs model.dtype='float32' (the int8 grids are float32 arithmetic), not "
                          f"{c.model.dtype!r}")


def check_model(cfg) -> None:
    """Refuses encoder configs whose layers run inside lax.scan / remat (calibration reads each layer's inputs)."""
    if cfg.scan_layers or cfg.remat != "none":
        raise ConfigError("qat: the encoder runs its layers in lax.scan / remat (model.scan_layers, model.remat); "
                          "turn them off for QAT")


def convert(model, s: dict):
    """`model` with fake-quant Linears for the settings `s` (in place)."""
    return qat.convert(model, s.get("weights", "per_channel") == "per_channel", qat.weight_levels(
        bool(s.get("reduce_range", False))))


def lr_rules(c) -> tuple:
    """The optimizer's learning-rate rules for the ranges: frozen ('ema') or range_lr_scale ('learned')."""
    return ((qat.RANGE, 0.0 if c.qat.range == "ema" else float(c.qat.range_lr_scale)),)


def start(c, graphdef, params, train_arrays: dict):
    """(graphdef, params) of the fake-quant task model from the float one: Linears converted, ranges calibrated
    on the first `calibration_batches` batches of the training arrays (no dropout)."""
    import jax.numpy as jnp
    from flax import nnx

    from mobiledistill.steps import forward

    model = convert(nnx.merge(graphdef, params), settings(c))
    graphdef, params = nnx.split(model)
    n, b = len(train_arrays["input_ids"]), c.train.batch
    keys = ("input_ids", "attention_mask", "token_type_ids")
    batches = [{k: jnp.asarray(train_arrays[k][i:i + b]) for k in keys if k in train_arrays}
               for i in range(0, min(n, b * int(c.qat.calibration_batches)), b)]
    params = qat.calibrate(graphdef, params, batches, lambda m, batch: forward(m, batch),
                           float(c.qat.ema_momentum))
    return graphdef, params


def write_ranges(c, run_dir, graphdef, params) -> None:
    from flax import nnx

    qat.write_ranges(str(run_dir / qat.RANGES_FILE), nnx.merge(graphdef, params), settings(c))
