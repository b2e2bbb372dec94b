"""Dataset formats users bring, read into :class:`Sample` lists.

- LLaVA conversation JSON: a list of ``{"id", "image"?, "audio"?, "video"?, "conversations": [{"from":
  "human"|"gpt"|"system", "value"}], "meta"?}``; each media field is one path or a list of paths (several
  media per sample, markers anywhere in the text). JSON lines (``.jsonl``) with the same records too.
- Interleaved documents, each read as one document sample (learned as plain text: every media marker is
  followed by its text, closed by ``<|endofchunk|>``):
  ``{"id", "image": [paths], "text": "<image>a cat.<|endofchunk|><image>..."}`` (OpenFlamingo's MMC4 form);
  ``{"id", "texts": [str | null, ...], "images": [path | null, ...]}`` (OBELICS: parallel lists with
  exactly one non-null entry per position); ``{"id", "content": [{"type": "text", "text": str},
  {"type": "image", "image": path}, ...]}`` (a list of entries; ``audio`` and ``video`` entries too).
- Caption pairs: ``{"id"?, "image"|"audio": path, "caption": str}`` records become a one-turn
  conversation asking for a caption.
- Hugging Face ``datasets`` (:func:`samples_from_hf`): rows of the forms above whose media columns hold
  PIL images (the ``Image()`` feature), ``{"bytes", "path"}`` dicts (``Image(decode=False)``,
  ``Audio(decode=False)``), audio ``{"array", "sampling_rate"}`` dicts, or paths.

Relative media paths resolve against the JSON file's directory (``root`` for a Hugging Face dataset). A
path that leaves it (``../../etc/passwd``, an absolute path elsewhere) is refused unless
``allow_outside_root=True``; the check is on the path as written, so symlinks inside the directory are
followed. A sample id defaults to ``<file>#<index>``.

A bad record raises :class:`BadSample` naming the file and record, the sample and the field
(``data.json#3: sample 'x7': conversations[1].value: must be a string, got int``); with
``on_bad_sample="skip"`` it is skipped and recorded in ``log`` instead. A file that is not a list of
records (invalid UTF-8, invalid JSON) is an error naming the file, under either policy.
"""

from __future__ import annotations

import codecs
import json
import os
from collections.abc import Callable, Iterable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .badsamples import BadSample, BadSampleLog, check_policy
from .schema import END_OF_CHUNK, MARKERS, Message, Sample

ROLE_OF = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
CAPTION_PROMPT = {"image": "Describe the image.", "audio": "Describe the sound.", "video": "Describe the video."}
PARAGRAPH = "\n\n"  # between consecutive text entries of an interleaved document

# (item, sample id, field) -> a media item for Sample.media, or BadSample
Resolve = Callable[[Any, str, str], Any]


def _parse_json(text: str, where: str) -> Any:
    try:
        return json.loads(text)
    except RecursionError as err:
        raise ValueError(f"{where}: invalid JSON (nested too deeply)") from err
    except ValueError as err:  # JSONDecodeError, and integers too long to convert
        raise ValueError(f"{where}: invalid JSON ({err})") from err


def _parse_line(line: str, path: Path, number: int) -> Any:
    try:
        return _parse_json(line, f"{path}:{number}")
    except ValueError as err:
        return BadSample.of(f"{path.name}:{number}", "line", str(err), kind="invalid JSON")


