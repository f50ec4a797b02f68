"""SQuAD exact match and F1 in percent, as the official v1.1 / v2.0 evaluation scripts compute them."""

from __future__ import annotations

import collections
import math
import re
import string
import warnings
from collections.abc import Iterable, Mapping
from typing import Any


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
