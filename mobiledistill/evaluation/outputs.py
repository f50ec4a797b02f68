"""Writing evaluation results: predictions (SQuAD JSON / GLUE TSV), metrics, n-best and null odds."""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np


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