def read_records(path: str | Path) -> list[Any]:
    """JSON list or JSON lines -> records (each should be an object; :func:`load_samples` checks). In
    JSON lines, a line that is not valid JSON comes back as its :class:`BadSample`, which
    :func:`load_samples` raises or skips like any other bad record."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"dataset file {str(path)!r} does not exist")
    data = path.read_bytes()
    bom = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0  # a leading byte-order mark is allowed
    try:
        text = data[bom:].decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not valid UTF-8 at byte {bom + err.start} ({err.reason})") from err
    if path.suffix == ".jsonl":  # lines end at "\n" only: other line breaks may sit inside JSON strings
        return [_parse_line(line, path, n) for n, line in enumerate(text.split("\n"), 1) if line.strip()]
    records = _parse_json(text, str(path))
    if not isinstance(records, list):
        raise ValueError(f"{path}: expected a list of objects (one per sample), got {type(records).__name__}")
    return records


def _path(value: str, sample_id: str, field: str, root: Path, allow_outside_root: bool) -> Path:
    """``value`` resolved against ``root`` with ``..`` removed from the text (so that the file read is the
    one checked); refused when it leaves ``root``, unless allowed."""
    if "://" in value:
        raise BadSample.of(sample_id, field, f"{value!r} is a URL; download the media and give local paths",
                           kind="missing file")
    path = Path(os.path.normpath(root / value))
    inside, target = Path(os.path.abspath(root)), Path(os.path.abspath(path))
    if not allow_outside_root and not target.is_relative_to(inside):
        raise BadSample.of(sample_id, field, f"{value!r} resolves to {str(target)!r}, outside the dataset directory "
                           f"{str(inside)!r}; pass allow_outside_root=True to read it", kind="path outside root")
    return path


def _json_item(item: Any, sample_id: str, field: str, root: Path, allow_outside_root: bool) -> Path:
    if not isinstance(item, str) or not item:
        raise BadSample.of(sample_id, field, "must be a path (a non-empty string)")
    return _path(item, sample_id, field, root, allow_outside_root)


def _hf_item(item: Any, sample_id: str, field: str, root: Path, allow_outside_root: bool) -> Any:
    """A Hugging Face ``datasets`` cell -> a media item: PIL images, bytes and audio arrays as they are."""
    if isinstance(item, dict) and item.get("array") is not None:
        rate = item.get("sampling_rate")
        if isinstance(rate, np.ndarray) and rate.ndim == 0:  # under dataset.with_format("numpy")
            rate = rate.item()
        return {"array": item["array"], "sampling_rate": rate}
    if isinstance(item, dict):  # Image(decode=False) / Audio(decode=False)
        item = item.get("bytes") or item.get("path")
    if hasattr(item, "get_all_samples"):  # torchcodec's AudioDecoder, what Audio() decodes to
        decoded = item.get_all_samples()  # data: (channels, samples)
        return {"array": decoded.data.mean(0).numpy(), "sampling_rate": decoded.sample_rate}
    if isinstance(item, (Image.Image, bytes)):
        return item
    if isinstance(item, str) and item:
        return _path(item, sample_id, field, root, allow_outside_root)
    raise BadSample.of(sample_id, field, "must be a path, the file's bytes, a PIL image or an audio dict, got "
                       f"{type(item).__name__}")


def _media_items(record: dict, modality: str, sample_id: str, resolve: Resolve) -> list[Any]:
    value = record.get(modality)
    if value is None:
        value = record.get(modality + "s")
    if value is None:
        return []
    items = value if isinstance(value, list) else [value]
    return [resolve(item, sample_id, f"{modality}[{i}]") for i, item in enumerate(items)]


def _meta(record: dict, sample_id: str) -> dict[str, Any]:
    meta = record.get("meta")
    if meta is None:
        return {}
    if not isinstance(meta, dict):
        raise BadSample.of(sample_id, "meta", f"must be an object, got {type(meta).__name__}")
    return dict(meta)


def llava_record_to_sample(record: dict, sample_id: str, resolve: Resolve) -> Sample:
    turns = record["conversations"]
    if not isinstance(turns, list) or not turns:
        raise BadSample.of(sample_id, "conversations", f"must be a non-empty list, got {_describe(turns)}")
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise BadSample.of(sample_id, f"conversations[{i}]", "needs 'from' and 'value'")
        role = turn["from"]
        if not isinstance(role, str) or role not in ROLE_OF:
            raise BadSample.of(sample_id, f"conversations[{i}].from", f"is {role!r}; expected one of {sorted(ROLE_OF)}")
        if not isinstance(turn["value"], str):
            raise BadSample.of(sample_id, f"conversations[{i}].value", f"must be a string, got {type(turn['value']).__name__}")
        messages.append(Message(ROLE_OF[role], turn["value"]))
    media = {m: _media_items(record, m, sample_id, resolve) for m in MARKERS}
    sample = Sample(sample_id, messages, {m: v for m, v in media.items() if v}, _meta(record, sample_id))
    sample.validate()
    return sample


def document_record_to_sample(record: dict, sample_id: str, resolve: Resolve) -> Sample:
    if not isinstance(record["text"], str) or not record["text"].strip():
        raise BadSample.of(sample_id, "text", "must be a non-empty string")
    media = {m: _media_items(record, m, sample_id, resolve) for m in MARKERS}
    sample = Sample(sample_id, [Message("document", record["text"])], {m: v for m, v in media.items() if v},
                    _meta(record, sample_id))
    sample.validate()
    return sample


def _interleaved_sample(record: dict, sample_id: str, entries: list[tuple[str, Any, str]], resolve: Resolve) -> Sample:
    """``(kind, value, field)`` entries (kind "text" or a modality) -> a document sample: each media
    marker is followed by the text after it, closed by ``<|endofchunk|>`` before the next marker."""
    parts: list[str] = []
    media: dict[str, list[Any]] = {}
    chunk_open = previous_text = False
    for kind, value, field in entries:
        if kind == "text":
            parts.append(PARAGRAPH + value if previous_text else value)
            previous_text = True
            continue
        if chunk_open:
            parts.append(END_OF_CHUNK)
        parts.append(MARKERS[kind])
        media.setdefault(kind, []).append(resolve(value, sample_id, field))
        chunk_open, previous_text = True, False
    if chunk_open:
        parts.append(END_OF_CHUNK)
    sample = Sample(sample_id, [Message("document", "".join(parts))], media, _meta(record, sample_id))
    sample.validate()
    return sample


def obelics_record_to_sample(record: dict, sample_id: str, resolve: Resolve) -> Sample:
    """OBELICS: ``texts`` and ``images`` are parallel lists, exactly one of them non-null per position."""
    texts, images = record["texts"], record.get("images")
    for name, value in (("texts", texts), ("images", images)):
        if not isinstance(value, list):
            raise BadSample.of(sample_id, name, f"must be a list (parallel to 'texts' / 'images'), got {_describe(value)}")
    if len(texts) != len(images):
        raise BadSample.of(sample_id, "images", f"has {len(images)} entries but 'texts' has {len(texts)}; the lists are "
                           "parallel")
    entries = []
    for i, (text, image) in enumerate(zip(texts, images)):
        if (text is None) == (image is None):
            raise BadSample.of(sample_id, f"texts[{i}]", f"exactly one of texts[{i}] and images[{i}] must be non-null")
        if image is not None:
            entries.append(("image", image, f"images[{i}]"))
        elif not isinstance(text, str):
            raise BadSample.of(sample_id, f"texts[{i}]", f"must be a string or null, got {type(text).__name__}")
        else:
            entries.append(("text", text, f"texts[{i}]"))
    return _interleaved_sample(record, sample_id, entries, resolve)


def content_record_to_sample(record: dict, sample_id: str, resolve: Resolve) -> Sample:
    """``content``: a list of ``{"type": "text", "text": str}`` and ``{"type": m, m: item}`` entries."""
    content = record["content"]
    if not isinstance(content, list) or not content:
        raise BadSample.of(sample_id, "content", f"must be a non-empty list of entries, got {_describe(content)}")
    entries = []
    for i, entry in enumerate(content):
        kind = entry.get("type") if isinstance(entry, dict) else None
        if not isinstance(kind, str) or kind not in ("text", *MARKERS):
            raise BadSample.of(sample_id, f"content[{i}]", f"needs 'type' 'text' or one of {list(MARKERS)}")
        value = entry.get(kind)
        if value is None or (kind == "text" and not isinstance(value, str)):
            raise BadSample.of(sample_id, f"content[{i}].{kind}", f"the entry needs its {kind!r} value")
        entries.append((kind, value, f"content[{i}].{kind}"))
    return _interleaved_sample(record, sample_id, entries, resolve)


def caption_record_to_sample(record: dict, sample_id: str, resolve: Resolve) -> Sample:
    modalities = [m for m in MARKERS if record.get(m) is not None]
    if len(modalities) != 1:
        raise BadSample.of(sample_id, "record", f"a caption record needs exactly one of {list(MARKERS)}, and 'caption' "
                           "('conversations', 'text', 'texts' or 'content' for the other forms)")
    modality = modalities[0]
    if not isinstance(record.get("caption"), str):
        raise BadSample.of(sample_id, "caption", "must be a string")
    messages = [Message("user", f"{MARKERS[modality]}\n{CAPTION_PROMPT[modality]}"), Message("assistant", record["caption"])]
    sample = Sample(sample_id, messages, {modality: _media_items(record, modality, sample_id, resolve)},
                    {**_meta(record, sample_id), "kind": "caption"})
    sample.validate()
    return sample


def _describe(value: Any) -> str:
    return f"{type(value).__name__} {value!r}"[:80]


def _sample_id(record: dict, index: int, source: str) -> str:
    value = record.get("id")
    if value is None:
        return f"{source}#{index}"
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise BadSample.of(f"{source}#{index}", "id", f"must be a string or an integer, got {type(value).__name__}")
    return str(value)


def _converter(record: dict) -> Callable[[dict, str, Resolve], Sample]:
    """The record's form, from the first of its keys that is set (a Hugging Face row has every column,
    None where unused)."""
    forms = (("conversations", llava_record_to_sample), ("texts", obelics_record_to_sample),
             ("content", content_record_to_sample), ("text", document_record_to_sample))
    return next((convert for key, convert in forms if record.get(key) is not None), caption_record_to_sample)


def _to_samples(records: Iterable[Any], source: str, resolve: Resolve, on_bad_sample: str,
                log: BadSampleLog | None) -> list[Sample]:
    """Records -> samples, the form detected per record; bad ones raise or are skipped into ``log``."""
    if check_policy(on_bad_sample) == "skip" and log is None:
        raise ValueError("on_bad_sample='skip' needs a log (a BadSampleLog) to count the skipped samples in")
    samples, seen = [], set()
    for index, record in enumerate(records):
        try:
            if isinstance(record, BadSample):  # a JSON line that did not parse
                raise record
            if not isinstance(record, dict):
                raise BadSample.of(f"{source}#{index}", "record", f"must be an object, got {type(record).__name__}")
            sample_id = _sample_id(record, index, source)
            sample = _converter(record)(record, sample_id, resolve)
            if sample.id in seen:
                raise BadSample.of(sample.id, "id", "appears more than once; sample ids must be unique", kind="duplicate id")
        except BadSample as bad:
            err = bad.in_file(f"{source}#{index}")  # the record's position: two bad records never count as one
            if on_bad_sample == "error":
                raise err from bad
            log.record(err)
            continue
        seen.add(sample.id)
        samples.append(sample)
    return samples


def load_samples(path: str | Path, *, on_bad_sample: str = "error", log: BadSampleLog | None = None,
                 allow_outside_root: bool = False) -> list[Sample]:
    """Read a LLaVA conversation, interleaved document or caption-pairs file (form detected per record).
    ``on_bad_sample="skip"`` skips bad records into ``log`` (e.g. the processor's ``bad_samples``)."""
    path = Path(path)
    records = read_records(path)
    resolve = partial(_json_item, root=path.parent, allow_outside_root=allow_outside_root)
    return _to_samples(records, path.name, resolve, on_bad_sample, log)


def samples_from_hf(dataset: Iterable[dict], *, root: str | Path = ".", name: str = "dataset", on_bad_sample: str = "error",
                    log: BadSampleLog | None = None, allow_outside_root: bool = False) -> list[Sample]:
    """Rows of a Hugging Face ``datasets.Dataset`` (or any iterable of dicts) -> samples, as
    :func:`load_samples` reads records. Media cells may hold PIL images, bytes, ``{"bytes", "path"}`` or
    ``{"array", "sampling_rate"}`` dicts (audio keeps its own rate and is resampled), or paths relative to
    ``root``. ``name`` stands for the file in ids (``name#index``) and messages. A caption dataset whose
    caption column is called ``text`` needs ``dataset.rename_column("text", "caption")`` (``text`` means an
    MMC4 document)."""
    resolve = partial(_hf_item, root=Path(root), allow_outside_root=allow_outside_root)
    return _to_samples(dataset, name, resolve, on_bad_sample, log)


def resolve_dataset(data: str | Path, name: str, split: str) -> Path:
    """``name`` is a JSON file, or a task of a dataset directory (``{data}/{name}_{split}.json``)."""
    candidate = Path(name)
    if candidate.suffix in (".json", ".jsonl") and candidate.is_file():
        return candidate
    path = Path(data) / f"{name}_{split}.json"
    if not path.is_file():
        available = sorted(p.name for p in Path(data).glob(f"*_{split}.json")) if Path(data).is_dir() else []
        raise FileNotFoundError(f"no dataset {name!r} for split {split!r}: {path} does not exist; found {available}")
    return path
