"""The int8 ONNX files other than dynamic (issue #11): weight-only, static (calibrated) and static from QAT ranges.

The dense layers of the exported graph are the MatMul / Gemm nodes whose weight is an initializer (transformers'
nn.Linear; the attention products and the embedding lookups are not dense layers and stay float, as in QAT). The
weight-only and static files also store the embedding tables int8 (`quantize_embeddings`: per row, scaled after the
lookup; the vocabulary table is most of a small student's file); the QAT file keeps them float, as its fake-quant
forward does:

- `weight_only`: each such weight becomes int8 (symmetric, per output channel: scale = max |W[:, c]| / 127) and a
  DequantizeLinear in front of the node; activations stay float (QDQ, written with the onnx API).
- `static_int8`: onnxruntime `quantize_static` in QDQ format on those nodes: int8 per-channel weights on a 7-bit
  grid (`reduce_range`, below), int8 activations (asymmetric, per tensor) with scales from MinMax calibration on
  `calibration_inputs` sequences.
- `qat_int8`: the same QDQ structure written with the onnx API from the ranges a QAT run learned
  (`mobiledistill.qat`): each dense node's input gets QuantizeLinear -> DequantizeLinear with that Linear's
  (scale, zero_point), its weight the grid the fake-quant forward used, so the file computes the QAT forward. The
  graph's nodes are matched to the model's Linears by their weights' values.

Why 7-bit weights where activations are int8 (`reduce_range`; QAT's default too): onnxruntime fuses the QDQ dense
nodes into MatMulIntegerToFloat, and on x86 CPUs without VNNI (AVX2) its u8 x s8 kernel adds pairs of products in
int16 with saturation. With weights on [-127, 127] this machine's (AVX2) file then disagreed with the QAT fake-quant
forward by as much as the fp32 model did (3.6 output steps on a random test model); on [-63, 63] it agrees to 1e-9
(and so it does with optimisations off, whatever the grid). Weight-only files run float MatMuls: full [-127, 127].
"""

from __future__ import annotations

import hashlib
import os

import numpy as np

from mobiledistill.export_write import INPUTS


class Int8Error(RuntimeError):
    """The graph's dense layers and the QAT model's Linears do not match."""


def dense_nodes(model) -> list[tuple]:
    """[(node, weight initializer, transposed)] for MatMul / Gemm nodes whose input B is an initializer;
    `transposed`: the weight is stored [out, in] (Gemm transB=1), else [in, out]."""
    inits = {t.name: t for t in model.graph.initializer}
    out = []
    for node in model.graph.node:
        if node.op_type in ("MatMul", "Gemm") and len(node.input) > 1 and node.input[1] in inits:
            trans = node.op_type == "Gemm" and any(a.name == "transB" and a.i == 1 for a in node.attribute)
            if inits[node.input[1]].dims and len(inits[node.input[1]].dims) == 2:
                out.append((node, inits[node.input[1]], trans))
    return out


