"""Random kill sweep: SIGKILL a tiny run at seeded random moments, re-run it until it finishes, and compare the final
parameters and metrics bit for bit with an uninterrupted run.

    python benchmarks/kill_sweep.py --points=20            # writes benchmarks/results/kill_sweep.json

Two recipes: a tiny teacher pre-training pipeline and a tiny fine-tuning run (3 epochs, checkpoints every 2 steps).
Kill moments are wall-clock offsets drawn uniformly over the reference run's duration, so some land in start-up,
some in training, some inside an (async) checkpoint write, a cache write or the report. Each point records where it
landed (what the workdir held at the kill: checkpoint steps, Orbax temporary directories of a save in flight,
done.json), how many re-runs it took, and whether the result is identical.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MRPC = "sentence1\tsentence2\tlabel\n" + "A man sleeps.\tSomeone sleeps.\t1\nA dog runs.\tA cat sits.\t0\n" * 8


def recipes(scratch: str) -> dict[str, dict]:
    """name -> {args(workdir), stage directories whose final checkpoint is compared}."""
    sys.path.insert(0, REPO)
    from mobiledistill.data import embedded_corpus, train_wordpiece

    vocab = os.path.join(scratch, "vocab.txt")
    if not os.path.exists(vocab):
        with open(vocab, "w") as f:
            f.write(train_wordpiece(embedded_corpus().texts(max_chars=300_000), vocab_size=1024).vocab_text())
    for split in ("train", "dev"):
        with open(os.path.join(scratch, f"{split}.tsv"), "w") as f:
            f.write(MRPC)
    pipeline = ["--config=configs/teacher.py:local", "--config.teacher.num_hidden_layers=2",
                "--config.teacher.steps=16", "--config.teacher.warmup_steps=2", "--config.train.global_batch=8",
                "--config.data.max_seq_length=32", "--config.data.max_predictions_per_seq=5",
                "--config.train.checkpoint_every=2", "--config.train.log_every=2", "--config.train.eval_batches=2",
                f"--config.data.vocab={vocab}"]
    finetune = ["--config=configs/finetune_glue.py:task=mrpc,tiny=1", "--config.data.source=files",
                f"--config.data.files.train={scratch}/train.tsv", f"--config.data.files.validation={scratch}/dev.tsv",
                "--config.seeds=(0,)", "--config.train.epochs=3", "--config.train.checkpoint_every=2",
                "--config.data.max_train_examples=16",
                # a fixed vocab: WordPiece trained on 16 sentences breaks frequency ties in hash order, so two
                # separate workdirs would get different vocabs (a resumed run re-uses its cached one)
                f"--config.tokenizer={vocab}"]
    return {"pipeline": {"args": pipeline, "stages": ["teacher"]},
            "finetune": {"args": finetune, "stages": ["seed_0"]}}


def command(recipe: dict, workdir: str) -> list[str]:
    return [sys.executable, "-m", "mobiledistill.main", *recipe["args"], f"--workdir={workdir}"]


def env() -> dict:
    e = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
    e.pop("MOBILEDISTILL_FAULT", None)
    return e


def run_to_end(recipe: dict, workdir: str, max_runs: int = 6) -> int:
    """Re-runs the command until it exits 0; returns how many runs it took."""
    for n in range(1, max_runs + 1):
        r = subprocess.run(command(recipe, workdir), cwd=REPO, env=env(), capture_output=True, text=True)
        if r.returncode == 0:
            return n
        if n == max_runs:
            raise RuntimeError(f"{workdir}: still failing after {n} runs: {r.stderr[-2000:]}")
    return max_runs


def landed(workdir: str) -> dict:
    """What the workdir held at the kill."""
    out = {"workdir_exists": os.path.isdir(workdir)}
    for d, dirs, files in os.walk(workdir):
        if os.path.basename(d) == "checkpoints":
            out.setdefault("checkpoints", {})[os.path.relpath(os.path.dirname(d), workdir)] = sorted(dirs)
            dirs[:] = []
        if "done.json" in files:
            out.setdefault("done", []).append(os.path.relpath(d, workdir))
    tmp = [s for steps in out.get("checkpoints", {}).values() for s in steps if "tmp" in s]
    out["async_save_in_flight"] = bool(tmp)
    out["report_written"] = os.path.exists(os.path.join(workdir, "report.md"))
    return out


def final_state(workdir: str, recipe: dict) -> dict:
    """{name: array} of every compared stage's final parameters plus its done.json metrics (without timings)."""
    import jax
    import orbax.checkpoint as ocp

    out = {}
    for stage in recipe["stages"]:
        with open(os.path.join(workdir, stage, "done.json")) as f:
            done = json.load(f)
        out[f"{stage}/done"] = {k: v for k, v in done.items() if k != "seconds"}
        with ocp.StandardCheckpointer() as c:
            tree = c.restore(os.path.join(workdir, stage, "checkpoints", str(done["final_step"]), "params"))
        for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]:
            out[f"{stage}{jax.tree_util.keystr(p)}"] = np.asarray(v)
    return out


