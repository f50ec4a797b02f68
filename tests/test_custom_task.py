"""Tasks with the user's own labels (task=custom): label inference and refusal, metrics, end-to-end fine-tuning and
task distillation from local files at test size, the one-line error of a bad label, and a refused run that leaves
its workdir reusable."""

import json
import os
import random
import subprocess
import sys

import numpy as np
import pytest
import sklearn.metrics as skm

from mobiledistill import evaluate, finetune
from mobiledistill.config import ConfigError
from mobiledistill.data import DataError, load_custom_files

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "configs"))

import distill_task  # noqa: E402
import finetune_glue  # noqa: E402

# Each class has its own topic words: a trivially separable task that a tiny model learns in a few dozen steps.
TOPICS = {"1": "apple pear plum grape", "2": "car bus train tram", "3": "red blue green pink",
          "4": "dog cat cow goat", "5": "rain snow wind hail"}


def _rows(n, seed, labels=tuple(TOPICS)):
    rng = random.Random(seed)
    out = []
    for i in range(n):
        label = labels[i % len(labels)]
        words = TOPICS[str(list(labels).index(label) + 1)].split()
        out.append((" ".join(rng.choice(words) for _ in range(6)), label))
    return out


def _write_jsonl(path, rows, text="text", number_labels=True):
    with open(path, "w") as f:
        for t, y in rows:
            f.write(json.dumps({text: t, "label": int(y) if number_labels else y}) + "\n")


def _learn(c, epochs=12):
    """Sizes at which test_bert learns the topic task: seq 16, batch 10, lr 2e-3, 12 epochs, one seed."""
    c.seeds, c.train.epochs, c.train.lr, c.train.batch, c.train.eval_batch = (0,), epochs, 2e-3, 10, 10
    c.data.max_seq_length, c.data.max_train_examples, c.data.max_eval_examples = 16, 0, 0
    c.train.dropout = False
    return c


def _untouched(workdir):
    """Nothing left in the workdir (the workdir lock may have created the empty folder)."""
    return not workdir.exists() or not any(workdir.iterdir())


# ---------------------------------------------------------------------------------------------------------------
# Data and metrics


def test_labels_from_data_are_sorted_and_bad_values_name_file_line_and_labels(tmp_path):
    train, dev = tmp_path / "train.tsv", tmp_path / "dev.tsv"
    train.write_text("sentence\tlabel\na b\t10\nc d\t2\ne f\t2\ng h\t9\n")
    dev.write_text("sentence\tlabel\na b\t9\nc d\t3\n")
    task, ex = load_custom_files({"train": str(train)})
    assert task.label_names == ("2", "9", "10") and task.text_keys == ("sentence",)  # numeric order, not '10' < '2'
    assert [e["label"] for e in ex["train"]] == [2, 0, 0, 1]
    with pytest.raises(DataError) as info:
        load_custom_files({"train": str(train), "validation": str(dev)})
    msg = str(info.value)
    assert msg.startswith(f"{dev} line 3: label '3'") and "valid: 2, 9, 10" in msg and "\n" not in msg
    # Names that look like integers are matched as names, never read as ids ('0' is not '2', the class of id 0).
    zero = tmp_path / "zero.tsv"
    zero.write_text("sentence\tlabel\na b\t0\n")
    with pytest.raises(DataError, match=r"zero.tsv line 2: label '0'.*valid: 2, 9, 10$"):
        load_custom_files({"train": str(train), "validation": str(zero)}, label_names=("2", "9", "10"))


def test_given_label_names_ids_columns_and_hints(tmp_path):
    train = tmp_path / "train.csv"
    train.write_text("question,answer,label\nq1,a1,pos\nq2,a2,1\nq3,a3,neg\n")
    task, ex = load_custom_files({"train": str(train)}, label_names=("neg", "pos"), text_columns=("question",
                                                                                                  "answer"))
    assert task.text_keys == ("question", "answer") and [e["label"] for e in ex["train"]] == [1, 1, 0]
    with pytest.raises(DataError, match=r"no text column among the fields \['answer', 'label', 'question'\]"):
        load_custom_files({"train": str(train)})
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"premise": p, "hypothesis": h, "label": y}) + "\n"
                             for p, h, y in (("a", "b", "yes"), ("c", "d", "no"))))
    task, _ = load_custom_files({"train": str(pairs)})
    assert task.text_keys == ("premise", "hypothesis") and task.label_names == ("no", "yes")
    reg = tmp_path / "reg.jsonl"
    reg.write_text("".join(json.dumps({"text": "x", "label": v}) + "\n" for v in (0.5, 1.25, 3.0)))
    with pytest.raises(DataError, match="non-integer numbers.*custom.regression=True"):
        load_custom_files({"train": str(reg)})
    task, ex = load_custom_files({"train": str(reg)}, regression=True)
    assert task.is_regression and [e["label"] for e in ex["train"]] == [0.5, 1.25, 3.0]
    one = tmp_path / "one.tsv"
    one.write_text("text\tlabel\na\tx\nb\tx\n")
    with pytest.raises(DataError, match="every training row has label 'x'"):
        load_custom_files({"train": str(one)})


