"""Inference latency of a full-size MobileBERT classifier: our JAX paths vs transformers in PyTorch (issue #11).

    .venv/bin/python benchmarks/inference.py                    # batch 1 x 128, ~3 minutes on 2 CPU cores
    .venv/bin/python benchmarks/inference.py --threads=1 --repeats=40

One `SequenceClassificationModel` (preset `--preset`, random init, 2 labels, fp32) and the same weights in
transformers' `MobileBertForSequenceClassification` (eager attention, eval mode), timed in one process, interleaved:
every round calls each variant once, in a rotating order, and the report is the median per variant plus the median
of the per-round ratios to PyTorch eager (robust to load drifting on a shared machine).

    jax_predictor          mobiledistill.inference.Predictor: the serving forward (layers unrolled, parameters as
                           one flat list flattened once, jit)          <- what export and deployment use now
    jax_jit_state          jax.jit over an nnx.State argument, the model's config (the path measured before)
    jax_jit_state_scan     the same with scan_layers=True (a model trained with scanned layers, served as it was
                           trained)
    pytorch_eager_fp32     transformers, torch.no_grad, torch.set_num_threads(--threads)    <- the 1x baseline
    torch_compile_fp32     torch.compile of it (recorded as an error where inductor cannot build)

`dispatch_ms` is how long a call takes to return before its result is ready (Python and argument handling that the
computation waits for). Writes benchmarks/results/inference.json (machine, versions, load average at start and end:
on a loaded machine PyTorch's spinning OpenMP threads suffer most, so its ratios are the least reliable there).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULT = os.path.join(ROOT, "benchmarks", "results", "inference.json")
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
os.environ.setdefault("JAX_PLATFORMS", "cpu")

BASELINE = "pytorch_eager_fp32"


def machine(threads: int) -> dict:
    import jax
    import torch
    import transformers

    cpu = ""
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return dict(platform=platform.platform(), cpu=cpu, cores=os.cpu_count(),
                cpus_in_affinity=len(os.sched_getaffinity(0)), threads=threads, python=platform.python_version(),
                jax=jax.__version__, jaxlib=__import__("jaxlib").__version__, torch=torch.__version__,
                torch_threads=torch.get_num_threads(), transformers=transformers.__version__,
                xla_flags=os.environ.get("XLA_FLAGS", ""), load_average_at_start=list(os.getloadavg()))


def build(preset_name: str, num_labels: int, seed: int = 0):
    """(our model, the transformers model with the same weights)."""
    import transformers
    from flax import nnx
    from transformers.utils import logging

    from mobiledistill import convert
    from mobiledistill.models import SequenceClassificationModel, preset

    model = SequenceClassificationModel(preset(preset_name), num_labels, nnx.Rngs(seed))
    logging.disable_progress_bar()
    logging.set_verbosity_error()
    with tempfile.TemporaryDirectory() as d:
        convert.save_hf(model, d)
        hf = transformers.MobileBertForSequenceClassification.from_pretrained(d, attn_implementation="eager")
    return model, hf.eval()


def variants(model, hf, ids, mask, types, compile_torch: bool) -> tuple[dict, dict]:
    """({name: (call -> output, wait(output) -> logits as numpy)}, {name: error}) for every runtime."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch
    from flax import nnx

    from mobiledistill.inference import Predictor

    j = [jnp.asarray(a, jnp.int32) for a in (ids, mask, types)]
    out, errors = {}, {}
    wait_jax = lambda o: np.asarray(jax.block_until_ready(o[0] if isinstance(o, tuple) else o))
    predictor = Predictor(model)
    out["jax_predictor"] = (lambda: predictor(*j), wait_jax)
    scanned = nnx.clone(model)
    for _, module in nnx.iter_modules(scanned):
        if getattr(module, "cfg", None) is not None and hasattr(module.cfg, "scan_layers"):
            module.cfg = module.cfg.replace(scan_layers=True)
    for name, m in (("jax_jit_state", model), ("jax_jit_state_scan", scanned)):
        graphdef, state = nnx.split(m)
        f = jax.jit(lambda s, i, k, t, g=graphdef: nnx.merge(g, s)(i, t, k)[0])
        out[name] = (lambda f=f, state=state: f(state, *j), wait_jax)
    t = [torch.tensor(a, dtype=torch.long) for a in (ids, mask, types)]

    def torch_call(module):
        def call():
            with torch.no_grad():
                return module(input_ids=t[0], attention_mask=t[1], token_type_ids=t[2]).logits
        return call

    out[BASELINE] = (torch_call(hf), lambda o: o.numpy())
    if compile_torch:
        try:
            compiled = torch_call(torch.compile(hf))
            compiled()  # compiles here: a missing C++ toolchain fails now, not inside the timing loop
            out["torch_compile_fp32"] = (compiled, lambda o: o.numpy())
        except Exception as e:  # inductor needs a C++ compiler; record why it is missing
            errors["torch_compile_fp32"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300]}"
    return out, errors


