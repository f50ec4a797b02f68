"""Several seeds: mean ± sample std of each metric, and a Markdown table of them."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np


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