def weight_grid(w: np.ndarray, per_channel: bool = True, levels: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(int8 q, float32 scale) of a kernel [in, out] on the symmetric grid [-levels, levels] (default
    `qat.WMAX`), as `qat.fake_quant_weight` computes it (float32, round half to even)."""
    from mobiledistill import qat

    import jax.numpy as jnp

    levels = qat.WMAX if levels is None else levels
    w = jnp.asarray(w, jnp.float32)
    scale = qat.weight_scale(w, per_channel, levels)  # XLA's division (NumPy's can differ by an ulp)
    q = jnp.clip(jnp.round(w / scale), -levels, levels)
    return np.asarray(q).astype(np.int8), np.asarray(scale, np.float32)


def _kernel(init, transposed: bool) -> np.ndarray:
    from onnx import numpy_helper
    w = numpy_helper.to_array(init).astype(np.float32)
    return np.ascontiguousarray(w.T if transposed else w)


def _digest(kernel: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(kernel, np.float32).tobytes()).hexdigest()


def write_qdq(fp32_path: str, out_path: str, per_channel: bool = True, activations: dict | None = None,
              levels: int | None = None) -> int:
    """Writes `out_path`: every dense node's weight int8 + DequantizeLinear; with `activations` ({node name:
    (scale, zero_point)}) its input also QuantizeLinear -> DequantizeLinear (nodes not named stay float-input).
    Returns the number of dense nodes."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(fp32_path)
    nodes = dense_nodes(model)
    graph = model.graph
    drop, new_inits, order = set(), [], []
    for node, init, trans in nodes:
        q, scale = weight_grid(_kernel(init, trans), per_channel, levels)
        base = node.name or f"{node.op_type}_{node.output[0]}"
        if trans:
            q = np.ascontiguousarray(q.T)
        names = (f"{base}.w_q", f"{base}.w_scale", f"{base}.w_zp", f"{base}.w_dq")
        new_inits += [numpy_helper.from_array(q, names[0]), numpy_helper.from_array(scale, names[1]),
                      numpy_helper.from_array(np.zeros(scale.shape, np.int8), names[2])]
        axis = [] if scale.ndim == 0 else [helper.make_attribute("axis", 0 if trans else 1)]
        dq = helper.make_node("DequantizeLinear", list(names[:3]), [names[3]], name=f"{base}.w_DequantizeLinear")
        dq.attribute.extend(axis)
        order.append((node, dq))
        drop.add(init.name)
        node.input[1] = names[3]
        if activations is not None and node.name in activations:
            a_scale, a_zp = activations[node.name]
            an = (f"{base}.x_scale", f"{base}.x_zp", f"{base}.x_q", f"{base}.x_dq")
            new_inits += [numpy_helper.from_array(np.asarray(a_scale, np.float32), an[0]),
                          numpy_helper.from_array(np.asarray(a_zp, np.int8), an[1])]
            order.append((node, helper.make_node("QuantizeLinear", [node.input[0], an[0], an[1]], [an[2]],
                                                 name=f"{base}.x_QuantizeLinear")))
            order.append((node, helper.make_node("DequantizeLinear", [an[2], an[0], an[1]], [an[3]],
                                                 name=f"{base}.x_DequantizeLinear")))
            node.input[0] = an[3]
    still_used = {i for n in graph.node for i in n.input}
    before = {}
    for node, extra in order:
        before.setdefault(id(node), []).append(extra)
    _save_rewritten(model, out_path, [t for t in graph.initializer if t.name not in drop or t.name in still_used],
                    new_inits, before=before)
    return len(nodes)


def _save_rewritten(model, path: str, kept_inits: list, new_inits: list, before: dict | None = None,
                    after: dict | None = None) -> None:
    """Gives `model` the initializers `kept_inits + new_inits` and splices in new nodes ({id(node): [nodes]} to put
    before / after it), then checks and saves it as one file."""
    import onnx

    graph = model.graph
    del graph.initializer[:]
    graph.initializer.extend(kept_inits + new_inits)
    ordered = []
    for n in graph.node:
        ordered += (before or {}).get(id(n), []) + [n] + (after or {}).get(id(n), [])
    del graph.node[:]
    graph.node.extend(ordered)
    onnx.checker.check_model(model)
    onnx.save_model(model, path, save_as_external_data=False)


def embedding_tables(model) -> dict[str, list]:
    """{initializer name: [Gather nodes]} for the float 2-D tables that only Gather nodes (axis 0) read: the word,
    position and token-type embeddings (a table also read otherwise, e.g. a tied decoder, is left out)."""
    inits = {t.name: t for t in model.graph.initializer
             if len(t.dims) == 2 and t.data_type == 1}  # FLOAT
    readers: dict[str, list] = {}
    for node in model.graph.node:
        for i, name in enumerate(node.input):
            if name in inits:
                readers.setdefault(name, []).append((node, i))
    return {name: [n for n, _ in r] for name, r in readers.items()
            if all(n.op_type == "Gather" and i == 0 and all(a.i == 0 for a in n.attribute if a.name == "axis")
                   for n, i in r)}


