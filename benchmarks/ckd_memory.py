"""Memory and time of CKD's triple-wise word relation (WR angle) with gradients: windowed vs naive full-triple.

    .venv/bin/python benchmarks/ckd_memory.py            # ~1-3 minutes on 2 CPU cores
    .venv/bin/python benchmarks/ckd_memory.py --quick    # smaller sweep, for a smoke test

The windowed loss (`mobiledistill.losses.wr_angle_loss`, W = 21) gathers [B, S, W, H] neighbour differences and
builds [B, S, W, W] angles; the naive version builds all [B, S, S, H] differences and [B, S, S, S] angles and masks
them with the same window afterwards (same value). Each (implementation, sequence length) runs in a fresh process
and reports: XLA's compiled memory analysis (temp / argument / output bytes, their sum is the peak estimate), the
process peak RSS (a high-water mark) and its growth over the pre-compile baseline and over the post-compile mark
(the latter is the execution's own growth when it exceeds the compiler's), and the median time of the jitted
value_and_grad w.r.t. the student. Naive sizes whose compiled estimate exceeds --naive-budget-gb are compiled (to
report the estimate) but not run. Writes benchmarks/results/ckd_memory.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULT = os.path.join(ROOT, "benchmarks", "results", "ckd_memory.json")
MB = 1024.0 ** 2
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def _naive_wr_angle(t, s, mask, window):
    """Full O(S^3) reference in JAX: all (i, j, k) angles, then the window / padding / j,k != i masks."""
    import jax
    import jax.numpy as jnp

    from mobiledistill.losses import window_bounds

    hi = jax.lax.Precision.HIGHEST
    batch, seq = mask.shape
    valid = mask > 0

    def angles(x):
        d = x[:, None, :, :] - x[:, :, None, :]  # [B, i, j, H] = x_j - x_i
        d = d * jax.lax.rsqrt(jnp.maximum(jnp.sum(d * d, -1, keepdims=True), 1e-16))
        return jnp.einsum("bijh,bikh->bijk", d, d, precision=hi)

    start, w = window_bounds(mask, batch, seq, window)
    pos = jnp.arange(seq)
    in_win = (pos[None, None, :] >= start[..., None]) & (pos[None, None, :] < start[..., None] + w)
    nb = in_win & valid[:, None, :] & (pos[None, :, None] != pos[None, None, :])  # [B, i, j]
    m = valid[:, :, None, None] & nb[:, :, :, None] & nb[:, :, None, :]
    err = jnp.where(m, jnp.square(angles(s) - angles(jax.lax.stop_gradient(t))), 0.0)
    return jnp.sum(err) / jnp.maximum(jnp.sum(m), 1)


def _inputs(batch, seq, hidden, seed=0):
    import numpy as np

    rng = np.random.default_rng(seed)
    t = rng.normal(size=(batch, seq, hidden)).astype(np.float32)
    s = rng.normal(size=(batch, seq, hidden)).astype(np.float32)
    lengths = np.linspace(seq, max(seq // 2, 1), batch).astype(int)  # padding: real lengths S .. S/2
    mask = (np.arange(seq)[None, :] < lengths[:, None]).astype(np.int32)
    return t, s, mask


def run_one(impl: str, batch: int, seq: int, hidden: int, window: int, chunk: int | None, budget_gb: float,
            max_runs: int) -> dict:
    import jax

    from mobiledistill.losses import wr_angle_loss

    t, s, mask = _inputs(batch, seq, hidden)
    t, s, mask = jax.device_put(t), jax.device_put(s), jax.device_put(mask)
    if impl == "windowed":
        def loss(s_, t_, m_):
            return wr_angle_loss(t_, s_, m_, window=window, chunk_size=chunk)
    else:
        def loss(s_, t_, m_):
            return _naive_wr_angle(t_, s_, m_, window)
    fn = jax.jit(jax.value_and_grad(loss))
    rss0 = _rss_mb()
    c0 = time.perf_counter()
    compiled = fn.lower(s, t, mask).compile()
    compile_s = time.perf_counter() - c0
    rss1 = _rss_mb()
    ma = compiled.memory_analysis()
    mem = {k: getattr(ma, f"{k}_size_in_bytes", 0) / MB for k in ("temp", "argument", "output", "alias")}
    peak_mb = mem["temp"] + mem["argument"] + mem["output"] - mem["alias"]
    rec = {"impl": impl, "batch": batch, "seq": seq, "hidden": hidden, "window": window, "chunk_size": chunk,
           "compiled_mb": {k: round(v, 2) for k, v in mem.items()}, "peak_estimate_mb": round(peak_mb, 2),
           "compile_s": round(compile_s, 2), "executed": False}
    if peak_mb > budget_gb * 1024:
        rec["skipped"] = f"compiled estimate {peak_mb / 1024:.1f} GiB > budget {budget_gb} GiB"
        return rec
    times, value = [], None
    for _ in range(max_runs):
        r0 = time.perf_counter()
        value, grad = compiled(s, t, mask)
        jax.block_until_ready(grad)
        times.append(time.perf_counter() - r0)
        if sum(times) > 20.0:
            break
    rec.update(executed=True, loss=float(value), time_s=round(statistics.median(times), 4), runs=len(times),
               rss_baseline_mb=round(rss0, 1), rss_after_compile_mb=round(rss1, 1), rss_peak_mb=round(_rss_mb(), 1),
               rss_growth_mb=round(_rss_mb() - rss0, 1), rss_growth_run_mb=round(_rss_mb() - rss1, 1),
               device=str(jax.devices()[0]))
    return rec


def _check_equal(window: int) -> dict:
    """Windowed and naive values agree (small size, in this process)."""
    import jax

    from mobiledistill.losses import wr_angle_loss

    jax.config.update("jax_default_matmul_precision", "highest")
    t, s, mask = _inputs(2, 48, 32, seed=1)
    a = float(wr_angle_loss(t, s, mask, window=window))
    b = float(_naive_wr_angle(t, s, mask, window))
    return {"batch": 2, "seq": 48, "hidden": 32, "windowed": a, "naive": b, "rel_diff": abs(a - b) / abs(b)}


def _slopes(rows: list[dict], key: str) -> list[dict]:
    pts = [(r["seq"], r[key]) for r in rows if r.get(key)]
    return [{"seq": f"{s0}->{s1}", "ratio": round(v1 / v0, 2),
             "exponent": round(math.log(v1 / v0) / math.log(s1 / s0), 2)} for (s0, v0), (s1, v1) in zip(pts, pts[1:])]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--window", type=int, default=21)
    ap.add_argument("--windowed-seqs", default="32,64,128,256,512,1024")
    ap.add_argument("--naive-seqs", default="32,64,128,256,512")
    ap.add_argument("--chunk", type=int, default=64, help="chunk_size of the extra chunked windowed runs (0: none)")
    ap.add_argument("--chunk-seqs", default="512,1024", help="lengths of the extra chunked windowed runs")
    ap.add_argument("--naive-budget-gb", type=float, default=6.0)
    ap.add_argument("--max-runs", type=int, default=3)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=RESULT)
    ap.add_argument("--one", nargs=3, metavar=("IMPL", "SEQ", "CHUNK"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        impl, seq, chunk = args.one[0], int(args.one[1]), int(args.one[2]) or None
        rec = run_one(impl, args.batch, seq, args.hidden, args.window, chunk, args.naive_budget_gb, args.max_runs)
        print("RESULT " + json.dumps(rec))
        return
    if args.quick:
        args.windowed_seqs, args.naive_seqs, args.chunk_seqs = "32,64,128", "32,64", "128"
        args.batch, args.hidden, args.chunk = 2, 128, 32
    t0 = time.perf_counter()
    jobs = [("windowed", int(x), 0) for x in args.windowed_seqs.split(",")]
    if args.chunk:
        jobs += [("windowed", int(x), args.chunk) for x in args.chunk_seqs.split(",")]
    jobs += [("naive", int(x), 0) for x in args.naive_seqs.split(",")]
    rows = []
    for impl, seq, chunk in jobs:
        cmd = [sys.executable, os.path.abspath(__file__), "--one", impl, str(seq), str(chunk),
               "--batch", str(args.batch), "--hidden", str(args.hidden), "--window", str(args.window),
               "--naive-budget-gb", str(args.naive_budget_gb), "--max-runs", str(args.max_runs)]
        env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
        if proc.returncode or not line:
            rec = {"impl": impl, "seq": seq, "chunk_size": chunk or None, "executed": False,
                   "error": (proc.stderr.strip().splitlines() or ["?"])[-1][:300], "returncode": proc.returncode}
        else:
            rec = json.loads(line[0][len("RESULT "):])
        rows.append(rec)
        print(f"{impl:8s} S={seq:5d} chunk={chunk or '-':>4} est={rec.get('peak_estimate_mb', float('nan')):9.1f} MB "
              f"rss+={rec.get('rss_growth_mb', float('nan')):8.1f} MB time={rec.get('time_s', float('nan')):8.3f} s "
              f"{rec.get('skipped', rec.get('error', ''))}", flush=True)
    plain = {impl: [r for r in rows if r["impl"] == impl and not r.get("chunk_size") and "peak_estimate_mb" in r]
             for impl in ("windowed", "naive")}
    ran = [r["seq"] for r in plain["naive"] if r["executed"]]
    out = {
        "benchmark": "ckd_memory: WR triple-wise (angle) loss + gradient w.r.t. the student",
        "config": {"batch": args.batch, "hidden": args.hidden, "window": args.window, "padding": "lengths S..S/2",
                   "naive_budget_gb": args.naive_budget_gb},
        "host": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "check": _check_equal(args.window),
        "results": rows,
        "largest_naive_executed_seq": max(ran) if ran else None,
        "growth_with_seq": {impl: {"peak_estimate": _slopes(v, "peak_estimate_mb"), "time": _slopes(v, "time_s")}
                            for impl, v in plain.items()},
        "total_s": round(time.perf_counter() - t0, 1),
    }
    import jax
    out["jax"] = jax.__version__
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
    print(f"check: windowed {out['check']['windowed']:.6g} vs naive {out['check']['naive']:.6g}; "
          f"wrote {args.out} in {out['total_s']} s")


if __name__ == "__main__":
    main()
