"""Primitive classification/regression metrics, GLUE per-task metrics and the metrics of a custom task.

The primitive metric functions (`accuracy`, `binary_f1`, `matthews_corrcoef`, `pearson`, `spearman`) return
fractions exactly like scikit-learn/SciPy; `glue_metrics` and `custom_metrics` return percentages, the convention of
the GLUE leaderboard and the papers (SPEC §11).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import numpy as np


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
