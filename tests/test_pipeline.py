"""The pipeline as users run it: `python -m mobiledistill.main` in a subprocess, on a tiny version of the local config.

Covers exact resume after kill -9, SIGTERM save-and-exit, skipping a finished run, refusing another config in the
same workdir, 1 vs 8 devices, the paper-scale dry run and one-line errors for bad input.
"""

import json
import os
import signal
import subprocess
import sys

import numpy as np
import orbax.checkpoint as ocp
import pytest
from _limits import SUBPROCESS_TIMEOUT

from mobiledistill.data import embedded_corpus, train_wordpiece

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def vocab(tmp_path_factory):
    """One vocab file for all runs (WordPiece training is not bit-reproducible across processes)."""
    path = tmp_path_factory.mktemp("vocab") / "vocab.txt"
    tok = train_wordpiece(embedded_corpus().texts(max_chars=300_000), vocab_size=1024)
    path.write_text(tok.vocab_text())
    return str(path)


def tiny(vocab, *extra, config="configs/progressive.py:local"):
    return [f"--config={config}",
            "--config.teacher.num_hidden_layers=2", "--config.student.num_hidden_layers=2",
            "--config.teacher.steps=12", "--config.teacher.warmup_steps=2",
            "--config.pkt.steps_per_layer=8", "--config.pkt.warmup_steps=1",
            "--config.pd.steps=8", "--config.pd.warmup_steps=1",
            "--config.train.global_batch=8", "--config.data.max_seq_length=32",
            "--config.data.max_predictions_per_seq=5", "--config.train.checkpoint_every=4",
            "--config.train.log_every=2", "--config.train.eval_batches=2", "--config.scratch_baseline=False",
            f"--config.data.vocab={vocab}", *extra]


def env(devices=1, **extra):
    e = dict(os.environ, JAX_PLATFORMS="cpu", **extra)
    e.pop("MOBILEDISTILL_FAULT", None)
    e.update(extra)
    if devices > 1:
        e["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    return e


def main(args, workdir=None, timeout=SUBPROCESS_TIMEOUT, cwd=REPO, **env_kw):
    cmd = [sys.executable, "-m", "mobiledistill.main", *args] + ([f"--workdir={workdir}"] if workdir else [])
    e = env(**env_kw)
    e["PYTHONPATH"] = REPO
    return subprocess.run(cmd, cwd=cwd, env=e, capture_output=True, text=True, timeout=timeout)


def final_params(workdir, stage, step):
    manager = ocp.CheckpointManager(os.path.join(workdir, stage, "checkpoints"),
                                    item_names=("params", "opt_state", "data"))
    params = manager.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore())).params
    manager.close()
    flat, _ = __import__("jax").tree_util.tree_flatten_with_path(params)
    return {__import__("jax").tree_util.keystr(p): np.asarray(v) for p, v in flat}


def tree_mtimes(root):
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            out[os.path.join(d, f)] = os.stat(os.path.join(d, f)).st_mtime_ns
    return out


def error_line(result):
    lines = [l for l in result.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-2000:]
    return lines[0]


@pytest.mark.slow
def test_kill9_resume_is_bit_identical_and_finished_runs_are_left_alone(vocab, tmp_path):
    ref_dir, run_dir = str(tmp_path / "ref"), str(tmp_path / "run")
    ref = main(tiny(vocab), ref_dir)
    assert ref.returncode == 0, ref.stderr[-3000:]
    for stage in ("teacher", "pkt_00", "pkt_01", "pd"):
        assert os.path.exists(os.path.join(ref_dir, stage, "done.json"))
        assert os.listdir(os.path.join(ref_dir, stage, "tb"))
    assert os.path.exists(os.path.join(ref_dir, "report.md"))
    assert os.path.exists(os.path.join(ref_dir, "plots", "pkt_01.png"))

    killed = main(tiny(vocab), run_dir, MOBILEDISTILL_FAULT="kill:pkt_01:6")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert not os.path.exists(os.path.join(run_dir, "pkt_01", "done.json"))
    resumed = main(tiny(vocab), run_dir)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    out = resumed.stdout
    assert "[1/4 teacher] finished earlier: skipped" in out
    assert "[2/4 pkt_00] finished earlier: skipped" in out
    assert "[3/4 pkt_01] resuming at step 4" in out
    a, b = final_params(ref_dir, "pd", 8), final_params(run_dir, "pd", 8)
    assert a.keys() == b.keys() and len(a) > 50
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)

    before = tree_mtimes(run_dir)
    again = main(tiny(vocab), run_dir)
    assert again.returncode == 0 and "nothing to do: all 4 stages" in again.stdout
    assert tree_mtimes(run_dir) == before

    other = main(tiny(vocab, "--config.pd.alpha=0.3"), run_dir)
    assert other.returncode == 2
    assert "holds another experiment (config differs in ['pd.alpha'])" in error_line(other)
    assert tree_mtimes(run_dir) == before


