"""The sample schema every loader produces and the processor consumes.

A sample is a conversation whose message texts hold media markers (``<image>``, ``<audio>``,
``<video>``) and, per modality, the list of media files in the order their markers appear. A
*document* sample (one message with role ``"document"``) is plain interleaved text instead, as in
Flamingo's M3W and OpenFlamingo's MMC4: ``<image>`` markers, each followed by the text tied to it and
closed by ``<|endofchunk|>``.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .badsamples import BadSample

MARKERS = {"image": "<image>", "audio": "<audio>", "video": "<video>"}
MARKER_RE = re.compile("|".join(re.escape(m) for m in MARKERS.values()))  # any media marker
END_OF_CHUNK = "<|endofchunk|>"  # closes the text tied to one media item in a document (OpenFlamingo)
ROLES = ("system", "user", "assistant", "document")


@dataclass
class Message:
    role: str  # "system" | "user" | "assistant"
    content: str


@dataclass
class Sample:
    """One training or evaluation example.

    ``media[m]`` lists the items for modality ``m`` in marker order, each one a file path, the file's
    bytes, or an already loaded item (a PIL image, an audio array; see :mod:`mmfuse.data.media`);
    ``meta`` carries free-form annotations (question kind, reference answer, split, ...).
    """

    id: str
    messages: list[Message]
    media: dict[str, list[Any]] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def is_document(self) -> bool:
        return len(self.messages) == 1 and self.messages[0].role == "document"

    def marker_counts(self) -> dict[str, int]:
        return {m: sum(msg.content.count(tok) for msg in self.messages) for m, tok in MARKERS.items()}

    def validate(self) -> None:
        """Raise :class:`BadSample` naming the sample and field when the sample is malformed."""
        if not self.messages:
            raise BadSample.of(self.id, "conversations", "is empty")
        for i, msg in enumerate(self.messages):
            if msg.role not in ROLES:
                raise BadSample.of(self.id, f"conversations[{i}]", f"has role {msg.role!r}; expected one of {ROLES}")
            if not isinstance(msg.content, str):
                raise BadSample.of(self.id, f"conversations[{i}].value", f"must be a string, got {type(msg.content).__name__}")
            try:
                msg.content.encode("utf-8")
            except UnicodeEncodeError as err:
                raise BadSample.of(self.id, f"conversations[{i}].value", f"is not valid Unicode text ({err.reason} at "
                                   f"character {err.start})", kind="invalid text") from err
        if any(m.role == "document" for m in self.messages) and not self.is_document:
            raise BadSample.of(self.id, "conversations", "a 'document' turn must be the sample's only turn")
        counts = self.marker_counts()
        for modality, n_markers in counts.items():
            n_media = len(self.media.get(modality, []))
            if n_markers != n_media:
                raise BadSample.of(
                    self.id, modality, f"lists {n_media} item(s) but the text has {n_markers} {MARKERS[modality]} "
                    "marker(s); they must match one to one", kind="marker mismatch"
                )

    def prompt_and_answer(self) -> tuple[list[Message], str]:
        """Split off the final assistant turn: (messages up to the last user turn, reference answer).
        A document prompt (the model continues it) keeps its reference in ``meta["answer"]``."""
        if self.is_document:
            if "answer" not in self.meta:
                raise BadSample.of(self.id, "meta", "a document prompt needs its reference in meta['answer']")
            return self.messages, self.meta["answer"]
        if self.messages[-1].role != "assistant":
            raise BadSample.of(self.id, "conversations", "the last turn must be the assistant's answer")
        return self.messages[:-1], self.messages[-1].content

    def resolve(self, root: Path) -> "Sample":
        """Return a copy whose relative media paths are resolved against ``root``."""
        media = {m: [root / p if isinstance(p, (str, Path)) else p for p in items] for m, items in self.media.items()}
        return Sample(self.id, list(self.messages), media, dict(self.meta))


def media_in_order(samples: list[Sample]) -> dict[str, list]:
    """Per modality, the samples' media items one sample after another (their markers' order)."""
    modalities = {m for s in samples for m in s.media}
    return {m: [item for s in samples for item in s.media.get(m, [])] for m in modalities}


def with_earlier(sample: Sample, earlier: list[Sample], sample_id: str) -> Sample:
    """``sample`` (renamed ``sample_id``) with each of ``earlier``'s conversations, and media in marker
    order, placed before its own: few-shot prompts, CM3Leon's retrieved documents."""
    messages = [m for other in earlier for m in other.messages] + sample.messages
    return dataclasses.replace(sample, id=sample_id, messages=messages, media=media_in_order([*earlier, sample]))
