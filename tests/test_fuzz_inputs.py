"""Hypothesis fuzzing of the dataset loader, the processor and the media loaders.

The only allowed outcomes are a valid result or a ``ValueError`` naming the file (broken files) or the
sample and the field (:class:`BadSample`); under ``on_bad_sample="skip"`` nothing but a broken file
raises. Example counts are bounded so that the file runs in well under a minute.
"""

from __future__ import annotations

import io
import json
import re
import tempfile
from pathlib import Path

import numpy as np
import pytest
import soundfile
from conftest import processor_with_policy, tiny_config
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image

from mmfuse.data.badsamples import BadSample, BadSampleLog, Skipped
from mmfuse.data.collate import Collator
from mmfuse.data.formats import load_samples, read_records
from mmfuse.data.processor import Encoded
from mmfuse.data.schema import ROLES, Message, Sample
from mmfuse.model import MultimodalLM

MAX_LENGTH = 256
FUZZ = settings(max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
DIR = Path(tempfile.mkdtemp(prefix="mmfuse-fuzz-"))
Image.new("RGB", (16, 16), (255, 0, 0)).save(DIR / "a.png")
soundfile.write(str(DIR / "a.wav"), np.zeros(4000, np.float32), 16000)

KEYS = ["id", "conversations", "from", "value", "image", "images", "audio", "video", "text", "texts", "content", "type",
        "caption", "meta", "array", "sampling_rate"]
MEDIA = ["a.png", "a.wav", "missing.png", "../a.png", "/etc/passwd", "", "http://x/a.png"]
TEXT = st.text(max_size=30) | st.sampled_from(["<image>", "<audio>", "<video>", "<|endofchunk|>", "human", "gpt", "image",
                                               "text", *MEDIA])
JSONISH = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | TEXT,
                       lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=5),
                                                                                  inner, max_size=5),
                       max_leaves=20)
TURN = st.fixed_dictionaries({"from": st.sampled_from(["human", "gpt", "system", "robot"]) | JSONISH, "value": TEXT | JSONISH})
WELL_FORMED = st.one_of(  # a record of each form, with arbitrary text
    st.builds(lambda i, q, a: {"id": i, "image": "a.png", "conversations": [{"from": "human", "value": "<image>" + q},
                                                                             {"from": "gpt", "value": a}]},
              st.text(max_size=8), st.text(max_size=20), st.text(max_size=20)),
    st.builds(lambda t: {"texts": [t, None, t], "images": [None, "a.png", None]}, st.text(max_size=20)),
    st.builds(lambda t: {"content": [{"type": "image", "image": "a.png"}, {"type": "text", "text": t}]}, st.text(max_size=20)),
    st.builds(lambda t: {"id": t, "audio": "a.wav", "caption": t}, st.text(max_size=20)),
)
MUTATED = st.tuples(WELL_FORMED, st.sampled_from(KEYS), JSONISH).map(lambda r: {**r[0], r[1]: r[2]})
RECORD = WELL_FORMED | MUTATED | (st.fixed_dictionaries({"id": TEXT | JSONISH}, optional={
    "conversations": st.lists(TURN, max_size=3) | JSONISH, "image": st.sampled_from(MEDIA) | JSONISH,
    "audio": st.sampled_from(MEDIA) | JSONISH, "text": TEXT, "texts": st.lists(TEXT | st.none(), max_size=3),
    "images": st.lists(st.sampled_from(MEDIA) | st.none(), max_size=3), "caption": TEXT | JSONISH, "meta": JSONISH,
    "content": st.lists(st.fixed_dictionaries({"type": st.sampled_from(["text", "image", "audio", "gif"])},
                                              optional={"text": TEXT, "image": st.sampled_from(MEDIA), "audio": JSONISH}),
                        max_size=3) | JSONISH,
}) | JSONISH)


@pytest.fixture(scope="module")
def model(tokenizer_dir):
    return MultimodalLM.from_config(tiny_config(tokenizer_dir, audio="linear", max_length=MAX_LENGTH))


@FUZZ
@given(content=st.binary(max_size=300) | JSONISH.map(lambda v: json.dumps(v).encode()), suffix=st.sampled_from([".json", ".jsonl"]))
def test_read_records_on_arbitrary_bytes(content, suffix):
    path = DIR / f"bytes{suffix}"
    path.write_bytes(content)
    try:
        records = read_records(path)
    except ValueError as err:
        assert str(err).startswith(str(path)), err
        return
    assert isinstance(records, list)


