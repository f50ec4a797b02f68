"""One engine for every config (mobiledistill.engine): dry runs of every config's own command, plan-time checks of
stage hand-off, and recipes (Pea-KD, teacher -> ... -> export) that resume bit-identically after SIGKILL / SIGTERM."""

import ast
import glob
import json
import os
import shlex
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from _limits import SUBPROCESS_TIMEOUT

from mobiledistill import engine, export_stage
from mobiledistill.errors import ConfigError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "configs"))


def first_command(path: str) -> list[str]:
    """The first `python -m mobiledistill.main --config=configs/<this file>...` command of the file's docstring."""
    doc = ast.get_docstring(ast.parse(open(path).read()))
    lines = doc.replace("\\\n", "").splitlines()  # a shell line continuation
    name = os.path.basename(path)
    for line in lines:
        if "python -m mobiledistill.main" in line and f"--config=configs/{name}" in line:
            words = shlex.split(line.split("#")[0])
            return words[words.index("mobiledistill.main") + 1:]
    raise AssertionError(f"{path}: no command for itself in its docstring")


DRIVER = textwrap.dedent("""
    import io, json, sys, contextlib
    from absl import flags
    from mobiledistill import main
    results = []
    for argv in json.loads(sys.argv[1]):
        out, err = io.StringIO(), io.StringIO()
        code = 0
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                main.main(main._parse(["main", *argv]))
            except SystemExit as e:
                code = e.code or 0
        flags.FLAGS.unparse_flags()
        results.append({"argv": argv, "code": code, "out": out.getvalue(), "err": err.getvalue()})
    print(json.dumps(results))
""")


def test_every_config_dry_runs_with_the_first_command_of_its_docstring():
    commands = []
    for path in sorted(glob.glob(os.path.join(REPO, "configs", "*.py"))):
        argv = [a for a in first_command(path) if not a.startswith("--workdir")]
        commands.append(argv + ["--dry_run"])
    assert len(commands) >= 12
    # fine-tuning and Pea-KD configs whose inputs exist plan too (presets: no checkpoint to read)
    commands += [["--config=configs/finetune_glue.py:task=mrpc,tiny=1", "--dry_run"],
                 ["--config=configs/peakd.py:task=rte,teacher=hf:/path/t,init=preset:test_bert", "--dry_run"]]
    r = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(commands)], cwd=REPO, capture_output=True,
                       text=True, timeout=SUBPROCESS_TIMEOUT)
    assert r.returncode == 0, r.stderr[-3000:]
    results = json.loads(r.stdout.strip().splitlines()[-1])
    planned, refused = [], []
    for res in results:
        cmd = " ".join(res["argv"])
        if res["code"] == 0:
            assert res["out"].strip(), cmd
            planned.append(res["argv"][0].split(":")[0])
            continue
        # refused at plan time: one line naming a placeholder path of the command that does not exist
        lines = [x for x in res["err"].strip().splitlines() if x.strip()]
        assert res["code"] == 2 and len(lines) == 1 and lines[0].startswith("error: "), (cmd, res["err"][-2000:])
        missing = [w for w in cmd.replace(",", " ").replace("=", " ").replace(":", " ").split()
                   if w.startswith(("/path", "runs/")) and w in lines[0]]
        assert missing and not any(os.path.exists(m) for m in missing), (cmd, lines[0])
        assert "does not exist" in lines[0], (cmd, lines[0])
        refused.append(lines[0])
    # every pipeline config and the end-to-end recipe plan without any input
    for name in ("progressive.py", "joint.py", "auxiliary.py", "teacher.py", "ckd.py", "minilm_mobilebert.py",
                 "mobilebert_task.py"):
        assert f"--config=configs/{name}" in planned, (planned, refused)
    ft = next(r for r in results if r["argv"][0].startswith("--config=configs/finetune_glue.py:task=mrpc"))
    assert ft["code"] == 0 and "task mrpc, 2 label(s); init preset:test_bert" in ft["out"], ft
    pea = next(r for r in results if "peakd.py:task=rte,teacher=hf" in r["argv"][0])
    assert pea["code"] == 2 and "distill.teacher=hf:/path/t: /path/t/config.json does not exist" in pea["err"], pea
    recipe = next(r for r in results if r["argv"][0].startswith("--config=configs/mobilebert_task.py"))["out"]
    for text in ("recipe: 5 stages", "== student_kd (finetune: init_from pretrain/pd, teacher_from teacher_task)",
                 "pkt_03", "GFLOP per sequence", "export student_kd"):
        assert text in recipe, recipe


