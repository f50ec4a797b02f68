"""GLUE tasks: examples from TFDS `glue/<task>` or local TSV/CSV/JSONL files with TFDS's columns, and features.

Features are fixed-length arrays: input_ids, token_type_ids, attention_mask ([N, max_seq_length] int32), label
([N] int32, float32 for STS-B) and idx. Labels may be given as ids or as the TFDS label names ('entailment',
'not_equivalent', ...); GLUE's hidden test labels (-1) are accepted only with `allow_unlabeled=True`. Pairs longer
than `max_seq_length` are truncated longest-first, counted and reported.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from mobiledistill.data.errors import DataError, SkipReport
from mobiledistill.data.sources import expand_paths, read_records
from mobiledistill.data.tfds_io import as_text, check_keys, open_tfds
from mobiledistill.data.tokenizer import WordPiece


@dataclasses.dataclass(frozen=True)
class GlueTask:
    """A GLUE task: its text columns (TFDS names), label names (None: regression) and evaluation splits."""

    name: str
    text_keys: tuple[str, ...]
    label_names: tuple[str, ...] | None
    eval_splits: tuple[str, ...] = ("validation",)

    @property
    def is_regression(self) -> bool:
        return self.label_names is None

    @property
    def num_labels(self) -> int:
        return 1 if self.label_names is None else len(self.label_names)


GLUE_TASKS: dict[str, GlueTask] = {
    t.name: t
    for t in (
        GlueTask("cola", ("sentence",), ("unacceptable", "acceptable")),
        GlueTask("sst2", ("sentence",), ("negative", "positive")),
        GlueTask("mrpc", ("sentence1", "sentence2"), ("not_equivalent", "equivalent")),
        GlueTask("stsb", ("sentence1", "sentence2"), None),
        GlueTask("qqp", ("question1", "question2"), ("not_duplicate", "duplicate")),
        GlueTask(
            "mnli",
            ("premise", "hypothesis"),
            ("entailment", "neutral", "contradiction"),
            ("validation_matched", "validation_mismatched"),
        ),
        GlueTask("qnli", ("question", "sentence"), ("entailment", "not_entailment")),
        GlueTask("rte", ("sentence1", "sentence2"), ("entailment", "not_entailment")),
        GlueTask("wnli", ("sentence1", "sentence2"), ("not_entailment", "entailment")),
    )
}


def glue_task(name: str) -> GlueTask:
    key = name.lower().replace("-", "").replace("_", "")
    if key not in GLUE_TASKS:
        raise DataError(f"unknown GLUE task {name!r}; valid: {', '.join(GLUE_TASKS)}")
    return GLUE_TASKS[key]


def _label(task: GlueTask, value: Any, where: str, allow_unlabeled: bool) -> float | int:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, bytes):
        value = value.decode("utf-8", errors="replace")
    if isinstance(value, str):
        value = value.strip()
    if task.is_regression:
        try:
            score = float(value)
        except (TypeError, ValueError):
            raise DataError(f"{where}: STS-B label {value!r} is not a number (valid: 0.0 to 5.0)") from None
        if score == -1 and allow_unlabeled:
            return -1.0
        if not 0.0 <= score <= 5.0:
            raise DataError(f"{where}: STS-B label {score} is outside 0.0 to 5.0")
        return score
    names = task.label_names
    if isinstance(value, str):
        lowered = value.lower()
        if lowered in names:
            return names.index(lowered)
        try:
            value = int(value)
        except ValueError:
            pass
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        if 0 <= value < len(names):
            return int(value)
        if value == -1 and allow_unlabeled:
            return -1
    valid = f"0..{len(names) - 1} or {', '.join(names)}"
    hint = " (-1 marks hidden test labels: pass allow_unlabeled=True)" if value in (-1, "-1") else ""
    raise DataError(f"{where}: unknown {task.name} label {value!r}; valid: {valid}{hint}")


def _example(task: GlueTask, record: Mapping[str, Any], where: str, default_idx: int, allow_unlabeled: bool) -> dict:
    texts = {}
    for key in task.text_keys:
        try:
            texts[key] = as_text(record[key])
        except UnicodeDecodeError:
            raise DataError(f"{where}: field {key!r} is not UTF-8") from None
    idx = record.get("idx", default_idx)
    try:
        idx = int(idx.item() if hasattr(idx, "item") else idx)
    except ValueError:
        raise DataError(f"{where}: idx {idx!r} is not an integer") from None
    label = _label(task, record["label"], where, allow_unlabeled)
    return {**texts, "label": label, "idx": idx}


def load_glue_tfds(
    task: str,
    split: str,
    *,
    data_dir: str | None = None,
    download: bool = False,
    allow_unlabeled: bool | None = None,
) -> list[dict]:
    """Examples of TFDS `glue/<task>` `split` (MNLI: 'validation_matched' / 'validation_mismatched')."""
    t = glue_task(task)
    source = open_tfds(f"glue/{t.name}", split, data_dir=data_dir, download=download)
    if allow_unlabeled is None:
        allow_unlabeled = split.startswith("test")
    first = source[0]
    check_keys(first, (*t.text_keys, "label"), f"TFDS glue/{t.name}:{split}")
    where = f"glue/{t.name}:{split}"
    return [_example(t, source[i], f"{where} record {i}", i, allow_unlabeled) for i in range(len(source))]


def load_glue_files(
    task: str,
    paths: str | Sequence[str],
    *,
    allow_unlabeled: bool = False,
    on_bad_record: str = "skip",
    delimiter: str | None = None,
) -> list[dict]:
    """Examples from local .tsv/.csv/.jsonl files whose columns are TFDS's (label, idx optional for unlabeled)."""
    t = glue_task(task)
    report = SkipReport(f"glue/{t.name} files")
    examples: list[dict] = []
    for path in expand_paths(paths):
        rows = read_records(path, report, on_bad_record=on_bad_record, delimiter=delimiter)
        if rows:
            needed = (*t.text_keys, "label") if not allow_unlabeled else t.text_keys
            check_keys(rows[0], needed, path)
        for i, row in enumerate(rows):
            if "label" not in row:
                row = {**row, "label": -1}
            examples.append(_example(t, row, f"{path} record {i + 1}", len(examples), allow_unlabeled))
    report.log()
    if not examples:
        raise DataError(f"glue/{t.name}: no examples in {paths!r}; {report.summary()}")
    return examples


