"""Text prompts read by a text encoder instead of the LLM (Pengi).

A model with a ``text_prompt`` encoder reads the text of every user turn through that encoder and a
mapping network, as a prefix of input embeddings, never as LLM tokens. :func:`route_prompts` rewrites a
conversation for it: each user turn keeps its media markers, in order, and its text is replaced by
one :data:`PROMPT_MARKER`, which the processor expands into the prefix positions; the texts become the
sample's ``text_prompt`` items. A user turn ``"<audio>\\nWhat is the pitch?"`` becomes
``"<audio><text_prompt>"``, so the LLM reads ``[audio prefix][prompt prefix]`` inside its chat
template and learns only the answer. System turns and documents are not prompts and stay as text.
"""

from __future__ import annotations

import re

from ..config import TEXT_PROMPT
from .badsamples import BadSample
from .schema import MARKER_RE, Message, Sample

PROMPT_MARKER = "<text_prompt>"
MARKER_OR_PROMPT_RE = re.compile(f"{MARKER_RE.pattern}|{re.escape(PROMPT_MARKER)}")


def route_prompts(sample: Sample) -> Sample:
    """``sample`` with each user turn's text moved into ``media["text_prompt"]``; :class:`BadSample`
    naming the turn when one has no text, or when the sample already holds ``<text_prompt>``."""
    for i, msg in enumerate(sample.messages):
        if PROMPT_MARKER in msg.content:
            raise BadSample.of(sample.id, f"conversations[{i}]", f"contains {PROMPT_MARKER}, which stands for the prompt "
                               "prefix of a text_prompt encoder and cannot appear in the data")
    messages, prompts = [], []
    for i, msg in enumerate(sample.messages):
        if msg.role != "user":
            messages.append(msg)
            continue
        text = MARKER_RE.sub("", msg.content).strip()
        if not text:
            raise BadSample.of(sample.id, f"conversations[{i}]", "the user turn has no text for the text_prompt encoder "
                               "(this model reads every user turn as media + a text prompt)", kind="no prompt")
        prompts.append(text)
        messages.append(Message("user", "".join(MARKER_RE.findall(msg.content)) + PROMPT_MARKER))
    return Sample(sample.id, messages, {**sample.media, TEXT_PROMPT: prompts}, sample.meta)