def _recipe(**sections):
    import ml_collections

    from mobiledistill.export_stage import export_config
    from mobiledistill.finetune import finetune_config
    import progressive

    c = ml_collections.ConfigDict()
    c.pretrain = progressive.get_config("local")
    c.pretrain.kind = "pretrain"
    for name, fields in sections.items():
        sub = export_config() if fields.pop("kind", "") == "export" else finetune_config()
        sub.update(fields)
        c[name] = sub
    c.stages = ("pretrain", *sections)
    return c


@pytest.mark.parametrize("sections, match", [
    (dict(task=dict(init_from="nope/pd")), "init_from='nope/pd' names no earlier stage; earlier: pretrain"),
    (dict(task=dict(init_from="pretrain/pkt_99")), "name one stage of pipeline 'pretrain' as pretrain/<stage>, "
                                                   "one of teacher, pkt_00"),
    (dict(task=dict(init_from="pretrain")), "pretrain/<stage>"),
    (dict(a=dict(init_from="pretrain/pd"), b=dict(init_from="a")), "use 'a' as teacher_from instead"),
    (dict(a=dict(init_from="pretrain/pd", teacher_from="b"), b=dict(init_from="pretrain/pd")),
     "teacher_from='b' names no earlier stage"),
    (dict(a=dict(init_from="pretrain/pd", teacher_from="pretrain/teacher")), "a teacher must be a fine-tuned"),
    (dict(e=dict(kind="export")), "an export stage needs init_from"),
])
def test_stage_inputs_are_checked_at_plan_time_in_one_line(sections, match):
    with pytest.raises(ConfigError, match=match.replace("(", r"\(").replace(")", r"\)")) as e:
        engine.plan(_recipe(**sections))
    assert "\n" not in str(e.value)


def test_a_missing_section_and_an_empty_recipe_are_refused():
    c = _recipe()
    with c.unlocked():
        c.stages = ("pretrain", "task")
    with pytest.raises(ConfigError, match="stages lists 'task' but the config has no section 'task'; sections: "
                                          "pretrain"):
        engine.plan(c)
    c.stages = ()
    with pytest.raises(ConfigError, match="stages is empty"):
        engine.plan(c)


# ---------------------------------------------------------------------------------------------------------------
# Recipes run end to end (subprocesses: SIGKILL / SIGTERM like a preempted machine)

POS = ["a wonderful , moving film", "great acting and a lovely story", "brilliant and funny", "a joy to watch",
       "superb , warm and clever", "the best film of the year"]
NEG = ["a dull , tedious mess", "boring and badly acted", "awful script , weak plot", "a tiresome bore",
       "clumsy , flat and lifeless", "the worst film of the year"]


