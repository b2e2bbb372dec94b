"""Fast-binding episodes (Frozen, Tsimpoukelli et al. 2021): naming things from the context alone.

Every other task of the world can be answered from its own media: a caption says what the scene
shows, so a model never needs what came before, and does not learn to read it. Few-shot prompts on a
new domain (the digits) then add nothing. Here each episode names one-object drawings with labels
drawn for that episode alone (``"a seven blue."``): four shots, then a query of a class the shots
showed, where the class is the drawing's colour, its shape or both, chosen per episode. Only the
context says the query's label. In 1-way episodes every shot carries it (copying); in 2-way episodes
the shots whose drawings share the query's class carry it (matching, then copying).

Written as OpenFlamingo documents (``<image>label<|endofchunk|>`` per drawing), the form of the
document few-shot prompts of :mod:`mmfuse.eval.tasks`.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterable, Sequence

SHOTS = 4
WAYS = (1, 2, 2)  # drawn per episode: a third copy-only, two thirds match-then-copy
ATTRIBUTES = ("colour", "shape", "both")

Drawing = tuple[str, dict[str, str]]  # (media file, its target attributes: colour, shape, ...)
Classes = dict[str, dict[tuple[str, ...], list[str]]]  # attribute -> class -> the files of its drawings


def label_words(lines: Iterable[str]) -> list[str]:
    """The words of ``lines`` (the world's text), longer than one letter: the words labels are made of, so
    that copying is learned for every word the LLM knows, not only for the names of what images show."""
    return sorted({word for line in lines for word in re.findall(r"[a-z]+", line.lower()) if len(word) > 1})


def _label(rng: random.Random, words: Sequence[str]) -> str:
    return "a " + " ".join(rng.sample(list(words), rng.choice((1, 2)))) + "."


def _class_of(target: dict[str, str], attribute: str) -> tuple[str, ...]:
    return (target["colour"], target["shape"]) if attribute == "both" else (target[attribute],)


def group_by_class(drawings: Sequence[Drawing]) -> Classes:
    """The drawings' files grouped by class, for every attribute of :data:`ATTRIBUTES` (once per split,
    not per episode)."""
    grouped: Classes = {a: {} for a in ATTRIBUTES}
    for file, target in drawings:
        for attribute, of_attribute in grouped.items():
            of_attribute.setdefault(_class_of(target, attribute), []).append(file)
    return grouped


def episode(rng: random.Random, grouped: Classes, words: Sequence[str]) -> tuple[list[str], list[str], str]:
    """``(files, labels, kind)`` for ``SHOTS`` shots and the query (the last), five different drawings of
    ``grouped`` (:func:`group_by_class`); ``kind`` is e.g. ``"2-way colour"``."""
    attribute, ways = rng.choice(ATTRIBUTES), rng.choice(WAYS)
    eligible = {a: sorted(c for c, files in of_attribute.items() if len(files) >= SHOTS + 1) for a, of_attribute in grouped.items()}
    if len(eligible[attribute]) < ways:  # a few drawings may leave too few classes of both colour and shape
        usable = [a for a in ATTRIBUTES if len(eligible[a]) >= ways]
        if not usable:
            drawings = sum(len(files) for files in grouped["colour"].values())
            raise ValueError(f"binding episodes: no attribute has {ways} classes of {SHOTS + 1}+ drawings among {drawings} drawings")
        attribute = rng.choice(usable)
    classes, by_class = rng.sample(eligible[attribute], ways), grouped[attribute]
    names: dict[tuple[str, ...], str] = {}
    while len(set(names.values())) < ways:
        names = {c: _label(rng, words) for c in classes}
    shots = [classes[i % ways] for i in range(SHOTS)]
    rng.shuffle(shots)
    sequence = [*shots, rng.choice(classes)]
    picks = {c: rng.sample(by_class[c], sequence.count(c)) for c in classes}  # no drawing twice
    files = [picks[c].pop() for c in sequence]
    return files, [names[c] for c in sequence], f"{ways}-way {attribute}"
