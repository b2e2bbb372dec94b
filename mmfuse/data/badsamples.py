"""Bad samples: one error type, one skip record, one log for the end-of-run summary.

Every problem with one sample (a missing or unreadable media file, a malformed record, a marker without
its media, a sample longer than the context) raises :class:`BadSample`, whose message names the sample
and the field: ``sample 'x7': image[0]: cannot read 'a.png' as an image (...)``. Under the ``"skip"``
policy (``on_bad_sample``) the processor and :func:`~mmfuse.data.formats.load_samples` catch it instead,
add a :class:`Skipped` record to a :class:`BadSampleLog` and go on. The processor returns the record in
place of the encoded sample and the collator passes it on in ``batch["skipped"]``: a loader worker's
log is a copy that the main process never sees, so the main process merges what reaches it in batches
(``log.add(batch["skipped"])``; records are counted once however often they arrive).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

POLICIES = ("error", "skip")


def check_policy(on_bad_sample: str) -> str:
    if on_bad_sample not in POLICIES:
        raise ValueError(f"on_bad_sample must be one of {POLICIES}, got {on_bad_sample!r}")
    return on_bad_sample


class BadSample(ValueError):
    """One sample cannot be used. ``kind`` is a short reason the summary counts by (``"missing file"``,
    ``"unreadable image"``, ``"too long"``, ...). Build it with :meth:`of`; the single-message
    constructor is what pickling and torch's re-raise from a loader worker call."""

    def __init__(self, message: str, *, sample_id: str = "?", field: str = "?", reason: str = "", kind: str = "malformed"):
        super().__init__(message)
        self.sample_id, self.field, self.reason, self.kind = sample_id, field, reason or message, kind

    @classmethod
    def of(cls, sample_id: str, field: str, reason: str, kind: str = "malformed", source: str | None = None) -> "BadSample":
        prefix = f"{source}: " if source else ""
        return cls(f"{prefix}sample {sample_id!r}: {field}: {reason}", sample_id=sample_id, field=field, reason=reason,
                   kind=kind)

    def in_file(self, source: str) -> "BadSample":
        """The same error with where it came from in front: the dataset file (or name) and record,
        ``data.json#3``."""
        return type(self).of(self.sample_id, self.field, self.reason, self.kind, source)

    def record(self) -> "Skipped":
        return Skipped(self.sample_id, self.field, self.kind, str(self))


@dataclass(frozen=True)
class Skipped:
    """A sample skipped under the ``"skip"`` policy, returned in place of its encoding."""

    sample_id: str
    field: str
    kind: str
    message: str


class BadSampleLog:
    """The skipped samples of a run, each counted once; :meth:`summary` is the end-of-run report."""

    def __init__(self):
        self._records: dict[Skipped, None] = {}  # insertion-ordered set

    def record(self, error: BadSample) -> Skipped:
        skipped = error.record()
        self._records[skipped] = None
        return skipped

    def add(self, records: Iterable[Skipped]) -> None:
        """Merge records, e.g. ``batch["skipped"]`` of a batch a loader worker built."""
        for skipped in records:
            self._records[skipped] = None

    def __len__(self) -> int:
        return len(self._records)

    def __iter__(self) -> Iterator[Skipped]:
        return iter(self._records)

    def counts(self) -> dict[str, int]:
        """Skipped samples per ``kind``, most frequent first."""
        return dict(Counter(r.kind for r in self._records).most_common())

    def summary(self, first: int = 5) -> str:
        """``skipped 3 bad sample(s): 2 unreadable image, 1 too long`` and the first ``first`` messages."""
        if not self._records:
            return "skipped no bad samples"
        counts = ", ".join(f"{n} {kind}" for kind, n in self.counts().items())
        lines = [f"skipped {len(self)} bad sample(s): {counts}"]
        lines += [f"  {r.message}" for r in list(self._records)[:first]]
        if len(self) > first:
            lines.append(f"  ... and {len(self) - first} more")
        return "\n".join(lines)
