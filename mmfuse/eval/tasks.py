"""Evaluation tasks: a dataset file (``{data}/{task}_{split}.json``) scored by its kind of metric.

* QA tasks (``*_qa``): exact-match accuracy per question kind, VQA accuracy, and optionally
  *choice accuracy*: the reference is ranked by likelihood among every answer of the same question
  kind in the evaluated set (model-agnostic: it needs no answer format, only log-likelihoods).
* Caption tasks (``*_caption``, ``interleaved``): CIDEr-D and BLEU-4 against the final assistant turn.
* Chains of manipulations (``chain_qa``, CogCoM): the model's first reply grounds the object the question
  names and asks for a crop; the crop of the box *the model wrote* is zoomed and given back as the next
  user turn, and the second reply is scored like a QA answer. Also reported: how many first replies hold
  a box, and how many boxes overlap the reference (IoU at least 0.5).
* Generation tasks (``image_generation``, ``audio_generation``; Type-D models): the model draws an image
  or makes a sound from the prompt alone, and a probe classifier trained on real world media
  (:mod:`mmfuse.eval.probes`) says what it shows; accuracy per attribute of ``meta.target``, and for
  images the share with colour *and* shape right.

Few-shot prompts put ``shots`` solved examples from the task's train split before the question, as
earlier turns of the same conversation (``shot_format="turns"``) or as one interleaved document in
OpenFlamingo's form (``"document"``: ``<image>answer<|endofchunk|>`` per shot, then the query's media
and question for the model to continue); shots are drawn at random or retrieved as the nearest
neighbours of the question's first media item in the encoder's embedding space.
"""

from __future__ import annotations

import functools
import random
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import torch

from ..data.formats import CAPTION_PROMPT, load_samples, resolve_dataset
from ..data.manipulations import box_iou, crop_and_zoom, parse_box
from ..data.media import load_image
from ..data.schema import END_OF_CHUNK, MARKER_RE, MARKERS, Message, Sample, media_in_order, with_earlier
from .adapter import EvalAdapter
from .metrics import bleu4, cider_d, exact_match, vqa_accuracy
from .retrieval import NearestNeighbours, choose_shots

SHOT_SELECTION = ("random", "retrieval")
SHOT_FORMATS = ("turns", "document")
FEWSHOT_POOL = 512  # train examples a few-shot prompt draws from
GENERATION_TASKS = {"image_generation": "image", "audio_generation": "audio"}  # task -> the modality generated
CHAIN_TASKS = ("chain_qa",)
CHAIN_STEP_TOKENS = 96  # a first reply, grounding(<phrase>) -> [[box]]; crop_and_zoom([[box]]), is about 65 tokens of the world LLM
GROUNDED_IOU = 0.5
# How each modality is decoded when scored: images greedily (measured best for the world's VQ codes);
# sounds by sampling at temperature 1, since most frames of a clip are silence and greedy decoding
# collapses to an all-silent clip (AudioPaLM and AudioLM sample too)
GENERATION_DECODING = {"image": {}, "audio": {"do_sample": True, "temperature": 1.0}}


def task_metric(task: str) -> str:
    """``"qa"`` or ``"caption"``, from the task's name."""
    if task.endswith("_qa"):
        return "qa"
    if task.endswith("_caption") or task == "interleaved":
        return "caption"
    if task in GENERATION_TASKS:
        return "generation"
    raise ValueError(f"task {task!r}: no metric for it; tasks are named '<x>_qa', '<x>_caption', 'interleaved' or "
                     f"one of {sorted(GENERATION_TASKS)}")


