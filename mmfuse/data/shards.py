"""Webdataset tar shards: write a dataset file as shards, and stream them for training.

A shard directory holds ``shard-000000.tar``, ``shard-000001.tar``, ... and ``index.json``. Each dataset
sample is one webdataset sample under a zero-padded running key (no dots: webdataset splits member names
at the first dot). ``<key>.json`` holds ``id``, ``messages`` (``role``, ``content``), ``meta`` and
``media``: per modality, the member names of its items in marker order. Each media file is stored as
its bytes under ``<key>.<modality>-<i><suffix>`` (the file's suffix, lower-cased as webdataset reads it).
A video given as a directory of frames is stored frame by frame, the ``.png``/``.jpg``/``.jpeg`` files in
name order as :func:`mmfuse.data.media.load_video` reads a directory, under
``<key>.video-<i>-<j><suffix>``; its ``media`` entry is the list of frame members and the stream yields
it as a list of frame bytes. A directory given for an image or audio item is an error.

:class:`ShardStream` yields :class:`Sample` objects whose media items are the files' raw bytes.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterator
from itertools import islice
from pathlib import Path
from typing import Any

import webdataset
from webdataset.tariterators import group_by_keys, tar_file_iterator

from .badsamples import BadSample, BadSampleLog
from .formats import load_samples
from .schema import Message, Sample

FORMAT = "mmfuse-shards"
VERSION = 1
INDEX = "index.json"
FRAME_SUFFIXES = (".png", ".jpg", ".jpeg")


def shard_name(number: int) -> str:
    return f"shard-{number:06d}.tar"


Member = tuple[str, Path]  # (member name in the shard, the file it holds)


def _media_files(sample: Sample, source: str) -> dict[str, list[Member | list[Member]]]:
    """Per modality, per item, the member it becomes: one for a file, a list of one per frame for a
    frame directory. A missing file or a misplaced directory is a :class:`BadSample`."""
    files: dict[str, list[Member | list[Member]]] = {}
    for modality, items in sample.media.items():
        files[modality] = []
        for i, item in enumerate(items):
            field, path = f"field {modality!r}[{i}]", Path(item)
            if path.is_file():
                files[modality].append((f"{modality}-{i}{path.suffix.lower()}", path))
            elif path.is_dir() and modality == "video":
                frames = [f for f in sorted(path.iterdir()) if f.suffix.lower() in FRAME_SUFFIXES]
                if not frames:
                    raise BadSample.of(sample.id, field, f"frame directory {str(path)!r} has no {'/'.join(FRAME_SUFFIXES)} files",
                                       kind="missing file", source=source)
                files[modality].append([(f"{modality}-{i}-{j}{f.suffix.lower()}", f) for j, f in enumerate(frames)])
            elif path.is_dir():
                raise BadSample.of(sample.id, field, f"{str(path)!r} is a directory; only a video may be a directory of frames",
                                   source=source)
            else:
                raise BadSample.of(sample.id, field, f"file {str(path)!r} does not exist", kind="missing file", source=source)
    return files


def _media_members(sample: Sample, source: str) -> tuple[dict[str, list], dict[str, bytes]]:
    """Per modality the member names of each item (a list of names for a frame directory), and the
    members' bytes."""
    names: dict[str, list] = {}
    members: dict[str, bytes] = {}
    for modality, items in _media_files(sample, source).items():
        names[modality] = [entry[0] if isinstance(entry, tuple) else [name for name, _ in entry] for entry in items]
        for entry in items:
            members.update({name: path.read_bytes() for name, path in ([entry] if isinstance(entry, tuple) else entry)})
    return names, members


def _has_media_files(sample: Sample, source: str, log: BadSampleLog) -> bool:
    try:
        _media_files(sample, source)
    except BadSample as bad:
        log.record(bad)
        return False
    return True


