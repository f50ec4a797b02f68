"""Tests for mobiledistill.evaluate: metrics vs scikit-learn/SciPy, official SQuAD numbers by hand, span decoding."""

import json
import math
import os
import re
import warnings

import numpy as np
import pytest
from scipy import stats
from sklearn import metrics as skm

from mobiledistill import evaluate as ev

# ------------------------------------------------------------------------------------------------ primitive metrics


def _random_cases():
    rng = np.random.default_rng(0)
    for n in (1, 2, 5, 37, 400):
        for _ in range(5):
            yield rng.integers(0, 2, n), rng.integers(0, 2, n)
    # edge cases: constant predictions, constant labels, all right, all wrong
    yield np.ones(10, int), rng.integers(0, 2, 10)
    yield rng.integers(0, 2, 10), np.zeros(10, int)
    yield np.zeros(8, int), np.zeros(8, int)
    yield np.array([0, 1, 1, 0]), np.array([0, 1, 1, 0])
    yield np.array([1, 0, 0, 1]), np.array([0, 1, 1, 0])


@pytest.mark.parametrize("case", list(_random_cases()))
def test_classification_metrics_match_sklearn(case):
    p, y = case
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sklearn warns on ill-defined F1 / MCC
        assert ev.accuracy(p, y) == pytest.approx(skm.accuracy_score(y, p), abs=1e-12)
        assert ev.binary_f1(p, y) == pytest.approx(skm.f1_score(y, p), abs=1e-12)
        assert ev.matthews_corrcoef(p, y) == pytest.approx(skm.matthews_corrcoef(y, p), abs=1e-12)


def test_mcc_constant_predictions_is_zero_and_multiclass_matches_sklearn():
    y = np.array([0, 1, 1, 0, 1])
    assert ev.matthews_corrcoef(np.ones(5, int), y) == 0.0
    rng = np.random.default_rng(1)
    p3, y3 = rng.integers(0, 3, 200), rng.integers(0, 3, 200)
    assert ev.matthews_corrcoef(p3, y3) == pytest.approx(skm.matthews_corrcoef(y3, p3), abs=1e-12)
    # a clearly non-zero value, so a function returning 0 would fail
    p = np.array([1, 1, 0, 0, 1, 0, 1, 1])
    t = np.array([1, 0, 0, 0, 1, 0, 1, 1])
    assert ev.matthews_corrcoef(p, t) == pytest.approx(skm.matthews_corrcoef(t, p))
    assert ev.matthews_corrcoef(p, t) > 0.7


def test_binary_f1_refuses_more_than_two_classes():
    with pytest.raises(ValueError, match="at most 2 classes"):
        ev.binary_f1([0, 1, 2], [0, 1, 1])


@pytest.mark.parametrize("seed", range(6))
def test_correlations_match_scipy_including_ties(seed):
    rng = np.random.default_rng(seed)
    n = [3, 10, 50, 200, 7, 1000][seed]
    x = rng.normal(size=n)
    y = 0.5 * x + rng.normal(size=n)
    # STS-B-like labels with many ties (0, 0.2, ..., 5) and rounded predictions with ties too
    xt = np.round(rng.uniform(0, 5, n) * 5) / 5
    yt = np.round(xt + rng.normal(scale=1.0, size=n))
    for a, b in ((x, y), (xt, yt), (x, yt)):
        assert ev.pearson(a, b) == pytest.approx(stats.pearsonr(a, b)[0], abs=1e-10)
        assert ev.spearman(a, b) == pytest.approx(stats.spearmanr(a, b)[0], abs=1e-10)
    assert np.array_equal(ev.rankdata(xt), stats.rankdata(xt))


