"""Checking an export: each written file in its own runtime against the JAX model, and latency at batch 1."""

from __future__ import annotations

import os
import time

import numpy as np

from mobiledistill.export_source import Source
from mobiledistill.export_write import HIDDEN, OUTPUTS, load_transformers, random_inputs

FP32_TOL = 1e-4


class VerifyError(RuntimeError):
    """A written fp32 file does not compute what the JAX model computes."""


def jax_outputs(src: Source, ids, mask, types) -> dict[str, np.ndarray]:
    """The JAX model's outputs under the ONNX output names (the serving forward, `mobiledistill.inference`)."""
    from mobiledistill.inference import Predictor

    values = Predictor(src.model, hidden=True)(ids, mask, types)
    return {n: np.asarray(v, np.float32) for n, v in zip(OUTPUTS[src.kind] + (HIDDEN,), values)}


def _valid(name: str, value: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Real-token rows of a per-token output ([N, C], or [N] for span logits); others unchanged."""
    return value[mask.astype(bool)] if value.ndim >= 2 and value.shape[:2] == mask.shape else value


def rel_err(ours: np.ndarray, ref: np.ndarray) -> float:
    """max |ours - ref| / max |ref|."""
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.max(np.abs(ours - ref)) / max(float(np.max(np.abs(ref))), 1e-30))


def channel_errors(ours: np.ndarray, ref: np.ndarray) -> dict:
    """Error of each feature channel (last axis) relative to that channel's own range: the number that shows
    int8 rounding ordinary channels away when a few outlier channels set the scale."""
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    ours, ref = ours.reshape(-1, ref.shape[-1]) if ref.ndim > 1 else ours[:, None], \
        ref.reshape(-1, ref.shape[-1]) if ref.ndim > 1 else ref[:, None]
    scale = np.maximum(np.max(np.abs(ref), axis=0), 1e-30)
    err = np.max(np.abs(ours - ref), axis=0) / scale
    worst = int(np.argmax(err))
    return {"channels": int(err.size), "max": float(err[worst]), "median": float(np.median(err)),
            "over_10pct": int(np.sum(err > 0.1)), "worst_channel": worst, "worst_channel_range": float(scale[worst]),
            "largest_channel_range": float(np.max(scale)), "median_channel_range": float(np.median(scale))}


def agreement(kind: str, name: str, ours: np.ndarray, ref: np.ndarray, mask: np.ndarray) -> float | None:
    """Fraction of equal argmax predictions (None for regression, which has no argmax)."""
    if name == HIDDEN or (kind != "span" and ref.shape[-1] == 1):
        return None
    if kind == "span":  # argmax over the real tokens of each row
        neg = np.where(mask.astype(bool), 0.0, -np.inf)
        return float(np.mean(np.argmax(ours + neg, 1) == np.argmax(ref + neg, 1)))
    return float(np.mean(np.argmax(_valid(name, ours, mask), -1) == np.argmax(_valid(name, ref, mask), -1)))


def compare(kind: str, got: dict, ref: dict, mask: np.ndarray) -> dict:
    out = {}
    for name, r in ref.items():
        g, rv = _valid(name, got[name], mask), _valid(name, r, mask)
        out[name] = {"rel_err": rel_err(g, rv), "per_channel": channel_errors(g, rv),
                     "argmax_agreement": agreement(kind, name, got[name], r, mask)}
    return out


def transformers_outputs(src: Source, hf_dir: str, ids, mask, types) -> dict[str, np.ndarray]:
    import torch

    model = load_transformers(src, hf_dir)
    with torch.no_grad():
        out = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), token_type_ids=torch.tensor(types),
                    output_hidden_states=True)
    values = {n: getattr(out, n).numpy() for n in OUTPUTS[src.kind]}
    values[HIDDEN] = out.hidden_states[-1].numpy()
    return values


def _ort_session(path: str):
    import onnxruntime as ort
    return ort.InferenceSession(path, providers=["CPUExecutionProvider"])


def onnx_outputs(session, ids, mask, types) -> dict[str, np.ndarray]:
    values = session.run(None, {"input_ids": ids, "attention_mask": mask, "token_type_ids": types})
    return {o.name: v for o, v in zip(session.get_outputs(), values)}


def _median_ms(fn, repeats: int) -> float:
    fn()  # warm-up (compilation, allocation)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times) * 1e3)


def latency(src: Source, hf_dir: str, onnx_files: dict[str, str], seq_len: int, repeats: int,
            tflite_files: dict[str, str] | None = None) -> dict[str, float]:
    """Median ms of one forward at batch 1 x seq_len in each runtime (same machine, same run: compare ratios)."""
    import jax
    import torch

    from mobiledistill.inference import Predictor

    ids, mask, types = random_inputs(src.model.encoder.cfg, 1, seq_len, seed=2)
    predict = Predictor(src.model)  # the serving forward: layers unrolled, parameters flattened once
    out = {"jax_jit_fp32": _median_ms(lambda: jax.block_until_ready(predict(ids, mask, types)), repeats)}
    model = load_transformers(src, hf_dir)
    t = [torch.tensor(a) for a in (ids, mask, types)]
    with torch.no_grad():
        out["pytorch_eager_fp32"] = _median_ms(lambda: model(input_ids=t[0], attention_mask=t[1],
                                                             token_type_ids=t[2]), repeats)
    for label, path in onnx_files.items():
        session = _ort_session(path)
        out[f"onnxruntime_{label}"] = _median_ms(lambda: onnx_outputs(session, ids, mask, types), repeats)
    for label, path in (tflite_files or {}).items():
        from mobiledistill import export_tflite
        runner = export_tflite.signature_runner(path)
        feed = {"input_ids": ids.astype(np.int32), "attention_mask": mask.astype(np.int32),
                "token_type_ids": types.astype(np.int32)}
        out[f"litert_{label}"] = _median_ms(lambda: runner(**feed), repeats)
    return out


def machine() -> dict:
    """What the latencies depend on: on a loaded machine PyTorch's spinning threads suffer most."""
    import torch
    return {"cpus": len(os.sched_getaffinity(0)), "load_average_1min": round(os.getloadavg()[0], 2),
            "torch_threads": torch.get_num_threads()}


def verify_inputs(src: Source, seq_len: int, batch: int = 8):
    """The held-out (ids, mask, types) every file is compared on."""
    return random_inputs(src.model.encoder.cfg, batch, seq_len)


def onnx_file_errors(src: Source, path: str, ref: dict, inputs, hidden_scale=None) -> dict:
    """An ONNX file against the JAX outputs `ref` on `inputs`; a residual-equalised file's `last_hidden_state`
    (h / s) is multiplied by `hidden_scale` (s) first, so errors are in the original basis."""
    ids, mask, types = inputs
    got = onnx_outputs(_ort_session(path), ids, mask, types)
    if hidden_scale is not None:
        got[HIDDEN] = got[HIDDEN] * np.asarray(hidden_scale, np.float32)
    return _summary(compare(src.kind, got, ref, mask))


def verify(src: Source, hf_dir: str, onnx_files: dict[str, str], seq_len: int, hf_written: bool = True,
           batch: int = 8, repeats: int = 10, hidden_scales: dict | None = None,
           tflite_files: dict[str, str] | None = None) -> dict:
    """Each written file in its own runtime against the JAX model; raises VerifyError when an fp32 file is off.

    `hidden_scales` ({label: s}) names the ONNX / LiteRT files whose `last_hidden_state` is residual-equalised
    (h / s).
    LiteRT files ({label: path}) take [1, seq_len] inputs and are fed the verify rows one at a time.
    The PyTorch eager latency baseline uses the transformers model even when only ONNX was asked for."""
    ids, mask, types = inputs = verify_inputs(src, seq_len, batch)
    ref = jax_outputs(src, ids, mask, types)
    results = {"inputs": f"{batch} random token sequences x {seq_len} (rows 2.. padded), two segments", "files": {}}
    if hf_written:
        results["files"]["hf"] = {"runtime": "transformers (PyTorch eager)", "precision": "fp32", **_summary(
            compare(src.kind, transformers_outputs(src, hf_dir, ids, mask, types), ref, mask))}
    for label, path in onnx_files.items():
        scale = (hidden_scales or {}).get(label)
        results["files"][os.path.basename(path)] = {"runtime": "onnxruntime", "precision": label,
                                                    **onnx_file_errors(src, path, ref, inputs, scale)}
    for label, path in (tflite_files or {}).items():
        from mobiledistill.export_tflite import tflite_outputs
        got = tflite_outputs(path, ids, mask, types)
        if (hidden_scales or {}).get(label) is not None:
            got[HIDDEN] = got[HIDDEN] * np.asarray(hidden_scales[label], np.float32)
        results["files"][os.path.basename(path)] = {"runtime": "LiteRT (ai-edge-litert)", "precision": label,
                                                    **_summary(compare(src.kind, got, ref, mask))}
    for name, r in results["files"].items():
        if r["precision"] == "fp32" and r["max_rel_err"] > FP32_TOL:
            raise VerifyError(f"{name}: max relative error {r['max_rel_err']:.3g} vs the JAX model exceeds "
                              f"{FP32_TOL:g} (output {r['worst_output']})")
    results["latency_ms_batch1"] = latency(src, hf_dir, onnx_files, seq_len, repeats, tflite_files)
    results["machine"] = machine()
    return results


def _summary(per_output: dict) -> dict:
    worst = max(per_output, key=lambda n: per_output[n]["rel_err"])
    return {"max_rel_err": per_output[worst]["rel_err"], "worst_output": worst, "outputs": per_output}
