"""Evaluation metrics for GLUE and SQuAD, span decoding, multi-seed summaries and result writing.

Everything here is plain NumPy/Python so it runs on the host after predictions have been pulled off the
accelerator, and so it can be checked against scikit-learn, SciPy and the official SQuAD scripts in the tests.

Scales: the primitive metric functions (`accuracy`, `binary_f1`, `matthews_corrcoef`, `pearson`, `spearman`)
return fractions exactly like scikit-learn/SciPy; `glue_metrics` and `squad_metrics` return percentages, the
convention of the GLUE leaderboard, the papers (SPEC §11) and the official SQuAD evaluation script.
"""

from __future__ import annotations

import collections
import json
import math
import os
import re
import string
import tempfile
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

__all__ = [
    "GLUE_TASKS",
    "accuracy",
    "binary_f1",
    "matthews_corrcoef",
    "pearson",
    "spearman",
    "rankdata",
    "glue_metrics",
    "macro_f1",
    "per_class_f1",
    "custom_metrics",
    "normalize_answer",
    "squad_exact",
    "squad_f1",
    "squad_metrics",
    "SpanPredictions",
    "decode_spans",
    "summarize_seeds",
    "format_seed_table",
    "write_eval_outputs",
]


# ----------------------------------------------------------------------------------------------------------------
# Primitive metrics (fractions, equal to scikit-learn / SciPy)
# ----------------------------------------------------------------------------------------------------------------