def test_correlation_edge_cases():
    assert ev.spearman([1, 2, 3, 4], [10, 20, 30, 1000]) == pytest.approx(1.0)
    assert ev.pearson([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert math.isnan(stats.pearsonr([1.0, 2, 3], [2.0, 2, 2])[0])
    assert math.isnan(ev.pearson([1.0, 2, 3], [2.0, 2, 2]))
    assert math.isnan(ev.spearman([1.0, 2, 3], [2.0, 2, 2]))
    with pytest.raises(ValueError, match="3 predictions but 2 labels"):
        ev.pearson([1, 2, 3], [1, 2])
    with pytest.raises(ValueError, match="empty"):
        ev.accuracy([], [])


# ------------------------------------------------------------------------------------------------ GLUE dispatcher


def test_glue_metrics_all_tasks():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 64)
    p = rng.integers(0, 2, 64)
    acc = 100 * skm.accuracy_score(y, p)
    f1 = 100 * skm.f1_score(y, p)
    assert ev.glue_metrics("cola", p, y) == pytest.approx(
        {"mcc": 100 * skm.matthews_corrcoef(y, p), "score": 100 * skm.matthews_corrcoef(y, p)})
    for task in ("sst2", "qnli", "rte", "wnli", "SST-2", "mnli_matched", "mnli-mm"):
        assert ev.glue_metrics(task, p, y) == pytest.approx({"accuracy": acc, "score": acc})
    for task in ("mrpc", "qqp"):
        assert ev.glue_metrics(task, p, y) == pytest.approx({"accuracy": acc, "f1": f1, "score": (acc + f1) / 2})
    ys = rng.uniform(0, 5, 64)
    ps = ys + rng.normal(size=64)
    pr, sp = 100 * stats.pearsonr(ps, ys)[0], 100 * stats.spearmanr(ps, ys)[0]
    assert ev.glue_metrics("sts-b", ps[:, None], ys) == pytest.approx(
        {"pearson": pr, "spearman": sp, "score": (pr + sp) / 2})
    # logits are argmax-ed (MNLI: 3 classes)
    y3 = rng.integers(0, 3, 30)
    logits = rng.normal(size=(30, 3))
    assert ev.glue_metrics("mnli", logits, y3)["accuracy"] == pytest.approx(
        100 * np.mean(logits.argmax(-1) == y3))


def test_glue_metrics_bad_input():
    valid = "cola, sst2, mrpc, stsb, qqp, mnli, qnli, rte, wnli"
    with pytest.raises(ValueError, match=rf"unknown GLUE task .squad.; valid tasks: {valid}"):
        ev.glue_metrics("squad", [0], [0])
    with pytest.raises(ValueError, match="hidden"):
        ev.glue_metrics("rte", [0, 1], [-1, -1])


# ------------------------------------------------------------------------------------------------ SQuAD


def test_normalize_answer_official():
    assert ev.normalize_answer("The Cat!") == "cat"
    assert ev.normalize_answer("  Hello,   World!! ") == "hello world"
    assert ev.normalize_answer("An apple a day") == "apple day"
    assert ev.normalize_answer("theater Anna") == "theater anna"  # articles only as whole words
    assert ev.normalize_answer("U.S.-born") == "usborn"


def test_exact_and_f1_by_hand():
    assert ev.squad_exact("cat", "The Cat!") == 1
    assert ev.squad_f1("cat", "The Cat!") == 1.0
    # 'quick brown fox' vs 'brown fox jumps': 2 common of 3 and 3 -> P = R = 2/3
    assert ev.squad_f1("the quick brown fox", "a brown fox jumps") == pytest.approx(2 / 3)
    # 'eiffel tower in paris' vs 'tower': P = 1, R = 1/4 -> F1 = 0.4
    assert ev.squad_f1("Eiffel Tower in Paris", "Tower") == pytest.approx(0.4)
    # repeated tokens count with multiplicity: gold x y y, pred y y y z -> common 2, P 2/4, R 2/3 -> 4/7
    assert ev.squad_f1("x y y", "y y y z") == pytest.approx(4 / 7)
    assert ev.squad_f1("cat", "dog") == 0.0
    # empty answers: v2.0 says both empty = 1; v1.1 gives 0 without overlap
    assert ev.squad_f1("", "") == 1.0 and ev.squad_f1("", "x") == 0.0 and ev.squad_f1("x", "") == 0.0
    assert ev.squad_f1("", "", version_2=False) == 0.0


def test_squad_v1_metrics_by_hand():
    examples = [
        {"id": "q1", "answers": ["The Cat!"]},
        {"id": "q2", "answers": ["the quick brown fox"]},
        {"id": "q3", "answers": ["Denver Broncos", "Broncos"]},
        {"id": "q4", "answers": [{"text": "Eiffel Tower in Paris"}, {"text": "Paris"}]},
    ]
    preds = {"q1": "cat", "q2": "a brown fox jumps", "q3": "the Broncos.", "q4": "Tower"}
    out = ev.squad_metrics(preds, examples)
    assert out == pytest.approx({"exact": 50.0, "f1": 100 * (1 + 2 / 3 + 1 + 0.4) / 4, "total": 4})
    # a missing prediction scores 0 and is reported
    with pytest.warns(UserWarning, match="no prediction"):
        out = ev.squad_metrics({"q1": "cat"}, examples)
    assert out["exact"] == 25.0 and out["missing"] == 3
    with pytest.raises(ValueError, match="version_2=True"):
        ev.squad_metrics({"a": ""}, [{"id": "a", "answers": []}], version_2=False)


def test_squad_v2_metrics_and_threshold_search_by_hand():
    examples = [
        {"id": "q1", "answers": ["Paris"]},
        {"id": "q2", "answers": ["blue whale"]},
        {"id": "q3", "answers": []},
        {"id": "q4", "answers": {"text": [], "answer_start": []}},
    ]
    preds = {"q1": "Paris", "q2": "whale", "q3": "London", "q4": ""}
    # without null odds: raw scores. EM q1..q4 = 1, 0, 0, 1; F1 = 1, 2/3, 0, 1
    out = ev.squad_metrics(preds, examples)
    assert out == pytest.approx({
        "exact": 50.0, "f1": 100 * (8 / 3) / 4, "total": 4,
        "HasAns_exact": 50.0, "HasAns_f1": 100 * (5 / 3) / 2, "HasAns_total": 2,
        "NoAns_exact": 50.0, "NoAns_f1": 50.0, "NoAns_total": 2,
    })
    # null odds: sweep in order q1 (-2), q2 (0.5), q3 (1.0), q4 (3.0) starting from 2 (both no-answers right):
    # EM: 2 -> 3 (q1, thr -2) -> 3 -> 2 -> 2: best 3/4 at -2.  F1: 2 -> 3 (-2) -> 3 2/3 (0.5) -> 2 2/3 -> 2 2/3.
    odds = {"q1": -2.0, "q2": 0.5, "q3": 1.0, "q4": 3.0}
    out = ev.squad_metrics(preds, examples, odds)
    assert out["best_exact"] == pytest.approx(75.0) and out["best_exact_thresh"] == -2.0
    assert out["best_f1"] == pytest.approx(100 * (11 / 3) / 4) and out["best_f1_thresh"] == 0.5
    assert out["exact"] == 50.0  # only q4 (3.0 > na_prob_thresh 1.0) is forced to '' and it already was
    # with q3's odds above 1.0 the official script counts it as answered '' -> right
    out = ev.squad_metrics(preds, examples, dict(odds, q3=1.5))
    assert out["exact"] == 75.0 and out["NoAns_exact"] == 100.0
    with pytest.raises(ValueError, match="null_odds has no value"):
        ev.squad_metrics(preds, examples, {"q1": 0.0})


# ------------------------------------------------------------------------------------------------ span decoding

CONTEXT = "Alan Turing was born in London in 1912. He studied at Cambridge and later worked at Manchester."
WORDS = [(m.start(), m.end()) for m in re.finditer(r"\w+", CONTEXT)]  # 17 words
N_Q, WIN, SEQ = 2, 8, 15  # [CLS] q q [SEP] 8 context tokens [SEP] + padding
FIRST_CTX = 1 + N_Q + 1


def _window(example_id, first_word):
    """One feature: offsets are None for [CLS]/[SEP], (-1,-1) for question and padding, word spans for context."""
    offsets = [None] + [(-1, -1)] * N_Q + [None]
    words = WORDS[first_word:first_word + WIN]
    offsets += words + [None]
    offsets += [(-1, -1)] * (SEQ - len(offsets))
    return {"example_id": example_id, "offset_mapping": offsets}, first_word


def _pos(first_word, word):
    return FIRST_CTX + word - first_word


def _turing_case():
    """3 windows (words 0-7, 5-12, 10-16). Best span 'studied at Cambridge' (words 9-11) only fits window 2."""
    feats, starts = zip(*[_window("t", w) for w in (0, 5, 10)])
    s = np.full((3, SEQ), -10.0)
    e = np.full((3, SEQ), -10.0)
    # window 0: distractor 'London' (word 5), score 3 + 3 = 6; an invalid end-before-start pair scoring 16;
    # a huge logit on [CLS] and on a question token, which are not context.
    s[0, _pos(0, 5)] = e[0, _pos(0, 5)] = 3.0
    s[0, _pos(0, 6)] = e[0, _pos(0, 3)] = 8.0
    s[0, 0] = e[0, 0] = 20.0
    e[0, 1] = 20.0
    # window 1: the answer, 5 + 4 = 9
    s[1, _pos(5, 9)], e[1, _pos(5, 11)] = 5.0, 4.0
    # window 2: 'at Cambridge' (words 10-11) 3.5 + 3.5 = 7; an over-long span (10..16, 7 tokens) scoring 12
    s[2, _pos(10, 10)], e[2, _pos(10, 11)] = 3.5, 3.5
    e[2, _pos(10, 16)] = 8.5
    return list(feats), s, e


def test_decode_spans_best_span_in_second_window():
    feats, s, e = _turing_case()
    out = ev.decode_spans(feats, s, e, n_best=5, max_answer_length=5, contexts={"t": CONTEXT})
    assert out.predictions == {"t": "studied at Cambridge"}
    nb = out.nbest["t"]
    assert [x["text"] for x in nb[:3]] == ["studied at Cambridge", "at Cambridge", "London"]
    assert [x["score"] for x in nb[:3]] == [9.0, 7.0, 6.0]
    probs = [x["probability"] for x in nb]
    assert sum(probs) == pytest.approx(1.0) and probs == sorted(probs, reverse=True)
    assert len(nb) <= 5 and len({x["text"] for x in nb}) == len(nb)
    assert out.null_odds == {}
    # with a longer limit the 7-token span wins: proves max_answer_length is what excluded it
    longer = ev.decode_spans(feats, s, e, n_best=5, max_answer_length=7, contexts={"t": CONTEXT})
    assert longer.predictions["t"] == "at Cambridge and later worked at Manchester"


def test_decode_spans_columnar_numpy_input_several_examples_and_max_context():
    feats, s, e = _turing_case()
    other, _ = _window("u", 0)
    s2 = np.full((1, SEQ), -10.0)
    e2 = np.full((1, SEQ), -10.0)
    s2[0, _pos(0, 0)], e2[0, _pos(0, 1)] = 2.0, 2.0  # 'Alan Turing'
    offsets = np.array([[(-1, -1) if o is None else o for o in f["offset_mapping"]] for f in feats + [other]])
    columns = {"example_id": ["t", "t", "u", "t"], "offset_mapping": offsets[[0, 1, 3, 2]]}
    S = np.concatenate([s, s2])[[0, 1, 3, 2]].astype(np.float32)
    E = np.concatenate([e, e2])[[0, 1, 3, 2]].astype(np.float32)
    out = ev.decode_spans(columns, S, E, n_best=5, max_answer_length=5, contexts={"t": CONTEXT, "u": CONTEXT})
    assert out.predictions == {"t": "studied at Cambridge", "u": "Alan Turing"}
    assert list(out.predictions) == ["t", "u"]
    # if window 2 is not the max-context window for 'studied', that start is not allowed there
    is_max = np.ones((4, SEQ), bool)
    is_max[1, _pos(5, 9)] = False
    columns["token_is_max_context"] = is_max
    out = ev.decode_spans(columns, S, E, n_best=5, max_answer_length=5, contexts={"t": CONTEXT, "u": CONTEXT})
    assert out.predictions["t"] == "at Cambridge"


def test_decode_spans_version_2_null_path():
    feats, s, e = _turing_case()
    # [CLS] null scores per window 2+2, 6+6, 5+5: the null score is the minimum, 4
    s[:, 0] = e[:, 0] = [2.0, 6.0, 5.0]
    ctx = {"t": CONTEXT}
    out = ev.decode_spans(feats, s, e, n_best=5, max_answer_length=5, version_2=True, contexts=ctx)
    assert out.null_odds == {"t": 4.0 - 9.0}
    assert out.predictions == {"t": "studied at Cambridge"}
    texts = [x["text"] for x in out.nbest["t"]]
    assert "" in texts and texts.index("") == 3  # scores 9, 7, 6, then null 4
    # a threshold below the difference predicts no answer
    out = ev.decode_spans(feats, s, e, 5, 5, True, -6.0, contexts=ctx)
    assert out.predictions == {"t": ""}
    # a confident null in every window
    s[:, 0] = e[:, 0] = 10.0
    out = ev.decode_spans(feats, s, e, 5, 5, True, contexts=ctx)
    assert out.predictions == {"t": ""} and out.null_odds["t"] == pytest.approx(11.0)
    assert out.nbest["t"][0]["text"] == ""
    # decoded predictions + null odds feed squad_metrics directly
    m = ev.squad_metrics(out.predictions, [{"id": "t", "answers": []}], out.null_odds)
    assert m["exact"] == 100.0 and m["NoAns_total"] == 1


def test_decode_spans_bad_input():
    feats, s, e = _turing_case()
    with pytest.raises(ValueError, match="shape"):
        ev.decode_spans(feats, s[:2], e[:2], contexts={"t": CONTEXT})
    with pytest.raises(ValueError, match="no context for example 't'"):
        ev.decode_spans(feats, s, e, contexts={})
    with pytest.raises(ValueError, match="features and contexts disagree"):
        ev.decode_spans(feats, s, e, contexts={"t": CONTEXT[:20]})


# ------------------------------------------------------------------------------------------------ seeds and writing


def test_summarize_seeds_and_table():
    runs = [{"accuracy": 80.0, "f1": 85.0, "total": 10, "note": "x"},
            {"accuracy": 82.0, "f1": 86.0, "total": 10},
            {"accuracy": 87.0, "total": 10}]
    s = ev.summarize_seeds(runs)
    assert s["accuracy"] == pytest.approx({"mean": 83.0, "std": float(np.std([80, 82, 87], ddof=1)), "n": 3})
    assert s["f1"] == pytest.approx({"mean": 85.5, "std": float(np.std([85, 86], ddof=1)), "n": 2})
    assert "note" not in s
    assert ev.summarize_seeds([{"a": 1.0}])["a"] == {"mean": 1.0, "std": 0.0, "n": 1}
    table = ev.format_seed_table({"mrpc": s, "rte": [{"accuracy": 66.2}]}, ["accuracy", "f1"], label="task")
    lines = table.strip().splitlines()
    assert lines[0] == "| task | n | accuracy | f1 |"
    assert lines[2] == f"| mrpc | 3 | 83.00 ± {s['accuracy']['std']:.2f} | 85.50 ± 0.71 (n=2) |"
    assert lines[3] == "| rte | 1 | 66.20 | – |"
    with pytest.raises(ValueError):
        ev.summarize_seeds([])


def test_write_eval_outputs_never_overwrites(tmp_path):
    out = tmp_path / "eval"
    paths = ev.write_eval_outputs(out, {"q1": "Paris"}, {"exact": 50.0, "f1": float("nan")}, name="squad",
                                  null_odds={"q1": math.inf})
    assert json.loads(open(paths["predictions"]).read()) == {"q1": "Paris"}
    assert json.loads(open(paths["metrics"]).read()) == {"exact": 50.0, "f1": None}
    assert json.loads(open(paths["null_odds"]).read()) == {"q1": None}
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        ev.write_eval_outputs(out, {"q1": "London"}, {"exact": 0.0}, name="squad")
    assert json.loads(open(paths["predictions"]).read()) == {"q1": "Paris"}
    ev.write_eval_outputs(out, {"q1": "London"}, {"exact": 0.0}, name="squad", overwrite=True)
    assert json.loads(open(paths["predictions"]).read()) == {"q1": "London"}
    assert not [f for f in os.listdir(out) if f.startswith(".tmp")]
    # GLUE: TSV in the submission format, with label names
    p = ev.write_eval_outputs(out, np.array([0, 2, 1]), {"accuracy": 66.7}, name="mnli",
                              label_names=["entailment", "neutral", "contradiction"])
    assert open(p["predictions"]).read() == "index\tprediction\n0\tentailment\n1\tcontradiction\n2\tneutral\n"
    p = ev.write_eval_outputs(out, np.array([[4.25], [0.5]]), {"pearson": 1.0}, name="stsb")
    assert open(p["predictions"]).read() == "index\tprediction\n0\t4.25\n1\t0.5\n"


def test_atomic_write_refuses_existing_target_even_without_precheck(tmp_path):
    target = tmp_path / "metrics.json"
    target.write_text("old")
    with pytest.raises(FileExistsError):
        ev._atomic_write(str(target), "new", overwrite=False)
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["metrics.json"]