def identical(a: dict, b: dict) -> bool:
    if a.keys() != b.keys():
        return False
    return all(np.array_equal(a[k], b[k]) if isinstance(a[k], np.ndarray) else a[k] == b[k] for k in a)


def sweep(points: int, seed: int, names: list[str], scratch: str) -> dict:
    rng = random.Random(seed)
    all_recipes = recipes(scratch)
    refs, durations = {}, {}
    for name in names:
        workdir = os.path.join(scratch, f"ref_{name}")
        t0 = time.perf_counter()
        run_to_end(all_recipes[name], workdir, max_runs=1)
        durations[name] = time.perf_counter() - t0
        refs[name] = final_state(workdir, all_recipes[name])
    results = []
    for i in range(points):
        name = names[i % len(names)]
        recipe, workdir = all_recipes[name], os.path.join(scratch, f"point_{i}_{name}")
        offset = rng.uniform(0.05, 1.0) * durations[name]
        proc = subprocess.Popen(command(recipe, workdir), cwd=REPO, env=env(), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        try:
            proc.wait(timeout=offset)
            killed = False
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            killed = True
        where = landed(workdir)
        runs = run_to_end(recipe, workdir)
        same = identical(refs[name], final_state(workdir, recipe))
        results.append({"point": i, "recipe": name, "offset_s": round(offset, 3),
                        "fraction_of_run": round(offset / durations[name], 3), "killed": killed, "landed": where,
                        "reruns": runs, "identical": same})
        print(f"point {i} {name}: kill at {offset:.1f}s ({offset / durations[name]:.0%}) "
              f"{'killed' if killed else 'finished first'}, async save in flight: {where['async_save_in_flight']}, "
              f"{runs} re-run(s), identical: {same}", flush=True)
        shutil.rmtree(workdir, ignore_errors=True)
    return {"points": points, "seed": seed, "recipes": names,
            "reference_seconds": {k: round(v, 2) for k, v in durations.items()},
            "all_identical": all(r["identical"] for r in results),
            "killed": sum(r["killed"] for r in results),
            "during_async_save": sum(r["landed"]["async_save_in_flight"] for r in results), "results": results}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--points", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--recipes", default="pipeline,finetune")
    p.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results", "kill_sweep.json"))
    a = p.parse_args(argv)
    scratch = tempfile.mkdtemp(prefix="kill-sweep-")
    try:
        summary = sweep(a.points, a.seed, a.recipes.split(","), scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(summary, f, indent=1)
    print(f"{summary['killed']} of {a.points} points killed ({summary['during_async_save']} during an async save); "
          f"all identical: {summary['all_identical']}; wrote {a.out}")
    return 0 if summary["all_identical"] else 1


if __name__ == "__main__":
    sys.exit(main())
