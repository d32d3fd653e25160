"""Bad data: why a sample was skipped, and the tally of skips reported at the end of a run.

A dataset raises :class:`SampleError` (a :class:`~mllmkit.errors.DataError`) naming the cause, the
annotation file and the record index. The encoder turns it into a :class:`Skip`, which travels
with its batch (also out of DataLoader worker processes, which cannot re-raise it intact). With
``[data] on_error = "skip"`` the sample is dropped and counted in a :class:`SkipReport`; with
``"fail"`` the main process raises the skip's error, so the run stops with the same one-line
message whether the sample was read in a worker or not.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable

import attrs

from mllmkit.errors import DataError

__all__ = [
    "CAUSES",
    "MALFORMED_RECORD",
    "MISSING_IMAGE",
    "TOO_LONG",
    "UNREADABLE_IMAGE",
    "SampleError",
    "Skip",
    "SkipReport",
]

MISSING_IMAGE = "missing_image"
UNREADABLE_IMAGE = "unreadable_image"
MALFORMED_RECORD = "malformed_record"
TOO_LONG = "too_long"
CAUSES = (MISSING_IMAGE, UNREADABLE_IMAGE, MALFORMED_RECORD, TOO_LONG)


class SampleError(DataError):
    """One record cannot be used: ``cause`` (one of :data:`CAUSES`), ``source`` file, record ``index``."""

    def __init__(self, cause: str, source: str, index: int, detail: str) -> None:
        self.cause, self.source, self.index, self.detail = cause, source, index, detail
        super().__init__(f"{source} record {index}: {detail} ({cause})")

    def __reduce__(self):  # rebuilt from its fields when pickled (e.g. across processes)
        return type(self), (self.cause, self.source, self.index, self.detail)


@attrs.frozen
class Skip:
    """A skipped sample, as the collator hands it to the loop."""

    cause: str
    source: str
    index: int
    detail: str

    @classmethod
    def from_error(cls, error: SampleError) -> Skip:
        return cls(error.cause, error.source, error.index, error.detail)

    def error(self) -> SampleError:
        """The :class:`SampleError` this skip stands for (raised where ``on_error = "fail"``)."""
        return SampleError(self.cause, self.source, self.index, self.detail)


@attrs.define
class SkipReport:
    """Skipped samples, counted by cause; each (file, record) is reported once however often it was drawn."""

    seen: dict[tuple[str, int], Skip] = attrs.Factory(dict)
    draws: Counter = attrs.Factory(Counter)

    def add(self, skips: Iterable[Skip]) -> None:
        for skip in skips:
            self.seen.setdefault((skip.source, skip.index), skip)
            self.draws[skip.cause] += 1

    def counts(self) -> dict[str, int]:
        """Distinct skipped records per cause."""
        return dict(Counter(s.cause for s in self.seen.values()))

    def merge(self, others: Iterable[SkipReport]) -> None:
        for other in others:
            for key, skip in other.seen.items():
                self.seen.setdefault(key, skip)
            self.draws.update(other.draws)

    def lines(self) -> list[str]:
        return [f"{s.source} record {s.index}: {s.detail} ({s.cause})"
                for s in sorted(self.seen.values(), key=lambda s: (s.source, s.index))]

    def summary(self, limit: int = 20) -> str:
        if not self.seen:
            return "no samples skipped"
        counts = ", ".join(f"{cause} {n}" for cause, n in sorted(self.counts().items()))
        lines = self.lines()
        more = [f"  ... and {len(lines) - limit} more"] if len(lines) > limit else []
        return "\n".join([f"skipped {len(self.seen)} record(s): {counts}", *("  " + line for line in lines[:limit]), *more])

    def write_jsonl(self, path) -> None:
        with open(path, "w", encoding="utf-8") as handle:
            handle.writelines(json.dumps(attrs.asdict(s)) + "\n" for s in sorted(self.seen.values(), key=lambda s: (s.source, s.index)))