@pytest.mark.slow
def test_sigterm_saves_the_current_step_and_a_rerun_continues(vocab, tmp_path):
    workdir = str(tmp_path / "w")
    args = tiny(vocab, "--config.teacher.steps=400", "--config.train.checkpoint_every=1000")
    cmd = [sys.executable, "-m", "mobiledistill.main", *args, f"--workdir={workdir}"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if "[1/4 teacher] step 4/400" in line:
            proc.send_signal(signal.SIGTERM)
            break
    _, err = proc.communicate(timeout=SUBPROCESS_TIMEOUT)
    assert proc.returncode == 3, err[-3000:]
    saved = json.loads(open(os.path.join(workdir, "config.json")).read())["teacher"]["steps"]
    assert saved == 400
    steps = sorted(int(d) for d in os.listdir(os.path.join(workdir, "teacher", "checkpoints")) if d.isdigit())
    assert len(steps) == 1 and 4 <= steps[0] < 400
    assert f"checkpointed at step {steps[0]}" in err
    resumed = main(args, workdir, MOBILEDISTILL_FAULT=f"kill:teacher:{steps[0] + 2}")
    assert f"[1/4 teacher] resuming at step {steps[0]}" in resumed.stdout
    assert resumed.returncode == -signal.SIGKILL


@pytest.mark.slow
def test_nonfinite_loss_stops_the_stage_and_keeps_the_last_good_checkpoint(vocab, tmp_path):
    workdir = str(tmp_path / "nan")
    args = tiny(vocab, "--config.teacher.lr=1e30", "--config.teacher.warmup_steps=0", "--config.train.log_every=1",
                "--config.train.checkpoint_every=1", config="configs/teacher.py:local")
    r = main(args, workdir)
    assert r.returncode == 2
    line = error_line(r)
    assert "non-finite loss/gradients at step" in line and "kept the last good checkpoint" in line
    good = int(line.split("(step ")[1].split(")")[0])
    saved = sorted(int(d) for d in os.listdir(os.path.join(workdir, "teacher", "checkpoints")) if d.isdigit())
    assert saved and saved[-1] == good
    assert not os.path.exists(os.path.join(workdir, "teacher", "done.json"))


@pytest.mark.slow
def test_relative_workdir(vocab, tmp_path):
    """The README runs `--workdir=runs/local`: relative paths are made absolute (Orbax requires it)."""
    args = tiny(vocab, "--config.teacher.steps=2", "--config.train.log_every=1",
                config=os.path.join(REPO, "configs", "teacher.py") + ":local")
    r = main(args, "runs/rel", cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr[-3000:]
    assert os.path.exists(tmp_path / "runs" / "rel" / "teacher" / "done.json")
    assert os.path.exists(tmp_path / "runs" / "rel" / "report.md")


@pytest.mark.slow
def test_one_and_eight_devices_give_the_same_losses(vocab, tmp_path):
    args = tiny(vocab, "--config.teacher.steps=3", "--config.train.log_every=1", config="configs/teacher.py:local")
    runs = {"1": ([], 1), "data8": (["--config.mesh.data=8"], 8),
            "data4_fsdp2": (["--config.mesh.data=4", "--config.mesh.fsdp=2"], 8)}
    losses = {}
    for name, (extra, devices) in runs.items():
        workdir = str(tmp_path / name)
        r = main(args + extra, workdir, devices=devices)
        assert r.returncode == 0, r.stderr[-3000:]
        records = [json.loads(l) for l in open(os.path.join(workdir, "teacher", "metrics.jsonl"))]
        losses[name] = np.array([[rec["loss"], rec["mlm"], rec["nsp"]] for rec in records])
    assert losses["1"].shape == (3, 3)
    np.testing.assert_allclose(losses["data8"], losses["1"], rtol=2e-5)
    np.testing.assert_allclose(losses["data4_fsdp2"], losses["1"], rtol=2e-5)


@pytest.mark.slow
def test_paper_scale_dry_run():
    r = main(["--config=configs/progressive.py", "--dry_run", "--devices=512"])
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout
    assert "26 stages on 512 devices" in out and "global batch 4096 x seq 128" in out
    assert "(24,581,888 backbone)" in out and "(294,467,840 backbone)" in out
    assert "pkt_23        10000" in out and "pd           500000" in out


@pytest.mark.parametrize("args,expected", [
    (["--config.train.bogus=1"], "unknown config key 'bogus' in --config.train.bogus=1"),
    (["--config.train.global_batch=abc"], "invalid literal for int()"),
    (["--config.train.global_batch=12", "--devices=8"], "is not divisible by the 8 devices"),
    (["--config.student.num_hidden_layers=30"], "layer-wise transfer needs a student no deeper than its teacher"),
    (["--config.student.hidden_act=swish"], "hidden_act='swish'; valid: relu"),
    (["--config.strategy=distill"], "strategy='distill'; valid: progressive, joint, auxiliary, teacher"),
])
def test_bad_input_is_one_line_and_nonzero(args, expected):
    r = main(["--config=configs/progressive.py", "--dry_run", *args])
    assert r.returncode == 2
    assert expected in error_line(r)