@FUZZ
@given(records=st.lists(RECORD, max_size=4))
def test_load_samples_on_arbitrary_records(records):
    path = DIR / "records.json"
    path.write_text(json.dumps(records))
    try:
        samples = load_samples(path)
    except BadSample as err:
        assert re.match(rf"records\.json#\d+: sample {re.escape(repr(err.sample_id))}: {re.escape(err.field)}: ", str(err)), err
        samples = None
    log = BadSampleLog()
    kept = load_samples(path, on_bad_sample="skip", log=log)  # never raises: the file is a list
    event("a record loaded" if kept else "no record loaded")
    assert len(kept) + len(log) == len(records)
    assert samples is None or (kept == samples and len(log) == 0)
    for sample in kept:
        sample.validate()


ANY_TEXT = st.text(st.characters(exclude_categories=()), max_size=30) | TEXT  # lone surrogates included


@st.composite
def samples(draw) -> Sample:
    """Mostly well-formed conversations (user/assistant turns, one marker per media item) of arbitrary
    text, sometimes arbitrary roles and markers."""
    media = {"image": [DIR / "a.png"] * draw(st.integers(0, 2)), "audio": [DIR / "a.wav"] * draw(st.integers(0, 1))}
    if draw(st.integers(0, 4)):
        roles = ["user" if i % 2 == 0 else "assistant" for i in range(draw(st.integers(2, 4)))]
    else:
        roles = draw(st.lists(st.sampled_from([*ROLES, "robot"]), max_size=4))
    texts = [draw(ANY_TEXT) for _ in roles]
    if texts and draw(st.integers(0, 4)):
        for modality, items in media.items():
            for _ in items:
                turn = draw(st.integers(0, len(texts) - 1))
                texts[turn] = f"<{modality}>" + texts[turn]
    return Sample(draw(st.text(max_size=8)), [Message(r, t) for r, t in zip(roles, texts)], {m: v for m, v in media.items() if v})


@FUZZ
@given(sample=samples())
def test_processor_on_arbitrary_conversations(model, sample):
    try:
        encoded = processor_with_policy(model, "error")(sample)
    except BadSample as err:
        assert str(err).startswith(f"sample {sample.id!r}: {err.field}: ") and err.sample_id == sample.id, err
        encoded = None
    if encoded is not None:
        assert isinstance(encoded, Encoded) and len(encoded.input_ids) == len(encoded.labels) <= MAX_LENGTH
    skipping = processor_with_policy(model, "skip")
    result = skipping(sample)
    event(type(result).__name__)  # --hypothesis-show-statistics: how many were encoded, how many skipped
    assert isinstance(result, Encoded) == (encoded is not None)
    assert isinstance(result, Skipped) == (len(skipping.bad_samples) == 1)
    batch = Collator(model.tokenizer.pad_token_id)([result])
    assert batch["skipped"] == ([result] if isinstance(result, Skipped) else [])


def _media_bytes() -> dict[str, bytes]:
    rng = np.random.default_rng(0)
    files = {}
    for fmt in ("PNG", "JPEG", "GIF"):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(buffer, format=fmt)
        files[fmt] = buffer.getvalue()
    for fmt, subtype in (("WAV", "PCM_16"), ("WAV", "FLOAT"), ("FLAC", "PCM_16")):
        buffer = io.BytesIO()
        soundfile.write(buffer, rng.uniform(-0.5, 0.5, (4000, 2)).astype(np.float32), 16000, format=fmt, subtype=subtype)
        files[f"{fmt}-{subtype}"] = buffer.getvalue()
    return files


MEDIA_BYTES = _media_bytes()


@FUZZ
@given(name=st.sampled_from(sorted(MEDIA_BYTES)), cut=st.floats(0, 1),
       flips=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=8))
def test_media_loaders_on_corrupted_bytes(model, name, cut, flips):
    data = bytearray(MEDIA_BYTES[name][: max(1, int(len(MEDIA_BYTES[name]) * cut))] if cut < 0.5 else MEDIA_BYTES[name])
    for position, value in flips:
        data[position % len(data)] = value
    modality = "audio" if name[0] in "WF" else "image"
    try:
        out = model.media_processors[modality](bytes(data), "s", 0)
    except BadSample as err:
        assert str(err).startswith(f"sample 's': {modality}[0]: ") and err.kind != "malformed", err
        return
    assert out.ndim in (1, 2, 3) and np.isfinite(out.numpy()).all()