def measure(calls: dict, repeats: int, warmup: int = 2) -> dict:
    """Interleaved timing: per variant the wall times of `repeats` calls (each waited for) and the dispatch times
    (until the call returned)."""
    names = list(calls)
    first = {}
    for name, (call, wait) in calls.items():
        t0 = time.perf_counter()
        wait(call())
        first[name] = time.perf_counter() - t0
        for _ in range(warmup - 1):
            wait(call())
    times = {n: [] for n in names}
    dispatch = {n: [] for n in names}
    for r in range(repeats):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            call, wait = calls[name]
            t0 = time.perf_counter()
            o = call()
            t1 = time.perf_counter()
            wait(o)
            t2 = time.perf_counter()
            times[name].append(t2 - t0)
            dispatch[name].append(t1 - t0)
    return {n: dict(first_call_s=first[n], times_ms=[1e3 * x for x in times[n]],
                    median_ms=1e3 * statistics.median(times[n]), dispatch_ms=1e3 * statistics.median(dispatch[n]))
            for n in names}, times


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="mobilebert")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq_len", type=int, default=128)
    p.add_argument("--num_labels", type=int, default=2)
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--threads", type=int, default=0, help="PyTorch threads (default: the CPUs JAX/XLA uses)")
    p.add_argument("--no_compile", action="store_true", help="skip torch.compile")
    p.add_argument("--out", default=RESULT)
    args = p.parse_args(argv)

    import numpy as np
    import torch

    threads = args.threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    result = dict(machine=machine(threads), preset=args.preset, batch=args.batch, seq_len=args.seq_len,
                  dtype="float32", baseline=BASELINE, repeats=args.repeats)
    model, hf = build(args.preset, args.num_labels)
    rng = np.random.default_rng(0)
    ids = rng.integers(1, model.encoder.cfg.vocab_size, (args.batch, args.seq_len))
    mask = np.ones_like(ids)
    types = (np.arange(args.seq_len)[None] >= args.seq_len // 2).astype(np.int64).repeat(args.batch, 0)
    calls, errors = variants(model, hf, ids, mask, types, not args.no_compile)
    stats, times = measure(calls, args.repeats)
    ref = calls[BASELINE][1](calls[BASELINE][0]())
    base = stats[BASELINE]["median_ms"]
    for name, s in stats.items():
        s["speedup_vs_pytorch_eager"] = base / s["median_ms"]
        s["paired_speedup_vs_pytorch_eager"] = statistics.median(
            b / x for b, x in zip(times[BASELINE], times[name]))
        s["max_rel_err_vs_pytorch"] = float(np.max(np.abs(calls[name][1](calls[name][0]()) - ref))
                                            / max(float(np.max(np.abs(ref))), 1e-30))
    for name, e in errors.items():
        stats[name] = {"error": e}
    result["variants"] = stats
    result["machine"]["load_average_at_end"] = list(os.getloadavg())
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"batch {args.batch} x {args.seq_len}, {args.preset}, {threads} threads, load average "
          f"{result['machine']['load_average_at_start'][0]:.2f} -> {result['machine']['load_average_at_end'][0]:.2f}")
    print("| variant | median ms | dispatch ms | vs PyTorch eager | paired |\n|---|---:|---:|---:|---:|")
    for name, s in stats.items():
        if "error" in s:
            print(f"| {name} | {s['error']} | | | |")
        else:
            print(f"| {name} | {s['median_ms']:.1f} | {s['dispatch_ms']:.2f} | {s['speedup_vs_pytorch_eager']:.2f}x "
                  f"| {s['paired_speedup_vs_pytorch_eager']:.2f}x |")
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