def write_task(tmp_path, rows=48, seed=0):
    rng = np.random.default_rng(seed)
    paths = {}
    for split, n in (("train", rows), ("dev", rows // 2)):
        lines = ["sentence\tlabel"]
        for i in range(n):
            label = int(rng.integers(0, 2))
            words = (POS if label else NEG)[int(rng.integers(0, 6))]
            lines.append(f"{words} {'indeed' if i % 3 else 'really'}\t{label}")
        paths[split] = str(tmp_path / f"{split}.tsv")
        open(paths[split], "w").write("\n".join(lines) + "\n")
    return paths


def env(**extra):
    e = {**os.environ, "JAX_PLATFORMS": "cpu", **extra}
    e.pop("XLA_FLAGS", None)
    return e


def main(args, workdir, **extra):
    return subprocess.run([sys.executable, "-m", "mobiledistill.main", *args, f"--workdir={workdir}"], cwd=REPO,
                          env=env(**extra), capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT)


def run_until(args, workdir, needle: str, sig, after: str = "") -> subprocess.CompletedProcess:
    """Starts the command and sends `sig` when a stdout line contains `needle` (after one containing `after`)."""
    cmd = [sys.executable, "-m", "mobiledistill.main", *args, f"--workdir={workdir}"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen = []
    for line in proc.stdout:
        seen.append(line)
        after = "" if after in line else after
        if not after and needle in line:
            proc.send_signal(sig)
            break
    out, err = proc.communicate(timeout=SUBPROCESS_TIMEOUT)
    return subprocess.CompletedProcess(cmd, proc.returncode, "".join(seen) + out, err)


def final_params(run_dir):
    import jax
    import orbax.checkpoint as ocp
    manager = ocp.CheckpointManager(os.path.join(run_dir, "checkpoints"), item_names=("params", "opt_state", "data"))
    try:
        params = manager.restore(manager.latest_step(),
                                 args=ocp.args.Composite(params=ocp.args.StandardRestore())).params
    finally:
        manager.close()
    flat, _ = jax.tree_util.tree_flatten_with_path(params)
    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in flat}


PEAKD_CONFIG = """
import os, sys
sys.path.insert(0, {configs!r})
import peakd


def get_config(arg=None):
    c = peakd.get_config("task=sst2,teacher=finetune:{teacher},tiny=1")
    for s in (c.ptp, c.pkd):
        s.data.source = "files"
        s.data.files.train, s.data.files.validation = {train!r}, {dev!r}
        s.data.max_train_examples, s.data.max_eval_examples = 0, 0
        s.train.epochs, s.train.checkpoint_every = 2, 4
        s.seeds = (0,)
    return c
"""


@pytest.fixture(scope="module")
def peakd_setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("peakd")
    files = write_task(tmp)
    teacher = str(tmp / "teacher")
    t_args = ["--config=configs/finetune_glue.py:task=sst2,tiny=1,seeds=1", "--config.data.source=files",
              f"--config.data.files.train={files['train']}", f"--config.data.files.validation={files['dev']}",
              "--config.data.max_train_examples=0", "--config.data.max_eval_examples=0"]
    r = main(t_args, teacher)
    assert r.returncode == 0, r.stderr[-3000:]
    cfg = tmp / "peakd_cfg.py"
    cfg.write_text(PEAKD_CONFIG.format(configs=os.path.join(REPO, "configs"), teacher=teacher, **files))
    ref = str(tmp / "ref")
    r = main([f"--config={cfg}"], ref)
    assert r.returncode == 0, r.stderr[-3000:]
    return tmp, [f"--config={cfg}"], ref


@pytest.mark.slow
def test_peakd_recipe_resumes_bit_identically_after_sigkill_and_sigterm(peakd_setup):
    tmp, args, ref = peakd_setup
    assert "## Stage `pkd` (finetune: init_from ptp)" in open(os.path.join(ref, "report.md")).read()
    # SIGKILL in the PTP stage's first epoch, then SIGTERM in the resumed run's PKD stage, then run to the end
    work = str(tmp / "killed")
    killed = run_until(args, work, "[seed 0 (1/1)] step 6/", signal.SIGKILL)  # checkpoint_every 4
    assert killed.returncode == -signal.SIGKILL
    assert "recipe stage 1/2: ptp" in killed.stdout, killed.stdout[-2000:]
    assert not os.path.exists(os.path.join(work, "ptp", "seed_0", "done.json"))
    termed = run_until(args, work, "[seed 0 (1/1)] step 7/", signal.SIGTERM, after="recipe stage 2/2: pkd")
    assert termed.returncode == 3, termed.stderr[-2000:]
    assert not os.path.exists(os.path.join(work, "pkd", "seed_0", "done.json"))
    resumed = main(args, work)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "recipe stage 1/2: ptp (finetune): finished earlier, skipped" in resumed.stdout
    assert "[seed 0 (1/1)] resuming at step" in resumed.stdout
    for stage in ("ptp", "pkd"):
        a = final_params(os.path.join(ref, stage, "seed_0"))
        b = final_params(os.path.join(work, stage, "seed_0"))
        assert a.keys() == b.keys() and len(a) > 10
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=f"{stage} {k}")
    ma = json.load(open(os.path.join(ref, "pkd", "summary.json")))["seeds"]
    mb = json.load(open(os.path.join(work, "pkd", "summary.json")))["seeds"]
    assert [{k: v for k, v in m.items() if k != "seconds"} for m in ma] == \
        [{k: v for k, v in m.items() if k != "seconds"} for m in mb]
    again = main(args, work)
    assert again.returncode == 0 and "nothing to do: all 2 recipe stages" in again.stdout


@pytest.mark.slow
def test_end_to_end_recipe_tiny_teacher_to_exported_int8_model(tmp_path):
    """configs/mobilebert_task.py:tiny: pretrain (teacher, PKT, PD, scratch) -> teacher / student fine-tuning ->
    task KD -> HF + ONNX fp32 + ONNX int8, verified and scored; the report compares every model; a SIGKILL in the
    task-KD stage resumes there, finished stages skipped."""
    files = write_task(tmp_path)
    args = [f"--config=configs/mobilebert_task.py:tiny,task=sst2,train={files['train']},dev={files['dev']}"]
    work = str(tmp_path / "w")
    killed = run_until(args, work, "[seed 0 (1/1)] step 1/", signal.SIGKILL)  # the first fine-tuning stage
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    r = main(args, work)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "recipe stage 1/5: pretrain (pretrain): finished earlier, skipped" in r.stdout
    report = open(os.path.join(work, "report.md")).read()
    for text in ("teacher (pre-trained)", "student, distilled (PD)", "student from scratch", "teacher_task: fine-tuned",
                 "student_task: fine-tuned", "student_kd: task KD from teacher_task",
                 "ONNX dynamic int8 (`model.int8.onnx`)",
                 "ONNX fp32 (`model.onnx`)", "JAX jit fp32", "MB"):
        assert text in report, report
    stage = json.load(open(os.path.join(work, "export", "stage.json")))
    assert set(stage["dev"]) == {"jax_fp32", "model.onnx", "model.int8.onnx"}
    jax_acc = stage["dev"]["jax_fp32"]["validation"]["accuracy"]
    assert abs(stage["dev"]["model.onnx"]["validation"]["accuracy"] - jax_acc) < 1e-6  # fp32 file == JAX
    assert stage["files"]["model.int8.onnx"] < stage["files"]["model.onnx"]
    assert stage["seq_len"] == 32  # timed at the fine-tuned student's length
    assert os.path.exists(os.path.join(work, "export", "hf", "model.safetensors"))
    again = main(args, work)
    assert again.returncode == 0 and "nothing to do: all 5 recipe stages" in again.stdout


def test_a_missing_export_runtime_is_named_before_any_stage_runs(tmp_path, monkeypatch):
    from mobiledistill import export
    import mobilebert_task

    monkeypatch.setitem(export.RUNTIMES, "hf", {"no_such_runtime_pkg": "no-such-runtime"})
    work = tmp_path / "w"
    with pytest.raises(export.ExportError, match="needs the Python package 'no-such-runtime'.*pip install"):
        engine.run(mobilebert_task.get_config("tiny"), str(work))
    assert not work.exists()  # nothing trained, nothing written


def test_an_export_of_a_mean_pooled_classifier_to_hf_is_refused_before_any_stage_runs(tmp_path):
    import mobilebert_task

    c = mobilebert_task.get_config("tiny")
    c.student_kd.model.classifier_pooling = "mean"
    work = tmp_path / "w"
    with pytest.raises(ConfigError, match="stage 'student_kd' mean-pools.*formats='onnx'"):
        engine.run(c, str(work))
    assert not work.exists()  # nothing trained, nothing written
    c.export.formats = "onnx"
    assert export_stage.check(c.export, next(s for s in engine.plan(c) if s.name == "student_kd")) == ["onnx"]
