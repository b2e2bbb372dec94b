"""Write the whole synthetic world to disk in the format users bring their own data in.

:func:`write_world` renders scenes, sound clips, videos, digits and interleaved documents (with
fast-binding episodes over the one-object drawings, :mod:`.binding`, and CogCoM's chains of
manipulations over the scenes, ``chain_qa``: :mod:`mmfuse.data.manipulations`) to PNG, WAV
and GIF files under ``images/``, ``audio/``, ``video/`` and ``digits/``, and writes one LLaVA-style
conversation JSON file per task and split (``{task}_{split}.json``), the text corpus
(``text_corpus_{split}.txt``) and a ``world.json`` manifest. Splits ``train``, ``val`` and ``test``
are i.i.d. and never contain a held-out attribute combination (:mod:`.heldout`); every ``heldout``
item contains at least one. Each record's ``meta`` holds ``task``, ``split``, ``kind`` (question kind
or ``"caption"``) and, for media, ``captions``: the caption of every media item, per modality in
marker order. The same seed writes byte-identical files.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ...config import JsonConfig
from .. import manipulations
from ..formats import CAPTION_PROMPT
from ..schema import MARKERS
from . import binding, digits, documents, heldout, scenes, sounds, text, video

SPLITS = ("train", "val", "test", "heldout")
TASKS = (
    "image_caption", "image_qa", "audio_caption", "audio_qa", "video_caption", "video_qa",
    "interleaved", "documents", "digits_qa", "digits_caption", "image_audio_qa", "text",
    "image_generation", "audio_generation", "audio_multi_qa", "binding", "binding_qa", "chain_qa",
)
GENERATION_PROMPT = {"image": "Draw the image: ", "audio": "Make the sound: "}
VIDEO_FRAMES = 8
BINDING_WORD_LINES = 5000  # corpus lines whose words make the binding labels (every word of the world's text)
DIGITS_TOTAL = 1797

Progress = Callable[[int, int, str], None]


@dataclass
class SplitSizes(JsonConfig):
    """Items per split."""

    train: int = 0
    val: int = 0
    test: int = 0
    heldout: int = 0

    def __getitem__(self, split: str) -> int:
        return getattr(self, split)

    @property
    def total(self) -> int:
        return sum(self[split] for split in SPLITS)


@dataclass
class WorldSizes(JsonConfig):
    """How many items :func:`write_world` draws. Scenes get one QA record per question kind (6) and
    sound clips 4-5; ``image_audio_qa`` pairs each split's scenes with its clips, one question per pair.
    ``digits`` takes the first N of scikit-learn's 1797 digits, split by index within each label (its
    occurrences 0, 10, 20, ... test, 1, 11, 21, ... val, the rest train). ``text`` counts both text-only QA records and corpus lines.
    ``binding`` counts fast-binding episodes over each split's ``generations`` drawings (:mod:`.binding`)."""

    images: SplitSizes = field(default_factory=lambda: SplitSizes(3000, 200, 500, 300))
    sounds: SplitSizes = field(default_factory=lambda: SplitSizes(3000, 200, 500, 300))
    videos: SplitSizes = field(default_factory=lambda: SplitSizes(600, 50, 200, 100))
    documents: SplitSizes = field(default_factory=lambda: SplitSizes(300, 30, 100, 50))
    generations: SplitSizes = field(default_factory=lambda: SplitSizes(2000, 100, 200, 100))
    binding: SplitSizes = field(default_factory=lambda: SplitSizes(4000, 100, 200, 0))
    text: SplitSizes = field(default_factory=lambda: SplitSizes(5000, 200, 500, 0))
    digits: int = DIGITS_TOTAL

    def __post_init__(self):
        if self.text.heldout:
            raise ValueError(f"sizes.text.heldout must be 0 (text has no held-out combinations), got {self.text.heldout}")
        if not 0 <= self.digits <= DIGITS_TOTAL:
            raise ValueError(f"sizes.digits must be 0..{DIGITS_TOTAL}, got {self.digits}")
        for name in ("images", "sounds", "videos", "documents", "generations", "binding", "text"):
            sizes = getattr(self, name)
            if min(sizes[s] for s in SPLITS) < 0:
                raise ValueError(f"sizes.{name} has a negative split size: {sizes}")
        for split in SPLITS:
            if self.binding[split] and not self.generations[split]:
                raise ValueError(f"sizes.binding.{split} is {self.binding[split]} but sizes.generations.{split} is 0: binding "
                                 "episodes name the generation task's drawings; set sizes.binding to 0 too")

    @classmethod
    def small(cls) -> "WorldSizes":
        """About a sixth of the default world (``mmfuse compare --quick``)."""
        return cls(
            images=SplitSizes(500, 100, 100, 60), sounds=SplitSizes(500, 100, 100, 60), videos=SplitSizes(40, 10, 10, 10),
            documents=SplitSizes(20, 5, 5, 5), generations=SplitSizes(400, 50, 100, 50), binding=SplitSizes(400, 20, 20, 0),
            text=SplitSizes(400, 50, 100, 0), digits=300,
        )

    @classmethod
    def tiny(cls) -> "WorldSizes":
        """A few items per split, for tests."""
        return cls(
            images=SplitSizes(12, 3, 4, 4), sounds=SplitSizes(12, 3, 4, 4), videos=SplitSizes(4, 2, 2, 2),
            documents=SplitSizes(3, 2, 2, 2), generations=SplitSizes(4, 2, 2, 2), binding=SplitSizes(0, 0, 0, 0),
            text=SplitSizes(20, 5, 5, 0), digits=40,
        )


