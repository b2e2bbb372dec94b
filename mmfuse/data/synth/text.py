"""The world's text: small text-only tasks and a corpus of world sentences.

:func:`text_question` draws a question a text-only model can answer (opposites, number-word
arithmetic, counting). :func:`text_corpus` mixes the facts behind those questions with the captions
of scenes, sounds, videos and digits and with questions on them, each after the caption it is about
(``"a large red circle on the left. What colour is the circle? red."``), as plain sentences; it is
what the world LLM is pretrained on and what text perplexity is measured on. Held-out attribute
combinations (:mod:`.heldout`) never appear in it.
"""

from __future__ import annotations

import random
from typing import Callable

from . import digits, scenes, sounds, video
from .heldout import event_allowed, shape_allowed

NUMBER_WORDS = (
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
    "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen", "twenty",
)
OPPOSITES = (
    ("left", "right"), ("up", "down"), ("top", "bottom"), ("small", "large"), ("high", "low"),
    ("fast", "slow"), ("short", "long"), ("first", "last"), ("before", "after"), ("yes", "no"),
    ("start", "end"), ("loud", "quiet"), ("light", "dark"), ("open", "closed"), ("hot", "cold"),
)
MAX_SUM = 10
COUNT_LENGTHS = (3, 4, 5)


def _opposite(rng: random.Random) -> tuple[str, str, str]:
    a, b = rng.choice(OPPOSITES)
    if rng.random() < 0.5:
        a, b = b, a
    return f"What is the opposite of {a}?", b, f"the opposite of {a} is {b}."


def _plus(rng: random.Random) -> tuple[str, str, str]:
    a = rng.randint(0, MAX_SUM)
    b = rng.randint(0, MAX_SUM - a)
    x, y, z = NUMBER_WORDS[a], NUMBER_WORDS[b], NUMBER_WORDS[a + b]
    return f"What is {x} plus {y}?", z, f"{x} plus {y} is {z}."


def _minus(rng: random.Random) -> tuple[str, str, str]:
    a = rng.randint(0, MAX_SUM)
    b = rng.randint(0, a)
    x, y, z = NUMBER_WORDS[a], NUMBER_WORDS[b], NUMBER_WORDS[a - b]
    return f"What is {x} minus {y}?", z, f"{x} minus {y} is {z}."


def _after(rng: random.Random) -> tuple[str, str, str]:
    n = rng.randrange(len(NUMBER_WORDS) - 1)
    x, y = NUMBER_WORDS[n], NUMBER_WORDS[n + 1]
    return f"What number comes after {x}?", y, f"{y} comes after {x}."


def _before(rng: random.Random) -> tuple[str, str, str]:
    n = rng.randrange(1, len(NUMBER_WORDS))
    x, y = NUMBER_WORDS[n], NUMBER_WORDS[n - 1]
    return f"What number comes before {x}?", y, f"{y} comes before {x}."


def _count(rng: random.Random) -> tuple[str, str, str]:
    length = rng.choice(COUNT_LENGTHS)
    start = rng.randrange(len(NUMBER_WORDS) - length + 1)
    words = NUMBER_WORDS[start : start + length]
    return f"Count from {words[0]} to {words[-1]}.", " ".join(words), " ".join(words) + "."


TEXT_TASKS: dict[str, Callable[[random.Random], tuple[str, str, str]]] = {
    "opposite": _opposite,
    "plus": _plus,
    "minus": _minus,
    "after": _after,
    "before": _before,
    "count": _count,
}


def text_question(rng: random.Random) -> tuple[str, str, str]:
    """A text-only ``(kind, question, answer)``, e.g. ``("plus", "What is one plus two?", "three")``."""
    kind = rng.choice(tuple(TEXT_TASKS))
    question, answer, _ = TEXT_TASKS[kind](rng)
    return kind, question, answer


def _fact(rng: random.Random) -> str:
    return TEXT_TASKS[rng.choice(tuple(TEXT_TASKS))](rng)[2]


def _qa_line(question: str, answer: str, context: str = "") -> str:
    """``"What is one plus one? two."``, after the item's caption when the question is about one."""
    return f"{context} {question} {answer}." if context else f"{question} {answer}."


def _text_qa(rng: random.Random) -> str:
    _, question, answer = text_question(rng)
    return _qa_line(question, answer)


def _scene_caption(rng: random.Random) -> str:
    return scenes.caption(scenes.sample_scene(rng, allowed=shape_allowed))


def _scene_qa(rng: random.Random) -> str:
    scene = scenes.sample_scene(rng, allowed=shape_allowed)
    _, question, answer = rng.choice(scenes.questions(scene, rng, allowed=shape_allowed))
    return _qa_line(question, answer, scenes.caption(scene))


def _sound_caption(rng: random.Random) -> str:
    return sounds.caption(sounds.sample_clip(rng, allowed=event_allowed))


def _sound_qa(rng: random.Random) -> str:
    clip = sounds.sample_clip(rng, allowed=event_allowed)
    _, question, answer = rng.choice(sounds.questions(clip, rng))
    return _qa_line(question, answer, sounds.caption(clip))


def _video_caption(rng: random.Random) -> str:
    return video.caption(video.sample_motion(rng, allowed=shape_allowed))


def _video_qa(rng: random.Random) -> str:
    motion = video.sample_motion(rng, allowed=shape_allowed)
    _, question, answer = rng.choice(video.questions(motion, rng))
    return _qa_line(question, answer, video.caption(motion))


def _digit_caption(rng: random.Random) -> str:
    return digits.caption(rng.randrange(10))


def _digit_qa(rng: random.Random) -> str:
    label = rng.randrange(10)
    _, question, answer = rng.choice(digits.questions(label))
    return _qa_line(question, answer, digits.caption(label))


# line source -> relative weight in the corpus
CORPUS_MIX: dict[Callable[[random.Random], str], int] = {
    _fact: 3,
    _text_qa: 3,
    _scene_caption: 2,
    _scene_qa: 3,
    _sound_caption: 2,
    _sound_qa: 3,
    _video_caption: 1,
    _video_qa: 1,
    _digit_caption: 1,
    _digit_qa: 1,
}


def text_corpus(rng: random.Random, n: int) -> list[str]:
    """``n`` lines of world text, one sentence (or question and answer) each, drawn with ``rng``."""
    sources, weights = list(CORPUS_MIX), list(CORPUS_MIX.values())
    return [rng.choices(sources, weights)[0](rng) for _ in range(n)]
