"""Fault tolerance: unreadable checkpoints, completion markers and caches are recovered from or refused in one
line, and nothing already written is deleted.

In-process tests corrupt small checkpoints written by `StageCheckpoints` itself in every way seen in practice
(a data file cut short, truncated metadata, a missing item, bad JSON); the end-to-end test corrupts the checkpoints
of a real tiny pipeline run and checks that the resumed run is bit-identical to an uninterrupted one.
"""

import glob
import hashlib
import json
import os
import shutil

import numpy as np
import pytest
from _limits import SUBPROCESS_TIMEOUT  # noqa: F401  (used by the subprocess tests below)

from mobiledistill import checkpoint as ckpt


def snapshot(root) -> dict:
    """{path: (size, mtime_ns, sha256)} of every file under `root`."""
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            p = os.path.join(d, f)
            with open(p, "rb") as fh:
                out[p] = (os.path.getsize(p), os.stat(p).st_mtime_ns, hashlib.sha256(fh.read()).hexdigest())
    return out


def truncate(path, size=None):
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2 if size is None else size)


def _trees(step):
    params = {"dense": {"kernel": np.full((64, 48), step, np.float32), "bias": np.arange(48, dtype=np.float32) + step}}
    opt = {"mu": np.full((64, 48), -step, np.float32), "count": np.array(step, np.int32)}
    return params, opt


def write_steps(stage_dir, steps=(1, 2, 3)):
    cps = ckpt.StageCheckpoints(stage_dir, max_to_keep=5, async_save=False)
    for s in steps:
        params, opt = _trees(s)
        cps.save(s, params, opt, {"position": s * 10})
    cps.close()


def corrupt_data_files(step_dir, item="params", size=None):
    files = glob.glob(os.path.join(step_dir, item, "**", "d", "*"), recursive=True)
    assert files
    for p in files:
        truncate(p, size)


CORRUPTIONS = {
    "data file cut short": (corrupt_data_files, "item 'params'"),
    "data files emptied": (lambda d: corrupt_data_files(d, "opt_state", 0), "item 'opt_state'"),
    "metadata cut short": (lambda d: truncate(os.path.join(d, "params", "_METADATA")), "JSONDecodeError"),
    "manifest cut short": (lambda d: truncate(os.path.join(d, "opt_state", "manifest.ocdbt")), "item 'opt_state'"),
    "missing item": (lambda d: shutil.rmtree(os.path.join(d, "params")), 'Item "params" was not found'),
    "bad data-iterator JSON": (lambda d: truncate(os.path.join(d, "data", "metadata")), "item 'data'"),
}


@pytest.mark.parametrize("kind", list(CORRUPTIONS))
def test_unreadable_latest_checkpoint_falls_back_to_the_previous_one(tmp_path, capsys, kind):
    stage = str(tmp_path / "stage")
    write_steps(stage)
    corrupt, expected = CORRUPTIONS[kind]
    corrupt(os.path.join(stage, "checkpoints", "3"))
    before = snapshot(stage)

    cps = ckpt.StageCheckpoints(stage, max_to_keep=5)
    like = _trees(0)
    step, params, opt, data = cps.restore_latest(*like)
    assert step == 2 and data == {"position": 20}
    np.testing.assert_array_equal(params["dense"]["kernel"], _trees(2)[0]["dense"]["kernel"])
    np.testing.assert_array_equal(opt["mu"], _trees(2)[1]["mu"])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert lines[0].startswith("warning: cannot read checkpoint ") and os.path.join("checkpoints", "3") in lines[0]
    assert expected in lines[0] and "resuming the stage from step 2" in lines[0]

    # Moved aside, not deleted: every file is still there, byte for byte.
    moved = os.path.join(stage, "unreadable_checkpoints", "3")
    after = snapshot(stage)
    renamed = {p.replace(os.path.join("checkpoints", "3"), os.path.join("unreadable_checkpoints", "3"), 1)
               if os.path.join("checkpoints", "3") in p else p: (size, digest) for p, (size, _, digest) in before.items()}
    assert {p: (size, digest) for p, (size, _, digest) in after.items()} == renamed
    assert os.path.isdir(moved) and cps.latest_step() == 2

    # Training goes on: step 3 is written again and read back.
    cps.save(3, *_trees(3), {"position": 30})
    cps.wait()
    assert cps.restore_latest(*like)[0] == 3
    cps.close()