def _rng(seed: int, stream: str, split: str) -> random.Random:
    """An independent stream per (modality, split): one split's size never changes another's items."""
    return random.Random(f"mmfuse-world-{seed}-{stream}-{split}")


def _record(rid: str, media: dict[str, list[str]], prompt: str, answer: str, meta: dict[str, Any]) -> dict[str, Any]:
    """A LLaVA-style record; a modality with one file is given as a string, several as a list."""
    record: dict[str, Any] = {"id": rid}
    for modality, files in media.items():
        record[modality] = files[0] if len(files) == 1 else files
    record["conversations"] = [{"from": "human", "value": prompt}, {"from": "gpt", "value": answer}]
    record["meta"] = meta
    return record


def _markers(modality: str, n: int = 1) -> str:
    return "".join(f"{MARKERS[modality]}\n" for _ in range(n))


@dataclass
class _Item:
    """One rendered media item: its file, caption and (kind, question, answer) triples."""

    id: str
    file: str
    caption: str
    questions: list[tuple[str, str, str]]
    scene: scenes.Scene | None = None  # images of scenes: what they show, for the chains


class _Writer:
    """Renders media and writes task files into ``root``, recording what it wrote for the manifest."""

    def __init__(self, root: Path, seed: int, sizes: WorldSizes, progress: Progress | None):
        self.root, self.seed, self.sizes, self.progress = root, seed, sizes, progress
        self.files: dict[str, dict[str, str]] = {}
        self.records: dict[str, dict[str, int]] = {}
        self.media: dict[str, int] = {}
        self.done = 0
        self.total = (
            sizes.images.total + sizes.sounds.total + sizes.videos.total + sizes.documents.total
            + 2 * sizes.generations.total + sizes.digits + len(TASKS) * len(SPLITS)
        )

    def tick(self, description: str) -> None:
        self.done += 1
        if self.progress is not None:
            self.progress(self.done, self.total, description)

    def save_media(self, folder: str, name: str, save: Callable[[Path], None]) -> str:
        (self.root / folder).mkdir(exist_ok=True)
        save(self.root / folder / name)
        self.media[folder] = self.media.get(folder, 0) + 1
        return f"{folder}/{name}"

    def write_task(self, task: str, split: str, records: list[dict[str, Any]]) -> None:
        self.tick(f"writing {task}_{split}.json")
        if not records:
            return
        name = f"{task}_{split}.json"
        (self.root / name).write_text(json.dumps(records, indent=1, ensure_ascii=False) + "\n")
        self.files.setdefault(task, {})[split] = name
        self.records.setdefault(task, {})[split] = len(records)

    # media items ------------------------------------------------------------------------------------

    def scene_items(self, split: str) -> list[_Item]:
        rng = _rng(self.seed, "images", split)
        allowed = None if split == "heldout" else heldout.shape_allowed
        items = []
        for i in range(self.sizes.images[split]):
            scene = _draw_scene(rng, split)
            iid = f"image-{split}-{i:05d}"
            path = self.save_media("images", f"{iid}.png", scenes.render_scene(scene).save)
            items.append(_Item(iid, path, scenes.caption(scene), scenes.questions(scene, rng, allowed=allowed), scene))
            self.tick("rendering images")
        return items

    def sound_items(self, split: str) -> list[_Item]:
        rng = _rng(self.seed, "sounds", split)
        items = []
        for i in range(self.sizes.sounds[split]):
            if split == "heldout":
                clip = heldout.sample_heldout(sounds.sample_clip, heldout.clip_is_heldout, rng)
            else:
                clip = sounds.sample_clip(rng, allowed=heldout.event_allowed)
            wave = sounds.synthesize(clip, rng=rng)
            iid = f"audio-{split}-{i:05d}"
            path = self.save_media("audio", f"{iid}.wav", lambda p: sounds.write_wav(p, wave, sounds.SAMPLE_RATE))
            items.append(_Item(iid, path, sounds.caption(clip), sounds.questions(clip, rng)))
            self.tick("synthesising sounds")
        return items

    def video_items(self, split: str) -> list[_Item]:
        rng = _rng(self.seed, "videos", split)
        items = []
        for i in range(self.sizes.videos[split]):
            if split == "heldout":
                motion = heldout.sample_heldout(video.sample_motion, heldout.shape_is_heldout, rng)
            else:
                motion = video.sample_motion(rng, allowed=heldout.shape_allowed)
            frames = video.render_video(motion, frames=VIDEO_FRAMES)
            iid = f"video-{split}-{i:05d}"
            path = self.save_media("video", f"{iid}.gif", lambda p: video.save_gif(frames, p))
            items.append(_Item(iid, path, video.caption(motion), video.questions(motion, rng)))
            self.tick("rendering videos")
        return items

    def digit_items(self) -> dict[str, list[_Item]]:
        images, labels = digits.load_digit_images()
        items: dict[str, list[_Item]] = {split: [] for split in SPLITS}
        seen = [0] * len(digits.DIGIT_WORDS)
        for i in range(self.sizes.digits):
            label = int(labels[i])
            split = {0: "test", 1: "val"}.get(seen[label] % 10, "train")  # stratified by label
            seen[label] += 1
            iid = f"digit-{i:04d}"
            path = self.save_media("digits", f"{iid}.png", images[i].save)
            items[split].append(_Item(iid, path, digits.caption(label), digits.questions(label)))
            self.tick("writing digits")
        return items

    # tasks ------------------------------------------------------------------------------------------

    def media_tasks(self, modality: str, prefix: str, split: str, items: list[_Item]) -> None:
        """``{prefix}_caption`` and ``{prefix}_qa`` records for single-item media."""
        def meta(task: str, item: _Item, kind: str) -> dict[str, Any]:
            out = {"task": task, "split": split, "kind": kind, "captions": {modality: [item.caption]}}
            if item.scene is not None:  # how many objects the question may have to choose among
                out["objects"] = len(item.scene.shapes)
            return out

        prompt = _markers(modality) + CAPTION_PROMPT[modality]
        self.write_task(f"{prefix}_caption", split, [
            _record(it.id, {modality: [it.file]}, prompt, it.caption, meta(f"{prefix}_caption", it, "caption"))
            for it in items
        ])
        self.write_task(f"{prefix}_qa", split, [
            _record(f"{it.id}-{kind}", {modality: [it.file]}, _markers(modality) + q, a, meta(f"{prefix}_qa", it, kind))
            for it in items for kind, q, a in it.questions
        ])

    def chain_task(self, split: str, items: list[_Item]) -> None:
        """``chain_qa``: for every scene of two or more objects (no held-out split), a colour and a shape question answered
        through CogCoM's chain (:mod:`mmfuse.data.manipulations`): the first reply grounds the object
        the question names and crops its box, the zoomed crop comes back as the next user turn (a PNG
        written here), the second reply is the answer. ``meta.box`` is the grounded box."""
        rng = _rng(self.seed, "chains", split)
        records = []
        for it in items if split != "heldout" else []:  # a crop of a held-out scene may show a seen object
            if len(it.scene.shapes) < 2:  # one object: nothing to ground
                continue
            image = scenes.render_scene(it.scene)
            for kind, question, target, answer, shape in scenes.detail_questions(it.scene, rng):
                box = scenes.object_box(shape)
                crop = manipulations.crop_and_zoom(image, box)
                crop_path = self.save_media("images", f"{it.id}-{kind}-crop.png", crop.save)
                records.append({
                    "id": f"{it.id}-chain-{kind}",
                    "image": [it.file, crop_path],
                    "conversations": [
                        {"from": "human", "value": f"{_markers('image')}{question} {manipulations.CHAIN_REQUEST}"},
                        {"from": "gpt", "value": manipulations.grounding_step(target, box)},
                        {"from": "human", "value": MARKERS["image"]},
                        {"from": "gpt", "value": answer},
                    ],
                    "meta": {"task": "chain_qa", "split": split, "kind": kind, "box": list(box),
                             "captions": {"image": [it.caption, f"a {shape.size} {shape.name}."]}},
                })
        self.write_task("chain_qa", split, records)

    def audio_multi_task(self, split: str, clips: list[_Item]) -> None:
        """``audio_multi_qa``: two of a clip's questions in one instruction, answered together (WavLLM's
        complex instructions); ``meta.kind`` names both kinds (``"pitch+duration"``)."""
        rng = _rng(self.seed, "audio_multi", split)
        records = []
        for clip in clips:
            kind, question, answer = sounds.combined_question(clip.questions, rng)
            meta = {"task": "audio_multi_qa", "split": split, "kind": kind, "captions": {"audio": [clip.caption]}}
            records.append(_record(f"{clip.id}-multi", {"audio": [clip.file]}, _markers("audio") + question, answer, meta))
        self.write_task("audio_multi_qa", split, records)

    def image_audio_task(self, split: str, images: list[_Item], clips: list[_Item]) -> None:
        rng = _rng(self.seed, "image_audio", split)
        n = min(len(images), len(clips))
        order = rng.sample(range(len(clips)), n)
        records = []
        for i, j in enumerate(order):
            image, clip = images[i], clips[j]
            about = rng.choice(("image", "audio"))
            kind, question, answer = rng.choice((image if about == "image" else clip).questions)
            meta = {
                "task": "image_audio_qa", "split": split, "kind": kind, "about": about,
                "captions": {"image": [image.caption], "audio": [clip.caption]},
            }
            prompt = _markers("image") + _markers("audio") + question
            records.append(_record(f"image_audio-{split}-{i:05d}", {"image": [image.file], "audio": [clip.file]}, prompt, answer, meta))
        self.write_task("image_audio_qa", split, records)

    def interleaved_task(self, split: str) -> None:
        rng = _rng(self.seed, "documents", split)
        allowed = None if split == "heldout" else heldout.shape_allowed
        records, plain = [], []
        for i in range(self.sizes.documents[split]):
            document = documents.sample_document(rng, lambda r: _draw_scene(r, split))
            did = f"doc-{split}-{i:05d}"
            files = [
                self.save_media("images", f"{did}-{j}.png", scenes.render_scene(scene).save)
                for j, scene in enumerate(document)
            ]
            if i % 2 == 0:
                kind, shots = "caption", documents.caption_document(document)
            else:
                kind, shots = documents.qa_document(document, rng, allowed=allowed)
            meta = {"task": "interleaved", "split": split, "kind": kind, "captions": {"image": [scenes.caption(s) for s in document]}}
            prompt = documents.few_shot_prompt(shots[:-1], shots[-1][0])
            records.append(_record(did, {"image": files}, prompt, shots[-1][1], meta))
            plain.append({"id": f"{did}-text", "image": files, "text": documents.document_text(shots), "meta": {**meta, "task": "documents"}})
            self.tick("rendering documents")
        self.write_task("interleaved", split, records)
        self.write_task("documents", split, plain)

    def generation_tasks(self, split: str) -> list[binding.Drawing]:
        """``image_generation`` / ``audio_generation``: a one-object scene or one-event clip drawn from
        its caption; ``meta.target`` holds the attributes a judge checks in what a model generates.
        Returns the drawings, (file, target) each."""
        scene_rng, clip_rng = _rng(self.seed, "image_generation", split), _rng(self.seed, "audio_generation", split)
        images, clips = [], []
        for i in range(self.sizes.generations[split]):
            if split == "heldout":
                scene = heldout.sample_heldout(lambda r: scenes.sample_scene(r, 1), heldout.scene_is_heldout, scene_rng)
                clip = heldout.sample_heldout(lambda r: sounds.sample_clip(r, 1), heldout.clip_is_heldout, clip_rng)
            else:
                scene = scenes.sample_scene(scene_rng, 1, allowed=heldout.shape_allowed)
                clip = sounds.sample_clip(clip_rng, 1, allowed=heldout.event_allowed)
            gid = f"{split}-{i:05d}"
            image = self.save_media("images", f"draw-{gid}.png", scenes.render_scene(scene).save)
            self.tick("rendering images to draw")
            wave = sounds.synthesize(clip, rng=clip_rng)
            audio = self.save_media("audio", f"make-{gid}.wav", lambda p: sounds.write_wav(p, wave, sounds.SAMPLE_RATE))
            self.tick("synthesising sounds to make")
            shape, event = scene.shapes[0], clip.events[0]
            images.append(_record(f"draw-{gid}", {"image": [image]}, GENERATION_PROMPT["image"] + scenes.caption(scene), MARKERS["image"], {
                "task": "image_generation", "split": split, "kind": "generation", "captions": {"image": [scenes.caption(scene)]},
                "target": {"colour": shape.colour, "shape": shape.shape, "size": shape.size, "cell": scenes.CELL_NAMES[shape.cell]}}))
            clips.append(_record(f"make-{gid}", {"audio": [audio]}, GENERATION_PROMPT["audio"] + sounds.caption(clip), MARKERS["audio"], {
                "task": "audio_generation", "split": split, "kind": "generation", "captions": {"audio": [sounds.caption(clip)]},
                "target": {"kind": event.kind, "pitch": event.pitch, "duration": event.duration}}))
        self.write_task("image_generation", split, images)
        self.write_task("audio_generation", split, clips)
        return [(r["image"], r["meta"]["target"]) for r in images]

    def binding_task(self, split: str, drawings: list[binding.Drawing]) -> None:
        """``binding``: fast-binding documents over the split's one-object drawings (:mod:`.binding`);
        ``binding_qa``: the same episodes as prompts that stop at the query's image, its label the answer."""
        rng, grouped = _rng(self.seed, "binding", split), binding.group_by_class(drawings)
        words = binding.label_words(text.text_corpus(_rng(self.seed, "binding-words", ""), BINDING_WORD_LINES))
        written, prompts = [], []
        for i in range(self.sizes.binding[split]):
            files, labels, kind = binding.episode(rng, grouped, words)
            meta = {"task": "binding", "split": split, "kind": kind, "answer": labels[-1]}
            bid = f"bind-{split}-{i:05d}"
            shots = documents.document_text([("", label) for label in labels[:-1]])
            written.append({"id": bid, "image": files, "text": shots + documents.document_text([("", labels[-1])]), "meta": meta})
            prompts.append({"id": f"{bid}-query", "image": files, "text": shots + MARKERS["image"], "meta": {**meta, "task": "binding_qa"}})
        self.write_task("binding", split, written)
        self.write_task("binding_qa", split, prompts)

    def text_task(self, split: str) -> None:
        n = self.sizes.text[split]
        if n:
            rng = _rng(self.seed, "text", split)
            name = f"text_corpus_{split}.txt"
            (self.root / name).write_text("".join(line + "\n" for line in text.text_corpus(rng, n)))
            self.files.setdefault("text_corpus", {})[split] = name
        rng = _rng(self.seed, "text_qa", split)
        records = []
        for i in range(n):
            kind, question, answer = text.text_question(rng)
            records.append(_record(f"text-{split}-{i:05d}", {}, question, answer, {"task": "text", "split": split, "kind": kind}))
        self.write_task("text", split, records)


