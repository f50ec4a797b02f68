"""Multi-host: two JAX processes on localhost (CPU, gloo collectives) run a short teacher pipeline (train, checkpoint
with per-process data positions, held-out evaluation, report) in one shared workdir and log the same losses as one
process fed the same global batches.

Each process reads its own shard of the documents, so the reference run stitches the two processes' local batches
(process 0's rows first, as `make_array_from_process_local_data` places them) in a single process.
"""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
from _limits import SUBPROCESS_TIMEOUT

from test_pipeline import REPO, env, tiny, vocab  # noqa: F401  (vocab is a fixture)

DRIVER = r"""
import os, sys
import numpy as np
if os.environ.get("STITCH_PROCESSES"):
    from mobiledistill import train
    from mobiledistill.data import iterators

    class Stitched:
        def __init__(self, *args, sharding=None, **kw):
            n = int(os.environ["STITCH_PROCESSES"])
            self.parts = [iterators.PretrainingIterator(*args, process_index=i, process_count=n, **kw)
                          for i in range(n)]
            self.sharding = sharding

        def __next__(self):
            local = [next(p) for p in self.parts]
            batch = {k: np.concatenate([b[k] for b in local]) for k in local[0]}
            return iterators.to_global(batch, self.sharding)

        def get_state(self):
            return {"parts": [p.get_state() for p in self.parts]}

        def set_state(self, state):
            for p, s in zip(self.parts, state["parts"]):
                p.set_state(s)

    train.PretrainingIterator = Stitched
from mobiledistill import main
sys.argv = ["mobiledistill.main"] + sys.argv[1:]
main.run()
"""

STAGES = ("teacher",)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args, workdir, **env_kw):
    cmd = [sys.executable, "-c", DRIVER, *args, f"--workdir={workdir}"]
    return subprocess.Popen(cmd, cwd=REPO, env=env(**env_kw), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def launch_pair(args, workdir) -> list:
    """Two JAX processes on localhost (one coordinator port) running the driver in `workdir`."""
    port = free_port()
    return [launch(args, workdir, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2",
                   JAX_PROCESS_ID=str(i)) for i in range(2)]


def wait_all(procs) -> list[tuple[str, str]]:
    """(stdout, stderr) of each process once all have exited 0 (any left running are killed on failure)."""
    try:
        results = [p.communicate(timeout=SUBPROCESS_TIMEOUT) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, (out, err) in zip(procs, results):
        assert p.returncode == 0, err[-3000:]
    return results


def losses(workdir):
    out = {}
    for stage in STAGES:
        records = [json.loads(line) for line in open(os.path.join(workdir, stage, "metrics.jsonl"))]
        out[stage] = np.array([[r["step"], r["loss"]] for r in records])
    return out


@pytest.mark.slow
def test_two_processes_match_one(vocab, tmp_path):  # noqa: F811
    args = tiny(vocab, "--config.teacher.steps=3", "--config.train.log_every=1", "--config.train.eval_batches=1",
                "--config.train.checkpoint_every=2", config="configs/teacher.py:local")
    multi, single = str(tmp_path / "multi"), str(tmp_path / "single")
    results = wait_all(launch_pair(args, multi) + [launch(args, single, STITCH_PROCESSES="2")])
    a, b = losses(multi), losses(single)
    for stage in STAGES:
        assert a[stage].shape == b[stage].shape == (3, 2), stage
        np.testing.assert_allclose(a[stage], b[stage], rtol=2e-5, err_msg=stage)
        assert os.path.exists(os.path.join(multi, stage, "done.json"))
    data = json.load(open(os.path.join(multi, "teacher", "checkpoints", "2", "data", "metadata")))
    assert [s["process_index"] for s in data["per_process"]] == [0, 1]
    assert os.path.exists(os.path.join(multi, "report.md"))
    assert "held-out MLM accuracy" in results[0][0] and "held-out MLM accuracy" not in results[1][0]


def run_pair(args, workdir):
    """The pipeline in two JAX processes on localhost sharing `workdir`; returns process 0's stdout."""
    return wait_all(launch_pair(args, workdir))[0][0]


@pytest.mark.slow
def test_two_processes_offline_teacher_of_every_logit_trains_as_online(vocab, tmp_path):  # noqa: F811
    """PD with the offline teacher (pd.teacher_top_k = the vocabulary) in two processes: each stores its own rows
    (`p0000-*`, `p0001-*`, the same number), process 0 writes meta.json once both have stopped, and PD reads the
    rows back into the same global batches: the logged PD losses are the online two-process run's (to the top-k
    order's float rounding)."""
    vocab_size = len(open(vocab).read().split())
    base = tiny(vocab, "--config.train.log_every=1")
    online, offline = tmp_path / "online", tmp_path / "offline"
    run_pair(base, str(online))
    out = run_pair(base + [f"--config.pd.teacher_top_k={vocab_size}", "--config.pd.teacher_topk_epochs=0.3"],
                   str(offline))
    assert "offline teacher: storing its top" in out
    cache = offline / "pd" / "teacher_topk"
    files = [sorted(p.name for p in cache.glob(f"p{i:04d}-*.npz")) for i in range(2)]
    meta = json.load(open(cache / "meta.json"))
    assert len(files[0]) == len(files[1]) == meta["batches"] >= 8, (len(files[0]), len(files[1]), meta["batches"])
    assert meta["signature"]["process_count"] == 2 and meta["top_k_mass"] == pytest.approx(1.0, abs=1e-5)
    a = [json.loads(line) for line in open(online / "pd" / "metrics.jsonl")]
    b = [json.loads(line) for line in open(offline / "pd" / "metrics.jsonl")]
    a, b = ([(r["step"], r["loss"]) for r in x if "loss" in r] for x in (a, b))
    assert len(a) == len(b) == 8 and [s for s, _ in a] == [s for s, _ in b]
    np.testing.assert_allclose([v for _, v in b], [v for _, v in a], rtol=1e-3)