def test_macro_and_per_label_f1_equal_sklearn():
    rng = np.random.default_rng(0)
    y, p = rng.integers(0, 5, 200), rng.integers(0, 4, 200)  # class 4 is never predicted
    assert evaluate.macro_f1(p, y) == pytest.approx(skm.f1_score(y, p, average="macro"))
    per = evaluate.per_class_f1(p, y, 6)
    assert per[:5] == pytest.approx(list(skm.f1_score(y, p, average=None, labels=range(5)))) and per[5] is None
    m = evaluate.custom_metrics(np.eye(5)[p], y, ("a", "b", "c", "d", "e"))
    assert m["accuracy"] == pytest.approx(100 * skm.accuracy_score(y, p))
    assert m["f1_per_label"]["e"] == 0.0 and m["score"] == pytest.approx((m["accuracy"] + m["macro_f1"]) / 2)


def test_custom_config_checks():
    c = finetune_glue.get_config("task=custom,tiny=1")
    assert c.data.source == "files"
    c.custom.labels = ("neg,neu,pos",)  # the command line's --config.custom.labels=neg,neu,pos
    finetune.validate(c)
    assert finetune._names(c.custom.labels) == ("neg", "neu", "pos")
    c.custom.regression = True
    with pytest.raises(ConfigError, match="regression task has no label names"):
        finetune.validate(c)
    c = finetune_glue.get_config("task=custom,tiny=1")
    c.data.source = "tfds"
    with pytest.raises(ConfigError, match="task='custom' reads local files"):
        finetune.validate(c)
    with pytest.raises(ConfigError, match="ckd=1 needs a GLUE task"):
        distill_task.get_config("task=custom,teacher=finetune:/x,ckd=1")
    # Older workdirs keep their fingerprint: the custom block counts only for task=custom.
    assert "custom" not in finetune._fingerprint_config(finetune_glue.get_config("task=sst2"))


# ---------------------------------------------------------------------------------------------------------------
# End to end


@pytest.mark.slow
def test_five_labels_train_and_score_each_split(tmp_path):
    for split, n, seed in (("train", 100, 0), ("dev", 40, 1), ("test", 30, 2)):
        _write_jsonl(tmp_path / f"{split}.jsonl", _rows(n, seed))
    c = _learn(finetune_glue.get_config("task=custom,tiny=1"))
    c.data.files.train, c.data.files.validation = str(tmp_path / "train.jsonl"), str(tmp_path / "dev.jsonl")
    c.data.files.test = str(tmp_path / "test.jsonl")
    workdir = tmp_path / "run"
    out = finetune.run(c, str(workdir))[0]
    # Chance is 20%; permuted class ids between the files would score below it. (This tiny model's optimisation
    # is seed- and order-sensitive: it reaches 40-100% here, so the bar is set above chance, not at 100%.)
    assert out["validation/accuracy"] > 30 and out["test/accuracy"] > 30, out
    assert "score" not in out and {"validation/macro_f1", "test/macro_f1"} <= set(out)
    run = workdir / "seed_0"
    for split, n, seed in (("validation", 40, 1), ("test", 30, 2)):
        lines = (run / f"{split}_predictions.tsv").read_text().splitlines()
        preds = [line.split("\t")[1] for line in lines[1:]]
        gold = [y for _, y in _rows(n, seed)]
        assert len(preds) == n and set(preds) <= set(TOPICS)  # label names, not ids 0..4
        assert 100 * np.mean([p == g for p, g in zip(preds, gold)]) == pytest.approx(out[f"{split}/accuracy"])
        m = json.loads((run / f"{split}_metrics.json").read_text())
        assert sorted(m["f1_per_label"]) == sorted(TOPICS)
    report = (workdir / "report.md").read_text()
    assert "labels (class id order): 1, 2, 3, 4, 5" in report
    assert "## validation" in report and "## test" in report and "| macro_f1 |" in report
    assert "Per label (test):" in report
    info = json.loads((workdir / "model.json").read_text())
    assert info["label_names"] == list(TOPICS) and info["num_labels"] == 5