def quantize_embeddings(path: str) -> dict:
    """Rewrites `path` in place with int8 embedding tables (`embedding_tables`): symmetric per row (scale = max |row|
    / 127), looked up as int8 and scaled after the lookup (Gather q, Gather scale -> Cast -> Mul), so no table is
    dequantised whole at run time. The vocabulary table is most of a small student's file, and the QDQ dense-layer
    quantisation leaves it float. Returns the export.json record."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(path)
    graph = model.graph
    tables = embedding_tables(model)
    inits = {t.name: t for t in graph.initializer}
    new_inits, after = [], {}
    rows = 0
    for name, gathers in tables.items():
        w = numpy_helper.to_array(inits[name]).astype(np.float32)
        scale = np.max(np.abs(w), axis=1, keepdims=True) / 127.0
        scale[scale == 0] = 1.0
        q = np.clip(np.round(w / scale), -127, 127).astype(np.int8)
        rows += w.shape[0]
        new_inits += [numpy_helper.from_array(q, f"{name}.q"), numpy_helper.from_array(scale.astype(np.float32),
                                                                                       f"{name}.s")]
        for k, g in enumerate(gathers):
            base, out = f"{name}.{k}", g.output[0]
            after[id(g)] = [
                helper.make_node("Gather", [f"{name}.s", g.input[1]], [f"{base}.gs"], name=f"{base}.GatherScale"),
                helper.make_node("Cast", [f"{base}.gq"], [f"{base}.gf"], to=onnx.TensorProto.FLOAT,
                                 name=f"{base}.Cast"),
                helper.make_node("Mul", [f"{base}.gf", f"{base}.gs"], [out], name=f"{base}.Scale")]
            g.input[0], g.output[0] = f"{name}.q", f"{base}.gq"
    del graph.value_info[:]  # shapes of renamed outputs would be stale
    _save_rewritten(model, path, [t for t in graph.initializer if t.name not in tables], new_inits, after=after)
    return {"tables": sorted(tables), "rows": rows, "scheme": "int8 symmetric per row, scaled after the lookup"}


def weight_only(fp32_path: str, out_path: str) -> dict:
    n = write_qdq(fp32_path, out_path, per_channel=True)
    return {"dense_nodes": n, "weights": "int8 symmetric per output channel", "activations": "float",
            "embeddings": quantize_embeddings(out_path)}


class _Reader:
    """onnxruntime CalibrationDataReader over (ids, mask, types) batches."""

    def __init__(self, batches):
        self._it = iter([{k: np.asarray(a, np.int64) for k, a in zip(INPUTS, b)} for b in batches])

    def get_next(self):
        return next(self._it, None)


def static_int8(fp32_path: str, out_path: str, scratch: str, batches) -> dict:
    """onnxruntime `quantize_static` (QDQ, MinMax) of the dense nodes, calibrated on `batches`."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    pre = os.path.join(scratch, "model.static.pre.onnx")
    quant_pre_process(fp32_path, pre, skip_symbolic_shape=True)
    names = [n.name for n, _, _ in dense_nodes(onnx.load(pre))]
    quantize_static(pre, out_path, _Reader(batches), quant_format=QuantFormat.QDQ, op_types_to_quantize=[
        "MatMul", "Gemm"], per_channel=True, activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
        nodes_to_quantize=names, calibrate_method=CalibrationMethod.MinMax, reduce_range=True,
        extra_options={"WeightSymmetric": True, "ActivationSymmetric": False})
    return {"dense_nodes": len(names), "weights": "int8 storage, 7-bit symmetric grid (reduce_range) per output "
            "channel",
            "activations": "int8 asymmetric per tensor, onnxruntime MinMax calibration",
            "calibration_sequences": int(sum(len(b[0]) for b in batches)),
            "embeddings": quantize_embeddings(out_path)}


def qat_int8(fp32_path: str, out_path: str, float_model, info: dict) -> dict:
    """The static int8 file whose grids are the QAT run's (`info`: `qat.strip`'s): activations from
    info['ranges'] ({Linear path: {scale, zero_point}}), weights as the fake-quant forward rounds them. Raises
    Int8Error if a dense node of the graph has no Linear of the model with the same weights (or two Linears with
    different ranges share them)."""
    import onnx

    from mobiledistill import qat

    by_digest: dict[str, set] = {}
    for path, m in qat.linears(float_model).items():
        r = info["ranges"][path]
        by_digest.setdefault(_digest(np.asarray(m.kernel[...], np.float32)), set()).add(
            (r["scale"], r["zero_point"]))
    acts = {}
    for node, init, trans in dense_nodes(onnx.load(fp32_path)):
        found = by_digest.get(_digest(_kernel(init, trans)))
        if not found or len(found) > 1:
            raise Int8Error(f"dense node {node.name} of the ONNX graph matches {len(found or ())} of the QAT "
                            f"model's Linears by its weights (needs exactly 1)")
        acts[node.name] = next(iter(found))
    levels = info["weight_levels"]
    n = write_qdq(fp32_path, out_path, per_channel=info["per_channel"], activations=acts, levels=levels)
    return {"dense_nodes": n, "weights": f"int8 symmetric [-{levels}, {levels}] "
            f"{'per output channel' if info['per_channel'] else 'per tensor'} (the QAT grid)",
            "activations": "int8 asymmetric per tensor, the QAT run's ranges"}


