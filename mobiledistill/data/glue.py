"""GLUE tasks: examples from TFDS `glue/<task>` or local TSV/CSV/JSONL files with TFDS's columns, and features.

Features are fixed-length arrays: input_ids, token_type_ids, attention_mask ([N, max_seq_length] int32), label
([N] int32, float32 for STS-B) and idx. Labels may be given as ids or as the TFDS label names ('entailment',
'not_equivalent', ...); GLUE's hidden test labels (-1) are accepted only with `allow_unlabeled=True`. Pairs longer
than `max_seq_length` are truncated longest-first, counted and reported.

`load_custom_files` reads a task with the user's own labels (task 'custom'): any number of classes named by the
data's label values (or by a given list), one text column or a pair, or a regression target.
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
    """A GLUE task: its text columns (TFDS names), label names (None: regression) and evaluation splits.

    A custom task (`custom=True`, see `custom_task`) also names its label column, matches label values to the names
    exactly (no lower-casing, no range check for regression), and takes integer ids only when `label_ids`.
    """

    name: str
    text_keys: tuple[str, ...]
    label_names: tuple[str, ...] | None
    eval_splits: tuple[str, ...] = ("validation",)
    label_key: str = "label"
    custom: bool = False
    label_ids: bool = True

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


def glue_task(name: str | GlueTask) -> GlueTask:
    if isinstance(name, GlueTask):
        return name
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
    if task.custom:
        return _custom_label(task, value, where)
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
    for key in (*task.text_keys, task.label_key):
        if key not in record:
            raise DataError(f"{where}: missing field {key!r}; fields present: {sorted(record)}")
    for key in task.text_keys:
        try:
            texts[key] = as_text(record[key])
        except UnicodeDecodeError:
            raise DataError(f"{where}: field {key!r} is not UTF-8") from None
    idx = default_idx if task.custom else record.get("idx", default_idx)  # a custom file's own ids may be text
    try:
        idx = int(idx.item() if hasattr(idx, "item") else idx)
    except ValueError:
        raise DataError(f"{where}: idx {idx!r} is not an integer") from None
    label = _label(task, record[task.label_key], where, allow_unlabeled)
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
    for path, row, line in _file_rows(paths, report, on_bad_record, delimiter):
        if not examples:
            check_keys(row, (*t.text_keys, t.label_key) if not allow_unlabeled else t.text_keys, path)
        if t.label_key not in row:
            row = {**row, t.label_key: -1}
        examples.append(_example(t, row, f"{path} line {line}", len(examples), allow_unlabeled))
    report.log()
    if not examples:
        raise DataError(f"glue/{t.name}: no examples in {paths!r}; {report.summary()}")
    return examples


def _file_rows(paths, report: SkipReport, on_bad_record: str, delimiter: str | None):
    """(path, row, file line) of every record of the files matched by `paths`."""
    for path in expand_paths(paths):
        lines: list[int] = []
        rows = read_records(path, report, on_bad_record=on_bad_record, delimiter=delimiter, line_numbers=lines)
        yield from ((path, row, line) for row, line in zip(rows, lines))


# ---------------------------------------------------------------------------------------------------------------
# Tasks with the user's own labels

CUSTOM = "custom"
# Text columns tried in order when none are named: the first set present in the training file is used.
DEFAULT_TEXT_COLUMNS = (("sentence1", "sentence2"), ("text_a", "text_b"), ("premise", "hypothesis"),
                        ("question1", "question2"), ("question", "sentence"), ("sentence",), ("text",))
_MAX_LISTED = 20  # label names quoted in one error line


def _label_text(value: Any) -> str:
    """A label value as the name it stands for: JSON numbers 3 and 3.0 are both '3'; strings are stripped."""
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, bytes):
        value = value.decode("utf-8", errors="replace")
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip() if value is not None else ""


def _is_int(text: str) -> bool:
    try:
        int(text)
    except ValueError:
        return False
    return True


def _listed(names: Sequence[str]) -> str:
    shown = ", ".join(names[:_MAX_LISTED])
    return shown + (f", ... ({len(names)} labels)" if len(names) > _MAX_LISTED else "")


def _custom_label(task: GlueTask, value: Any, where: str) -> float | int:
    text = _label_text(value)
    if task.is_regression:
        try:
            score = float(text)
        except ValueError:
            score = float("nan")
        if not np.isfinite(score):
            raise DataError(f"{where}: label {value!r} in column {task.label_key!r} is not a finite number "
                            f"(regression task)")
        return score
    names = task.label_names
    if text in names:
        return names.index(text)
    if task.label_ids and _is_int(text) and 0 <= int(text) < len(names):
        return int(text)
    ids = f" or an id 0..{len(names) - 1}" if task.label_ids else ""
    raise DataError(f"{where}: label {text!r} in column {task.label_key!r} is not a label of this task; "
                    f"valid: {_listed(names)}{ids}")


def custom_task(
    text_keys: Sequence[str],
    label_names: Sequence[str] | None,
    *,
    label_key: str = "label",
    eval_splits: Sequence[str] = ("validation",),
    label_ids: bool | None = None,
) -> GlueTask:
    """A classification task over `label_names` (class ids in that order), or regression with None.

    Integer label values are read as class ids when `label_ids` (default: only when no name looks like an integer,
    so names '1'..'5' are matched as names and never shifted to ids).
    """
    if label_names is not None:
        label_names = tuple(str(n) for n in label_names)
        if len(label_names) < 2:
            raise DataError(f"custom task: {len(label_names)} label name(s) {list(label_names)}; a classifier needs "
                            f"at least 2 (for a numeric target use regression)")
        dup = sorted({n for n in label_names if label_names.count(n) > 1})
        if dup:
            raise DataError(f"custom task: label names {dup} are given more than once in {list(label_names)}")
        if label_ids is None:
            label_ids = not any(_is_int(n) for n in label_names)
    if not 1 <= len(text_keys) <= 2:
        raise DataError(f"custom task: text columns {list(text_keys)}; give one (single sentence) or two (pairs)")
    return GlueTask(CUSTOM, tuple(text_keys), label_names, tuple(eval_splits), label_key=label_key, custom=True,
                    label_ids=bool(label_ids))


def _text_columns(row: Mapping[str, Any], given: Sequence[str], path: str) -> tuple[str, ...]:
    if given:
        return tuple(given)
    for keys in DEFAULT_TEXT_COLUMNS:
        if all(k in row for k in keys):
            return keys
    raise DataError(f"{path}: no text column among the fields {sorted(row)}; name it (or the pair) with "
                    f"custom.text_columns, e.g. --config.custom.text_columns=review or =question,answer")


def _labels_from_data(values: Sequence[str], where: str, label_key: str) -> tuple[str, ...]:
    """The distinct label values, sorted (numerically when they are all integers)."""
    names = sorted(set(values))
    if "" in names:
        raise DataError(f"{where}: an empty value in label column {label_key!r}; every training row needs a label")
    if all(_is_int(n) for n in names):
        return tuple(sorted(names, key=int))
    try:
        [float(n) for n in names]
    except ValueError:
        return tuple(names)
    raise DataError(f"{where}: the label column {label_key!r} holds non-integer numbers ({_listed(names[:3])}); "
                    f"for a numeric target set --config.custom.regression=True, or list the classes in "
                    f"custom.labels")


def load_custom_files(
    files: Mapping[str, str | Sequence[str]],
    *,
    text_columns: Sequence[str] = (),
    label_names: Sequence[str] | None = None,
    regression: bool = False,
    label_column: str = "label",
    on_bad_record: str = "skip",
    delimiter: str | None = None,
) -> tuple[GlueTask, dict[str, list[dict]]]:
    """(task, {split: examples}) of a task with the user's own labels, from local .tsv/.csv/.jsonl files.

    `files` maps split names to paths or globs and must hold 'train'. Text columns default to the first of
    DEFAULT_TEXT_COLUMNS that the training file has. Classification labels are `label_names` when given, else the
    distinct values of the training labels (sorted); a value of any split outside them is refused, naming the
    file, line and the valid labels. `regression` reads the label column as a float target.
    """
    if "train" not in files:
        raise DataError("custom task: no training file (data.files.train)")
    if regression and label_names:
        raise DataError(f"custom task: label names {list(label_names)} given for a regression task; drop one")
    rows: dict[str, list[tuple[str, dict, int]]] = {}
    for split, paths in files.items():
        report = SkipReport(f"custom {split} files")
        rows[split] = list(_file_rows(paths, report, on_bad_record, delimiter))
        report.log()
        if not rows[split]:
            raise DataError(f"custom task: no rows in {split} files {paths!r}; {report.summary()}")
    first_path, first = rows["train"][0][0], rows["train"][0][1]
    keys = _text_columns(first, text_columns, first_path)
    for split, split_rows in rows.items():
        checked = set()
        for path, row, _ in split_rows:
            if path not in checked:
                check_keys(row, (*keys, label_column), path)
                checked.add(path)
    names = None
    if not regression:
        if label_names:
            names = tuple(label_names)
        else:
            values = [_label_text(row.get(label_column)) for _, row, _ in rows["train"]]
            names = _labels_from_data(values, f"{first_path}", label_column)
            if len(names) < 2:
                raise DataError(f"{first_path}: every training row has label {names[0]!r}; a classifier needs at "
                                f"least 2 labels (list them in custom.labels)")
    task = custom_task(keys, names, label_key=label_column,
                       eval_splits=tuple(s for s in files if s != "train"),
                       label_ids=None if label_names else False)
    out = {}
    for split, split_rows in rows.items():
        try:
            out[split] = [_example(task, row, f"{path} line {line}", i, False)
                          for i, (path, row, line) in enumerate(split_rows)]
        except DataError as e:
            if names is None or label_names or "is not a label of this task" not in str(e):
                raise
            raise DataError(f"{e} (the training file's labels; to allow others list every label in "
                            f"custom.labels)") from None
    return task, out


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
