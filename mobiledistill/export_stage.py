"""The export stage of a recipe (mobiledistill.engine): a finished model -> deployable files, and the labelled dev
accuracy of every file next to the JAX model's, on the same rows.

    c.kind = 'export'; c.formats = 'hf,onnx' (a subset of hf,onnx,tflite); c.quantize = 'none' | 'dynamic';
    c.seq_len (0 = the fine-tuned source's sequence length, else min(128, max positions); the LiteRT files take
    exactly that many tokens); c.verify; c.repeats (timed runs per runtime);
    c.eval_rows (dev rows scored per file, 0 = all);
    c.equalize (True: the int8 file of a NoNorm model is residual-equalised, as the CLI's default; False: never);
    c.calibration (sequences the equalisation scales are calibrated on)

The files are written by `mobiledistill.export` into a temporary sibling and renamed into place (a killed export
leaves nothing half-written); `stage.json` (sizes, latency, accuracies) marks the stage finished.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time

import ml_collections
import numpy as np
from etils import epath

from mobiledistill import checkpoint as ckpt
from mobiledistill import export
from mobiledistill.errors import ConfigError

DONE = "stage.json"


def export_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.kind = "export"
    c.source = ""  # written by the engine from the section's init_from
    c.formats = "hf,onnx"
    c.quantize = "dynamic"
    c.seq_len = 0
    c.verify = True
    c.repeats = 10
    c.eval_rows = 0
    c.eval_batch = 32
    c.equalize = True  # where it is exact (NoNorm) and there is an int8 file; see mobiledistill.quantize
    c.calibration = export.CALIBRATION
    return c


def finished(directory: epath.Path) -> dict | None:
    try:
        return json.loads((epath.Path(directory) / DONE).read_text())
    except (OSError, ValueError):
        return None


def check(c, source=None) -> list[str]:
    """The section's formats after checking them, the quantisation and the runtimes they need (before any stage
    of the recipe runs: a missing package is named up front, not after hours of training). `source`: the recipe
    stage the export reads (its `init_from`), whose model settings may rule a format out."""
    formats = [f.strip() for f in str(c.formats).split(",") if f.strip()]
    bad = [f for f in formats if f not in export.FORMATS]
    if bad or not formats:
        raise ConfigError(f"formats={c.formats!r}; valid: comma-separated {', '.join(export.FORMATS)}")
    if c.quantize not in export.QUANTIZE:
        raise ConfigError(f"quantize={c.quantize!r}; valid: {', '.join(export.QUANTIZE)}")
    if c.quantize != "none" and not {"onnx", "tflite"} & set(formats):
        raise ConfigError(f"quantize={c.quantize!r} quantises the ONNX / LiteRT files: add onnx or tflite to formats")
    if c.quantize == "weight_only" and "onnx" not in formats:
        raise ConfigError("quantize='weight_only' writes model.int8.onnx only (LiteRT's converter has no weight-only "
                          "int8): add onnx to formats")
    if not isinstance(c.get("equalize", True), bool):
        raise ConfigError(f"equalize={c.equalize!r}; valid: True, False")
    if not 1 <= int(c.get("calibration", export.CALIBRATION)) <= export.MAX_CALIBRATION:
        raise ConfigError(f"calibration={c.calibration!r}; valid: 1..{export.MAX_CALIBRATION} sequences")
    pooling = source.config.get("model", {}).get("classifier_pooling") if source is not None else None
    if "hf" in formats and source is not None and source.kind == "finetune" and pooling == "mean":
        raise ConfigError(f"formats={c.formats!r}: stage {source.name!r} mean-pools (model.classifier_pooling="
                          f"'mean'), and transformers' *ForSequenceClassification reads [CLS]; use formats='onnx' or "
                          f"'onnx,tflite', which carry the mean-pooled head")
    export.check_runtimes(formats)
    return formats


def _write_files(c, src, directory: epath.Path, default_len: int = 0) -> dict:
    """The export record; the files are written once (a finished export directory is only read)."""
    record_path = directory / "export.json"
    if record_path.exists():
        return json.loads(record_path.read_text())
    formats = check(c)
    max_len = src.model.encoder.cfg.max_position_embeddings
    seq_len = int(c.seq_len) or default_len or min(128, max_len)
    if not 2 <= seq_len <= max_len:
        raise ConfigError(f"seq_len={seq_len}; valid: 2..{max_len} (the model's max_position_embeddings)")
    parent = directory.parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{directory.name}.partial-", dir=str(parent))
    try:
        os.chmod(tmp, 0o755)
        record = export.export(src, tmp, formats, c.quantize, seq_len, bool(c.verify), int(c.repeats),
                               None if c.get("equalize", True) else False,
                               int(c.get("calibration", export.CALIBRATION)))
        if directory.exists():
            shutil.rmtree(str(directory))  # an empty or partial directory of a killed run: nothing finished there
        os.rename(tmp, str(directory))
        tmp = None
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return record


def _onnx_predict(path: str, arrays, batch: int) -> dict[str, np.ndarray]:
    import onnxruntime as ort

    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs() if o.name != export.HIDDEN]
    chunks: dict[str, list] = {n: [] for n in names}
    n = len(arrays["input_ids"])
    for i in range(0, n, batch):
        feed = {k: np.asarray(arrays[k][i:i + batch], np.int64) for k in export.INPUTS}
        for name, v in zip(names, session.run(names, feed)):
            chunks[name].append(np.asarray(v))
    return {k: np.concatenate(v) for k, v in chunks.items()}


def _tflite_predict(path: str, arrays) -> dict[str, np.ndarray]:
    """The task outputs of a LiteRT file (fixed [1, L] inputs: one row per call; shorter rows are padded to L and
    their per-token outputs cut back)."""
    from mobiledistill import export_tflite

    runner = export_tflite.signature_runner(path)
    length, width = export_tflite.seq_len_of(runner), arrays["input_ids"].shape[1]
    if width > length:
        raise ConfigError(f"{os.path.basename(path)} takes {length} tokens but the dev rows have {width}: export at "
                          f"seq_len={width} (0 = the fine-tuned model's length)")
    feed = [np.pad(np.asarray(arrays[k]), ((0, 0), (0, length - width))) for k in export.INPUTS]
    names = set(export.OUTPUTS["span"] + export.OUTPUTS["classification"])
    out = export_tflite.tflite_outputs(path, *feed, names=names, runner=runner)
    return {k: v[:, :width] if v.ndim == 2 and k != "logits" else v for k, v in out.items()}


def _limited(features, kind: str, rows: int):
    if not rows or kind == "span":
        return features
    return {k: v[:rows] for k, v in features.items()}


def dev_accuracy(src_config, run_path: str, files: dict[str, str], rows: int, batch: int) -> dict:
    """{model: {split: metrics}} for the JAX model of the run and each ONNX / LiteRT file, on the same dev rows."""
    from mobiledistill import finetune, sharding, task_plan

    workdir, run_dir = finetune.finished_run_dir(epath.Path(run_path))
    info = finetune.read_model_json(workdir)
    data = task_plan.task_data_for_run(src_config, info)
    t = finetune.load_finetuned(run_dir, dtype="float32")
    predict = finetune.make_predict(t.graphdef, t.kind)
    mesh = sharding.make_mesh(-1, 1)
    out: dict[str, dict] = {"jax_fp32": {}}
    for name in files:
        out[name] = {}
    for split, features in data.evals.items():
        features = _limited(features, t.kind, rows)
        arrays = features.arrays if t.kind == "span" else features
        runs = {"jax_fp32": finetune.predict_arrays(predict, t.params, arrays, batch, mesh)}
        for name, path in files.items():
            runs[name] = _tflite_predict(path, arrays) if name.endswith(".tflite") else _onnx_predict(path, arrays,
                                                                                                      batch)
        for name, outputs in runs.items():
            metrics, _, _ = finetune.score(src_config, t.kind, features, outputs, data.task)
            out[name][split] = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
    return out


def run(c, directory: epath.Path, source_config=None) -> dict:
    """Exports `c.source` into `directory` and, for a fine-tuned source whose config is given, scores every file on
    its dev split(s); returns (and writes to stage.json) the stage summary."""
    t0 = time.perf_counter()
    directory = epath.Path(directory)
    src = export.load_source(c.source)
    record = _write_files(c, src, directory, source_config.data.max_seq_length if source_config else 0)
    print(f"exported {', '.join(record['files'])} from {src.description} to {directory}", flush=True)
    summary = {"source": c.source, "kind": src.kind, "parameters": record["parameters"],
               "files": {k: v["bytes"] for k, v in record["files"].items()}}
    verify = record.get("verify")
    if verify:
        summary["latency_ms_batch1"] = verify["latency_ms_batch1"]
        summary["seq_len"] = record["seq_len"]
        summary["max_rel_err"] = {k: v["max_rel_err"] for k, v in verify["files"].items()}
    onnx_files = {n: str(directory / n) for n in record["files"] if n.endswith((".onnx", ".tflite"))}
    if source_config is not None and src.kind != "pretraining" and onnx_files:
        print(f"scoring {', '.join(['JAX fp32', *onnx_files])} on the dev split(s)", flush=True)
        summary["dev"] = dev_accuracy(source_config, c.source, onnx_files, int(c.eval_rows), int(c.eval_batch))
        for name, per_split in summary["dev"].items():
            print(f"  {name}: " + "; ".join(f"{s} " + ", ".join(f"{k} {v:.2f}" for k, v in m.items()
                                                                   if k in ("accuracy", "f1", "score", "macro_f1"))
                                            for s, m in per_split.items()), flush=True)
    summary["seconds"] = time.perf_counter() - t0
    ckpt.write_json_atomic(directory / DONE, summary)
    return summary
