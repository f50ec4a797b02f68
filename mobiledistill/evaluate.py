"""Evaluation metrics for GLUE and SQuAD, span decoding, multi-seed summaries and result writing.

Everything here is plain NumPy/Python so it runs on the host after predictions have been pulled off the
accelerator, and so it can be checked against scikit-learn, SciPy and the official SQuAD scripts in the tests.

Scales: the primitive metric functions (`accuracy`, `binary_f1`, `matthews_corrcoef`, `pearson`, `spearman`)
return fractions exactly like scikit-learn/SciPy; `glue_metrics` and `squad_metrics` return percentages, the
convention of the GLUE leaderboard, the papers (SPEC §11) and the official SQuAD evaluation script.

This module is the one place to import them from; the code lives in `mobiledistill.evaluation` (`glue`, `squad`,
`spans`, `seeds`, `outputs`), one job a module.
"""

from __future__ import annotations

from mobiledistill.evaluation.glue import (
    GLUE_TASKS,
    accuracy,
    binary_f1,
    custom_metrics,
    glue_metrics,
    macro_f1,
    matthews_corrcoef,
    pearson,
    per_class_f1,
    rankdata,
    spearman,
)
from mobiledistill.evaluation.outputs import _atomic_write, _jsonable, write_eval_outputs  # noqa: F401
from mobiledistill.evaluation.seeds import format_seed_table, summarize_seeds
from mobiledistill.evaluation.spans import SpanPredictions, decode_spans
from mobiledistill.evaluation.squad import normalize_answer, squad_exact, squad_f1, squad_metrics

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