def _shard_bounds(total: int, samples_per_shard: int) -> list[tuple[int, int]]:
    """``[first, last)`` of each shard: the fewest shards of at most ``samples_per_shard`` samples, sizes
    differing by at most one (no short last shard, so ranks read nearly the same number of samples)."""
    count = -(-total // samples_per_shard)
    base, extra = divmod(total, count)
    ends = [0]
    for number in range(count):
        ends.append(ends[-1] + base + (number < extra))
    return list(zip(ends, ends[1:]))


def write_shards(source_json: Path, out_dir: Path, *, samples_per_shard: int = 1000,
                 progress: Callable[[int, int], None] | None = None, allow_outside_root: bool = False,
                 on_bad_sample: str = "error", log: BadSampleLog | None = None) -> dict:
    """Write the samples of a LLaVA conversation, interleaved document or caption-pairs file (read by
    :func:`load_samples`) as tar shards of at most ``samples_per_shard`` samples (in file order, spread
    evenly over the fewest shards) and an ``index.json`` into ``out_dir``; return the index.
    ``progress(done, total)`` is called after each sample. ``allow_outside_root``: accept media paths
    outside the file's directory (see :func:`load_samples`). ``on_bad_sample="skip"`` leaves malformed
    records and samples with a missing media file out, into ``log`` (whether a file decodes is the
    processor's business, when training reads the shards).

    Shards are written under ``.partial`` names and renamed once every sample is written; on an error
    the partial files are removed, so ``out_dir`` never holds half a conversion.
    """
    source_json, out_dir = Path(source_json), Path(out_dir)
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be at least 1, got {samples_per_shard}")
    samples = load_samples(source_json, allow_outside_root=allow_outside_root, on_bad_sample=on_bad_sample, log=log)
    if on_bad_sample == "skip":
        samples = [sample for sample in samples if _has_media_files(sample, source_json.name, log)]
    if not samples:
        raise ValueError(f"{source_json}: the dataset has no samples")
    out_dir.mkdir(parents=True, exist_ok=True)
    if (out_dir / INDEX).exists() or any(out_dir.glob("shard-*.tar")):
        raise FileExistsError(f"{out_dir} already holds shards; delete them or choose another directory")
    shards: list[dict[str, Any]] = []
    partial: list[Path] = []
    try:
        for number, (first, last) in enumerate(_shard_bounds(len(samples), samples_per_shard)):
            chunk = samples[first:last]
            name = shard_name(number)
            partial.append(out_dir / f"{name}.partial")
            with webdataset.TarWriter(str(partial[-1]), encoder=False, mtime=0) as tar:
                for index, sample in enumerate(chunk, start=first):
                    key = f"{index:09d}"
                    media, members = _media_members(sample, source_json.name)
                    record = {"id": sample.id, "messages": [{"role": m.role, "content": m.content} for m in sample.messages],
                              "meta": sample.meta, "media": media}
                    tar.write({"__key__": key, "json": json.dumps(record).encode("utf-8"), **members})
                    if progress is not None:
                        progress(index + 1, len(samples))
            shards.append({"name": name, "samples": len(chunk)})
        index = {"format": FORMAT, "version": VERSION, "source": str(source_json.resolve()),
                 "samples": len(samples), "shards": shards}
        partial.append(out_dir / f"{INDEX}.partial")
        partial[-1].write_text(json.dumps(index, indent=2) + "\n")
    except BaseException:
        for path in partial:
            path.unlink(missing_ok=True)
        raise
    for path in partial:
        path.rename(path.with_suffix(""))
    return index


class ShardStream:
    """The samples of a shard directory, streamed: at most ``shuffle_buffer`` raw records are held at a
    time (``shuffle_buffer=1`` keeps shard order).

    An epoch is deterministic for a given ``(seed, rank, world)``: the shards are permuted with ``seed``,
    rank ``r`` reads shards ``perm[r::world]`` through a shuffle buffer seeded from ``(seed, rank)`` and
    stops after :meth:`samples_per_rank` samples, so every rank yields the same number. A rank that got
    one shard more than another stops inside its shards; with a shard count that is a multiple of the
    world size at most one sample per shard goes unread (shard sizes differ by at most one). Use a new
    seed each epoch (e.g. ``seed + epoch``) for a new order.
    """

    def __init__(self, directory: str | Path, *, shuffle_buffer: int = 1000):
        self.directory = Path(directory)
        index_path = self.directory / INDEX
        if not index_path.is_file():
            raise FileNotFoundError(f"{self.directory}: no {INDEX}; write shards with `mmfuse data shard`")
        index = json.loads(index_path.read_text())
        if index.get("format") != FORMAT or index.get("version") != VERSION:
            raise ValueError(f"{index_path}: expected format {FORMAT!r} version {VERSION}, got "
                             f"{index.get('format')!r} version {index.get('version')!r}")
        self.shards: list[tuple[str, int]] = [(s["name"], s["samples"]) for s in index["shards"]]
        for name, _ in self.shards:
            if not (self.directory / name).is_file():
                raise FileNotFoundError(f"{self.directory}: shard {name} listed in {INDEX} does not exist")
        if shuffle_buffer < 1:
            raise ValueError(f"shuffle_buffer must be at least 1, got {shuffle_buffer}")
        self.shuffle_buffer = shuffle_buffer

    def __len__(self) -> int:
        return sum(n for _, n in self.shards)

    def samples_per_rank(self, world: int) -> int:
        """Samples every rank reads in one epoch whatever the seed: the total of the ``len(shards) // world``
        smallest shards (the fewest shards a rank can get)."""
        self._check_world(world)
        return sum(sorted(n for _, n in self.shards)[: len(self.shards) // world])

    def epoch(self, seed: int, rank: int = 0, world: int = 1, start: int = 0) -> Iterator[Sample]:
        """Rank ``rank``'s samples of the epoch seeded by ``seed``, from position ``start`` on: the first
        ``start`` records are read but not turned into samples (resuming is cheap)."""
        count = self.samples_per_rank(world)
        if not 0 <= rank < world:
            raise ValueError(f"rank must be in [0, {world}), got {rank}")
        if not 0 <= start <= count:
            raise ValueError(f"start must be in [0, {count}] (the samples per rank of one epoch), got {start}")
        perm = list(range(len(self.shards)))
        random.Random(f"{FORMAT}/{seed}").shuffle(perm)
        records = self._records([self.shards[i] for i in perm[rank::world]])
        rng = random.Random(f"{FORMAT}/{seed}/{rank}")
        shuffled = webdataset.shuffle(bufsize=self.shuffle_buffer, initial=self.shuffle_buffer, rng=rng)(records)
        return self._samples(islice(shuffled, start, count), records)

    def _samples(self, records: Iterator[dict], source: Iterator[dict]) -> Iterator[Sample]:
        try:
            for record in records:
                yield self._sample(record)
        finally:
            source.close()  # closes the open shard file when the epoch is left early

    def _check_world(self, world: int) -> None:
        if world < 1:
            raise ValueError(f"world must be at least 1, got {world}")
        if world > len(self.shards):
            hint = (f"reshard with samples_per_shard at most {len(self) // world}" if len(self) >= world
                    else f"the dataset has only {len(self)} samples")
            raise ValueError(f"{self.directory}: {len(self.shards)} shard(s) cannot be split over {world} ranks "
                             f"(each rank reads whole shards); {hint}")

    def _records(self, shards: list[tuple[str, int]]) -> Iterator[dict]:
        for name, expected in shards:
            found = 0
            for record in self._read_shard(name):
                found += 1
                yield record
            if found != expected:
                raise ValueError(f"{self.directory / name}: holds {found} samples but {INDEX} lists {expected}")

    def _read_shard(self, name: str) -> Iterator[dict]:
        """The raw records of one shard: ``__key__``, ``__url__`` (the shard name) and member bytes."""
        with open(self.directory / name, "rb") as stream:
            yield from group_by_keys({**f, "__url__": name} for f in tar_file_iterator(stream))

    def _sample(self, record: dict) -> Sample:
        where = f"{self.directory / record['__url__']}: key {record['__key__']}"
        if "json" not in record:
            raise ValueError(f"{where}: no .json member")
        info = json.loads(record["json"])

        def member(name: str) -> bytes:
            if name not in record:
                raise ValueError(f"{where}: sample {info['id']!r} lists member {name!r}, which the shard lacks")
            return record[name]

        media = {m: [[member(f) for f in item] if isinstance(item, list) else member(item) for item in items]
                 for m, items in info["media"].items()}
        return Sample(info["id"], [Message(m["role"], m["content"]) for m in info["messages"]], media, info["meta"])