def evaluate_task(
    adapter: EvalAdapter,
    data: str | Path,
    task: str,
    split: str = "test",
    *,
    limit: int | None = None,
    shots: int = 0,
    shot_selection: str = "random",
    shot_format: str = "turns",
    choices: bool = False,
    seed: int = 0,
    max_new_tokens: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    allow_outside_root: bool = False,
) -> dict:
    """Score ``adapter`` on ``split`` of ``task``; the result dict is described in the module docstring.
    ``allow_outside_root``: accept media paths outside the dataset file's directory."""
    metric = task_metric(task)
    read = functools.partial(load_samples, allow_outside_root=allow_outside_root)
    samples = read(resolve_dataset(data, task, split))[:limit]
    if not samples:
        raise ValueError(f"task {task!r} split {split!r}: no samples")
    if metric == "generation":
        if shots:
            raise ValueError(f"task {task!r}: generation tasks are scored zero-shot")
        modality = GENERATION_TASKS[task]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            items = adapter.generate_media(samples, modality, **GENERATION_DECODING[modality])
        return {**generation_scores(samples, items, modality), "decoding": GENERATION_DECODING[modality],
                "task": task, "split": split, "shots": 0, "shot_selection": None, "shot_format": None}
    if task in CHAIN_TASKS:
        if shots:
            raise ValueError(f"task {task!r}: chains are scored zero-shot")
        result = chain_scores(adapter, samples, max_new_tokens or 8, progress)
        return {**result, "task": task, "split": split, "shots": 0, "shot_selection": None, "shot_format": None}
    if shots:
        samples = few_shot(adapter, samples, read(resolve_dataset(data, task, "train")), shots, shot_selection, seed,
                           shot_format)
    max_new_tokens = max_new_tokens or (8 if metric == "qa" else 48)
    predictions = []
    for start in range(0, len(samples), adapter.batch_size):
        predictions += adapter.generate(samples[start : start + adapter.batch_size], max_new_tokens)
        if progress:
            progress(len(predictions), len(samples))
    result = qa_scores(samples, predictions) if metric == "qa" else caption_scores(samples, predictions)
    if choices and metric == "qa":
        if shots and shot_format == "document":
            raise ValueError("choice accuracy scores conversation replies; use shot_format='turns' with choices")
        result["choice_accuracy"] = choice_accuracy(adapter, samples)
    result.update(task=task, split=split, shots=shots, shot_selection=shot_selection if shots else None,
                  shot_format=shot_format if shots else None)
    return result


def qa_scores(samples: list[Sample], predictions: list[str]) -> dict:
    """``{"accuracy", "vqa_accuracy", "count", "by_kind": {kind: {"accuracy", "count"}}, "predictions"}``,
    plus ``"by_objects": {kind: {"n": {"accuracy", "count"}}}`` when the samples' meta say how many objects
    their scene holds (the world's images): a question about one of several objects needs the model to
    bind the attribute to the object named, which a one-object scene does not test."""
    hits: dict[str, list[bool]] = defaultdict(list)
    by_objects: dict[str, dict[int, list[bool]]] = defaultdict(lambda: defaultdict(list))
    vqa, rows = [], []
    for sample, prediction in zip(samples, predictions, strict=True):
        reference = sample.prompt_and_answer()[1]
        ok = exact_match(prediction, reference)
        kind = sample.meta.get("kind", "all")
        hits[kind].append(ok)
        if "objects" in sample.meta:
            by_objects[kind][int(sample.meta["objects"])].append(ok)
        vqa.append(vqa_accuracy(prediction, [reference]))
        rows.append({"id": sample.id, "kind": kind, "prediction": prediction, "reference": reference, "correct": ok})
    every = [ok for oks in hits.values() for ok in oks]
    result = {
        "accuracy": sum(every) / len(every),
        "vqa_accuracy": sum(vqa) / len(vqa),
        "count": len(every),
        "by_kind": {k: {"accuracy": sum(v) / len(v), "count": len(v)} for k, v in sorted(hits.items())},
        "predictions": rows,
    }
    if by_objects:
        result["by_objects"] = {k: {str(n): {"accuracy": sum(v) / len(v), "count": len(v)} for n, v in sorted(counts.items())}
                                for k, counts in sorted(by_objects.items())}
    return result