def glue_features(
    task: str,
    examples: Sequence[Mapping[str, Any]],
    tokenizer: WordPiece,
    max_seq_length: int = 128,
    report: SkipReport | None = None,
) -> dict[str, np.ndarray]:
    """[CLS] a [SEP] (b [SEP]) features, padded to `max_seq_length`; truncations are counted in `report`."""
    t = glue_task(task)
    if not examples:
        raise DataError(f"glue/{t.name}: no examples to turn into features")
    report = report if report is not None else SkipReport(f"glue/{t.name} features")
    backend = Tokenizer.from_str(tokenizer.backend.to_str())
    backend.enable_truncation(max_seq_length, strategy="longest_first")
    backend.enable_padding(length=max_seq_length, pad_id=tokenizer.pad_id, pad_token="[PAD]")
    if len(t.text_keys) == 1:
        inputs = [ex[t.text_keys[0]] for ex in examples]
    else:
        inputs = [(ex[t.text_keys[0]], ex[t.text_keys[1]]) for ex in examples]
    encodings = backend.encode_batch(inputs)
    truncated = sum(1 for e in encodings if e.overflowing)
    if truncated:
        report.add("truncated_examples", f"longer than {max_seq_length} tokens", n=truncated)
        report.log()
    label_dtype = np.float32 if t.is_regression else np.int32
    return {
        "input_ids": np.array([e.ids for e in encodings], np.int32),
        "token_type_ids": np.array([e.type_ids for e in encodings], np.int32),
        "attention_mask": np.array([e.attention_mask for e in encodings], np.int32),
        "label": np.array([ex["label"] for ex in examples], label_dtype),
        "idx": np.array([ex.get("idx", i) for i, ex in enumerate(examples)], np.int32),
    }
