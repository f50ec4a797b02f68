"""Answer-span decoding across doc-stride windows (the official BERT `run_squad` post-processing)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np


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
