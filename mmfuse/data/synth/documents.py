"""Interleaved image-text documents: several scenes in one sample, for few-shot (in-context) prompts.

A document is 2-4 scenes. Its user text interleaves one ``<image>`` marker per scene with that
scene's text (a caption, or a question and its answer) and ends with the last scene's marker (and
question); the assistant answers for the last scene. :func:`few_shot_prompt` builds such text from
any (question, answer) shots, so evaluation can prompt a model in context the same way.
"""

from __future__ import annotations

import random
from typing import Callable, Sequence

from ..schema import MARKERS
from . import scenes

MIN_IMAGES, MAX_IMAGES = 2, 4


def few_shot_prompt(shots: Sequence[tuple[str, str]], question: str = "", marker: str = MARKERS["image"]) -> str:
    """User text for in-context learning: per shot its marker, question and answer (``"What colour is
    the circle? red."``; an empty question makes the answer a caption), then the query's marker and
    ``question``. E.g. ``"<image>\\na red circle.\\n<image>"`` for captioning."""
    lines = []
    for shot_question, answer in shots:
        text = f"{shot_question} {answer}" if shot_question else answer
        lines.append(f"{marker}\n{text if text.endswith('.') else text + '.'}")
    lines.append(f"{marker}\n{question}" if question else marker)
    return "\n".join(lines)


def sample_document(rng: random.Random, sample: Callable[[random.Random], scenes.Scene] | None = None) -> list[scenes.Scene]:
    """2-4 scenes drawn with ``sample`` (default :func:`scenes.sample_scene`)."""
    sample = sample or scenes.sample_scene
    return [sample(rng) for _ in range(rng.randint(MIN_IMAGES, MAX_IMAGES))]


def caption_document(document: list[scenes.Scene]) -> tuple[str, str]:
    """``(user text, answer)``: every scene but the last with its caption, then the last to caption."""
    shots = [("", scenes.caption(s)) for s in document[:-1]]
    return few_shot_prompt(shots), scenes.caption(document[-1])


def qa_document(
    document: list[scenes.Scene], rng: random.Random, allowed: Callable[[scenes.Shape], bool] | None = None
) -> tuple[str, str, str]:
    """``(kind, user text, answer)``: one question kind drawn with ``rng``, asked of every scene, answered
    for all but the last. ``allowed`` is passed to :func:`scenes.questions`."""
    asked = [{kind: (q, a) for kind, q, a in scenes.questions(s, rng, allowed=allowed)} for s in document]
    kind = rng.choice(sorted(asked[0]))
    question, answer = asked[-1][kind]
    return kind, few_shot_prompt([qa[kind] for qa in asked[:-1]], question), answer
