"""Random kill sweep: SIGKILL a tiny run at seeded random moments of its own progress, re-run it until it finishes,
and compare the final parameters and metrics bit for bit with an uninterrupted run.

    python benchmarks/kill_sweep.py --points=20            # writes benchmarks/results/kill_sweep.json

Two recipes: a tiny teacher pre-training pipeline and a tiny fine-tuning run (3 epochs, checkpoints every 2 steps).

Kill moments are measured in the killed run's own progress, not in wall-clock time (a loaded machine runs a child
several times slower or faster than the reference, so wall-clock offsets often fired after the run had finished).
The sweep watches the run: every line it prints on stdout and every entry that appears in or leaves its workdir
(polled every few ms down to `<stage>/checkpoints/<step>`: stage directories, caches, checkpoint steps, Orbax
temporary directories `<step>.orbax-checkpoint-tmp-*` of a save in flight, done.json, report.md) is one event.
Two kinds of point:
  * `event`: a target drawn uniformly over the events of an uninterrupted run; SIGKILL right after that many events.
  * `async_save`: SIGKILL as soon as the temporary directory of the j-th checkpoint save (j drawn uniformly over the
    run's saves) is seen in flight, i.e. inside an asynchronous checkpoint write. Every third point is one.
An attempt that finishes before its kill (or, for an `async_save` point, whose save committed before the signal
arrived) is recorded and retried in a fresh workdir with an earlier target, up to 3 attempts. Each point records
what the workdir held at the kill (`landed`: checkpoint steps, temporary directories of a save in flight, done.json,
report), the last event seen, which step the re-run resumed from, how many re-runs it took and whether the result
is identical.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MRPC = "sentence1\tsentence2\tlabel\n" + "A man sleeps.\tSomeone sleeps.\t1\nA dog runs.\tA cat sits.\t0\n" * 8
TMP = ".orbax-checkpoint-tmp"  # Orbax's suffix of a step directory that is still being written
POLL_S = 0.002
ATTEMPTS = 3


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
    e = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO, PYTHONUNBUFFERED="1")
    e.pop("MOBILEDISTILL_FAULT", None)
    return e


RESUMED = re.compile(r"\] resuming at step (\d+)")
SKIPPED = re.compile(r"\] finished earlier: skipped|^nothing to do", re.M)


def run_to_end(recipe: dict, workdir: str, max_runs: int = 6) -> tuple[int, dict]:
    """Re-runs the command until it exits 0; returns how many runs it took and what the runs said they did: the
    steps they resumed from, how many finished stages they skipped, the warnings they printed."""
    said = {"resumed_from": [], "skipped_finished": 0, "warnings": []}
    for n in range(1, max_runs + 1):
        r = subprocess.run(command(recipe, workdir), cwd=REPO, env=env(), capture_output=True, text=True)
        said["resumed_from"] += [int(m) for m in RESUMED.findall(r.stdout)]
        said["skipped_finished"] += len(SKIPPED.findall(r.stdout))
        said["warnings"] += [x[:200] for x in r.stderr.splitlines() if x.startswith("warning: ")]
        if r.returncode == 0:
            return n, said
        if n == max_runs:
            raise RuntimeError(f"{workdir}: still failing after {n} runs: {r.stderr[-2000:]}")
    return max_runs, said


# Watching a run ---------------------------------------------------------------------------------------------------
def _ls(path: str) -> list[os.DirEntry]:
    try:
        return list(os.scandir(path))
    except (FileNotFoundError, NotADirectoryError):
        return []


def _is_dir(e: os.DirEntry) -> bool:
    try:
        return e.is_dir(follow_symlinks=False)
    except OSError:
        return False


def snapshot(workdir: str) -> set[str]:
    """The workdir's entries (relative paths) down to `<stage>/checkpoints/<step>`: what shows a run's progress."""
    out = set()
    for e in _ls(workdir):
        out.add(e.name)
        if _is_dir(e):
            for f in _ls(e.path):
                out.add(f"{e.name}/{f.name}")
                if f.name == "checkpoints":
                    out.update(f"{e.name}/checkpoints/{s.name}" for s in _ls(f.path))
    return out


def in_flight(entries: set[str]) -> list[str]:
    """Orbax temporary step directories among `entries` (an async checkpoint write not yet committed)."""
    return sorted(p for p in entries if "/checkpoints/" in p and TMP in os.path.basename(p))


def _save_step(path: str) -> int:
    return int(os.path.basename(path).split(".", 1)[0])


def watch(recipe: dict, workdir: str, kill_when=None) -> dict:
    """Runs the command, recording its events; SIGKILLs it as soon as `kill_when(events, entries)` is true.

    An event is ('stdout', line), ('new', path) or ('gone', path). Returns {events, killed, seconds, saves (steps
    whose temporary directory was seen in flight, in order)}.
    """
    proc = subprocess.Popen(command(recipe, workdir), cwd=REPO, env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, bufsize=1)
    lines: queue.Queue = queue.Queue()

    def read():
        for line in proc.stdout:
            lines.put(line.rstrip("\n"))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    events, before, saves, killed = [], set(), [], False
    t0 = time.perf_counter()
    while True:
        finished = proc.poll() is not None
        while True:
            try:
                events.append(("stdout", lines.get_nowait()))
            except queue.Empty:
                break
        now = snapshot(workdir)
        events += [("new", p) for p in sorted(now - before)] + [("gone", p) for p in sorted(before - now)]
        for p in in_flight(now - before):
            if _save_step(p) not in saves:
                saves.append(_save_step(p))
        before = now
        if finished:
            break
        if kill_when is not None and kill_when(events, now, saves):
            proc.send_signal(signal.SIGKILL)
            killed = True
            break
        time.sleep(POLL_S)
    proc.wait()
    seconds = time.perf_counter() - t0
    reader.join(timeout=10)
    if killed and proc.returncode != -signal.SIGKILL:  # it exited on its own before the signal arrived
        killed = False
    if not killed and proc.returncode != 0:
        raise RuntimeError(f"{workdir}: the run failed on its own (exit {proc.returncode})")
    return {"events": events, "killed": killed, "seconds": seconds, "saves": saves}


def landed(workdir: str, events: list) -> dict:
    """What the workdir held at the kill (the process is dead: nothing changes it any more)."""
    entries = snapshot(workdir)
    out = {"workdir_exists": os.path.isdir(workdir), "events_seen": len(events)}
    if events:
        kind, what = events[-1]
        out["last_event"] = f"{kind}: {what[:160]}"
    for p in sorted(entries):
        parts = p.split("/")
        if len(parts) == 3 and parts[1] == "checkpoints":
            out.setdefault("checkpoints", {}).setdefault(parts[0], []).append(parts[2])
        if parts[-1] == "done.json":
            out.setdefault("done", []).append(parts[0] if len(parts) == 2 else ".")
    tmp = in_flight(entries)
    out["async_save_in_flight"] = bool(tmp)
    if tmp:
        out["saves_in_flight"] = tmp
    partial = sorted(p for p in entries if ".tmp-" in p and TMP not in p)  # write_json_atomic's temporaries
    if partial:
        out["partial_files"] = partial
    out["report_written"] = "report.md" in entries
    return out


# Results ----------------------------------------------------------------------------------------------------------
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


def tamper_data_state(workdir: str) -> str | None:
    """Moves the fine-tuning data iterator of the newest committed checkpoint one batch back (a resume that restores
    the wrong data position); returns the file changed. Only used to show that the comparison catches a broken
    resume."""
    for stage in sorted(os.listdir(workdir)):
        ckpts = os.path.join(workdir, stage, "checkpoints")
        if not os.path.isdir(ckpts):
            continue
        for step in sorted((int(s) for s in os.listdir(ckpts) if s.isdigit()), reverse=True):
            path = os.path.join(ckpts, str(step), "data", "metadata")
            try:
                with open(path) as f:
                    state = json.load(f)
            except (OSError, ValueError):
                continue
            if state.get("kind") == "arrays" and state.get("position", 0) >= 1:
                state["position"] -= 1  # the batch before is read again, every later one shifts
                with open(path, "w") as f:
                    json.dump(state, f)
                return path
    return None


# The sweep --------------------------------------------------------------------------------------------------------
def point_kind(i: int) -> str:
    return "async_save" if i % 3 == 2 else "event"


def kill_point(recipe: dict, workdir: str, kind: str, ref: dict, rng: random.Random) -> dict:
    """Up to ATTEMPTS fresh runs, each SIGKILLed at a drawn target, until one is killed where it was meant to be.

    Returns the last attempt's record plus every attempt's (target, outcome)."""
    n_events, n_saves = len(ref["events"]), max(len(ref["saves"]), 1)
    if kind == "event":
        target = rng.randint(1, max(1, n_events - 1))  # kill right after this many events
    else:
        target = rng.randint(1, n_saves)  # kill as soon as the target-th save is seen in flight
    attempts = []
    for attempt in range(ATTEMPTS):
        shutil.rmtree(workdir, ignore_errors=True)
        if kind == "event":
            w = watch(recipe, workdir, lambda events, entries, saves, t=target: len(events) >= t)
        else:
            w = watch(recipe, workdir, lambda events, entries, saves, t=target: len(saves) >= t
                      and bool(in_flight(entries)))
        where = landed(workdir, w["events"])
        ok = w["killed"] and (kind == "event" or where["async_save_in_flight"])
        attempts.append({"target": target, "killed": w["killed"], "async_save_in_flight": where["async_save_in_flight"],
                         "seconds": round(w["seconds"], 2)})
        if ok or attempt == ATTEMPTS - 1:
            return {"target": target, "killed": w["killed"], "landed": where, "attempts": attempts,
                    "seconds_to_kill": round(w["seconds"], 2)}
        # finished first, or the save committed before the signal: an earlier target in a fresh workdir
        if kind == "event":
            target = rng.randint(1, max(1, min(target, len(w["events"])) - 2))
        else:
            target = rng.randint(1, max(1, min(target, len(w["saves"]) or target) - 1))
    raise AssertionError("unreachable")


def sweep(points: int, seed: int, names: list[str], scratch: str, log=print) -> dict:
    rng = random.Random(seed)
    all_recipes = recipes(scratch)
    refs, states = {}, {}
    for name in names:
        workdir = os.path.join(scratch, f"ref_{name}")
        refs[name] = watch(all_recipes[name], workdir)
        states[name] = final_state(workdir, all_recipes[name])
        log(f"reference {name}: {refs[name]['seconds']:.1f}s, {len(refs[name]['events'])} events, saves seen in "
            f"flight at steps {refs[name]['saves']}")
    results = []
    for i in range(points):
        name, kind = names[i % len(names)], point_kind(i)
        recipe, workdir = all_recipes[name], os.path.join(scratch, f"point_{i}_{name}")
        p = kill_point(recipe, workdir, kind, refs[name], rng)
        runs, said = run_to_end(recipe, workdir)
        same = identical(states[name], final_state(workdir, recipe))
        where = p["landed"]
        results.append({"point": i, "recipe": name, "kind": kind, **p, "reruns": runs, **said, "identical": same})
        resumed = (f"resuming from step(s) {said['resumed_from']}" if said["resumed_from"] else
                   f"{said['skipped_finished']} finished stage(s) skipped" if said["skipped_finished"] else
                   "starting afresh")
        log(f"point {i} {name} ({kind}, target {p['target']}, {len(p['attempts'])} attempt(s)): "
            f"{'killed' if p['killed'] else 'FINISHED BEFORE ITS KILL'} after {where['events_seen']} events "
            f"({where.get('last_event', '-')[:70]}), checkpoints {where.get('checkpoints', {})}, async save in "
            f"flight: {where['async_save_in_flight']}, {runs} re-run(s) {resumed}, "
            f"identical: {same}")
        shutil.rmtree(workdir, ignore_errors=True)
    return {"points": points, "seed": seed, "recipes": names,
            "reference_seconds": {k: round(v["seconds"], 2) for k, v in refs.items()},
            "reference_events": {k: len(v["events"]) for k, v in refs.items()},
            "reference_saves_seen_in_flight": {k: v["saves"] for k, v in refs.items()},
            "all_identical": all(r["identical"] for r in results),
            "killed": sum(r["killed"] for r in results),
            "not_killed": sum(not r["killed"] for r in results),
            "async_save_points": sum(r["kind"] == "async_save" for r in results),
            "during_async_save": sum(r["killed"] and r["landed"]["async_save_in_flight"] for r in results),
            "attempts": sum(len(r["attempts"]) for r in results),
            "results": results}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--points", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--recipes", default="pipeline,finetune")
    p.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results", "kill_sweep.json"))
    p.add_argument("--scratch", default=None, help="keep the inputs and reference workdirs here (default: a "
                   "temporary directory, removed at the end)")
    a = p.parse_args(argv)
    scratch = a.scratch or tempfile.mkdtemp(prefix="kill-sweep-")
    os.makedirs(scratch, exist_ok=True)
    try:
        summary = sweep(a.points, a.seed, a.recipes.split(","), scratch, log=lambda m: print(m, flush=True))
    finally:
        if a.scratch is None:
            shutil.rmtree(scratch, ignore_errors=True)
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(summary, f, indent=1)
    print(f"{summary['killed']} of {a.points} points killed ({summary['during_async_save']} during an async save, "
          f"{summary['attempts']} attempts); all identical: {summary['all_identical']}; wrote {a.out}")
    return 0 if summary["all_identical"] else 1


if __name__ == "__main__":
    sys.exit(main())