def chain_scores(adapter: EvalAdapter, samples: list[Sample], max_new_tokens: int,
                 progress: Callable[[int, int], None] | None = None) -> dict:
    """CogCoM's loop on each sample's first question: the model's first reply, the zoomed crop of the box
    it wrote as the next user turn, its second reply scored against the reference. ``qa_scores``' dict,
    plus ``"box_written"`` (share of first replies with a well-formed box), ``"grounded"`` (share whose box
    overlaps ``meta.box`` by IoU >= 0.5) and each prediction's ``"step"`` (the first reply) and ``"box"``."""
    for s in samples:
        if len(s.messages) < 4 or [m.role for m in s.messages[:3]] != ["user", "assistant", "user"]:
            raise ValueError(f"sample {s.id!r}: a chain is a question, a manipulation turn, the manipulated "
                             "image's turn and an answer")
    firsts = [Sample(s.id, s.messages[:1], {"image": s.media["image"][:1]}, s.meta) for s in samples]
    steps = adapter.generate(firsts, CHAIN_STEP_TOKENS)
    boxes = [parse_box(step) for step in steps]
    seconds = {}
    for i, (sample, step, box) in enumerate(zip(samples, steps, boxes)):
        if box is not None:
            image = load_image(sample.media["image"][0], sample.id, 0)
            seconds[i] = Sample(sample.id, [sample.messages[0], Message("assistant", step), Message("user", MARKERS["image"])],
                                {"image": [sample.media["image"][0], crop_and_zoom(image, box)]}, sample.meta)
    answers = dict(zip(seconds, adapter.generate(list(seconds.values()), max_new_tokens) if seconds else []))
    if progress:
        progress(len(samples), len(samples))
    result = qa_scores(samples, [answers.get(i, "") for i in range(len(samples))])
    for row, step, box in zip(result["predictions"], steps, boxes):
        row.update(step=step, box=list(box) if box else None)
    grounded = [box is not None and box_iou(box, tuple(s.meta["box"])) >= GROUNDED_IOU for s, box in zip(samples, boxes)]
    result["box_written"] = sum(box is not None for box in boxes) / len(samples)
    result["grounded"] = sum(grounded) / len(samples)
    return result


def caption_scores(samples: list[Sample], predictions: list[str]) -> dict:
    """``{"cider_d", "bleu4", "count", "predictions"}`` against each sample's final assistant turn."""
    references = [[s.prompt_and_answer()[1]] for s in samples]
    return {
        "cider_d": cider_d(predictions, references),
        "bleu4": bleu4(predictions, references),
        "count": len(samples),
        "predictions": [{"id": s.id, "prediction": p, "reference": r[0]} for s, p, r in zip(samples, predictions, references)],
    }


def generation_scores(samples: list[Sample], items: list[torch.Tensor | None], modality: str) -> dict:
    """``{"accuracy", "by_attribute": {attribute: share}, "complete", "count", "probe": its accuracy on real
    media, "predictions"}``. The headline ``accuracy`` is colour and shape both right for images, the
    pitch for sounds. An incomplete item counts as wrong."""
    from .probes import load_probe, probe_metrics

    probe = load_probe(modality)
    done = [i for i, item in enumerate(items) if item is not None]
    predicted = probe.predict(torch.stack([items[i] for i in done])) if done else {}
    rows = []
    for i, sample in enumerate(samples):
        target = sample.meta["target"]
        guess = {a: predicted[a][done.index(i)] for a in predicted if a in target} if i in done else {}
        rows.append({"id": sample.id, "target": target, "predicted": guess, "complete": i in done})
    attributes = sorted({a for row in rows for a in row["target"]} & set(predicted)) if done else []
    accuracy = {a: sum(row["predicted"].get(a) == row["target"][a] for row in rows) / len(rows) for a in attributes}
    if modality == "image" and {"colour", "shape"} <= set(attributes):
        accuracy["colour_and_shape"] = sum(row["predicted"].get("colour") == row["target"]["colour"]
                                           and row["predicted"].get("shape") == row["target"]["shape"] for row in rows) / len(rows)
    headline = accuracy.get("colour_and_shape" if modality == "image" else "pitch", 0.0)
    return {"accuracy": headline, "by_attribute": accuracy, "complete": len(done) / len(samples), "count": len(samples),
            "probe": probe_metrics(modality), "predictions": rows}


