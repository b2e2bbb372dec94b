"""Interleaved image-text documents: several scenes in one sample, for few-shot (in-context) prompts.

A document is 2-4 scenes, each with its text (a caption, or a question and its answer). It is
written in two forms:

- a conversation whose user text interleaves one ``<image>`` marker per scene with that scene's text
  and ends with the last scene's marker (and question); the assistant answers for the last scene.
  :func:`few_shot_prompt` builds such text from any shots, so evaluation prompts the same way;
- plain text in OpenFlamingo's MMC4 form (:func:`document_text`): every scene's marker, its text and
  ``<|endofchunk|>``.

Half the documents are *bursty* (Chan et al. 2022: in-context learning emerges when items recur
within a context): their last scene repeats an earlier one, so its text can be read from the context.
"""

from __future__ import annotations

import random
from typing import Callable, Sequence

from ..schema import END_OF_CHUNK, MARKERS
from . import scenes

MIN_IMAGES, MAX_IMAGES = 2, 4
BURSTY = 0.5  # the share of documents whose last scene repeats an earlier one

Shots = Sequence[tuple[str, str]]  # (question, answer) per scene; an empty question makes the answer a caption


def _shot_text(question: str, answer: str) -> str:
    text = f"{question} {answer}" if question else answer
    return text if text.endswith(".") else text + "."


def few_shot_prompt(shots: Shots, question: str = "", marker: str = MARKERS["image"]) -> str:
    """User text for in-context learning: per shot its marker, question and answer (``"What colour is
    the circle? red."``; an empty question makes the answer a caption), then the query's marker and
    ``question``. E.g. ``"<image>\\na red circle.\\n<image>"`` for captioning."""
    lines = [f"{marker}\n{_shot_text(q, a)}" for q, a in shots]
    lines.append(f"{marker}\n{question}" if question else marker)
    return "\n".join(lines)


def document_text(shots: Shots, marker: str = MARKERS["image"]) -> str:
    """OpenFlamingo's MMC4 form: ``"<image>a red circle.<|endofchunk|><image>..."``, one chunk per shot."""
    return "".join(f"{marker}{_shot_text(q, a)}{END_OF_CHUNK}" for q, a in shots)


def sample_document(rng: random.Random, sample: Callable[[random.Random], scenes.Scene] | None = None) -> list[scenes.Scene]:
    """2-4 scenes drawn with ``sample`` (default :func:`scenes.sample_scene`); with probability
    :data:`BURSTY` the last one repeats an earlier scene."""
    sample = sample or scenes.sample_scene
    document = [sample(rng) for _ in range(rng.randint(MIN_IMAGES, MAX_IMAGES))]
    if rng.random() < BURSTY:
        document[-1] = rng.choice(document[:-1])
    return document


def caption_document(document: list[scenes.Scene]) -> list[tuple[str, str]]:
    """Every scene's shot: its caption."""
    return [("", scenes.caption(s)) for s in document]


def qa_document(
    document: list[scenes.Scene], rng: random.Random, allowed: Callable[[scenes.Shape], bool] | None = None
) -> tuple[str, list[tuple[str, str]]]:
    """``(kind, shots)``: one question kind drawn with ``rng``, asked and answered of every scene.
    ``allowed`` is passed to :func:`scenes.questions`."""
    asked = [{kind: (q, a) for kind, q, a in scenes.questions(s, rng, allowed=allowed)} for s in document]
    kind = rng.choice(sorted(asked[0]))
    return kind, [qa[kind] for qa in asked]