@pytest.mark.slow
def test_string_label_pairs_then_distill_from_the_teacher(tmp_path):
    names = ("fruit", "vehicle", "colour", "animal", "weather")
    given = ("weather", "animal", "colour", "vehicle", "fruit")  # ids follow custom.labels, not sorted order
    for split, n, seed in (("train", 100, 0), ("dev", 40, 1)):
        with open(tmp_path / f"{split}.csv", "w") as f:
            f.write("question,answer,label\n")
            for t, y in _rows(n, seed, names):
                f.write(f"what is it,{t},{y}\n")
    teacher_dir, student_dir = tmp_path / "teacher", tmp_path / "student"
    c = _learn(finetune_glue.get_config("task=custom,tiny=1"))
    c.data.files.train, c.data.files.validation = str(tmp_path / "train.csv"), str(tmp_path / "dev.csv")
    c.custom.text_columns, c.custom.labels = ("question,answer",), given
    out = finetune.run(c, str(teacher_dir))[0]
    assert out["accuracy"] > 30, out  # chance 20%
    assert json.loads((teacher_dir / "model.json").read_text())["label_names"] == list(given)
    preds = (teacher_dir / "seed_0" / "validation_predictions.tsv").read_text().splitlines()[1:]
    assert {p.split("\t")[1] for p in preds} <= set(names)

    s = _learn(distill_task.get_config(f"task=custom,teacher=finetune:{teacher_dir},tiny=1"))
    s.data.files.train, s.data.files.validation = c.data.files.train, c.data.files.validation
    s.custom.text_columns = ("question,answer",)  # the labels come from the teacher
    assert s.distill.temperature == 2.0 and s.tokenizer == ""
    kd = finetune.run(s, str(student_dir))[0]
    assert (student_dir / "teacher_logits.npz").exists() and np.isfinite(kd["accuracy"]), kd
    assert json.loads((student_dir / "model.json").read_text())["label_names"] == list(given)
    s.custom.labels = names  # another class order than the teacher's: refused
    with pytest.raises(ConfigError, match="student must use the teacher's"):
        finetune.run(s, str(tmp_path / "student2"))
    assert _untouched(tmp_path / "student2")


@pytest.mark.slow
def test_regression_target(tmp_path):
    rng = random.Random(0)
    rows = [(" ".join(rng.choice(("good", "bad")) for _ in range(4)), 0.0) for _ in range(24)]
    rows = [(t, float(t.split().count("good"))) for t, _ in rows]
    _write_jsonl(tmp_path / "train.jsonl", rows, number_labels=False)
    c = finetune_glue.get_config("task=custom,tiny=1,seeds=1")
    c.custom.regression = True
    c.data.files.train = c.data.files.validation = str(tmp_path / "train.jsonl")
    out = finetune.run(c, str(tmp_path / "run"))[0]
    assert {"pearson", "spearman", "score"} <= set(out)
    pred = (tmp_path / "run" / "seed_0" / "validation_predictions.tsv").read_text().splitlines()[1]
    assert np.isfinite(float(pred.split("\t")[1]))
    assert "regression target `label`" in (tmp_path / "run" / "report.md").read_text()


@pytest.mark.slow
def test_bad_label_exits_2_in_one_line_and_leaves_the_workdir_reusable(tmp_path):
    _write_jsonl(tmp_path / "train.jsonl", _rows(20, 0, ("neg", "pos")), number_labels=False)
    (tmp_path / "dev.tsv").write_text("text\tlabel\napple pear\tneg\ncar bus\tmaybe\nred\tpos\n")
    workdir = tmp_path / "run"
    args = [sys.executable, "-m", "mobiledistill.main", "--config=configs/finetune_glue.py:task=custom,tiny=1",
            f"--workdir={workdir}", f"--config.data.files.train={tmp_path}/train.jsonl",
            f"--config.data.files.validation={tmp_path}/dev.tsv", "--config.seeds=(0,)"]
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
    p = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert p.returncode == 2, p.stderr[-2000:]
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: {tmp_path}/dev.tsv line 3: label 'maybe'") and "valid: neg, pos" in last
    assert _untouched(workdir)
    # A check that fails after the vocab was trained leaves nothing behind either.
    c = finetune_glue.get_config("task=custom,tiny=1,seeds=1")
    c.data.files.train = c.data.files.validation = str(tmp_path / "train.jsonl")
    c.data.max_seq_length = 100_000
    with pytest.raises(ConfigError, match="max_position_embeddings"):
        finetune.run(c, str(workdir))
    assert _untouched(workdir)
    # The corrected command (another config: 'maybe' declared a label) runs in the same workdir.
    p = subprocess.run(args + ["--config.custom.labels=neg,pos,maybe"], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=1200)
    assert p.returncode == 0, p.stderr[-2000:]
    m = json.loads((workdir / "seed_0" / "validation_metrics.json").read_text())
    assert sorted(m["f1_per_label"]) == ["maybe", "neg", "pos"]