def choice_accuracy(adapter: EvalAdapter, samples: list[Sample]) -> float:
    """Share of samples whose reference has the highest likelihood among the answers of its kind."""
    by_kind: dict[str, list[int]] = defaultdict(list)
    for i, s in enumerate(samples):
        by_kind[s.meta.get("kind", "all")].append(i)
    hits = 0
    for indices in by_kind.values():
        group = [samples[i] for i in indices]
        answers = sorted({s.prompt_and_answer()[1] for s in group})
        best = adapter.score(group, answers).argmax(dim=1).tolist()
        hits += sum(answers[b] == s.prompt_and_answer()[1] for b, s in zip(best, group))
    return hits / len(samples)


def few_shot(
    adapter: EvalAdapter, samples: list[Sample], pool: list[Sample], shots: int, selection: str, seed: int,
    shot_format: str = "turns",
) -> list[Sample]:
    """Each sample with ``shots`` solved pool examples put before it (as earlier turns, or as a document)."""
    if selection not in SHOT_SELECTION:
        raise ValueError(f"shot_selection must be one of {SHOT_SELECTION}, got {selection!r}")
    if shot_format not in SHOT_FORMATS:
        raise ValueError(f"shot_format must be one of {SHOT_FORMATS}, got {shot_format!r}")
    pool = random.Random(seed).sample(pool, min(len(pool), FEWSHOT_POOL))
    rng = random.Random(seed + 1)
    if selection == "random":
        chosen = [choose_shots(len(pool), shots, rng=rng)[0] for _ in samples]
    else:
        index = NearestNeighbours(embed_samples(adapter, pool))
        chosen = choose_shots(len(pool), shots, rng=rng, query_embeddings=embed_samples(adapter, samples), index=index)
    combine = _as_turns if shot_format == "turns" else _as_document
    return [combine(sample, [pool[j] for j in picks]) for sample, picks in zip(samples, chosen)]


def _first_modality(sample: Sample) -> str:
    for modality, items in sample.media.items():
        if items:
            return modality
    raise ValueError(f"sample {sample.id!r}: retrieval needs media to embed, and it has none")


def _as_turns(sample: Sample, shots: list[Sample]) -> Sample:
    return with_earlier(sample, shots, f"{sample.id}+{len(shots)}shot")


def _as_document(sample: Sample, shots: list[Sample]) -> Sample:
    """One document: per shot its media, question (a caption request is dropped) and answer closed by
    ``<|endofchunk|>``; then the query's media and question, for the model to continue."""
    chunks = []
    for example in [*shots, sample]:
        messages, answer = example.prompt_and_answer()
        if len(messages) != 1 or messages[0].role != "user":
            raise ValueError(f"sample {example.id!r}: the document shot format takes one-question samples")
        content = messages[0].content
        markers = "".join(m.group() for m in MARKER_RE.finditer(content))
        question = MARKER_RE.sub("", content).strip()
        question = "" if question in CAPTION_PROMPT.values() else question
        chunks.append((markers, question, answer))
    text = "".join(f"{m}{q + ' ' if q else ''}{a}{END_OF_CHUNK}" for m, q, a in chunks[:-1])
    text += chunks[-1][0] + chunks[-1][1]
    meta = {**sample.meta, "answer": chunks[-1][2]}
    return Sample(f"{sample.id}+{len(shots)}shot", [Message("document", text)], media_in_order([*shots, sample]), meta)


def embed_samples(adapter: EvalAdapter, samples: list[Sample]) -> torch.Tensor:
    """Mean-pooled encoder embedding of each sample's first media item, ``(n, d)``."""
    modality = _first_modality(samples[0])
    return adapter.embed(modality, [s.media[modality][0] for s in samples])
