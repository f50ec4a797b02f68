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
    port = free_port()
    procs = [launch(args, multi, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2",
                    JAX_PROCESS_ID=str(i)) for i in range(2)]
    procs.append(launch(args, single, STITCH_PROCESSES="2"))
    try:
        results = [p.communicate(timeout=SUBPROCESS_TIMEOUT) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, (out, err) in zip(procs, results):
        assert p.returncode == 0, err[-3000:]
    a, b = losses(multi), losses(single)
    for stage in STAGES:
        assert a[stage].shape == b[stage].shape == (3, 2), stage
        np.testing.assert_allclose(a[stage], b[stage], rtol=2e-5, err_msg=stage)
        assert os.path.exists(os.path.join(multi, stage, "done.json"))
    data = json.load(open(os.path.join(multi, "teacher", "checkpoints", "2", "data", "metadata")))
    assert [s["process_index"] for s in data["per_process"]] == [0, 1]
    assert os.path.exists(os.path.join(multi, "report.md"))
    assert "held-out MLM accuracy" in results[0][0] and "held-out MLM accuracy" not in results[1][0]
