"""LiteRT (TFLite) files of an export (SPEC §13): the JAX model -> `jax2tf` -> SavedModel -> `TFLiteConverter`.

The model's inference function (task outputs plus `last_hidden_state`, the ONNX file's outputs) is made a pure
function of its parameters (nnx.split), converted by `jax.experimental.jax2tf.convert` (native StableHLO
serialisation, the only kind JAX 0.10 has; no gradient, so the custom_vjp of the int8 matmul never matters) and
wrapped in a `tf.function` with a fixed input signature: int32 input_ids / attention_mask / token_type_ids of shape
[1, L]. The parameters are tf.Variables of a tf.Module saved with that signature, so the file carries a
`serving_default` signature whose input and output names are the ONNX file's. Fixed shapes because a polymorphic
batch does not reach TFLite builtins (`vhlo.dynamic_gather_v1` is not legalised, TF 2.21); callers feed rows one
at a time. Only TFLite builtin ops are used: the files run in the plain `ai-edge-litert` interpreter.

tensorflow is imported here only, and this module only when a tflite file is written or read.
"""

from __future__ import annotations

import os
import warnings

import numpy as np

from mobiledistill.export_write import HIDDEN, INPUTS, OUTPUTS

SIGNATURE = "serving_default"
INT8 = "int8_dynamic"  # the precision label of the dynamic-range int8 file (as for ONNX)
MODES = {"dynamic": INT8, "int8": "int8_static"}  # --quantize -> the precision label of model.int8.tflite


def _tf():
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # no C++ start-up chatter on stderr
    import tensorflow as tf
    return tf


def _saved_model(model, kind: str, seq_len: int, directory: str) -> str:
    """The model as a SavedModel with one fixed-shape [1, seq_len] int32 signature; returns its directory."""
    import jax
    from flax import nnx
    from jax.experimental import jax2tf

    tf = _tf()
    names = OUTPUTS[kind] + (HIDDEN,)
    graphdef, state = nnx.split(model)
    leaves, treedef = jax.tree.flatten(state)

    def forward(params, ids, mask, types):
        out = nnx.merge(graphdef, jax.tree.unflatten(treedef, params))(ids, types, mask)
        return tuple(out[:-1]) + (out[-1].sequence_output,)

    converted = jax2tf.convert(forward, with_gradient=False)
    module = tf.Module()
    module.params = [tf.Variable(np.asarray(x), trainable=False, name=f"p{i}") for i, x in enumerate(leaves)]

    @tf.function(input_signature=[tf.TensorSpec([1, seq_len], tf.int32, name=n) for n in INPUTS], autograph=False)
    def serve(input_ids, attention_mask, token_type_ids):
        return dict(zip(names, converted(module.params, input_ids, attention_mask, token_type_ids)))

    module.serve = serve
    tf.saved_model.save(module, directory, signatures={SIGNATURE: serve.get_concrete_function()})
    return directory


def _convert(saved: str, quantize: str = "none", calibration=None) -> bytes:
    """The converter on `saved`: quantize "none" (fp32), "dynamic" (dynamic-range: int8 weights per channel,
    activations quantised at run time) or "int8" (full-integer: int8 weights per channel and int8 activations per
    tensor, their ranges calibrated by the converter on `calibration`, batches of (ids, mask, types) rows fed one at a
    time; inputs stay int32 and outputs float)."""
    tf = _tf()
    converter = tf.lite.TFLiteConverter.from_saved_model(saved, signature_keys=[SIGNATURE])
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]  # what plain LiteRT runs (no Flex)
    if quantize != "none":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if quantize == "int8":
        def rows():
            for batch in calibration:
                for i in range(len(batch[0])):
                    yield {k: np.asarray(a[i:i + 1], np.int32) for k, a in zip(INPUTS, batch)}

        converter.representative_dataset = rows
    with warnings.catch_warnings():  # the converter's calibrator still uses the deprecated tf.lite.Interpreter
        warnings.filterwarnings("ignore", message=".*tf.lite.Interpreter is deprecated")
        return converter.convert()


def write_tflite(model, kind: str, seq_len: int, scratch: str, fp32_path: str | None = None,
                 int8_path: str | None = None, int8_model=None, quantize: str = "dynamic",
                 calibration=None) -> None:
    """Writes the fp32 file of `model` and/or the int8 file (`quantize` "dynamic" or "int8", see `_convert`;
    `calibration`: the int8 ranges' batches) of `int8_model` (default `model`; the residual-equalised copy for NoNorm
    models), each with a [1, seq_len] `serving_default` signature."""
    saved = _saved_model(model, kind, seq_len, os.path.join(scratch, "saved_model"))
    if fp32_path:
        with open(fp32_path, "wb") as f:
            f.write(_convert(saved))
    if int8_path:
        if int8_model is not None and int8_model is not model:
            saved = _saved_model(int8_model, kind, seq_len, os.path.join(scratch, "saved_model_int8"))
        with open(int8_path, "wb") as f:
            f.write(_convert(saved, quantize, calibration))


def signature_runner(path: str, threads: int | None = None):
    """The file's `serving_default` in the ai-edge-litert interpreter (all CPUs of this process by default)."""
    from ai_edge_litert.interpreter import Interpreter

    threads = threads or len(os.sched_getaffinity(0))
    return Interpreter(model_path=path, num_threads=threads).get_signature_runner(SIGNATURE)


def seq_len_of(runner) -> int:
    return int(runner.get_input_details()["input_ids"]["shape"][1])


def tflite_outputs(path: str, ids, mask, types, names=None, runner=None) -> dict[str, np.ndarray]:
    """The file's outputs on a batch, fed one row at a time (its inputs are [1, L]); `names` selects outputs."""
    runner = runner or signature_runner(path)
    rows: dict[str, list] = {}
    for i in range(len(ids)):
        out = runner(**{k: np.asarray(a[i:i + 1], np.int32) for k, a in zip(INPUTS, (ids, mask, types))})
        for k, v in out.items():
            if names is None or k in names:
                rows.setdefault(k, []).append(np.array(v))
    return {k: np.concatenate(v) for k, v in rows.items()}


def versions() -> dict:
    import ai_edge_litert

    return {"tensorflow": _tf().__version__, "ai_edge_litert": getattr(ai_edge_litert, "__version__", "?")}
