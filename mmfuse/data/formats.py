"""Dataset formats users bring, read into :class:`Sample` lists.

- LLaVA conversation JSON: a list of ``{"id", "image"?, "audio"?, "video"?, "conversations": [{"from":
  "human"|"gpt"|"system", "value"}], "meta"?}``; each media field is one path or a list of paths (several
  media per sample, markers anywhere in the text). JSON lines (``.jsonl``) with the same records too.
- Interleaved documents: ``{"id", "image": [paths], "text": "<image>a cat.<|endofchunk|><image>..."}``
  (OpenFlamingo's MMC4 form) become a document sample, learned as plain text.
- Caption pairs: ``{"id"?, "image"|"audio": path, "caption": str}`` records become a one-turn
  conversation asking for a caption.

Relative media paths resolve against the JSON file's directory. Errors name the file, the record
and the field.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .schema import MARKERS, Message, Sample

ROLE_OF = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
CAPTION_PROMPT = {"image": "Describe the image.", "audio": "Describe the sound.", "video": "Describe the video."}


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """JSON list or JSON lines -> records."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"dataset file {str(path)!r} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not valid UTF-8 ({err})") from err
    try:
        if path.suffix == ".jsonl":
            records = [json.loads(line) for line in text.splitlines() if line.strip()]
        else:
            records = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: invalid JSON ({err})") from err
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise ValueError(f"{path}: expected a list of objects (one per sample)")
    return records


def _media_field(record: dict, modality: str, where: str) -> list[str]:
    value = record.get(modality, record.get(modality + "s"))
    if value is None:
        return []
    items = value if isinstance(value, list) else [value]
    if not all(isinstance(v, str) and v for v in items):
        raise ValueError(f"{where}: field {modality!r} must be a path or a list of paths")
    return items


def llava_record_to_sample(record: dict, index: int, root: Path, source: str = "?") -> Sample:
    sample_id = str(record.get("id", f"{source}#{index}"))
    where = f"{source}: sample {sample_id!r}"
    turns = record.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise ValueError(f"{where}: field 'conversations' must be a non-empty list")
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise ValueError(f"{where}: conversations[{i}] needs 'from' and 'value'")
        if turn["from"] not in ROLE_OF:
            raise ValueError(f"{where}: conversations[{i}].from is {turn['from']!r}; expected one of {sorted(ROLE_OF)}")
        if not isinstance(turn["value"], str):
            raise ValueError(f"{where}: conversations[{i}].value must be a string")
        messages.append(Message(ROLE_OF[turn["from"]], turn["value"]))
    media = {m: [root / p for p in _media_field(record, m, where)] for m in MARKERS}
    meta = record.get("meta", {})
    if not isinstance(meta, dict):
        raise ValueError(f"{where}: field 'meta' must be an object")
    sample = Sample(sample_id, messages, {m: v for m, v in media.items() if v}, dict(meta))
    sample.validate()
    return sample


def document_record_to_sample(record: dict, index: int, root: Path, source: str = "?") -> Sample:
    sample_id = str(record.get("id", f"{source}#{index}"))
    where = f"{source}: sample {sample_id!r}"
    if not isinstance(record["text"], str) or not record["text"].strip():
        raise ValueError(f"{where}: field 'text' must be a non-empty string")
    media = {m: [root / p for p in _media_field(record, m, where)] for m in MARKERS}
    meta = record.get("meta", {})
    if not isinstance(meta, dict):
        raise ValueError(f"{where}: field 'meta' must be an object")
    sample = Sample(sample_id, [Message("document", record["text"])], {m: v for m, v in media.items() if v}, dict(meta))
    sample.validate()
    return sample


def caption_record_to_sample(record: dict, index: int, root: Path, source: str = "?") -> Sample:
    sample_id = str(record.get("id", f"{source}#{index}"))
    where = f"{source}: sample {sample_id!r}"
    modalities = [m for m in MARKERS if m in record]
    if len(modalities) != 1:
        raise ValueError(f"{where}: a caption record needs exactly one of {list(MARKERS)}")
    modality = modalities[0]
    if not isinstance(record.get("caption"), str):
        raise ValueError(f"{where}: field 'caption' must be a string")
    messages = [Message("user", f"{MARKERS[modality]}\n{CAPTION_PROMPT[modality]}"), Message("assistant", record["caption"])]
    meta = dict(record.get("meta", {}), kind="caption")
    return Sample(sample_id, messages, {modality: [root / p for p in _media_field(record, modality, where)]}, meta)


def load_samples(path: str | Path) -> list[Sample]:
    """Read a LLaVA conversation, interleaved document or caption-pairs file (detected per record)."""
    path = Path(path)
    records = read_records(path)
    samples = []
    for i, record in enumerate(records):
        convert = (llava_record_to_sample if "conversations" in record
                   else document_record_to_sample if "text" in record else caption_record_to_sample)
        samples.append(convert(record, i, path.parent, path.name))
    ids = [s.id for s in samples]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise ValueError(f"{path}: sample id {dup!r} appears more than once")
    return samples


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