def test_no_readable_checkpoint_is_one_error_and_nothing_moves(tmp_path):
    stage = str(tmp_path / "stage")
    write_steps(stage, (1, 2))
    for s in (1, 2):
        corrupt_data_files(os.path.join(stage, "checkpoints", str(s)))
    before = snapshot(stage)
    cps = ckpt.StageCheckpoints(stage)
    with pytest.raises(ckpt.CheckpointError) as info:
        cps.restore_latest(*_trees(0))
    msg = str(info.value)
    assert "\n" not in msg and "no readable checkpoint in" in msg
    assert "step 2: item 'params'" in msg and "step 1: item 'params'" in msg and "nothing was moved or deleted" in msg
    cps.close()
    assert snapshot(stage) == before


def test_a_new_stage_has_no_checkpoint(tmp_path):
    cps = ckpt.StageCheckpoints(str(tmp_path / "fresh"))
    assert cps.restore_latest(*_trees(0)) is None
    cps.close()


@pytest.mark.parametrize("content", [b'{"final_step": 12, "sta', b"", b"[1, 2]", b'{"final_step": "x"}', b"\xff\xfe"])
def test_unreadable_done_json_counts_as_unfinished_with_a_warning(tmp_path, capsys, content):
    (tmp_path / "done.json").write_bytes(content)
    assert ckpt.stage_done(tmp_path) is None
    (line,) = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
    assert line.startswith("warning: ") and str(tmp_path / "done.json") in line and "unfinished" in line
    assert (tmp_path / "done.json").read_bytes() == content  # left for mark_done to replace atomically
    (tmp_path / "done.json").write_text('{"final_step": 12}')
    assert ckpt.stage_done(tmp_path) == {"final_step": 12}


def test_read_npz_refuses_truncated_and_pickled_files(tmp_path):
    good = tmp_path / "good.npz"
    np.savez(good, a=np.arange(4), key=np.array("k"))
    out = ckpt.read_npz(good, "cache")
    assert list(out) == ["a", "key"] and str(out["key"]) == "k"
    cut = tmp_path / "cut.npz"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    pickled = tmp_path / "pickled.npz"
    np.savez(pickled, a=np.array([{"x": 1}], dtype=object))
    for path in (cut, pickled):
        with pytest.raises(ckpt.CheckpointError) as info:
            ckpt.read_npz(path, "teacher-logit cache")
        assert str(path) in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(ckpt.CheckpointError, match="does not exist"):
        ckpt.read_npz(tmp_path / "nope.npz", "Pea-KD PTP encoder")


def _tokenizer_texts():
    """Real prose: on a toy corpus WordPiece breaks frequency ties in hash order and a retrained vocab differs."""
    from _data_helpers import corpus

    return [d for d in corpus().documents if len(d) > 400][:300]


TOKENIZER_DAMAGE = ["vocab cut short", "meta not JSON", "meta missing", "vocab not UTF-8"]


def damage_tokenizer_cache(cache, damage):
    vocab, meta = os.path.join(cache, "vocab.txt"), os.path.join(cache, "tokenizer_meta.json")
    if damage == "vocab cut short":
        truncate(vocab)
    elif damage == "meta not JSON":
        truncate(meta)
    elif damage == "meta missing":
        os.remove(meta)
    else:
        with open(vocab, "ab") as f:
            f.write(b"\xff\xfe\n")
    return {p: open(p, "rb").read() for p in (vocab, meta) if os.path.exists(p)}


