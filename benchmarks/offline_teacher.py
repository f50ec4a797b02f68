"""Offline vs online teacher in pre-training distillation, on the local recipe (real text, a trained teacher).

    python benchmarks/offline_teacher.py                                  # ~15 minutes on 2 CPU cores
    python benchmarks/offline_teacher.py --top_k=16,128 --epochs=0.5 --work=/tmp/offline_teacher

Runs the recipe (`--config`, default configs/progressive.py:local: teacher pre-training, progressive transfer and PD
with the teacher run every step) once, then its PD stage again from the same transferred student for each
`--top_k`, the teacher's k largest MLM logits stored for `--epochs` passes over the corpus and read instead of
running it (mobiledistill/teacher_topk.py). Per variant: the PD stage's wall time with the cache build's share, its
median steps/s, the teacher probability mass the top k keep, the training loss at every logged step against the
online run, and the held-out MLM accuracy, NLL and distillation loss (always against the full online teacher).
`--set` passes config overrides to every run (the tests use a tiny recipe). Writes
benchmarks/results/offline_teacher.json (or `--out`), updated after every run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULT = os.path.join(ROOT, "benchmarks", "results", "offline_teacher.json")


def run(args: list[str], workdir: str) -> float:
    """Runs the pipeline CLI; returns its wall seconds (raises with its stderr's tail on failure)."""
    env = dict(os.environ, PYTHONPATH=ROOT)
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "mobiledistill.main", *args, f"--workdir={workdir}"], cwd=ROOT, env=env,
                       capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"error: {' '.join(args)} failed (exit {r.returncode}): {r.stderr.strip()[-800:]}")
    return time.perf_counter() - t0


def pd_summary(workdir: str) -> dict:
    """What the PD stage of a finished workdir recorded: its done.json, logged losses and steps/s."""
    pd = os.path.join(workdir, "pd")
    done = json.load(open(os.path.join(pd, "done.json")))
    rows = [json.loads(line) for line in open(os.path.join(pd, "metrics.jsonl"))]
    rows = [r for r in rows if "loss" in r]
    rates = [r["steps_per_s"] for r in rows[1:] if r.get("steps_per_s", 0) > 0]  # the first includes the compile
    summary = dict(seconds=done.get("seconds"), losses={r["step"]: r["loss"] for r in rows},
                   median_steps_per_s=statistics.median(rates) if rates else None,
                   **{k: v for k, v in done.items() if k.startswith("eval_")})
    meta = os.path.join(pd, "teacher_topk", "meta.json")
    if os.path.exists(meta):
        m = json.load(open(meta))
        summary.update(cache_batches=m["batches"], cache_epochs_read=m["epochs_read"], top_k_mass=m["top_k_mass"],
                       cache_build_seconds=m["build_seconds"], cache_bytes=m["bytes_process0"])
    return summary


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/progressive.py:local")
    ap.add_argument("--top_k", default="8,64", help="comma-separated k values")
    ap.add_argument("--epochs", type=float, default=1.0, help="passes over the corpus the stored batches cover")
    ap.add_argument("--set", action="append", default=[], help="config override field=value, for every run")
    ap.add_argument("--work", default=os.path.join(ROOT, "runs", "offline_teacher"))
    ap.add_argument("--out", default=RESULT)
    args = ap.parse_args(argv)
    try:
        ks = [int(k) for k in args.top_k.split(",")]
        if not ks or min(ks) < 1 or not args.epochs > 0:
            raise ValueError
    except ValueError:
        raise SystemExit(f"error: --top_k={args.top_k!r} --epochs={args.epochs}; valid: comma-separated integers "
                         f">= 1 and epochs > 0") from None
    base = [f"--config={args.config}", "--config.scratch_baseline=False", *(f"--config.{s}" for s in args.set)]
    out = dict(config=args.config, overrides=args.set, epochs=args.epochs, load_average_at_start=os.getloadavg())

    def save():
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        json.dump(out, open(args.out, "w"), indent=2)

    online = os.path.join(args.work, "online")
    out["online_pipeline_seconds"] = run(base, online)
    out["online"] = pd_summary(online)
    print(f"online teacher: PD {out['online']['seconds']:.1f} s, held-out MLM accuracy "
          f"{out['online']['eval_mlm_accuracy']:.4f}", flush=True)
    save()
    out["offline"] = {}
    for k in ks:
        workdir = os.path.join(args.work, f"offline_k{k}")
        if not os.path.exists(os.path.join(workdir, "pd", "done.json")):
            shutil.rmtree(workdir, ignore_errors=True)
            shutil.copytree(online, workdir, ignore=shutil.ignore_patterns("pd", "report.md", "LOCK*", "*.lock"))
        run(base + [f"--config.pd.teacher_top_k={k}", f"--config.pd.teacher_topk_epochs={args.epochs}",
                    "--allow_config_change"], workdir)
        r = pd_summary(workdir)
        steps = sorted(set(r["losses"]) & set(out["online"]["losses"]))
        diffs = [r["losses"][s] - out["online"]["losses"][s] for s in steps]
        r["train_loss_minus_online"] = dict(mean=statistics.mean(diffs), max_abs=max(abs(d) for d in diffs),
                                           last=diffs[-1]) if diffs else None
        r["pd_speedup_vs_online"] = out["online"]["seconds"] / (r["seconds"] + r["cache_build_seconds"])
        if r.get("median_steps_per_s") and out["online"].get("median_steps_per_s"):
            r["step_speedup_vs_online"] = r["median_steps_per_s"] / out["online"]["median_steps_per_s"]
        out["offline"][f"k={k}"] = r
        print(f"offline teacher k={k}: top-k mass {r['top_k_mass']:.4f}, PD {r['seconds']:.1f} s + cache build "
              f"{r['cache_build_seconds']:.1f} s ({r['cache_batches']} batches), step "
              f"{r.get('step_speedup_vs_online', float('nan')):.2f}x online, held-out MLM accuracy "
              f"{r['eval_mlm_accuracy']:.4f} (online {out['online']['eval_mlm_accuracy']:.4f})", flush=True)
        save()
    out["load_average_at_end"] = os.getloadavg()
    save()
    print(f"wrote {args.out}")
    return out


if __name__ == "__main__":
    main()