def _pair(predictions, labels, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Turns both inputs into 1-D arrays of equal, non-zero length, or raises one clear ValueError."""
    p = np.asarray(predictions)
    y = np.asarray(labels)
    if p.ndim != 1 or y.ndim != 1:
        raise ValueError(f"{name}: predictions and labels must be 1-D, got shapes {p.shape} and {y.shape}")
    if p.shape[0] != y.shape[0]:
        raise ValueError(f"{name}: {p.shape[0]} predictions but {y.shape[0]} labels")
    if p.shape[0] == 0:
        raise ValueError(f"{name}: no examples to evaluate (empty predictions and labels)")
    return p, y


def accuracy(predictions, labels) -> float:
    """Fraction of predictions equal to their label (sklearn `accuracy_score`)."""
    p, y = _pair(predictions, labels, "accuracy")
    return float(np.mean(p == y))


def binary_f1(predictions, labels, pos_label: int = 1) -> float:
    """F1 of the positive class, 2TP / (2TP + FP + FN); 0.0 when there is neither a true nor a predicted positive.

    Same as sklearn `f1_score(labels, predictions)` (average='binary', zero_division default). More than two
    distinct values is an error, as in sklearn, because binary F1 would silently ignore the extra classes.
    """
    p, y = _pair(predictions, labels, "binary_f1")
    classes = np.union1d(np.unique(p), np.unique(y))
    if classes.size > 2:
        raise ValueError(f"binary_f1: expected at most 2 classes, got {classes.size}: {classes.tolist()[:10]}")
    pred_pos = p == pos_label
    true_pos = y == pos_label
    tp = float(np.sum(pred_pos & true_pos))
    fp = float(np.sum(pred_pos & ~true_pos))
    fn = float(np.sum(~pred_pos & true_pos))
    denom = 2.0 * tp + fp + fn
    return 0.0 if denom == 0 else 2.0 * tp / denom


def per_class_f1(predictions, labels, num_classes: int) -> list[float | None]:
    """F1 of each class id 0..num_classes-1 (one-vs-rest); None for a class neither predicted nor in the labels."""
    p, y = _pair(predictions, labels, "per_class_f1")
    out: list[float | None] = []
    for k in range(num_classes):
        tp = float(np.sum((p == k) & (y == k)))
        denom = float(np.sum(p == k) + np.sum(y == k))  # 2TP + FP + FN
        out.append(None if denom == 0 else 2.0 * tp / denom)
    return out


def macro_f1(predictions, labels) -> float:
    """Unweighted mean of the per-class F1 over the classes present in the labels or the predictions.

    Same as sklearn `f1_score(labels, predictions, average='macro')`.
    """
    p, y = _pair(predictions, labels, "macro_f1")
    classes = np.union1d(np.unique(p), np.unique(y))
    f1 = []
    for k in classes:
        tp = float(np.sum((p == k) & (y == k)))
        f1.append(2.0 * tp / float(np.sum(p == k) + np.sum(y == k)))
    return float(np.mean(f1))


def matthews_corrcoef(predictions, labels) -> float:
    """Matthews correlation coefficient (multi-class form of Gorodkin 2004, as sklearn); 0.0 when undefined.

    Undefined = all predictions or all labels in one class (e.g. a model that always predicts "acceptable" on
    CoLA), which sklearn also reports as 0.0.
    """
    p, y = _pair(predictions, labels, "matthews_corrcoef")
    classes, inverse = np.unique(np.concatenate([y, p]), return_inverse=True)
    k = classes.size
    yi, pi = inverse[: y.size], inverse[y.size :]
    confusion = np.zeros((k, k), dtype=np.float64)
    np.add.at(confusion, (yi, pi), 1.0)
    t_sum = confusion.sum(axis=1)
    p_sum = confusion.sum(axis=0)
    n_correct = np.trace(confusion)
    n = confusion.sum()
    cov_ytyp = n_correct * n - np.dot(t_sum, p_sum)
    cov_ypyp = n * n - np.dot(p_sum, p_sum)
    cov_ytyt = n * n - np.dot(t_sum, t_sum)
    if cov_ypyp * cov_ytyt == 0:
        return 0.0
    return float(cov_ytyp / np.sqrt(cov_ytyt * cov_ypyp))


def pearson(x, y) -> float:
    """Pearson correlation; NaN when either input is constant (as SciPy `pearsonr`), since it is undefined."""
    a, b = _pair(x, y, "pearson")
    if a.size < 2:
        raise ValueError("pearson: need at least 2 examples")
    a = a.astype(np.float64)
    b = b.astype(np.float64)
    am = a - a.mean()
    bm = b - b.mean()
    na = np.linalg.norm(am)
    nb = np.linalg.norm(bm)
    # A constant input can leave round-off residue after centring; treat it as exactly constant like SciPy.
    if na == 0 or nb == 0 or np.all(a == a[0]) or np.all(b == b[0]):
        return float("nan")
    r = np.dot(am / na, bm / nb)
    return float(np.clip(r, -1.0, 1.0))


def rankdata(x) -> np.ndarray:
    """Ranks 1..n with ties given the average of the ranks they span (SciPy `rankdata(method='average')`)."""
    a = np.asarray(x).ravel()
    order = np.argsort(a, kind="mergesort")
    sorted_a = a[order]
    # Start of each run of equal values in sorted order, plus the end sentinel.
    starts = np.concatenate([[0], np.nonzero(sorted_a[1:] != sorted_a[:-1])[0] + 1, [a.size]])
    ranks_sorted = np.empty(a.size, dtype=np.float64)
    for lo, hi in zip(starts[:-1], starts[1:]):
        ranks_sorted[lo:hi] = 0.5 * (lo + 1 + hi)  # mean of ranks lo+1 .. hi
    ranks = np.empty(a.size, dtype=np.float64)
    ranks[order] = ranks_sorted
    return ranks


def spearman(x, y) -> float:
    """Spearman rank correlation = Pearson correlation of average ranks (handles ties as SciPy `spearmanr`)."""
    a, b = _pair(x, y, "spearman")
    return pearson(rankdata(a), rankdata(b))


# ----------------------------------------------------------------------------------------------------------------
# GLUE
# ----------------------------------------------------------------------------------------------------------------

# task -> (metrics reported, metrics averaged into the task's main score)
GLUE_TASKS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "cola": (("mcc",), ("mcc",)),
    "sst2": (("accuracy",), ("accuracy",)),
    "mrpc": (("accuracy", "f1"), ("accuracy", "f1")),
    "stsb": (("pearson", "spearman"), ("pearson", "spearman")),
    "qqp": (("accuracy", "f1"), ("accuracy", "f1")),
    "mnli": (("accuracy",), ("accuracy",)),
    "qnli": (("accuracy",), ("accuracy",)),
    "rte": (("accuracy",), ("accuracy",)),
    "wnli": (("accuracy",), ("accuracy",)),
}
# MNLI is evaluated twice, on the matched and the mismatched dev sets, with the same metric.
_GLUE_ALIASES = {
    "mnlim": "mnli",
    "mnlimm": "mnli",
    "mnlimatched": "mnli",
    "mnlimismatched": "mnli",
    "sts": "stsb",
}
_METRIC_FNS = {
    "accuracy": accuracy,
    "f1": binary_f1,
    "mcc": matthews_corrcoef,
    "pearson": pearson,
    "spearman": spearman,
}


def _glue_task_name(task: str) -> str:
    """Canonical task name: case, '-' and '_' are ignored ('SST-2', 'sts_b', 'mnli-mm' all work)."""
    key = re.sub(r"[-_\s]", "", str(task).lower())
    key = _GLUE_ALIASES.get(key, key)
    if key not in GLUE_TASKS:
        raise ValueError(
            f"unknown GLUE task {task!r}; valid tasks: {', '.join(GLUE_TASKS)} "
            "(also mnli_matched / mnli_mismatched)"
        )
    return key


def glue_metrics(task: str, predictions, labels) -> dict[str, float]:
    """All GLUE metrics of one task in percent, plus `score`, the task's main number.

    `predictions` may be class ids [N] or logits [N, C] (argmax is taken) for the classification tasks, and
    scores [N] or [N, 1] for STS-B. The main score follows the GLUE convention: the mean of the two metrics for
    MRPC/QQP (accuracy, F1) and STS-B (Pearson, Spearman), the single metric otherwise. Labels of -1 (GLUE's
    hidden test labels) are refused: evaluate on the validation split.
    """
    name = _glue_task_name(task)
    reported, main = GLUE_TASKS[name]
    p = np.asarray(predictions)
    y = np.asarray(labels)
    if y.size and np.any(y < 0):
        raise ValueError(
            f"glue_metrics({name}): labels contain negative values ({int(np.sum(y < 0))} of {y.size}); "
            "GLUE test labels are hidden (-1), evaluate on the validation split"
        )
    if name == "stsb":
        if p.ndim == 2 and p.shape[1] == 1:
            p = p[:, 0]
        p = p.astype(np.float64)
        y = y.astype(np.float64)
    elif p.ndim == 2:
        p = np.argmax(p, axis=-1)
    if p.ndim != 1:
        raise ValueError(f"glue_metrics({name}): predictions must have shape [N] or [N, C], got {p.shape}")
    out = {m: 100.0 * _METRIC_FNS[m](p, y) for m in reported}
    out["score"] = float(np.mean([out[m] for m in main]))
    return out


def custom_metrics(predictions, labels, label_names: Sequence[str] | None) -> dict[str, Any]:
    """Metrics in percent of a task with the user's own labels (see `data.glue.custom_task`).

    Classification (`label_names` given; predictions are class ids [N] or logits [N, C]): accuracy, macro-F1, and
    `score` = their mean (the GLUE convention for tasks reported with accuracy and F1), plus `f1_per_label`
    {label name: F1, None when the label is neither predicted nor in the labels}. Regression (`label_names` None):
    Pearson, Spearman and their mean, as STS-B.
    """
    p = np.asarray(predictions)
    y = np.asarray(labels)
    if label_names is None:
        if p.ndim == 2 and p.shape[1] == 1:
            p = p[:, 0]
        p, y = p.astype(np.float64), y.astype(np.float64)
        out = {"pearson": 100.0 * pearson(p, y), "spearman": 100.0 * spearman(p, y)}
        out["score"] = float(np.mean([out["pearson"], out["spearman"]]))
        return out
    if p.ndim == 2:
        p = np.argmax(p, axis=-1)
    out: dict[str, Any] = {"accuracy": 100.0 * accuracy(p, y), "macro_f1": 100.0 * macro_f1(p, y)}
    out["score"] = float(np.mean([out["accuracy"], out["macro_f1"]]))
    out["f1_per_label"] = {name: (None if f is None else 100.0 * f)
                           for name, f in zip(label_names, per_class_f1(p, y, len(label_names)))}
    return out


# ----------------------------------------------------------------------------------------------------------------
# SQuAD (official v1.1 / v2.0 evaluation)
# ----------------------------------------------------------------------------------------------------------------

_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)


def normalize_answer(s: str) -> str:
    """Official SQuAD normalisation: lower-case, drop ASCII punctuation, drop articles a/an/the, squeeze spaces."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in _PUNCTUATION)
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def squad_exact(gold: str, prediction: str) -> int:
    """1 if the normalised strings are equal, else 0."""
    return int(normalize_answer(gold) == normalize_answer(prediction))


def squad_f1(gold: str, prediction: str, version_2: bool = True) -> float:
    """Token-level F1 between normalised answers (bag of tokens).

    With `version_2` (the v2.0 script): if either side has no tokens, F1 is 1 when both are empty, else 0.
    Without it (the v1.1 script): no overlap is always 0, even for two empty strings.
    """
    gold_toks = normalize_answer(gold).split()
    pred_toks = normalize_answer(prediction).split()
    if version_2 and (not gold_toks or not pred_toks):
        return float(gold_toks == pred_toks)
    num_same = sum((collections.Counter(gold_toks) & collections.Counter(pred_toks)).values())
    if num_same == 0:
        return 0.0
    precision = num_same / len(pred_toks)
    recall = num_same / len(gold_toks)
    return 2.0 * precision * recall / (precision + recall)


def _answer_texts(example: Mapping[str, Any]) -> list[str]:
    """Gold answer strings from {'answers': [str]}, [{'text': str}] or HF's {'text': [...], 'answer_start': [...]}."""
    answers = example.get("answers", [])
    if isinstance(answers, Mapping):
        answers = answers.get("text", [])
    texts = []
    for a in answers:
        texts.append(a["text"] if isinstance(a, Mapping) else a)
    if not all(isinstance(t, str) for t in texts):
        raise ValueError(f"example {example.get('id')!r}: answers must be strings, got {answers!r}")
    return texts


def _best_threshold(preds, scores, na_probs, has_ans, qids, total) -> tuple[float, float]:
    """Official `find_best_thresh`: sweep the no-answer threshold over the sorted null scores.

    Start by answering nothing (every unanswerable question right); then, in increasing null-score order, let
    each question keep its predicted answer and track the best total. Returns (best score in %, threshold).
    """
    cur = sum(1 for q in qids if not has_ans[q])
    best, best_thresh = cur, 0.0
    for q in sorted(qids, key=lambda k: na_probs[k]):
        if has_ans[q]:
            diff = scores[q]
        else:
            diff = -1 if preds[q] else 0
        cur += diff
        if cur > best:
            best, best_thresh = cur, na_probs[q]
    return 100.0 * best / total, float(best_thresh)


def squad_metrics(
    predictions: Mapping[str, str],
    examples: Iterable[Mapping[str, Any]],
    null_odds: Mapping[str, float] | None = None,
    *,
    version_2: bool | None = None,
    na_prob_thresh: float = 1.0,
) -> dict[str, float]:
    """SQuAD exact match and F1 in percent, as the official evaluation scripts compute them.

    examples: [{'id': ..., 'answers': [str, ...]}]; an empty answer list marks an unanswerable (v2.0) question
    whose only correct prediction is ''. Each question scores the max over its gold answers.
    version_2: None infers it (any unanswerable question, or `null_odds` given). v2.0 adds HasAns_/NoAns_
    breakdowns; with `null_odds` (per-question null-score difference, as `decode_spans` returns) it applies
    `na_prob_thresh` (questions with odds above it count as answered '') and adds best_exact/best_f1 with their
    thresholds, exactly as `evaluate-v2.0.py --na-prob-file`.
    A question without prediction scores 0 and is counted in `missing` (the v1.1 script's rule; the v2.0
    script would skip it, which flatters partial runs).
    """
    examples = list(examples)
    if not examples:
        raise ValueError("squad_metrics: no examples to evaluate")
    gold: dict[str, list[str]] = {}
    for ex in examples:
        if "id" not in ex:
            raise ValueError(f"squad_metrics: example without 'id': {dict(ex)!r}"[:200])
        qid = str(ex["id"])
        if qid in gold:
            raise ValueError(f"squad_metrics: duplicate example id {qid!r}")
        gold[qid] = _answer_texts(ex)
    if version_2 is None:
        version_2 = null_odds is not None or any(not g for g in gold.values())
    if not version_2:
        empty = [q for q, g in gold.items() if not g]
        if empty:
            raise ValueError(
                f"squad_metrics: {len(empty)} question(s) without gold answers (e.g. {empty[0]!r}) in v1.1 mode; "
                "pass version_2=True for SQuAD v2.0"
            )

    has_ans: dict[str, bool] = {}
    exact_raw: dict[str, float] = {}
    f1_raw: dict[str, float] = {}
    preds: dict[str, str] = {}
    missing = []
    for qid, answers in gold.items():
        if version_2:
            # v2.0 script: gold answers that normalise to nothing are dropped; none left -> only '' is right.
            answers = [a for a in answers if normalize_answer(a)] or [""]
            has_ans[qid] = bool(gold[qid])
        else:
            has_ans[qid] = True
        if qid not in predictions:
            missing.append(qid)
            exact_raw[qid] = f1_raw[qid] = 0.0
            continue
        pred = predictions[qid]
        if not isinstance(pred, str):
            raise ValueError(f"squad_metrics: prediction for {qid!r} must be a string, got {type(pred).__name__}")
        preds[qid] = pred
        exact_raw[qid] = float(max(squad_exact(a, pred) for a in answers))
        f1_raw[qid] = max(squad_f1(a, pred, version_2=version_2) for a in answers)
    if missing:
        warnings.warn(
            f"squad_metrics: {len(missing)} of {len(gold)} questions have no prediction (e.g. {missing[0]!r}); "
            "they score 0",
            stacklevel=2,
        )

    total = len(gold)
    if not version_2:
        out = {
            "exact": 100.0 * sum(exact_raw.values()) / total,
            "f1": 100.0 * sum(f1_raw.values()) / total,
            "total": total,
        }
        if missing:
            out["missing"] = len(missing)
        return out

    na_probs: dict[str, float] = {}
    if null_odds is not None:
        absent = [q for q in preds if q not in null_odds]
        if absent:
            raise ValueError(
                f"squad_metrics: null_odds has no value for {len(absent)} predicted question(s), e.g. {absent[0]!r}"
            )
        # None stands for +inf (no non-null span at all) once written to strict JSON.
        na_probs = {q: math.inf if null_odds[q] is None else float(null_odds[q]) for q in preds}
    exact_t, f1_t = dict(exact_raw), dict(f1_raw)
    for q in preds:
        if na_probs.get(q, 0.0) > na_prob_thresh:
            exact_t[q] = f1_t[q] = float(not has_ans[q])

    def block(qids, prefix=""):
        n = len(qids)
        return {
            f"{prefix}exact": 100.0 * sum(exact_t[q] for q in qids) / n,
            f"{prefix}f1": 100.0 * sum(f1_t[q] for q in qids) / n,
            f"{prefix}total": n,
        }

    out = block(list(gold))
    has_qids = [q for q in gold if has_ans[q]]
    no_qids = [q for q in gold if not has_ans[q]]
    if has_qids:
        out.update(block(has_qids, "HasAns_"))
    if no_qids:
        out.update(block(no_qids, "NoAns_"))
    if null_odds is not None:
        qids = list(preds)
        out["best_exact"], out["best_exact_thresh"] = _best_threshold(preds, exact_raw, na_probs, has_ans, qids, total)
        out["best_f1"], out["best_f1_thresh"] = _best_threshold(preds, f1_raw, na_probs, has_ans, qids, total)
    if missing:
        out["missing"] = len(missing)
    return out


# ----------------------------------------------------------------------------------------------------------------
# Span decoding across doc-stride windows
# ----------------------------------------------------------------------------------------------------------------


class SpanPredictions(NamedTuple):
    """Result of `decode_spans`, keyed by example id in order of first appearance."""

    predictions: dict[str, str]
    nbest: dict[str, list[dict[str, Any]]]  # [{'text', 'score', 'probability', 'start_logit', 'end_logit'}]
    null_odds: dict[str, float]  # v2.0 only: null score - best non-null score (+inf if no valid span)


def _feature_records(features) -> list[Mapping[str, Any]]:
    """Accepts a list of per-feature mappings or one mapping of columns; returns per-feature mappings."""
    if isinstance(features, Mapping):
        if "example_id" not in features or "offset_mapping" not in features:
            raise ValueError("decode_spans: features need 'example_id' and 'offset_mapping' columns")
        keys = list(features)
        n = len(features["example_id"])
        for k in keys:
            if len(features[k]) != n:
                raise ValueError(f"decode_spans: feature column {k!r} has {len(features[k])} rows, expected {n}")
        return [{k: features[k][i] for k in keys} for i in range(n)]
    records = list(features)
    for i, r in enumerate(records):
        if "example_id" not in r or "offset_mapping" not in r:
            raise ValueError(f"decode_spans: feature {i} lacks 'example_id' or 'offset_mapping'")
    return records


def _context_offsets(offsets, seq_len: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-token (char_start, char_end) and a mask of tokens that lie in the context.

    A token is context when its offset is a pair with end > start; None, (-1, -1) and the (0, 0) that
    tokenizers give special tokens are not. Positions past the end of the offset list are padding.
    """
    starts = np.full(seq_len, -1, dtype=np.int64)
    ends = np.full(seq_len, -1, dtype=np.int64)
    for t, off in enumerate(offsets):
        if t >= seq_len:
            break
        if off is None:
            continue
        s, e = int(off[0]), int(off[1])
        if s >= 0 and e > s:
            starts[t], ends[t] = s, e
    return starts, ends, starts >= 0


def _softmax(scores: Sequence[float]) -> list[float]:
    """Numerically stable softmax of a list of floats."""
    if not scores:
        return []
    a = np.asarray(scores, dtype=np.float64)
    e = np.exp(a - a.max())
    return (e / e.sum()).tolist()


def decode_spans(
    features,
    start_logits,
    end_logits,
    n_best: int = 20,
    max_answer_length: int = 30,
    version_2: bool = False,
    null_score_diff_threshold: float = 0.0,
    *,
    contexts: Mapping[str, str] | None = None,
) -> SpanPredictions:
    """Turns per-window start/end logits into one answer string per example (Google BERT `run_squad` decoding).

    features: one record per window with `example_id` and `offset_mapping` (per token (char_start, char_end) in
    the example's context, None or (-1, -1) for question/special/padding tokens), optionally
    `token_is_max_context` (a start is only allowed where this window gives the token its maximal context, as
    in the original BERT code) and `context` (used when `contexts` is None). start/end_logits: [num_features,
    seq_len]. For each window the top `n_best` starts and ends are paired; a pair is valid when both tokens are
    in the context, end >= start and the span has at most `max_answer_length` tokens; its score is
    start_logit + end_logit and the best across all windows wins. The n-best list is deduplicated by text and
    carries softmax probabilities. v2.0: the null score is the minimum over windows of start_logit[0] +
    end_logit[0] (the [CLS] token); the prediction is '' when null - best non-null > `null_score_diff_threshold`.
    """
    if n_best < 1 or max_answer_length < 1:
        raise ValueError(f"decode_spans: n_best and max_answer_length must be >= 1, got {n_best}, {max_answer_length}")
    records = _feature_records(features)
    start_logits = np.asarray(start_logits, dtype=np.float64)
    end_logits = np.asarray(end_logits, dtype=np.float64)
    if start_logits.ndim != 2 or start_logits.shape != end_logits.shape or start_logits.shape[0] != len(records):
        raise ValueError(
            f"decode_spans: start/end logits must both have shape [num_features={len(records)}, seq_len], "
            f"got {start_logits.shape} and {end_logits.shape}"
        )
    seq_len = start_logits.shape[1]

    by_example: dict[str, list[int]] = {}
    for i, r in enumerate(records):
        by_example.setdefault(r["example_id"], []).append(i)

    predictions: dict[str, str] = {}
    all_nbest: dict[str, list[dict[str, Any]]] = {}
    null_odds: dict[str, float] = {}
    for example_id, feature_ids in by_example.items():
        if contexts is not None:
            if example_id not in contexts:
                raise ValueError(f"decode_spans: no context for example {example_id!r}")
            context = contexts[example_id]
        else:
            context = records[feature_ids[0]].get("context")
            if context is None:
                raise ValueError(f"decode_spans: pass contexts= or give features a 'context' (example {example_id!r})")

        prelim = []  # (score, start_logit, end_logit, char_start, char_end)
        null_score = math.inf
        null_logits = (0.0, 0.0)
        for fi in feature_ids:
            rec = records[fi]
            s_log, e_log = start_logits[fi], end_logits[fi]
            char_s, char_e, in_ctx = _context_offsets(rec["offset_mapping"], seq_len)
            if in_ctx.any() and char_e[in_ctx].max() > len(context):
                raise ValueError(
                    f"decode_spans: offset_mapping of a feature of example {example_id!r} points to character "
                    f"{int(char_e[in_ctx].max())} but the context has {len(context)}; features and contexts disagree"
                )
            max_ctx = rec.get("token_is_max_context")
            if max_ctx is not None:
                if isinstance(max_ctx, Mapping):
                    allowed = np.array([bool(max_ctx.get(t, max_ctx.get(str(t), False))) for t in range(seq_len)])
                else:
                    allowed = np.zeros(seq_len, dtype=bool)
                    flags = np.asarray(max_ctx, dtype=bool)[:seq_len]
                    allowed[: flags.size] = flags
                start_ok = in_ctx & allowed
            else:
                start_ok = in_ctx
            if version_2:
                score = s_log[0] + e_log[0]
                if score < null_score:
                    null_score, null_logits = float(score), (float(s_log[0]), float(e_log[0]))
            top_s = np.argsort(-s_log, kind="stable")[:n_best]
            top_e = np.argsort(-e_log, kind="stable")[:n_best]
            for s in top_s:
                if not start_ok[s]:
                    continue
                for e in top_e:
                    if not in_ctx[e] or e < s or e - s + 1 > max_answer_length:
                        continue
                    prelim.append((float(s_log[s] + e_log[e]), float(s_log[s]), float(e_log[e]),
                                   int(char_s[s]), int(char_e[e])))
        prelim.sort(key=lambda x: -x[0])  # stable: equal scores keep window/token order

        nbest: list[dict[str, Any]] = []
        seen: set[str] = set()
        for score, sl, el, cs, ce in prelim:
            if len(nbest) >= n_best:
                break
            text = context[cs:ce]
            if text in seen:
                continue
            seen.add(text)
            nbest.append({"text": text, "score": score, "start_logit": sl, "end_logit": el})
        best_non_null = nbest[0] if nbest else None
        if version_2:
            null_entry = {"text": "", "score": null_score, "start_logit": null_logits[0], "end_logit": null_logits[1]}
            # Keep the n-best list sorted by score with the null answer in its place.
            pos = next((k for k, ent in enumerate(nbest) if ent["score"] < null_score), len(nbest))
            nbest.insert(pos, null_entry)
        if not nbest:
            nbest.append({"text": "", "score": 0.0, "start_logit": 0.0, "end_logit": 0.0})
        for ent, prob in zip(nbest, _softmax([ent["score"] for ent in nbest])):
            ent["probability"] = prob

        if version_2:
            diff = math.inf if best_non_null is None else null_score - best_non_null["score"]
            null_odds[example_id] = diff
            answer_null = best_non_null is None or diff > null_score_diff_threshold
            predictions[example_id] = "" if answer_null else best_non_null["text"]
        else:
            predictions[example_id] = best_non_null["text"] if best_non_null else ""
        all_nbest[example_id] = nbest
    return SpanPredictions(predictions, all_nbest, null_odds)


# ----------------------------------------------------------------------------------------------------------------
# Several seeds
# ----------------------------------------------------------------------------------------------------------------


def _is_number(v) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_))


def summarize_seeds(runs: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, float]]:
    """Mean, sample standard deviation (ddof=1; 0.0 for a single run) and count of each numeric metric.

    Fine-tuning CoLA/MRPC/RTE varies by ~3 points between seeds (SPEC §4), so reports give mean ± std. A metric
    absent from some runs is summarised over the runs that have it (see `n`); non-numeric values are skipped.
    """
    runs = list(runs)
    if not runs:
        raise ValueError("summarize_seeds: no runs given")
    values: dict[str, list[float]] = {}
    for run in runs:
        for k, v in run.items():
            if _is_number(v):
                values.setdefault(k, []).append(float(v))
    out = {}
    for k, vs in values.items():
        a = np.asarray(vs, dtype=np.float64)
        out[k] = {
            "mean": float(a.mean()),
            "std": float(a.std(ddof=1)) if a.size > 1 else 0.0,
            "n": int(a.size),
        }
    return out


def format_seed_table(
    rows: Mapping[str, Any] | Sequence[tuple[str, Any]],
    metrics: Sequence[str] | None = None,
    *,
    digits: int = 2,
    label: str = "run",
) -> str:
    """Markdown table with one row per run name and "mean ± std" cells.

    rows: {name: summary} or [(name, summary)], where a summary is what `summarize_seeds` returns or a list of
    per-seed metric dicts (summarised here). Columns are `metrics`, or every metric in order of first appearance.
    The `n` column is the number of seeds; a cell with fewer seeds than its row says so, e.g. "(n=2)".
    """
    items = list(rows.items()) if isinstance(rows, Mapping) else list(rows)
    summaries = []
    for name, s in items:
        if isinstance(s, Sequence) and not isinstance(s, (str, bytes)):
            s = summarize_seeds(s)
        summaries.append((str(name), s))
    if metrics is None:
        metrics = []
        for _, s in summaries:
            metrics.extend(m for m in s if m not in metrics)
    header = [label, "n", *metrics]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    for name, s in summaries:
        n = max((s[m]["n"] for m in metrics if m in s), default=0)
        cells = [name.replace("|", "\\|"), str(n)]
        for m in metrics:
            if m not in s:
                cells.append("–")
                continue
            c = s[m]
            cell = f"{c['mean']:.{digits}f}" if c["n"] == 1 else f"{c['mean']:.{digits}f} ± {c['std']:.{digits}f}"
            if c["n"] != n:
                cell += f" (n={c['n']})"
            cells.append(cell)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------------------------
# Writing results
# ----------------------------------------------------------------------------------------------------------------


def _jsonable(obj):
    """NumPy scalars/arrays to Python; NaN/inf to None so the files are strict JSON (readable by jq, JS...)."""
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, (np.bool_, bool)):
        return bool(obj)
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        f = float(obj)
        return f if math.isfinite(f) else None
    return obj


def _atomic_write(path: str, text: str, overwrite: bool) -> None:
    """Writes via a temp file in the same folder, then an atomic link (no overwrite) or rename (overwrite)."""
    folder = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(prefix=".tmp-" + os.path.basename(path) + "-", dir=folder)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        if overwrite:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)  # fails with FileExistsError instead of replacing a file that appeared meanwhile
            except FileExistsError:
                raise FileExistsError(f"refusing to overwrite existing {path} (pass overwrite=True)") from None
            except OSError:  # file systems without hard links
                if os.path.exists(path):
                    raise FileExistsError(f"refusing to overwrite existing {path} (pass overwrite=True)") from None
                os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_eval_outputs(
    out_dir: str | os.PathLike,
    predictions,
    metrics: Mapping[str, Any],
    *,
    name: str = "eval",
    nbest: Mapping[str, Any] | None = None,
    null_odds: Mapping[str, float] | None = None,
    label_names: Sequence[str] | None = None,
    overwrite: bool = False,
) -> dict[str, str]:
    """Writes `{name}_predictions.{json|tsv}`, `{name}_metrics.json` and optional n-best / null-odds JSON.

    SQuAD predictions (a dict id -> answer) go to JSON in the official format; GLUE predictions (a sequence or
    array, class ids or STS-B scores) go to a TSV `index<TAB>prediction` as the GLUE server expects, with class
    ids mapped through `label_names` when given. Every file goes through a temp file and an atomic link/rename;
    if any target already exists nothing is written and FileExistsError is raised, unless overwrite=True.
    Returns {kind: path}. Non-finite floats become null (strict JSON).
    """
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    files: dict[str, tuple[str, str]] = {}
    if isinstance(predictions, Mapping):
        files["predictions"] = (f"{name}_predictions.json",
                                json.dumps(_jsonable(predictions), indent=2, ensure_ascii=False) + "\n")
    else:
        p = np.asarray(predictions)
        if p.ndim == 2 and p.shape[1] == 1:
            p = p[:, 0]
        if p.ndim != 1:
            raise ValueError(f"write_eval_outputs: GLUE predictions must be 1-D, got shape {p.shape}")
        lines = ["index\tprediction"]
        for i, v in enumerate(p.tolist()):
            if label_names is not None:
                if not (isinstance(v, int) and 0 <= v < len(label_names)):
                    raise ValueError(f"write_eval_outputs: prediction {v!r} at {i} is not a class id of {label_names}")
                v = label_names[v]
            elif isinstance(v, float):
                v = f"{v:.6g}"
            lines.append(f"{i}\t{v}")
        files["predictions"] = (f"{name}_predictions.tsv", "\n".join(lines) + "\n")
    files["metrics"] = (f"{name}_metrics.json", json.dumps(_jsonable(metrics), indent=2, sort_keys=True) + "\n")
    if nbest is not None:
        files["nbest"] = (f"{name}_nbest.json", json.dumps(_jsonable(nbest), indent=2, ensure_ascii=False) + "\n")
    if null_odds is not None:
        files["null_odds"] = (f"{name}_null_odds.json", json.dumps(_jsonable(null_odds), indent=2) + "\n")

    paths = {k: os.path.join(out_dir, fn) for k, (fn, _) in files.items()}
    if not overwrite:
        existing = [p for p in paths.values() if os.path.exists(p)]
        if existing:
            raise FileExistsError(
                f"refusing to overwrite existing {', '.join(existing)} (pass overwrite=True or another name/out_dir)"
            )
    for k, (_, text) in files.items():
        _atomic_write(paths[k], text, overwrite)
    return paths
