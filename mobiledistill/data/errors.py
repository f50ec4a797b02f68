"""The data pipeline's error type and its counted-skip report.

Bad input either stops with one `DataError` line naming the file/key/value and what would be valid, or is skipped
and counted in a `SkipReport`, whose summary is logged and kept with the iterator state so nothing is lost silently.
"""

from __future__ import annotations

import collections
import logging

log = logging.getLogger("mobiledistill.data")


class DataError(ValueError):
    """Unusable input data: one line that says what is wrong and what would be valid."""


class SkipReport:
    """Counts of skipped or altered input, by reason ('undecodable_lines', 'empty_files', ...), with examples."""

    def __init__(self, name: str):
        self.name = name
        self.counts: collections.Counter[str] = collections.Counter()
        self.examples: dict[str, str] = {}

    def add(self, reason: str, where: str = "", n: int = 1) -> None:
        """Counts `n` skips for `reason`; the first of each reason is logged at once, the totals by `log()`."""
        if reason not in self.counts:
            log.warning("%s: %s%s (further ones are counted)", self.name, reason, f" at {where}" if where else "")
        self.counts[reason] += n
        if where and reason not in self.examples:
            self.examples[reason] = where

    def merge(self, other: SkipReport) -> None:
        self.counts.update(other.counts)
        for k, v in other.examples.items():
            self.examples.setdefault(k, v)

    def as_dict(self) -> dict[str, int]:
        return dict(sorted(self.counts.items()))

    def summary(self) -> str:
        if not self.counts:
            return f"{self.name}: nothing skipped"
        parts = []
        for reason, n in sorted(self.counts.items()):
            first = f" (first: {self.examples[reason]})" if reason in self.examples else ""
            parts.append(f"{reason}={n}{first}")
        return f"{self.name}: " + ", ".join(parts)

    def log(self) -> None:
        if self.counts:
            log.warning("%s", self.summary())

    def __repr__(self) -> str:
        return f"SkipReport({self.summary()})"
