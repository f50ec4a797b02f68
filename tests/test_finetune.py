"""Fine-tuning and task distillation end to end at test size: GLUE (classification, regression) and SQuAD on
`tfds.testing.mock_data`, local files through `python -m mobiledistill.main`, evaluation mode, multi-seed reports."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
from _limits import SUBPROCESS_TIMEOUT
import tensorflow_datasets as tfds

from mobiledistill import finetune
from mobiledistill.config import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "configs"))

import distill_task
import finetune_glue
import finetune_squad


def _metrics(path):
    with open(path) as f:
        return json.load(f)


def _finite(d):
    return all(v is None or not isinstance(v, float) or math.isfinite(v) for v in d.values())


@pytest.mark.slow
def test_sst2_finetune_then_distill_multi_seed(tmp_path):
    teacher_dir, student_dir = str(tmp_path / "teacher"), str(tmp_path / "student")
    with tfds.testing.mock_data(num_examples=10):
        out = finetune.run(finetune_glue.get_config("task=sst2,tiny=1"), teacher_dir)
        assert sorted(out) == [0, 1]
        for seed in (0, 1):
            m = _metrics(os.path.join(teacher_dir, f"seed_{seed}", "validation_metrics.json"))
            assert set(m) == {"accuracy", "score"} and _finite(m)
            lines = open(os.path.join(teacher_dir, f"seed_{seed}", "validation_predictions.tsv")).read().split("\n")
            assert lines[0] == "index\tprediction" and lines[1].split("\t")[1] in ("negative", "positive")
        report = open(os.path.join(teacher_dir, "report.md")).read()
        assert "| accuracy |" in report.replace("| n | accuracy", "| accuracy") and " ± " in report
        # Re-running a finished run skips its seeds and gives the same summaries.
        assert finetune.run(finetune_glue.get_config("task=sst2,tiny=1"), teacher_dir) == out

        c = distill_task.get_config(f"task=sst2,teacher=finetune:{teacher_dir},tiny=1")
        assert c.distill.temperature == 4.0  # CKD's SST-2 temperature
        kd = finetune.run(c, student_dir)
    assert os.path.exists(os.path.join(student_dir, "teacher_logits.npz"))
    assert all(math.isfinite(kd[s]["accuracy"]) for s in (0, 1))
    summary = json.load(open(os.path.join(student_dir, "summary.json")))
    assert summary["mean_std"]["accuracy"]["n"] == 2
    assert "distilled from finetune:" in open(os.path.join(student_dir, "report.md")).read()
    jsonl = open(os.path.join(student_dir, "seed_0", "metrics.jsonl")).read().splitlines()
    assert "logit_kd" in json.loads(jsonl[-1])


@pytest.mark.slow
def test_stsb_regression_and_ckd_distill_config(tmp_path):
    with tfds.testing.mock_data(num_examples=10):
        c = finetune_glue.get_config("task=stsb,tiny=1,seeds=1")
        out = finetune.run(c, str(tmp_path / "stsb"))
    m = _metrics(str(tmp_path / "stsb" / "seed_0" / "validation_metrics.json"))
    assert {"pearson", "spearman", "score"} <= set(m) and out[0]["final_step"] == 2
    preds = open(tmp_path / "stsb" / "seed_0" / "validation_predictions.tsv").read().split("\n")[1]
    assert np.isfinite(float(preds.split("\t")[1]))
    # CKD task-specific terms are registry losses; they need the teacher's hidden states (no logit cache).
    c = distill_task.get_config("task=rte,teacher=finetune:/x,ckd=1")
    spec, cacheable = finetune.loss_spec(c, "classification", 2, object())
    assert {"logit_kd", "wr_pair", "wr_angle", "ltr_pair", "ltr_angle"} == set(spec) and not cacheable
    assert c.train.lr == 5e-5 and c.train.epochs == 6


def _squad_records(n, version_2):
    rng = np.random.default_rng(0)
    words = ["the", "river", "flows", "north", "past", "old", "mills", "and", "a", "stone", "bridge", "near", "town"]
    out = []
    for i in range(n):
        context = " ".join(rng.choice(words, 30))
        start = int(rng.integers(0, 20))
        answer = " ".join(context.split()[start:start + 2])
        char = len(" ".join(context.split()[:start])) + (1 if start else 0)
        impossible = version_2 and i % 3 == 0
        out.append({"id": f"q{i}".encode(), "title": b"t", "context": context.encode(),
                    "question": f"where does item {i} go".encode(), "is_impossible": impossible,
                    "answers": {"text": np.array([] if impossible else [answer.encode()], object),
                                "answer_start": np.array([] if impossible else [char], np.int32)}})
    return out


@pytest.mark.parametrize("version", ["v1", pytest.param("v2", marks=pytest.mark.slow)])
def test_squad_end_to_end(tmp_path, version):
    records = _squad_records(8, version == "v2")
    with tfds.testing.mock_data(as_data_source_fn=lambda builder, split, **kw: records):
        c = finetune_squad.get_config(f"{version},tiny=1,seeds=1")
        assert c.train.lr == 1e-3 and c.task == "squad"
        finetune.run(c, str(tmp_path / "squad"))
    run = tmp_path / "squad" / "seed_0"
    m = _metrics(str(run / "validation_metrics.json"))
    assert {"exact", "f1"} <= set(m) and _finite(m)
    preds = json.load(open(run / "validation_predictions.json"))
    assert sorted(preds) == sorted(f"q{i}" for i in range(8))
    assert (run / "validation_null_odds.json").exists() == (version == "v2")


def test_squad_recipe_and_arg_errors():
    c = finetune_squad.get_config("v2,init=hf:/m")
    assert (c.squad_version, c.train.lr, c.train.epochs, c.train.batch) == ("v2.0", 4e-5, 5, 32)
    assert (c.data.max_seq_length, c.data.doc_stride, c.init) == (384, 128, "hf:/m")
    with pytest.raises(ConfigError, match="unknown key 'colour'"):
        finetune_glue.get_config("task=sst2,colour=red")
    with pytest.raises(ConfigError, match="needs teacher"):
        distill_task.get_config("task=sst2")
    bad = finetune_glue.get_config("task=sst3,tiny=1")
    with pytest.raises(ConfigError, match="task='sst3'"):
        finetune.validate(bad)


@pytest.mark.slow
def test_main_files_eval_mode_and_bad_input(tmp_path):
    rows = [("A man sleeps.", "Someone sleeps.", 1), ("A dog runs.", "A cat sits.", 0)] * 5
    for split in ("train", "dev"):
        with open(tmp_path / f"{split}.tsv", "w") as f:
            f.write("sentence1\tsentence2\tlabel\n" + "".join(f"{a}\t{b}\t{y}\n" for a, b, y in rows))
    workdir = tmp_path / "mrpc"
    args = [sys.executable, "-m", "mobiledistill.main", "--config=configs/finetune_glue.py:task=mrpc,tiny=1",
            f"--workdir={workdir}", "--config.data.source=files", f"--config.data.files.train={tmp_path}/train.tsv",
            f"--config.data.files.validation={tmp_path}/dev.tsv", "--config.seeds=(0,)"]
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
    p = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT)
    assert p.returncode == 0, p.stderr[-2000:]
    m = _metrics(str(workdir / "seed_0" / "validation_metrics.json"))
    assert {"accuracy", "f1", "score"} <= set(m) and _finite(m)

    c = finetune_glue.get_config("task=mrpc,tiny=1")
    c.data.source, c.seeds, c.mode = "files", (0,), "eval"
    c.data.files.train, c.data.files.validation = f"{tmp_path}/train.tsv", f"{tmp_path}/dev.tsv"
    res = finetune.run(c, str(workdir))
    assert res[0]["accuracy"] == m["accuracy"]
    assert (workdir / "seed_0" / "eval_validation_predictions.tsv").exists()

    p = subprocess.run(args[:3] + ["--config=configs/finetune_glue.py:task=mrpc,tiny=1", f"--workdir={workdir}2",
                                   "--config.data.source=files"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=SUBPROCESS_TIMEOUT)
    assert p.returncode == 2 and p.stderr.strip().splitlines()[-1].startswith("error: data.source='files' needs")