@pytest.mark.parametrize("damage", TOKENIZER_DAMAGE)
def test_unreadable_tokenizer_cache_is_trained_again_identically(tmp_path, capsys, damage):
    from mobiledistill.data import DataError, trained_tokenizer

    cache = str(tmp_path / "tok")
    kw = dict(corpus_name="toy", vocab_size=500)
    first = trained_tokenizer(_tokenizer_texts(), cache, **kw).vocab_text()
    damaged = damage_tokenizer_cache(cache, damage)
    capsys.readouterr()

    with pytest.raises(DataError) as info:  # no corpus to train on: one line, nothing touched
        trained_tokenizer(None, cache, **kw)
    assert "\n" not in str(info.value) and cache in str(info.value)
    assert {p: open(p, "rb").read() for p in damaged} == damaged

    again = trained_tokenizer(_tokenizer_texts(), cache, **kw).vocab_text()
    assert again == first
    (line,) = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
    assert line.startswith(f"warning: tokenizer cache {cache} cannot be used") and "trained it again" in line
    for p, content in damaged.items():  # the damaged files are kept beside the new cache
        assert open(p + ".unreadable", "rb").read() == content
    assert trained_tokenizer(None, cache, **kw).vocab_text() == first  # the new cache is complete
    assert not [x for x in capsys.readouterr().err.splitlines() if x.strip()]


@pytest.mark.parametrize("damage", ["vocab cut short", "meta not JSON"])
def test_a_retrained_vocab_that_differs_is_refused(tmp_path, damage):
    """The workdir's models were trained with the old vocab: another one must not silently replace it."""
    from mobiledistill.data import DataError, trained_tokenizer

    cache = str(tmp_path / "tok")
    trained_tokenizer(_tokenizer_texts(), cache, corpus_name="toy", vocab_size=500)
    damage_tokenizer_cache(cache, damage)
    before = snapshot(cache)
    with pytest.raises(DataError) as info:
        trained_tokenizer(_tokenizer_texts()[:100], cache, corpus_name="toy", vocab_size=500)
    assert "training it again gave another vocab" in str(info.value) and "\n" not in str(info.value)
    assert snapshot(cache) == before


def test_cache_of_another_experiment_is_still_refused(tmp_path):
    from mobiledistill.data import DataError, trained_tokenizer

    cache = str(tmp_path / "tok")
    trained_tokenizer(_tokenizer_texts(), cache, corpus_name="toy", vocab_size=500)
    before = snapshot(cache)
    with pytest.raises(DataError, match="was trained with"):
        trained_tokenizer(_tokenizer_texts(), cache, corpus_name="toy", vocab_size=501)
    assert snapshot(cache) == before


# End to end ----------------------------------------------------------------------------------------------------


def _run(args, workdir):
    import subprocess
    import sys

    from test_pipeline import REPO, env

    e = env()
    e["PYTHONPATH"] = REPO
    return subprocess.run([sys.executable, "-m", "mobiledistill.main", *args, f"--workdir={workdir}"], cwd=REPO,
                          env=e, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT)


def _warnings(result):
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    return [line for line in result.stderr.splitlines() if line.startswith("warning: ")]


def _params(step_dir):
    import jax
    import orbax.checkpoint as ocp

    with ocp.StandardCheckpointer() as c:
        tree = c.restore(os.path.join(step_dir, "params"))
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in flat}


def _assert_same_params(a_dir, b_dir):
    a, b = _params(a_dir), _params(b_dir)
    assert a.keys() == b.keys() and len(a) > 10
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


