"""SQuAD v1.1 / v2.0: examples from TFDS `squad/v1.1`, `squad/v2.0` or the official JSON, and windowed features.

A context longer than the window is covered by several features ("windows") that overlap by `doc_stride` tokens
(Hugging Face `stride` semantics, as in its run_qa.py). Questions are cut to `max_query_length` tokens first. Each
feature keeps, for the span decoder (`mobiledistill.evaluate.decode_spans`): its example id, the character span in
the context of every token (-1, -1 for question, special and padding tokens) and whether the window gives each token
its maximal context (BERT's `_check_is_max_context`). Training features carry start/end token positions; an
unanswerable question or an answer outside the window points both at [CLS] (index 0).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from typing import Any

import numpy as np

from mobiledistill.data.errors import DataError, SkipReport
from mobiledistill.data.tfds_io import as_text, check_keys, open_tfds
from mobiledistill.data.tokenizer import WordPiece

SQUAD_VERSIONS = ("v1.1", "v2.0")


@dataclasses.dataclass(frozen=True)
class SquadExample:
    """One question; `answers`/`answer_starts` are the gold spans (empty for an unanswerable v2.0 question)."""

    id: str
    title: str
    question: str
    context: str
    answers: tuple[str, ...]
    answer_starts: tuple[int, ...]
    is_impossible: bool = False

    def gold(self) -> dict[str, Any]:
        """The record `mobiledistill.evaluate.squad_metrics` takes."""
        return {"id": self.id, "answers": [] if self.is_impossible else list(self.answers)}


def _texts(values: Any) -> list[str]:
    return [as_text(v) for v in (values.tolist() if hasattr(values, "tolist") else values)]


def load_squad_tfds(
    version: str = "v1.1", split: str = "validation", *, data_dir: str | None = None, download: bool = False
) -> list[SquadExample]:
    """Examples of TFDS `squad/<version>` (v1.1 or v2.0), split 'train' or 'validation'."""
    if version not in SQUAD_VERSIONS:
        raise DataError(f"SQuAD version {version!r}; valid: {', '.join(SQUAD_VERSIONS)}")
    source = open_tfds(f"squad/{version}", split, data_dir=data_dir, download=download)
    check_keys(source[0], ("id", "context", "question", "answers"), f"TFDS squad/{version}:{split}")
    out = []
    for i in range(len(source)):
        r = source[i]
        answers = r["answers"]
        starts = answers["answer_start"]
        out.append(
            SquadExample(
                id=as_text(r["id"]),
                title=as_text(r.get("title", "")),
                question=as_text(r["question"]),
                context=as_text(r["context"]),
                answers=tuple(_texts(answers["text"])),
                answer_starts=tuple(int(s) for s in (starts.tolist() if hasattr(starts, "tolist") else starts)),
                is_impossible=bool(np.asarray(r.get("is_impossible", False)).item()),
            )
        )
    return out


def load_squad_json(path: str) -> list[SquadExample]:
    """Examples from a file in the official format: {"data": [{"title", "paragraphs": [{"context", "qas": [...]}]}]}."""
    try:
        with open(path, "rb") as f:
            doc = json.loads(f.read().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 (byte {e.start}); SQuAD files are UTF-8 JSON") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON (line {e.lineno}: {e.msg})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("data"), list):
        raise DataError(f"{path}: expected the official SQuAD format, an object with a 'data' list of articles")
    out = []
    for a, article in enumerate(doc["data"]):
        for p, para in enumerate(article.get("paragraphs", [])):
            where = f"{path}: data[{a}].paragraphs[{p}]"
            if "context" not in para or "qas" not in para:
                raise DataError(f"{where} lacks 'context' or 'qas'")
            for q, qa in enumerate(para["qas"]):
                if "id" not in qa or "question" not in qa:
                    raise DataError(f"{where}.qas[{q}] lacks 'id' or 'question'")
                answers = qa.get("answers", [])
                out.append(
                    SquadExample(
                        id=str(qa["id"]),
                        title=str(article.get("title", "")),
                        question=qa["question"],
                        context=para["context"],
                        answers=tuple(x["text"] for x in answers),
                        answer_starts=tuple(int(x["answer_start"]) for x in answers),
                        is_impossible=bool(qa.get("is_impossible", False)),
                    )
                )
    if not out:
        raise DataError(f"{path}: no questions in the file")
    return out


@dataclasses.dataclass
class SquadFeatures:
    """Windows of SQuAD examples: model inputs in `arrays`, span-decoding metadata beside them.

    arrays: input_ids, token_type_ids, attention_mask, start_positions, end_positions, feature_index ([N] ints; the
    row of each feature, to map predictions back), example_index (into `examples`).
    """

    arrays: dict[str, np.ndarray]
    example_id: list[str]
    offset_mapping: np.ndarray  # int32 [N, L, 2]; (-1, -1) outside the context
    token_is_max_context: np.ndarray  # bool [N, L]
    examples: list[SquadExample]

    def __len__(self) -> int:
        return len(self.example_id)

    @property
    def contexts(self) -> dict[str, str]:
        return {ex.id: ex.context for ex in self.examples}

    def eval_columns(self) -> dict[str, Any]:
        """The columns `decode_spans(features, ...)` reads, row-aligned with `arrays`."""
        return {
            "example_id": self.example_id,
            "offset_mapping": self.offset_mapping,
            "token_is_max_context": self.token_is_max_context,
        }


def _answer_span(ex: SquadExample, report: SkipReport) -> tuple[int, int] | None:
    """(char_start, char_end) of the first gold answer in the context, or None (counted) if it is not there."""
    text, start = ex.answers[0], ex.answer_starts[0]
    if ex.context[start : start + len(text)] == text:
        return start, start + len(text)
    found = ex.context.find(text, max(0, start - 50))  # a few datasets have slightly shifted starts
    if found < 0:
        found = ex.context.find(text)
    if found < 0 or not text.strip():
        report.add("answer_not_in_context", ex.id)
        return None
    report.add("answer_start_corrected", ex.id)
    return found, found + len(text)


def _cut_questions(examples: Sequence[SquadExample], tokenizer: WordPiece, max_query_length: int, report) -> list[str]:
    encodings = tokenizer.plain.encode_batch([ex.question for ex in examples], add_special_tokens=False)
    out = []
    for ex, enc in zip(examples, encodings):
        if len(enc.ids) > max_query_length:
            report.add("questions_truncated", ex.id)
            out.append(ex.question[: enc.offsets[max_query_length - 1][1]])
        else:
            out.append(ex.question)
    return out


def squad_features(
    examples: Sequence[SquadExample],
    tokenizer: WordPiece,
    *,
    training: bool,
    max_seq_length: int = 384,
    doc_stride: int = 128,
    max_query_length: int = 64,
    report: SkipReport | None = None,
) -> SquadFeatures:
    """Windowed features; with `training`, examples whose answer is not in their context are skipped and counted."""
    room = max_seq_length - max_query_length - 3
    if not 0 <= doc_stride < room:
        raise DataError(
            f"doc_stride={doc_stride} must be below the context room max_seq_length - max_query_length - 3 = {room} "
            f"(max_seq_length={max_seq_length}, max_query_length={max_query_length})"
        )
    if not examples:
        raise DataError("SQuAD: no examples to turn into features")
    report = report if report is not None else SkipReport("squad features")
    spans: list[tuple[int, int] | None] = []
    kept: list[SquadExample] = []
    for ex in examples:
        span = None
        if training and not ex.is_impossible:
            if not ex.answers:
                report.add("answerable_without_answer", ex.id)
                continue
            span = _answer_span(ex, report)
            if span is None:
                continue
        kept.append(ex)
        spans.append(span)
    if not kept:
        raise DataError(f"SQuAD: every example was skipped ({report.summary()})")
    questions = _cut_questions(kept, tokenizer, max_query_length, report)
    enc = tokenizer.hf(
        questions,
        [ex.context for ex in kept],
        truncation="only_second",
        max_length=max_seq_length,
        stride=doc_stride,
        return_overflowing_tokens=True,
        return_offsets_mapping=True,
        return_token_type_ids=True,
        padding="max_length",
    )
    sample = np.asarray(enc["overflow_to_sample_mapping"], np.int64)
    n = len(sample)
    offsets = np.full((n, max_seq_length, 2), -1, np.int32)
    starts = np.zeros(n, np.int32)
    ends = np.zeros(n, np.int32)
    for i in range(n):
        seq = enc.sequence_ids(i)
        in_ctx = np.array([s == 1 for s in seq])
        offsets[i][in_ctx] = np.asarray(enc["offset_mapping"][i], np.int32)[in_ctx]
        span = spans[sample[i]]
        if span is not None:
            ctx = np.flatnonzero(in_ctx)
            s_char, e_char = span
            if offsets[i, ctx[0], 0] <= s_char and offsets[i, ctx[-1], 1] >= e_char:
                starts[i] = ctx[np.flatnonzero(offsets[i, ctx, 0] <= s_char)[-1]]
                ends[i] = ctx[np.flatnonzero(offsets[i, ctx, 1] >= e_char)[0]]
    max_context = _max_context(offsets, sample)
    if report.counts:
        report.log()
    arrays = {
        "input_ids": np.asarray(enc["input_ids"], np.int32),
        "token_type_ids": np.asarray(enc["token_type_ids"], np.int32),
        "attention_mask": np.asarray(enc["attention_mask"], np.int32),
        "start_positions": starts,
        "end_positions": ends,
        "feature_index": np.arange(n, dtype=np.int32),
        "example_index": sample.astype(np.int32),
    }
    return SquadFeatures(
        arrays=arrays,
        example_id=[kept[j].id for j in sample],
        offset_mapping=offsets,
        token_is_max_context=max_context,
        examples=kept,
    )


def _max_context(offsets: np.ndarray, sample: np.ndarray) -> np.ndarray:
    """BERT's max-context rule: a token belongs to the window where min(left, right context) + 0.01 * length is best."""
    n, length, _ = offsets.shape
    out = np.zeros((n, length), bool)
    best: dict[tuple[int, int], tuple[float, int]] = {}  # (example, char start) -> (score, feature)
    for i in range(n):
        ctx = np.flatnonzero(offsets[i, :, 0] >= 0)
        m = len(ctx)
        for j, pos in enumerate(ctx):
            key = (int(sample[i]), int(offsets[i, pos, 0]))
            score = min(j, m - 1 - j) + 0.01 * m
            if key not in best or score > best[key][0]:
                best[key] = (score, i)
    for i in range(n):
        for pos in np.flatnonzero(offsets[i, :, 0] >= 0):
            out[i, pos] = best[(int(sample[i]), int(offsets[i, pos, 0]))][1] == i
    return out
