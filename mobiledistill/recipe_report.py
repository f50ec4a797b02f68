"""The recipe's report.md (mobiledistill.engine): every model it produced side by side — parameters, FLOPs per
sequence, accuracy, file size, latency — then one line per stage pointing at that stage's own report."""

from __future__ import annotations

import json

import jax
from etils import epath

from mobiledistill import checkpoint as ckpt

PIPELINE_MODELS = (("teacher", "teacher (pre-trained)"), ("teacher_head", "teacher, adapted MLM head"),
                   ("pd", "student, distilled (PD)"), ("akt", "student, distilled (AKT)"),
                   ("scratch", "student from scratch"))


def _read(path: epath.Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _pipeline_rows(name: str, c, directory: epath.Path) -> list[dict]:
    from mobiledistill import pipeline
    from mobiledistill.data import load_tokenizer
    from mobiledistill.models import count_params, forward_flops
    from mobiledistill.train import abstract_model

    summaries = _read(directory / "summary.json") or {}
    teacher, student, stages = pipeline.plan(c)
    vocab = str(directory / "tokenizer") if c.data.vocab == "train" else c.data.vocab
    try:
        size = load_tokenizer(vocab).vocab_size
        teacher, student = pipeline.with_vocab(teacher, size), pipeline.with_vocab(student, size)
    except Exception:  # noqa: BLE001 (the configured vocab size stands in)
        pass
    trains = {s.name: s.trains for s in stages}
    seq = c.data.max_seq_length
    rows = []
    for stage, label in PIPELINE_MODELS:
        if stage not in summaries:
            continue
        cfg = teacher if trains.get(stage) == "teacher" else student
        acc = summaries[stage].get("eval_mlm_accuracy")
        rows.append({"model": label, "stage": f"{name}/{stage}",
                     "parameters": count_params(abstract_model(cfg)[1]["encoder"]),
                     "gflops": forward_flops(cfg, seq, pooler=False) / 1e9, "seq": seq,
                     "metric": "held-out MLM accuracy", "value": "–" if acc is None else f"{100 * acc:.2f}%"})
    return rows


def _finetune_rows(stage, directory: epath.Path) -> list[dict]:
    from mobiledistill import finetune, task_plan
    from mobiledistill.models import count_params, forward_flops

    name, c = stage.name, stage.config
    summary = _read(directory / "summary.json")
    try:
        info = finetune.read_model_json(directory)
    except (ckpt.CheckpointError, OSError, ValueError, TypeError):
        return []
    if not summary:
        return []
    cfg, seq = info["encoder"], c.data.max_seq_length
    n = count_params(task_plan.abstract_task_params(info["kind"], cfg, info["num_labels"]))
    mean_std = summary.get("mean_std", {})
    keys = [k for k in mean_std if k == "score" or k.endswith("/score")] or \
        [k for k in mean_std if k.endswith("accuracy")]
    value = "; ".join(f"{k} {mean_std[k]['mean']:.2f} ± {mean_std[k]['std']:.2f}" for k in keys)
    teacher = stage.teacher_from or c.distill.teacher or (c.ptp.teacher if c.get("ptp") is not None else "")
    what = "PTP (4-way teacher labels)" if c.get("ptp") is not None else (
        f"task KD from {teacher}" if teacher else "fine-tuned")
    return [{"model": f"{name}: {what}", "stage": name, "parameters": n, "gflops": forward_flops(cfg, seq) / 1e9,
             "seq": seq, "metric": f"dev {c.task} (%, {len(summary.get('seeds', []))} seed(s))", "value": value}]


def _export_rows(name: str, directory: epath.Path) -> list[dict]:
    s = _read(directory / "stage.json")
    if not s:
        return []
    lat = s.get("latency_ms_batch1", {})
    dev = s.get("dev", {})

    def acc(model):
        per_split = dev.get(model)
        if not per_split:
            return "–"
        return "; ".join(f"{split} score {m.get('score', m.get('accuracy', float('nan'))):.2f}"
                         for split, m in per_split.items())

    rows = [{"model": f"{name}: JAX jit fp32 (the fine-tuned model)", "stage": name, "parameters": s["parameters"],
             "metric": "dev (same rows)", "value": acc("jax_fp32"), "latency": lat.get("jax_jit_fp32")}]
    runtime = {"model.onnx": ("onnxruntime_fp32", "ONNX fp32"),
               "model.int8.onnx": ("onnxruntime_int8_dynamic", "ONNX dynamic int8"),
               "model.tflite": ("litert_fp32", "LiteRT fp32"),
               "model.int8.tflite": ("litert_int8_dynamic", "LiteRT dynamic-range int8"),
               "hf/model.safetensors": ("pytorch_eager_fp32", "Hugging Face, PyTorch eager fp32")}
    for file, size in s.get("files", {}).items():
        key, label = runtime.get(file, (None, file))
        scored = file.endswith((".onnx", ".tflite"))
        rows.append({"model": f"{name}: {label} (`{file}`)", "stage": name, "parameters": s["parameters"],
                     "metric": "dev (same rows)", "value": acc(file) if scored else "= JAX fp32",
                     "bytes": size, "latency": lat.get(key) if key else None})
    return rows


def model_rows(stages, workdir: epath.Path) -> list[dict]:
    rows = []
    for s in stages:
        directory = workdir / s.directory
        if s.kind == "pretrain":
            rows += _pipeline_rows(s.name, s.config, directory)
        elif s.kind == "finetune":
            rows += _finetune_rows(s, directory)
        else:
            rows += _export_rows(s.name, directory)
    return rows


def _cell(v, fmt: str) -> str:
    return "–" if v is None else format(v, fmt)


def write(c, workdir: epath.Path, stages) -> epath.Path:
    rows = model_rows(stages, workdir)
    lines = ["# mobiledistill recipe report", "",
             "Stages: " + " -> ".join(f"`{s.name}` ({s.kind}{s.inputs_text()})" for s in stages), "",
             "## Every model of this recipe", "",
             "Parameters: the encoder (pipeline stages) or the whole task model; GFLOPs: one forward pass of one "
             "sequence; latency: batch 1, median, this machine, one run (compare within a column).", "",
             "| model | stage | parameters | GFLOPs / sequence (length) | metric | value | file size | latency (ms) |",
             "|---|---|---:|---:|---|---|---:|---:|"]
    for r in rows:
        size = None if r.get("bytes") is None else f"{r['bytes'] / 1e6:.2f} MB"
        flops = _cell(r.get("gflops"), ".3f") + (f" ({r['seq']})" if r.get("seq") else "")
        lines.append(f"| {r['model']} | `{r['stage']}` | {r['parameters']:,} | "
                     f"{flops} | {r['metric']} | {r['value']} | {size or '–'} | "
                     f"{_cell(r.get('latency'), '.2f')} |")
    for s in stages:  # each stage's own report, its headings one level down
        report = workdir / s.directory / ("report.md" if s.kind != "export" else "model_card.md")
        lines += ["", f"## Stage `{s.name}` ({s.kind}{s.inputs_text()})", ""]
        if report.exists():
            lines += [f"From `{report}`:", ""]
            text = report.read_text().replace("](plots/", f"]({s.directory}/plots/")  # links from the workdir
            lines += [("#" + line) if line.startswith("#") else line for line in text.splitlines()]
        else:
            lines.append("no report")
    path = workdir / "report.md"
    if jax.process_index() == 0:
        ckpt.write_text_atomic(path, "\n".join(lines) + "\n")
        ckpt.write_text_atomic(workdir / "summary.json", json.dumps({"models": rows}, indent=2, default=str))
    return path
