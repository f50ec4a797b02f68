"""Task data: the raw examples of every split (GLUE, SQuAD, custom files, rotten_tomatoes) and their features."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np

from mobiledistill.config import ConfigError
from mobiledistill.data import (
    CUSTOM,
    GlueTask,
    glue_features,
    glue_task,
    load_custom_files,
    load_glue_files,
    load_glue_tfds,
    load_squad_json,
    load_squad_tfds,
    rotten_tomatoes,
    squad_features,
)
from mobiledistill.finetune.config import SQUAD, _names


@dataclasses.dataclass
class TaskData:
    """Training features and, per dev split, the features to predict plus what scoring them needs."""

    train: dict[str, np.ndarray]
    evals: dict[str, Any]  # split -> GLUE feature dict or SquadFeatures
    train_texts: list[str]
    num_labels: int
    label_names: tuple[str, ...] | None
    task: GlueTask | None = None  # the GLUE or custom task (None: SQuAD)


def _eval_splits(c) -> list[str]:
    if c.data.eval_splits:
        return [s.strip() for s in c.data.eval_splits.split(",") if s.strip()]
    if c.task == SQUAD:
        return ["validation"]
    if c.task == CUSTOM:
        return ["validation"] + (["test"] if c.data.files.get("test") else [])
    return list(glue_task(c.task).eval_splits)


def _limit(examples: list, n: int) -> list:
    return examples[:n] if n and n > 0 else examples


def load_examples(c, label_names: tuple[str, ...] | None = None) -> tuple[dict[str, list], GlueTask | None]:
    """(raw examples of the training split and every eval split, the task: None for SQuAD).

    A custom task takes its label names from `custom.labels`, else `label_names` (a teacher's or an earlier run's),
    else the training file."""
    splits = ["train", *_eval_splits(c)]
    if c.task == CUSTOM:
        files = {}
        for s in splits:
            files[s] = c.data.files.get(s, "")
            if not files[s]:
                raise ConfigError(f"task='custom' needs data.files.{s} (a path or glob)")
        u = c.custom
        task, out = load_custom_files(files, text_columns=_names(u.text_columns),
                                      label_names=_names(u.labels) or label_names, regression=bool(u.regression),
                                      label_column=u.label_column)
        return {s: _limit(ex, c.data.max_train_examples if s == "train" else c.data.max_eval_examples)
                for s, ex in out.items()}, task
    out = {}
    if c.data.source == "rotten_tomatoes":
        parts = rotten_tomatoes(seed=c.data.split_seed)
        for s in splits:
            if s not in parts:
                raise ConfigError(f"rotten_tomatoes has splits {sorted(parts)}, not {s!r}")
            out[s] = parts[s]
    for s in splits:
        if s in out:
            continue
        if c.data.source == "files":
            path = c.data.files.get(s, "")
            if not path:
                raise ConfigError(f"data.source='files' needs data.files.{s} (a path or glob)")
            out[s] = load_squad_json(path) if c.task == SQUAD else load_glue_files(c.task, path)
        elif c.task == SQUAD:
            out[s] = load_squad_tfds(c.squad_version, s, data_dir=c.data.tfds_data_dir or None)
        else:
            out[s] = load_glue_tfds(c.task, s, data_dir=c.data.tfds_data_dir or None)
        out[s] = _limit(out[s], c.data.max_train_examples if s == "train" else c.data.max_eval_examples)
    if c.data.source == "rotten_tomatoes":
        for s in splits:
            out[s] = _limit(out[s], c.data.max_train_examples if s == "train" else c.data.max_eval_examples)
    return out, None if c.task == SQUAD else glue_task(c.task)


def task_texts(task: GlueTask | None, examples: list) -> list[str]:
    if task is None:
        return [t for ex in examples for t in (ex.question, ex.context)]
    return [ex[k] for ex in examples for k in task.text_keys]


def build_features(c, examples: Mapping[str, list], tok, task: GlueTask | None = None) -> TaskData:
    d = c.data
    if c.task == SQUAD:
        kw = dict(max_seq_length=d.max_seq_length, doc_stride=d.doc_stride, max_query_length=d.max_query_length)
        train = squad_features(examples["train"], tok, training=True, **kw).arrays
        evals = {s: squad_features(ex, tok, training=False, **kw) for s, ex in examples.items() if s != "train"}
        return TaskData(train, evals, [], 2, None)
    task = task or glue_task(c.task)

    def feats(ex):
        f = glue_features(task, ex, tok, d.max_seq_length)
        f["labels"] = f.pop("label")
        return f

    evals = {s: feats(ex) for s, ex in examples.items() if s != "train"}
    return TaskData(feats(examples["train"]), evals, [], task.num_labels, task.label_names, task)