def _draw_scene(rng: random.Random, split: str) -> scenes.Scene:
    if split == "heldout":
        return heldout.sample_heldout(scenes.sample_scene, heldout.scene_is_heldout, rng)
    return scenes.sample_scene(rng, allowed=heldout.shape_allowed)


def _vocabularies() -> dict[str, Any]:
    return {
        "colours": list(scenes.COLOURS), "shapes": list(scenes.SHAPES), "sizes": list(scenes.SIZES),
        "positions": list(scenes.CELL_NAMES), "sound_kinds": list(sounds.KINDS), "pitches": list(sounds.PITCHES),
        "durations": list(sounds.DURATIONS), "directions": list(video.DIRECTIONS),
        "speeds": [video.SPEED_WORDS[s] for s in video.SPEEDS], "digits": list(digits.DIGIT_WORDS),
    }


def write_world(out_dir: Path, *, seed: int = 0, sizes: WorldSizes | None = None, progress: Progress | None = None) -> Path:
    """Write the world (media files, ``{task}_{split}.json``, ``text_corpus_{split}.txt``, ``world.json``)
    into ``out_dir``, which must be new or empty, and return it. ``progress(done, total, description)`` is called as items are written."""
    sizes = sizes or WorldSizes()
    root = Path(out_dir)
    if root.exists() and any(root.iterdir()):
        raise FileExistsError(f"write_world: {root} is not empty; write the world into a new or empty directory")
    root.mkdir(parents=True, exist_ok=True)
    writer = _Writer(root, seed, sizes, progress)
    digit_items = writer.digit_items()
    for split in SPLITS:
        images, clips, videos = writer.scene_items(split), writer.sound_items(split), writer.video_items(split)
        writer.media_tasks("image", "image", split, images)
        writer.chain_task(split, images)
        writer.media_tasks("audio", "audio", split, clips)
        writer.audio_multi_task(split, clips)
        writer.media_tasks("video", "video", split, videos)
        writer.media_tasks("image", "digits", split, digit_items[split])
        writer.image_audio_task(split, images, clips)
        writer.interleaved_task(split)
        writer.binding_task(split, writer.generation_tasks(split))
        writer.text_task(split)
    manifest = {
        "seed": seed,
        "sizes": sizes.to_dict(),
        "files": writer.files,
        "records": writer.records,
        "media": writer.media,
        "vocabularies": _vocabularies(),
        "heldout": {"shapes": [list(p) for p in heldout.HELDOUT_SHAPES], "sounds": [list(p) for p in heldout.HELDOUT_SOUNDS]},
        "video_frames": VIDEO_FRAMES,
        "sample_rate": sounds.SAMPLE_RATE,
    }
    (root / "world.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return root