@pytest.mark.slow
def test_pipeline_resumes_past_unreadable_checkpoints_and_done_json_bit_identically(tmp_path):
    from test_pipeline import tiny

    from mobiledistill.data import embedded_corpus, train_wordpiece

    vocab = tmp_path / "vocab.txt"
    vocab.write_text(train_wordpiece(embedded_corpus().texts(max_chars=300_000), vocab_size=1024).vocab_text())
    args = tiny(str(vocab), "--config.train.keep_checkpoints=3", config="configs/teacher.py:local")
    ref, run = str(tmp_path / "ref"), str(tmp_path / "run")
    r = _run(args, ref)
    assert r.returncode == 0, r.stderr[-3000:]
    ckpts = os.path.join(ref, "teacher", "checkpoints")
    assert sorted(int(s) for s in os.listdir(ckpts) if s.isdigit()) == [4, 8, 12]

    # The stage was cut short after step 12 was written (no done.json) and steps 12 and 8 were damaged.
    shutil.copytree(ref, run)
    os.remove(os.path.join(run, "teacher", "done.json"))
    corrupt_data_files(os.path.join(run, "teacher", "checkpoints", "12"))
    truncate(os.path.join(run, "teacher", "checkpoints", "8", "opt_state", "_METADATA"))
    r = _run(args, run)
    assert r.returncode == 0, r.stderr[-3000:]
    (line,) = _warnings(r)
    for text in ("checkpoints/12 (item 'params'", "checkpoints/8 (item 'opt_state': JSONDecodeError",
                 "resuming the stage from step 4"):
        assert text in line, line
    assert "resuming at step 4" in r.stdout
    for step in (8, 12):
        assert os.path.isdir(os.path.join(run, "teacher", "unreadable_checkpoints", str(step)))
    _assert_same_params(os.path.join(ckpts, "12"), os.path.join(run, "teacher", "checkpoints", "12"))
    done = json.load(open(os.path.join(run, "teacher", "done.json")))
    assert done["eval_loss"] == json.load(open(os.path.join(ref, "teacher", "done.json")))["eval_loss"]

    # A done.json cut short: the stage is completed again from its final checkpoint (no training), same summary.
    path = os.path.join(run, "teacher", "done.json")
    truncate(path)
    r = _run(args, run)
    assert r.returncode == 0, r.stderr[-3000:]
    (line,) = _warnings(r)
    assert path in line and "unfinished" in line
    assert "resuming at step 12" in r.stdout
    assert json.load(open(path))["eval_loss"] == done["eval_loss"]

    # Nothing readable: one error line, exit 2, nothing moved or deleted.
    os.remove(path)
    for step in os.listdir(os.path.join(run, "teacher", "checkpoints")):
        if step.isdigit():
            corrupt_data_files(os.path.join(run, "teacher", "checkpoints", step))
    before = snapshot(run)
    r = _run(args, run)
    assert r.returncode == 2
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: no readable checkpoint in "), r.stderr[-3000:]
    assert "nothing was moved or deleted" in lines[0]
    assert snapshot(run) == before


def test_a_config_field_added_since_is_named_when_the_workdir_is_refused(tmp_path):
    """An old workdir's config.json lacks a field a newer version added (value None): the refusal names it."""
    from mobiledistill.checkpoint import CheckpointError, check_fingerprint
    old = {"model": {"hidden_size": 8}, "seed": 0}
    assert check_fingerprint(tmp_path, old) is False
    new = {"model": {"hidden_size": 8, "classifier_pooling": None}, "seed": 0}
    with pytest.raises(CheckpointError, match=r"config differs in \['model.classifier_pooling \(not recorded in "
                                              r"the workdir: a field added since\)'\]\); use a new"):
        check_fingerprint(tmp_path, new)
    assert check_fingerprint(tmp_path, old) is True


def test_reports_are_replaced_whole_or_not_at_all(tmp_path, monkeypatch):
    """write_text_atomic (report.md, summary.json of both runners): an interrupted write leaves the old file."""
    from etils import epath
    path = tmp_path / "report.md"
    ckpt.write_text_atomic(path, "old\n")
    ckpt.write_text_atomic(path, "new\n")
    assert path.read_text() == "new\n" and os.listdir(tmp_path) == ["report.md"]

    def cut(self, text, *a, **k):  # the process dies halfway through writing the temporary file
        with open(self, "w") as f:
            f.write(text[:2])
        raise KeyboardInterrupt

    monkeypatch.setattr(epath.Path, "write_text", cut)
    with pytest.raises(KeyboardInterrupt):
        ckpt.write_text_atomic(path, "newer\n")
    assert path.read_text() == "new\n"
