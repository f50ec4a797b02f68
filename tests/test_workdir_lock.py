"""One writer per workdir: a live holder is refused in one line, a dead or recycled one is taken over, and the two
entry points (pipeline and fine-tuning) hold the lock while they run."""

import json
import os
import signal
import socket
import subprocess
import sys

import pytest
from _limits import SUBPROCESS_TIMEOUT

from mobiledistill import workdir_lock
from mobiledistill.checkpoint import CheckpointError


def write_lock(workdir, pid, host=None, start="auto"):
    workdir.mkdir(parents=True, exist_ok=True)
    holder = {"pid": pid, "host": host or socket.gethostname(), "since": "2026-01-01T00:00:00Z",
              "process_start": workdir_lock._start_time(pid) if start == "auto" else start}
    (workdir / workdir_lock.LOCK_NAME).write_text(json.dumps(holder))
    return holder


@pytest.fixture
def sleeper():
    p = subprocess.Popen(["sleep", "3600"])
    yield p
    p.kill()
    p.wait()


def files(d):
    return {os.path.join(r, f): open(os.path.join(r, f), "rb").read() for r, _, fs in os.walk(d) for f in fs}


def test_acquire_release_and_reentrance(tmp_path):
    with workdir_lock.hold(tmp_path / "w") as path:
        holder = json.loads(path.read_text())
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
        with workdir_lock.hold(tmp_path / "w"):  # the same process may nest (Pea-KD runs fine-tuning inside)
            pass
        assert path.exists()
    assert not path.exists()


def test_a_live_holder_is_refused_and_nothing_changes(tmp_path, sleeper):
    write_lock(tmp_path, sleeper.pid)
    before = files(tmp_path)
    with pytest.raises(CheckpointError) as info:
        workdir_lock.acquire(tmp_path)
    msg = str(info.value)
    assert "\n" not in msg and f"in use by pid {sleeper.pid} on host {socket.gethostname()}" in msg
    assert str(tmp_path / workdir_lock.LOCK_NAME) in msg
    assert files(tmp_path) == before


def test_another_hosts_lock_cannot_be_checked_and_is_refused(tmp_path):
    write_lock(tmp_path, 1, host="some-other-host")
    with pytest.raises(CheckpointError, match="in use by pid 1 on host some-other-host"):
        workdir_lock.acquire(tmp_path)


def test_unreadable_lock_is_refused_in_one_line(tmp_path):
    (tmp_path / workdir_lock.LOCK_NAME).write_text('{"pid": 1')
    with pytest.raises(CheckpointError, match="cannot be read"):
        workdir_lock.acquire(tmp_path)


@pytest.mark.parametrize("case", ["exited", "pid recycled"])
def test_a_stale_lock_is_taken_over_with_a_warning(tmp_path, capsys, sleeper, case):
    if case == "exited":
        p = subprocess.Popen(["true"])
        p.wait()
        write_lock(tmp_path, p.pid)
        why = f"pid {p.pid} is no longer running"
    else:  # the pid runs, but it is not the process that took the lock (another start time)
        write_lock(tmp_path, sleeper.pid, start="1")
        why = f"pid {sleeper.pid} now belongs to another process"
    path = workdir_lock.acquire(tmp_path)
    try:
        assert json.loads(path.read_text())["pid"] == os.getpid()
        (line,) = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
        assert line.startswith(f"warning: taking over the lock of {tmp_path}") and why in line
        assert sorted(os.listdir(tmp_path)) == [workdir_lock.LOCK_NAME]
    finally:
        workdir_lock.release(path)
    assert not os.listdir(tmp_path)


def test_finetune_run_is_refused_while_another_process_holds_the_workdir(tmp_path, sleeper):
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs"))
    import finetune_glue

    from mobiledistill import finetune

    write_lock(tmp_path, sleeper.pid)
    before = files(tmp_path)
    with pytest.raises(CheckpointError, match=f"in use by pid {sleeper.pid}"):
        finetune.run(finetune_glue.get_config("task=mrpc,tiny=1"), str(tmp_path))
    assert files(tmp_path) == before