# ---------------------------------------------------------------------------------------------------------------
# The export's int8 files (called by mobiledistill.export)

MODES = {"weight_only": "int8_weight_only", "int8": "int8_static"}  # --quantize -> the file's verify label


def calibration_batches(src, calibration: int, seq_len: int):
    """`calibration` [CLS] ... [SEP] sequences of random tokens, as batches of int64 (ids, mask, types)."""
    from mobiledistill import quantize
    from mobiledistill.data import load_tokenizer

    tok = load_tokenizer(src.tokenizer)
    return quantize.calibration_inputs(src.model.encoder.cfg, calibration, seq_len, cls_id=tok.cls_id,
                                       sep_id=tok.sep_id)


def write(src, quantize: str, fp32_path: str, int8_path: str, scratch: str, seq_len: int, calibration: int,
          equalized=None) -> tuple[str, dict, dict | None]:
    """Writes `int8_path` for --quantize=weight_only | int8 from the fp32 file; returns (its format line, the
    export.json `int8` record, the equalisation record or None). int8: from the QAT ranges when the source is a QAT
    run (`src.qat`), else calibrated by onnxruntime on `calibration` sequences, of the residual-equalised model
    when `equalized` (`export_write.equalized_model`'s (model, record)) is given."""
    if quantize == "weight_only":
        return "ONNX QDQ, int8 weights (per channel), float activations", {"mode": quantize, **weight_only(
            fp32_path, int8_path)}, None
    if src.qat is not None:
        rec = qat_int8(fp32_path, int8_path, src.model, src.qat)
        return "ONNX QDQ static int8, the QAT run's ranges", {"mode": quantize, "ranges": "qat", **rec}, None
    from mobiledistill.export_write import equalized_onnx

    model, equalization = equalized or (None, None)
    source = fp32_path if model is None else equalized_onnx(src, model, scratch, seq_len)
    rec = static_int8(source, int8_path, scratch, calibration_batches(src, calibration, seq_len))
    fmt = "ONNX QDQ static int8 (onnxruntime calibration)"
    if model is not None:
        fmt += "; residual-equalised, last_hidden_state = h / s"
    return fmt, {"mode": quantize, "ranges": "calibration", **rec}, equalization


def plain_static(src, fp32_path: str, scratch: str, seq_len: int, calibration: int) -> str:
    """The static int8 file without equalisation (for comparison; in `scratch`)."""
    path = os.path.join(scratch, "model.int8.plain.onnx")
    static_int8(fp32_path, path, scratch, calibration_batches(src, calibration, seq_len))
    return path


def qat_check(src, int8_path: str, inputs) -> dict:
    """The QAT int8 file against the JAX fake-quant forward of the run (what it must compute): per output the max
    |file - JAX| in units of that output's quantisation step (its range / 255), and the argmax agreement."""
    import dataclasses

    from mobiledistill.export_verify import jax_outputs, onnx_file_errors, onnx_outputs, _ort_session

    ids, mask, types = inputs
    qsrc = dataclasses.replace(src, model=src.qat["model"])
    ref = jax_outputs(qsrc, ids, mask, types)
    got = onnx_outputs(_ort_session(int8_path), ids, mask, types)
    steps = {}
    for name, r in ref.items():
        real = mask.astype(bool)
        g, r = (got[name][real], r[real]) if r.ndim >= 2 and r.shape[:2] == mask.shape else (got[name], r)
        step = max(float(np.max(r) - np.min(r)) / 255, 1e-30)
        steps[name] = float(np.max(np.abs(np.asarray(g, np.float64) - r)) / step)
    errors = onnx_file_errors(qsrc, int8_path, ref, inputs)
    return {"reference": "the JAX fake-quant forward of the QAT run", "max_err_in_output_steps": steps,
            "max_rel_err": errors["max_rel_err"], "outputs": errors["outputs"]}
