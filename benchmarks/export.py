"""Every deployment route of a finished fine-tuning run: dev accuracy, file size and latency (issue #11, SPEC §13).

    .venv/bin/python benchmarks/export.py --from=RUN [--seq_len=128] [--repeats=20] [--eval_rows=0]

RUN is what `python -m mobiledistill.export --from` accepts for a task model: a finished fine-tuning workdir (its
first finished seed) or `WORKDIR/seed_<s>`. Routes are built from `mobiledistill.export.FORMATS` and `QUANTIZE`
(every format but `hf`, each with every quantisation; int8 routes of a NoNorm model once with residual equalisation
and once without), so formats and modes added there are picked up; a combination the CLI refuses, or one that fails,
is recorded with its error instead of stopping the run. For every file written:

- dev accuracy (every metric of the task) on the run's dev split, the same rows for every file and for the JAX model
  (`mobiledistill.export_stage.dev_accuracy`), and the change against JAX fp32 in points;
- file size, and its fraction of the same format's fp32 file;
- latency at batch 1 x `--seq_len` (median of `--repeats` interleaved rounds: each round calls every runtime once, in
  a rotating order), with transformers' PyTorch eager fp32 (same weights, `torch.set_num_threads(--threads)`) as 1x
  and LiteRT fp32 as a second baseline where a .tflite route worked; JAX jit fp32 (`mobiledistill.inference`) is
  timed too.

`--qat_from=QATRUN` (a QAT fine-tuning run of the same task and tokenizer, e.g. one started from RUN with
`c.qat`) adds the route `onnx_int8_qat`: its static int8 file with the QAT run's own ranges, scored on the same dev
rows and compared with RUN's JAX fp32 (the model before QAT).

A route *qualifies* when it keeps the task metric within 1 point of JAX fp32 at <= 30% of its format's fp32 file
size; `recommended` is the smallest qualifying file (None when no route qualifies). Writes `--out` (default
benchmarks/results/export.json) with one entry per route and the markdown table it prints.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULT = os.path.join(ROOT, "benchmarks", "results", "export.json")
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
os.environ.setdefault("JAX_PLATFORMS", "cpu")

BASELINE = "pytorch_eager_fp32"
LITERT_FP32 = "tflite_fp32"
MAX_DROP, MAX_SIZE = 1.0, 0.30  # points of the task metric, fraction of the fp32 file
METRICS = ("accuracy", "f1", "exact_match", "pearson", "spearman", "matthews", "score")


def _error(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0][:400] if lines else ''}"


def plan_routes(formats, quantize, equalizable) -> list[dict]:
    """[{name, format, quantize, equalize}] for every non-hf format x quantisation; `equalizable(q)` says whether
    residual equalisation applies to mode q (then both variants are routes)."""
    routes = []
    for fmt in formats:
        if fmt == "hf":
            continue
        for q in quantize:
            if q == "none":
                routes.append(dict(name=f"{fmt}_fp32", format=fmt, quantize=q, equalize=False))
            elif equalizable(q):
                routes.append(dict(name=f"{fmt}_{q}_equalized", format=fmt, quantize=q, equalize=True))
                routes.append(dict(name=f"{fmt}_{q}_plain", format=fmt, quantize=q, equalize=False))
            else:
                routes.append(dict(name=f"{fmt}_{q}", format=fmt, quantize=q, equalize=False))
    return routes


def write_route(export, src, run: str, route: dict, directory: str, seq_len: int, calibration: int,
                fp32_files: dict) -> dict:
    """Exports one route into `directory`; returns {file, path, bytes, format_description, export_s} or raises."""
    argv = ["--from", run, "--to", directory, "--format", route["format"], "--quantize", route["quantize"],
            "--seq_len", str(seq_len), "--calibration", str(calibration)]
    if route["quantize"] != "none":
        argv.append("--equalize" if route["equalize"] else "--no-equalize")
    export.parse_args(argv)  # the CLI's refusals (a combination it does not offer) become the route's error
    export.check_runtimes([route["format"]])  # a missing runtime package, named
    os.makedirs(directory, exist_ok=True)
    t0 = time.perf_counter()
    record = export.export(src, directory, [route["format"]], route["quantize"], seq_len, False, 1,
                           route["equalize"] if route["quantize"] != "none" else None, calibration)
    files = [n for n in record["files"] if not n.startswith("hf/")]
    if route["quantize"] == "none":
        fp32_files[route["format"]] = set(files)
    else:
        files = [n for n in files if n not in fp32_files.get(route["format"], set())]
    if len(files) != 1:
        raise RuntimeError(f"expected one new model file, the export wrote {sorted(record['files'])}")
    name = files[0]
    entry = dict(file=name, path=os.path.join(directory, name), bytes=record["files"][name]["bytes"],
                 description=record["files"][name]["format"], export_s=time.perf_counter() - t0)
    eq = record.get("equalization") or {}
    if eq.get("applied"):  # how far the student's residual channels stand out, and what equalisation did to that
        entry["equalization"] = {k: v for k, v in eq.items() if k not in ("scales", "int8_without_equalization")}
    return entry


def primary_metric(metrics: dict) -> str:
    return next((m for m in METRICS if m in metrics), next(iter(metrics)))


def score_files(src_config, run: str, files: dict, rows: int, batch: int) -> dict:
    """export_stage.dev_accuracy for all files at once; one by one (errors kept per file) if that fails."""
    from mobiledistill import export_stage

    try:
        return export_stage.dev_accuracy(src_config, run, files, rows, batch)
    except Exception:
        out = {}
        for key, path in files.items():
            try:
                res = export_stage.dev_accuracy(src_config, run, {key: path}, rows, batch)
                out.update(res)
            except Exception as e:
                out[key] = {"error": _error(e)}
        if "jax_fp32" not in out:
            out.update(export_stage.dev_accuracy(src_config, run, {}, rows, batch))
        return out


def runners(export, src, hf_dir: str, files: dict, seq_len: int, threads: int) -> tuple[dict, dict]:
    """({name: zero-argument call running batch 1 x seq_len}, {name: error}) for PyTorch, JAX and every file."""
    import numpy as np
    import torch

    from mobiledistill.inference import Predictor

    ids, mask, types = export.random_inputs(src.model.encoder.cfg, 1, seq_len, seed=2)
    calls, errors = {}, {}
    model = export.load_transformers(src, hf_dir)
    t = [torch.tensor(a) for a in (ids, mask, types)]

    def eager():
        with torch.no_grad():
            return model(input_ids=t[0], attention_mask=t[1], token_type_ids=t[2])

    calls[BASELINE] = eager
    predictor = Predictor(src.model)
    calls["jax_jit_fp32"] = lambda: [np.asarray(x) for x in predictor(ids, mask, types)]
    for name, path in files.items():
        try:
            if path.endswith(".onnx"):
                import onnxruntime as ort
                opts = ort.SessionOptions()
                opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
                session = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
                feed = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
                calls[name] = lambda s=session, f=feed: s.run(None, f)
            elif path.endswith(".tflite"):
                from mobiledistill import export_tflite
                runner = export_tflite.signature_runner(path, threads)
                feed = {k: np.asarray(a, np.int32) for k, a in zip(export.INPUTS, (ids, mask, types))}
                calls[name] = lambda r=runner, f=feed: r(**f)
            else:
                raise ValueError(f"no runtime known for {os.path.basename(path)}")
            calls[name]()  # a file that cannot run fails here, not inside the timing loop
        except Exception as e:
            calls.pop(name, None)
            errors[name] = _error(e)
    return calls, errors


def interleaved(calls: dict, repeats: int) -> dict:
    """{name: median ms} over `repeats` rounds, each calling every runtime once in a rotating order."""
    names = list(calls)
    for call in calls.values():
        call()
    times = {n: [] for n in names}
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            t0 = time.perf_counter()
            calls[name]()
            times[name].append(time.perf_counter() - t0)
    return {n: 1e3 * statistics.median(v) for n, v in times.items()}


def machine(threads: int) -> dict:
    import torch
    cpu = ""
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return dict(platform=platform.platform(), cpu=cpu, cores=os.cpu_count(), threads=threads,
                torch_threads=torch.get_num_threads(), python=platform.python_version(),
                load_average_at_start=list(os.getloadavg()), date=time.strftime("%Y-%m-%d"))


def markdown(result: dict) -> str:
    lines = [f"| route | file | size (MB) | of fp32 | dev {result['metric']} | vs JAX fp32 | latency (ms) | "
             f"vs PyTorch eager | vs LiteRT fp32 |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    ref = result["baselines"]
    lines.append(f"| JAX jit fp32 (reference) | | | | {ref['jax_jit_fp32']['dev']:.2f} | | "
                 f"{ref['jax_jit_fp32']['latency_ms']:.2f} | {ref['jax_jit_fp32']['speedup_vs_pytorch_eager']:.2f}x | |")
    lines.append(f"| PyTorch eager fp32 (transformers) | hf/model.safetensors | {ref[BASELINE]['bytes'] / 1e6:.2f} | | "
                 f"| | {ref[BASELINE]['latency_ms']:.2f} | 1x | |")
    fmt = lambda v, f: "" if v is None else f.format(v)
    for name, r in result["routes"].items():
        if "error" in r and "bytes" not in r:
            lines.append(f"| {name} | failed: {r['error'][:120]} | | | | | | | |")
            continue
        mark = " **(qualifies)**" if r.get("qualifies") else ""
        lines.append(f"| {name}{mark} | {r['file']} | {r['bytes'] / 1e6:.2f} | {fmt(r.get('size_vs_fp32'), '{:.0%}')} "
                     f"| {fmt(r.get('dev'), '{:.2f}')} | {fmt(r.get('dev_change_points'), '{:+.2f}')} | "
                     f"{fmt(r.get('latency_ms'), '{:.2f}')} | {fmt(r.get('speedup_vs_pytorch_eager'), '{:.2f}x')} | "
                     f"{fmt(r.get('speedup_vs_litert_fp32'), '{:.2f}x')} |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--from", dest="run", required=True, help="a finished fine-tuning workdir or its seed_<s>")
    p.add_argument("--out", default=RESULT)
    p.add_argument("--work", default="", help="keep the exported files here (default: a temporary directory)")
    p.add_argument("--seq_len", type=int, default=128, help="latency length (capped at max_position_embeddings)")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--eval_rows", type=int, default=0, help="dev rows scored (0 = all)")
    p.add_argument("--eval_batch", type=int, default=32)
    p.add_argument("--threads", type=int, default=0, help="runtime threads (default: the CPUs of this process)")
    p.add_argument("--formats", default="", help="subset of mobiledistill.export.FORMATS (default: all)")
    p.add_argument("--quantize", default="", help="subset of mobiledistill.export.QUANTIZE (default: all)")
    p.add_argument("--calibration", type=int, default=0, help="int8 calibration sequences (default: export's)")
    p.add_argument("--qat_from", default="", help="a QAT fine-tuning run of the same model (c.qat; e.g. started "
                   "from --from): adds the route onnx_int8_qat, its static int8 file with the run's own ranges")
    args = p.parse_args(argv)

    import ml_collections
    import torch
    import transformers
    from etils import epath

    from mobiledistill import export, finetune
    from mobiledistill.models import count_params

    threads = args.threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    run = os.path.abspath(args.run)
    src = export.load_source(run)
    if src.kind == "pretraining":
        sys.exit(f"error: --from={args.run} is a pre-training stage; give a finished fine-tuning run")
    workdir, run_dir = finetune.finished_run_dir(epath.Path(run))
    src_config = ml_collections.ConfigDict(json.loads((workdir / "config.json").read_text()))
    cfg = src.model.encoder.cfg
    seq_len = min(args.seq_len, cfg.max_position_embeddings)
    calibration = args.calibration or export.CALIBRATION
    pick = lambda arg, full: [x for x in full if not arg or x in arg.split(",")]
    formats, modes = pick(args.formats, export.FORMATS), pick(args.quantize, export.QUANTIZE)

    def equalizable(q):
        try:
            return export.resolve_equalize(cfg, q, None, **({"qat": src.qat is not None} if hasattr(src, "qat")
                                                             else {}))
        except Exception:
            return False

    qat_run = os.path.abspath(args.qat_from) if args.qat_from else ""
    qsrc = export.load_source(qat_run) if qat_run else None
    if qsrc is not None and (qsrc.qat is None or qsrc.tokenizer != src.tokenizer or qsrc.task != src.task):
        sys.exit(f"error: --qat_from={args.qat_from} must be a QAT run (c.qat) of --from's task with its tokenizer")
    work = os.path.abspath(args.work) if args.work else tempfile.mkdtemp(prefix="export-bench-")
    os.makedirs(work, exist_ok=True)
    result = dict(run=str(run_dir), source=src.description, task=src.task, kind=src.kind,
                  parameters=count_params(src.model),
                  seq_len=seq_len, threads=threads, machine=machine(threads), formats=formats, quantize=modes,
                  criterion=f"dev metric within {MAX_DROP:g} point of JAX fp32 at <= {MAX_SIZE:.0%} of the same "
                            "format's fp32 file", routes={})
    try:
        hf_dir = os.path.join(work, "hf")
        if not os.path.isdir(hf_dir):
            export.write_hf(src, hf_dir)
        fp32_files, files = {}, {}
        routes = [dict(r, source=src, run=run) for r in plan_routes(formats, modes, equalizable)]
        if qsrc is not None:
            routes.append(dict(name="onnx_int8_qat", format="onnx", quantize="int8", equalize=False, source=qsrc,
                               run=qat_run))
        for route in routes:
            entry = dict(format=route["format"], quantize=route["quantize"], equalize=route["equalize"])
            if route["run"] != run:
                entry["run"] = route["run"]
            directory = os.path.join(work, route["name"])
            shutil.rmtree(directory, ignore_errors=True)
            try:
                entry.update(write_route(export, route["source"], route["run"], route, directory, seq_len,
                                         calibration, fp32_files))
                files[f"{route['name']}/{entry['file']}"] = entry.pop("path")
            except (Exception, SystemExit) as e:
                entry["error"] = _error(e)
            print(f"{route['name']}: {entry.get('error') or entry['file']}", flush=True)
            result["routes"][route["name"]] = entry
        dev = score_files(src_config, run, files, args.eval_rows, args.eval_batch)
        split = next(iter(dev["jax_fp32"]))
        result["split"] = split
        result["metric"] = metric = primary_metric(dev["jax_fp32"][split])
        ref_acc = dev["jax_fp32"][split][metric]
        calls, errors = runners(export, src, hf_dir, files, seq_len, threads)
        latency = interleaved(calls, args.repeats)
        base = latency[BASELINE]
        litert = next((latency[k] for k in files if k.startswith(f"{LITERT_FP32}/") and k in latency), None)
        result["baselines"] = {
            BASELINE: dict(latency_ms=base, bytes=os.path.getsize(os.path.join(hf_dir, "model.safetensors")),
                           runtime=f"transformers {transformers.__version__}, torch {torch.__version__}"),
            "jax_jit_fp32": dict(latency_ms=latency["jax_jit_fp32"], dev=ref_acc, dev_metrics=dev["jax_fp32"][split],
                                 speedup_vs_pytorch_eager=base / latency["jax_jit_fp32"])}
        for key, path in files.items():
            name = key.split("/")[0]
            r = result["routes"][name]
            fp32 = result["routes"].get(f"{r['format']}_fp32", {}).get("bytes")
            r["size_vs_fp32"] = r["bytes"] / fp32 if fp32 else None
            d = dev.get(key, {})
            if "error" in d:
                r["dev_error"] = d["error"]
            elif split in d:
                r["dev_metrics"] = d[split]
                r["dev"] = d[split][metric]
                r["dev_change_points"] = r["dev"] - ref_acc
            if key in latency:
                r["latency_ms"] = latency[key]
                r["speedup_vs_pytorch_eager"] = base / latency[key]
                r["speedup_vs_litert_fp32"] = litert / latency[key] if litert else None
            else:
                r["latency_error"] = errors.get(key, "not timed")
            r["qualifies"] = bool(r.get("dev_change_points") is not None and r["size_vs_fp32"] is not None
                                  and r["dev_change_points"] >= -MAX_DROP and r["size_vs_fp32"] <= MAX_SIZE)
        ok = [n for n, r in result["routes"].items() if r.get("qualifies")]
        result["qualifying"] = ok
        result["recommended"] = min(ok, key=lambda n: (result["routes"][n]["bytes"],
                                                       result["routes"][n].get("latency_ms", 0))) if ok else None
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    result["machine"]["load_average_at_end"] = list(os.getloadavg())
    result["table_md"] = markdown(result)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"\n{src.description}; dev split {result['split']} ({metric}); batch 1 x {seq_len}, {threads} threads\n")
    print(result["table_md"])
    print(f"\nrecommended: {result['recommended'] or 'no route met: ' + result['criterion']}\nwrote {args.out}")
    return result


if __name__ == "__main__":
    main()