@pytest.mark.slow
def test_second_pipeline_on_a_busy_workdir_is_refused_then_a_killed_ones_lock_is_taken_over(tmp_path):
    from test_pipeline import REPO, env, main, tiny

    from mobiledistill.data import embedded_corpus, train_wordpiece

    vocab = tmp_path / "vocab.txt"
    vocab.write_text(train_wordpiece(embedded_corpus().texts(max_chars=300_000), vocab_size=1024).vocab_text())
    workdir = str(tmp_path / "w")
    args = tiny(str(vocab), "--config.teacher.steps=400", "--config.train.checkpoint_every=4",
                config="configs/teacher.py:local")
    cmd = [sys.executable, "-m", "mobiledistill.main", *args, f"--workdir={workdir}"]
    first = subprocess.Popen(cmd, cwd=REPO, env=dict(env(), PYTHONPATH=REPO), stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, text=True)
    try:
        for line in first.stdout:
            if "[1/1 teacher] step 8/400" in line:
                break
        assert first.poll() is None
        second = main(args, workdir)
        assert second.returncode == 2
        lines = [x for x in second.stderr.splitlines() if x.strip()]
        assert len(lines) == 1 and lines[0].startswith(f"error: workdir {workdir} is in use by pid {first.pid}")
    finally:
        first.send_signal(signal.SIGKILL)
        first.communicate(timeout=SUBPROCESS_TIMEOUT)
    assert os.path.exists(os.path.join(workdir, workdir_lock.LOCK_NAME))  # left behind by the killed run
    third = main(args, workdir)
    assert f"warning: taking over the lock of {workdir} from pid {first.pid}" in third.stderr, third.stderr[-3000:]
    assert third.returncode == 0 and "[1/1 teacher] resuming at step" in third.stdout
    assert not os.path.exists(os.path.join(workdir, workdir_lock.LOCK_NAME))  # released at the end


@pytest.mark.slow
def test_a_finished_run_is_read_without_the_lock(tmp_path, sleeper, capsys):
    """Readers of a finished run are never refused while another process holds its workdir: re-running the finished
    experiment (nothing to do, nothing written), evaluating it (mode=eval) and exporting it; a run that would write
    (another seed) is still refused."""
    import tensorflow_datasets as tfds

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs"))
    import finetune_glue

    from mobiledistill import export, finetune

    workdir = str(tmp_path / "run")
    def config(seeds=(0,)):
        c = finetune_glue.get_config("task=sst2,tiny=1")
        c.seeds = seeds
        return c

    with tfds.testing.mock_data(num_examples=10):
        first = finetune.run(config(), workdir)
        holder = write_lock(tmp_path / "run", sleeper.pid)  # another live process holds the workdir
        before = files(workdir)
        capsys.readouterr()
        assert finetune.run(config(), workdir) == first
        assert "nothing to do: every seed [0]" in capsys.readouterr().out
        assert files(workdir) == before  # a pure read
        c = config()
        c.mode = "eval"
        assert set(finetune.run(c, workdir)) == {0}
        assert os.path.exists(os.path.join(workdir, "seed_0", "eval_validation_metrics.json"))
        with pytest.raises(CheckpointError, match=f"in use by pid {sleeper.pid}"):
            finetune.run(config(seeds=(0, 1)), workdir)  # seed 1 would be trained: a writer
    assert export.run([f"--from={workdir}", f"--to={tmp_path / 'exported'}", "--format=hf"]) == 0
    assert json.loads((tmp_path / "run" / workdir_lock.LOCK_NAME).read_text()) == holder


def test_a_finished_pipeline_is_read_without_the_lock(tmp_path, sleeper, capsys):
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs"))
    import teacher as teacher_config

    from mobiledistill import checkpoint as ckpt
    from mobiledistill import pipeline

    c = teacher_config.get_config("local")
    workdir = tmp_path / "w"
    _, _, stages = pipeline.plan(c)
    ckpt.check_fingerprint(workdir, c.to_dict())
    for s in stages:
        (workdir / s.name).mkdir()
        (workdir / s.name / "done.json").write_text(json.dumps({"stage": s.name, "final_step": s.steps}))
    (workdir / "report.md").write_text("# report\n")
    write_lock(workdir, sleeper.pid)
    before = files(workdir)
    capsys.readouterr()
    assert set(pipeline.run(c, str(workdir))) == {s.name for s in stages}
    assert f"nothing to do: all {len(stages)} stages" in capsys.readouterr().out and files(workdir) == before
    (workdir / stages[-1].name / "done.json").unlink()  # unfinished: a writer, refused
    with pytest.raises(CheckpointError, match=f"in use by pid {sleeper.pid}"):
        pipeline.run(c, str(workdir))
