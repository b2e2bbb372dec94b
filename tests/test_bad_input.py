"""The bad-input corpus, run through the real loader, processor and collator.

Every broken input gets a clear error naming the sample and the field (a broken file: the file), and
under ``on_bad_sample="skip"`` is skipped and counted with its reason; unusual but valid inputs load with
the right values. ``test_bad_input_table`` prints the table and its counts (crashes = 0).
"""

from __future__ import annotations

import io
import json
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
from conftest import processor_with_policy, tiny_config
from PIL import Image

from mmfuse.data.badsamples import BadSample, BadSampleLog
from mmfuse.data.collate import Collator
from mmfuse.data.dataset import ProcessedDataset
from mmfuse.data.formats import load_samples, samples_from_hf
from mmfuse.data.media import MediaProcessor, load_audio, load_image, load_video
from mmfuse.data.processor import Processor
from mmfuse.data.schema import Message, Sample
from mmfuse.model import MultimodalLM

MAX_LENGTH = 128
QUESTION = "what colour is the circle?"
OK_RECORD = {"id": "ok", "image": "ok.png", "conversations": [{"from": "human", "value": f"<image>\n{QUESTION}"},
                                                              {"from": "gpt", "value": "red"}]}


@pytest.fixture(scope="module")
def model(tokenizer_dir):
    return MultimodalLM.from_config(tiny_config(tokenizer_dir, audio="linear", max_length=MAX_LENGTH))


# -- building broken inputs ---------------------------------------------------------------------------
def _conv(sample_id="x", text=f"<image>\n{QUESTION}", answer="red", **fields) -> dict:
    return {"id": sample_id, **fields, "conversations": [{"from": "human", "value": text}, {"from": "gpt", "value": answer}]}


def _audio_conv(file: str, **fields) -> dict:
    return _conv(text="<audio>\nwhat is the pitch of the tone?", audio=file, **fields)


def _png_bytes(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def _png_header(width: int, height: int) -> bytes:
    """A valid 1-bit PNG whose header claims ``width x height`` pixels, a few hundred bytes long."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


def _tone(seconds: float, rate: int, channels: int = 1) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    wave = (0.4 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    return wave if channels == 1 else np.stack([wave] + [np.zeros_like(wave)] * (channels - 1), 1)


def _wav_bytes(wave: np.ndarray, rate: int, subtype: str = "PCM_16") -> bytes:
    buffer = io.BytesIO()
    soundfile.write(buffer, wave, rate, format="WAV", subtype=subtype)
    return buffer.getvalue()


def _flac_claiming_days() -> bytes:
    """A 0.5 s FLAC whose STREAMINFO claims 2^36 - 1 samples (49 days at 16 kHz)."""
    buffer = io.BytesIO()
    soundfile.write(buffer, _tone(0.5, 16000), 16000, format="FLAC")
    data = bytearray(buffer.getvalue())
    data[18:26] = (int.from_bytes(data[18:26], "big") | (1 << 36) - 1).to_bytes(8, "big")  # rate, channels, bits, samples
    return bytes(data)


def _with_rate(wav: bytes, rate: int) -> bytes:
    """A WAV whose header claims ``rate`` Hz."""
    return wav[:24] + struct.pack("<I", rate) + wav[28:]


def _files(**files: bytes | str | Image.Image) -> Callable[[Path], None]:
    """Files named by keyword, ``__`` standing for the dot (``x__png`` writes ``x.png``)."""
    def write(directory: Path) -> None:
        for name, content in files.items():
            path = directory / name.replace("__", ".")
            if isinstance(content, Image.Image):
                content.save(path)
            elif isinstance(content, str):
                path.write_text(content)
            else:
                path.write_bytes(content)
    return write


def _json(*records, files: Callable[[Path], None] = lambda d: None) -> Callable[[Path], Path]:
    """A data.json of the good sample ``ok`` and ``records``, with ``files`` written beside it."""
    def build(directory: Path) -> Path:
        Image.new("RGB", (16, 16), (255, 0, 0)).save(directory / "ok.png")
        files(directory)
        (directory / "data.json").write_text(json.dumps([OK_RECORD, *records]))
        return directory / "data.json"
    return build


def _raw(content: bytes) -> Callable[[Path], Path]:
    def build(directory: Path) -> Path:
        (directory / "data.json").write_bytes(content)
        return directory / "data.json"
    return build


def _hf(*rows: dict, as_dataset: bool = False) -> Callable[[Path], object]:
    """The good sample and ``rows`` as a Hugging Face ``datasets.Dataset`` (images stored as PNG bytes,
    decoded to PIL images by the ``Image()`` feature unless a row gives raw bytes), or as a list of dicts
    (for cells Arrow cannot store)."""
    def build(directory: Path):
        import datasets

        ok = {"id": "ok", "image": Image.new("RGB", (16, 16), (255, 0, 0)), "conversations": OK_RECORD["conversations"]}
        columns = sorted({k for r in (ok, *rows) for k in r})
        all_rows = [{k: r.get(k) for k in columns} for r in (ok, *rows)]
        if not as_dataset:
            return all_rows
        raw_images = any(isinstance(r.get("image"), dict) for r in rows)
        for r in all_rows:
            if isinstance(r["image"], Image.Image):
                r["image"] = {"bytes": _png_bytes(r["image"]), "path": None}
        dataset = datasets.Dataset.from_list(all_rows).cast_column("image", datasets.Image(decode=not raw_images))
        if any(isinstance(r.get("audio"), dict) and "bytes" in r["audio"] for r in rows):
            dataset = dataset.cast_column("audio", datasets.Audio(decode=False))
        return dataset
    return build


BAD_UTF8 = json.dumps([OK_RECORD, _conv(text="caf_")]).encode().replace(b"caf_", b"caf\xe9")
CORRUPT_PNG = _png_bytes(Image.new("RGB", (16, 16), (0, 255, 0)))[:60]
CORRUPT_JPEG = _png_bytes(Image.new("RGB", (16, 16), (0, 255, 0)), "JPEG")[:20] + bytes(range(256)) * 4
WAV = _wav_bytes(_tone(0.5, 16000), 16000)


class _FakeAudioDecoder:
    """What datasets' ``Audio()`` decodes to (torchcodec's ``AudioDecoder``), without torchcodec."""

    class _Samples:
        data = torch.from_numpy(np.stack([_tone(0.5, 8000), np.zeros(4000, np.float32)]))  # (channels, samples)
        sample_rate = 8000

    def get_all_samples(self):
        return self._Samples()


# -- checks of legitimate but unusual inputs: (encoded sample, sample, directory) -> asserts ---------------
def _pixels_are(value: int):
    """Every pixel of the sample's (square, uniform) image is ``value`` in 0..255, as the processor
    normalises it: ``(value / 255 - 0.5) / 0.5``."""
    def check(encoded, sample, directory):
        pixels = encoded.media["image"]
        assert torch.allclose(pixels, torch.full_like(pixels, (value / 255 - 0.5) / 0.5), atol=0.01)
    return check


def _audio_is(rate: int, channels: int):
    """The sample's file is a 0.5 s, 440 Hz tone at ``rate`` Hz; it is read as 0.5 s at 16 kHz, its
    channels (the tone and silence) averaged."""
    def check(encoded, sample, directory):
        assert encoded.media["audio"].shape[0] == 1
        wave = load_audio(directory / "x.wav", 16000)
        assert wave.shape == (8000,)
        assert abs(np.abs(wave).max() - 0.4 / channels) < 0.02
        peak = np.argmax(np.abs(np.fft.rfft(wave))) * 16000 / wave.shape[0]
        assert abs(peak - 440) < 4
    return check


def _audio_item_is(peak: float):
    """The sample's in-memory audio item is a 0.5 s, 440 Hz tone of amplitude ``peak``; it is read at
    its own rate and resampled to 0.5 s at 16 kHz."""
    def check(encoded, sample, directory):
        assert encoded.media["audio"].shape[0] == 1 and torch.isfinite(encoded.media["audio"]).all()
        wave = load_audio(sample.media["audio"][0], 16000)
        assert wave.shape == (8000,) and abs(np.abs(wave).max() - peak) < 0.02
    return check


def _text_is(text: str):
    def check(encoded, sample, directory):
        assert sample.messages[0].content == text and encoded.media["image"].shape[0] == text.count("<image>")
    return check


def _id_is(sample_id: str):
    def check(encoded, sample, directory):
        assert encoded.id == sample.id == sample_id
    return check


def _palette_with_transparency() -> Image.Image:
    image = Image.new("P", (16, 16), 0)
    image.putpalette([0, 0, 255] * 256)
    image.info["transparency"] = 0  # index 0 (blue in the palette) is transparent
    return image


# -- the corpus -------------------------------------------------------------------------------------------
@dataclass
class Case:
    name: str
    build: Callable[[Path], object]  # -> the data.json path, or Hugging Face rows
    expect: str  # "error" (of one sample: skippable), "file error", "loads"
    field: str = ""  # error: the field the message names; file error: text the message holds
    kind: str = "malformed"  # error: the reason the summary counts
    sample_id: str = "x"
    check: Callable | None = None  # loads: asserts the loaded values


BAD_UTF8_AT = BAD_UTF8.index(b"\xe9")
OBELICS_TEXT = "intro<image>a red square.\n\nmore.<|endofchunk|><image>a cat.<|endofchunk|>"
CASES = [
    # images
    Case("missing image file", _json(_conv(image="nope.png")), "error", "image[0]", "missing file"),
    Case("0-byte image file", _json(_conv(image="x.png"), files=_files(x__png=b"")), "error", "image[0]", "empty file"),
    Case("corrupt PNG (truncated)", _json(_conv(image="x.png"), files=_files(x__png=CORRUPT_PNG)), "error", "image[0]",
         "unreadable image"),
    Case("corrupt JPEG (garbage)", _json(_conv(image="x.jpg"), files=_files(x__jpg=CORRUPT_JPEG)), "error", "image[0]",
         "unreadable image"),
    Case("text file named .png", _json(_conv(image="x.png"), files=_files(x__png="hello")), "error", "image[0]", "unreadable image"),
    Case("decompression bomb, 10^10 pixels (PIL refuses)", _json(_conv(image="x.png"), files=_files(
        x__png=_png_header(100_000, 100_000))), "error", "image[0]", "image too large"),
    Case("decompression bomb, 10^8 pixels (over max_image_pixels)", _json(_conv(image="x.png"), files=_files(
        x__png=_png_header(10_000, 10_000))), "error", "image[0]", "image too large"),
    Case("grayscale image", _json(_conv(image="x.png"), files=_files(x__png=Image.new("L", (16, 16), 128))), "loads",
         check=_pixels_are(128)),
    Case("RGBA fully transparent (composited on white)", _json(_conv(image="x.png"), files=_files(
        x__png=Image.new("RGBA", (16, 16), (0, 0, 0, 0)))), "loads", check=_pixels_are(255)),
    Case("palette with a transparent index (white)", _json(_conv(image="x.png"), files=_files(x__png=_palette_with_transparency())),
         "loads", check=_pixels_are(255)),
    Case("16-bit grayscale 65535 (white)", _json(_conv(image="x.png"), files=_files(
        x__png=Image.fromarray(np.full((16, 16), 65535, np.uint16)))), "loads", check=_pixels_are(255)),
    Case("16-bit grayscale 32896 (128: scaled, not clipped)", _json(_conv(image="x.png"), files=_files(
        x__png=Image.fromarray(np.full((16, 16), 32896, np.uint16)))), "loads", check=_pixels_are(128)),
    # audio
    Case("missing audio file", _json(_audio_conv("nope.wav")), "error", "audio[0]", "missing file"),
    Case("0-byte WAV", _json(_audio_conv("x.wav"), files=_files(x__wav=b"")), "error", "audio[0]", "empty file"),
    Case("text file named .wav", _json(_audio_conv("x.wav"), files=_files(x__wav="hello")), "error", "audio[0]",
         "unreadable audio"),
    Case("truncated WAV", _json(_audio_conv("x.wav"), files=_files(x__wav=WAV[: len(WAV) // 2])), "error", "audio[0]",
         "truncated audio"),
    Case("WAV header with sampling rate 0", _json(_audio_conv("x.wav"), files=_files(x__wav=_with_rate(WAV, 0))), "error",
         "audio[0]", "unreadable audio"),
    Case("WAV header with sampling rate 8 Hz", _json(_audio_conv("x.wav"), files=_files(x__wav=_with_rate(WAV, 8))), "error",
         "audio[0]", "bad audio"),
    Case("NaN sample", _json(_audio_conv("x.wav"), files=_files(x__wav=_wav_bytes(
        np.where(np.arange(8000) == 100, np.nan, _tone(0.5, 16000)).astype(np.float32), 16000, "FLOAT"))),
         "error", "audio[0]", "bad audio"),
    Case("infinite sample", _json(_audio_conv("x.wav"), files=_files(x__wav=_wav_bytes(
        np.where(np.arange(8000) == 100, np.inf, _tone(0.5, 16000)).astype(np.float32), 16000, "FLOAT"))),
         "error", "audio[0]", "bad audio"),
    Case("float WAV with samples of 1e30", _json(_audio_conv("x.wav"), files=_files(x__wav=_wav_bytes(
        np.full(8000, 1e30, np.float32), 16000, "FLOAT"))), "error", "audio[0]", "bad audio"),
    Case("FLAC header claiming 49 days (never allocated)", _json(_audio_conv("x.flac"), files=_files(x__flac=_flac_claiming_days())),
         "error", "audio[0]", "too long"),
    Case("clip longer than the encoder window", _json(_audio_conv("x.wav"), files=_files(
        x__wav=_wav_bytes(_tone(3, 16000), 16000))), "error", "audio[0]", "too long"),
    Case("stereo WAV (downmixed)", _json(_audio_conv("x.wav"), files=_files(x__wav=_wav_bytes(_tone(0.5, 16000, 2), 16000))),
         "loads", check=_audio_is(16000, 2)),
    Case("44.1 kHz WAV (resampled)", _json(_audio_conv("x.wav"), files=_files(x__wav=_wav_bytes(_tone(0.5, 44100), 44100))),
         "loads", check=_audio_is(44100, 1)),
    Case("22.05 kHz WAV (resampled)", _json(_audio_conv("x.wav"), files=_files(x__wav=_wav_bytes(_tone(0.5, 22050), 22050))),
         "loads", check=_audio_is(22050, 1)),
    Case("8 kHz WAV (resampled)", _json(_audio_conv("x.wav"), files=_files(x__wav=_wav_bytes(_tone(0.5, 8000), 8000))),
         "loads", check=_audio_is(8000, 1)),
    # markers
    Case("marker without media", _json(_conv()), "error", "image", "marker mismatch"),
    Case("media without marker", _json(_conv(text=QUESTION, image="ok.png")), "error", "image", "marker mismatch"),
    Case("audio marker, image file", _json(_conv(text="<audio> hi", image="ok.png")), "error", "image", "marker mismatch"),
    # records and conversations
    Case("conversations is a string", _json({"id": "x", "conversations": "hi"}), "error", "conversations"),
    Case("conversations is empty", _json({"id": "x", "conversations": []}), "error", "conversations"),
    Case("turn is not an object", _json({"id": "x", "conversations": ["hi"]}), "error", "conversations[0]"),
    Case("value is an int", _json({"id": "x", "conversations": [{"from": "human", "value": 3}]}), "error",
         "conversations[0].value"),
    Case("unknown 'from'", _json({"id": "x", "conversations": [{"from": "robot", "value": "hi"}]}), "error",
         "conversations[0].from"),
    Case("'from' is a list", _json({"id": "x", "conversations": [{"from": ["human"], "value": "hi"}]}), "error",
         "conversations[0].from"),
    Case("no assistant turn", _json({"id": "x", "conversations": [{"from": "human", "value": "hi"}]}), "error", "conversations",
         "nothing to learn"),
    Case("conversation starting with the assistant", _json({"id": "x", "conversations": [{"from": "gpt", "value": "hi"}]}),
         "error", "conversations[0]"),
    Case("record is not an object", _json("just a string"), "error", "record", sample_id="data.json#1"),
    Case("id is a list", _json({**_conv(image="ok.png"), "id": ["x"]}), "error", "id", sample_id="data.json#1"),
    Case("missing id (defaults to file#index)", _json({k: v for k, v in _conv(image="ok.png").items() if k != "id"}), "loads",
         check=_id_is("data.json#1")),
    Case("duplicate id", _json(_conv(image="ok.png"), _conv(image="ok.png")), "error", "id", "duplicate id"),
    Case("meta is a list", _json(_conv(image="ok.png", meta=[1])), "error", "meta"),
    Case("media field is a number", _json(_conv(image=5)), "error", "image[0]"),
    Case("text far over the context", _json(_conv(image="ok.png", text="<image>" + QUESTION * 400)), "error", "input_ids",
         "too long"),
    # paths
    Case("path escaping the root (../../etc/passwd)", _json(_conv(image="../../etc/passwd")), "error", "image[0]",
         "path outside root"),
    Case("absolute path outside the root", _json(_conv(image="/etc/hostname")), "error", "image[0]", "path outside root"),
    Case("URL instead of a path", _json(_conv(image="https://example.com/a.png")), "error", "image[0]", "missing file"),
    Case("'..' that stays inside the root", _json(_conv(image="sub/../ok.png")), "loads", check=_id_is("x")),
    # text encoding, broken files
    Case("invalid UTF-8 in the JSON file", _raw(BAD_UTF8), "file error", f"data.json: not valid UTF-8 at byte {BAD_UTF8_AT}"),
    Case("lone surrogate in a text field", _json(_conv(image="ok.png", text="<image>\ud800?")), "error", "conversations[0].value",
         "invalid text"),
    Case("invalid JSON", _raw(b'[{"id": "x",'), "file error", "data.json: invalid JSON"),
    Case("JSON object instead of a list", _raw(b'{"id": "x"}'), "file error", "data.json: expected a list of objects"),
    Case("JSON nested 100000 deep", _raw(b"[" * 100_000 + b"]" * 100_000), "file error", "data.json: invalid JSON (nested too deeply)"),
    # interleaved documents
    Case("OBELICS document", _json({"id": "x", "texts": ["intro", None, "a red square.", "more.", None, "a cat."],
                                    "images": [None, "ok.png", None, None, "ok.png", None]}), "loads", check=_text_is(OBELICS_TEXT)),
    Case("OBELICS position with both text and image", _json({"id": "x", "texts": ["a", "b"], "images": [None, "ok.png"]}),
         "error", "texts[1]"),
    Case("OBELICS lists of different lengths", _json({"id": "x", "texts": ["a", None], "images": [None]}), "error", "images"),
    Case("OBELICS text is a number", _json({"id": "x", "texts": [None, 5], "images": ["ok.png", None]}), "error", "texts[1]"),
    Case("OBELICS image missing on disk", _json({"id": "x", "texts": [None, "a"], "images": ["nope.png", None]}), "error",
         "image[0]", "missing file"),
    Case("content entries document", _json({"id": "x", "content": [{"type": "image", "image": "ok.png"},
                                                                   {"type": "text", "text": "a red square."}]}),
         "loads", check=_text_is("<image>a red square.<|endofchunk|>")),
    Case("content entry of unknown type", _json({"id": "x", "content": [{"type": "image", "image": "ok.png"}, {"type": "gif"}]}),
         "error", "content[1]"),
    Case("content image entry without its image", _json({"id": "x", "content": [{"type": "image"}]}), "error", "content[0].image"),
    # Hugging Face datasets
    Case("HF Image() column, grayscale", _hf(_conv(image=Image.new("L", (16, 16), 128)), as_dataset=True), "loads",
         check=_pixels_are(128)),
    Case("HF Image(decode=False), corrupt bytes", _hf(_conv(image={"bytes": CORRUPT_PNG, "path": None}), as_dataset=True),
         "error", "image[0]", "unreadable image"),
    Case("HF caption pairs", _hf({"id": "x", "image": Image.new("RGB", (16, 16), (255, 255, 255)), "caption": "white."},
                                as_dataset=True), "loads", check=_pixels_are(255)),
    Case("HF Audio(decode=False) bytes at 44.1 kHz", _hf(_audio_conv({"bytes": _wav_bytes(_tone(0.5, 44100), 44100), "path": None}),
                                                       as_dataset=True), "loads", check=_audio_item_is(0.4)),
    Case("HF audio array at 8 kHz", _hf(_audio_conv({"array": _tone(0.5, 8000), "sampling_rate": 8000}), as_dataset=True),
         "loads", check=_audio_item_is(0.4)),
    Case("HF audio array without a rate", _hf(_audio_conv({"array": _tone(0.5, 8000), "sampling_rate": None})), "error",
         "audio[0]", "bad audio"),
    Case("HF decoded audio (torchcodec decoder, stereo 8 kHz)", _hf(_audio_conv(_FakeAudioDecoder())), "loads",
         check=_audio_item_is(0.2)),
]


# -- running a case ---------------------------------------------------------------------------------------
def _run(case: Case, directory: Path, model, policy: str):
    """Load, process and collate the case's data under ``policy``: ("ok", (samples, outputs, batch,
    log)) or ("error", the ValueError)."""
    directory.mkdir(parents=True)
    data = case.build(directory)
    processor = processor_with_policy(model, policy)
    log = processor.bad_samples  # the loader's skips are counted with the processor's
    try:
        if isinstance(data, Path):
            samples = load_samples(data, on_bad_sample=policy, log=log if policy == "skip" else None)
        else:
            samples = samples_from_hf(data, root=directory, name="hf", on_bad_sample=policy, log=log if policy == "skip" else None)
        outputs = [processor(sample) for sample in samples]
        batch = Collator(model.tokenizer.pad_token_id)(outputs)
    except ValueError as err:
        return "error", err
    return "ok", (samples, outputs, batch, log)


def check_case(case: Case, directory: Path, model) -> tuple[str, str]:
    """Run ``case`` under both policies and assert what it must do; its outcome under each."""
    status, result = _run(case, directory / "error", model, "error")
    if case.expect == "loads":
        assert status == "ok", f"{case.name}: {result}"
        samples, outputs, batch, log = result
        assert len(log) == 0 and batch["skipped"] == [] and batch["ids"] == [s.id for s in samples]
        encoded = {o.id: o for o in outputs}
        sample = samples[-1]
        case.check(encoded[sample.id], sample, directory / "error")
        status, result = _run(case, directory / "skip", model, "skip")
        assert status == "ok" and len(result[3]) == 0 and result[2]["ids"] == batch["ids"]
        return "loaded", "loaded"
    assert status == "error", f"{case.name}: expected an error, got {result}"
    message = str(result)
    if case.expect == "file error":
        assert case.field in message, message
        status, result = _run(case, directory / "skip", model, "skip")
        assert status == "error" and case.field in str(result), "a broken file is an error under either policy"
        return "clear error (file)", "clear error (file)"
    assert isinstance(result, BadSample), repr(result)
    assert f"sample {case.sample_id!r}: {case.field}: " in message, message
    assert (result.sample_id, result.field, result.kind) == (case.sample_id, case.field, case.kind), message
    status, result = _run(case, directory / "skip", model, "skip")
    assert status == "ok", f"{case.name}: under 'skip': {result}"
    samples, outputs, batch, log = result
    (record,) = list(log)
    assert (record.sample_id, record.field, record.kind) == (case.sample_id, case.field, case.kind)
    assert f"sample {case.sample_id!r}: {case.field}: " in record.message
    assert batch["ids"] == ["ok"] + (["x"] if case.name == "duplicate id" else [])  # the good samples go on
    assert batch["skipped"] in ([], [record])  # the processor's skips travel with the batch, the loader's are in the log
    assert log.counts() == {case.kind: 1} and f"skipped 1 bad sample(s): 1 {case.kind}" in log.summary()
    return "clear error", f"skipped and counted ({case.kind})"


RESULTS: dict[str, tuple[str, str]] = {}


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_case(case, tmp_path, model):
    RESULTS[case.name] = check_case(case, tmp_path, model)


def test_bad_input_table(tmp_path, model):
    """The table: every case, its outcome under each policy, and the counts; crashes = 0."""
    rows = []
    for i, case in enumerate(CASES):
        if case.name not in RESULTS:  # this test run alone
            try:
                RESULTS[case.name] = check_case(case, tmp_path / str(i), model)
            except AssertionError as err:
                RESULTS[case.name] = (f"wrong: {err}", "")
            except Exception as err:  # noqa: BLE001 - a crash is what the table counts
                RESULTS[case.name] = (f"crash: {type(err).__name__}: {err}", "")
        rows.append((case.name, *RESULTS[case.name]))
    width = max(len(r[0]) for r in rows)
    print(f"\n{'case':<{width}} | on_bad_sample='error' | on_bad_sample='skip'")
    for name, under_error, under_skip in rows:
        print(f"{name:<{width}} | {under_error:<21} | {under_skip}")
    counts = {
        "cases tried": len(rows),
        "clear errors": sum(r[1].startswith("clear error") for r in rows),
        "skipped and counted": sum(r[2].startswith("skipped and counted") for r in rows),
        "loaded": sum(r[1] == "loaded" for r in rows),
        "crashes": sum(r[1].startswith(("crash", "wrong")) for r in rows),
    }
    print(", ".join(f"{k}: {v}" for k, v in counts.items()))
    assert counts["crashes"] == 0, [r for r in rows if r[1].startswith(("crash", "wrong"))]
    assert counts["clear errors"] + counts["loaded"] == counts["cases tried"]
    assert counts["skipped and counted"] == sum(c.expect == "error" for c in CASES)


# -- skipping across loader workers --------------------------------------------------------------------------
def test_skips_are_counted_across_loader_workers(tmp_path, model):
    """Records skipped in worker processes reach the main process with the batches; a batch of skipped
    samples only comes through empty; under "error" the worker's BadSample is re-raised as one."""
    Image.new("RGB", (16, 16), (255, 0, 0)).save(tmp_path / "ok.png")
    (tmp_path / "corrupt.png").write_bytes(CORRUPT_PNG)
    records = [_conv("ok1", image="ok.png"), _conv("missing", image="nope.png"), _conv("ok2", image="ok.png"),
               _conv("ok3", image="ok.png"), _conv("corrupt", image="corrupt.png"),
               _conv("long", image="ok.png", text="<image>" + QUESTION * 400)]
    (tmp_path / "data.json").write_text(json.dumps(records))
    samples = load_samples(tmp_path / "data.json")
    processor = processor_with_policy(model, "skip")
    loader = torch.utils.data.DataLoader(ProcessedDataset(samples, processor), batch_size=2, num_workers=2,
                                         collate_fn=Collator(model.tokenizer.pad_token_id))
    log, ids, shapes = BadSampleLog(), [], []
    for batch in loader:
        log.add(batch["skipped"])
        ids += batch["ids"]
        shapes.append(tuple(batch["input_ids"].shape))
    assert ids == ["ok1", "ok2", "ok3"]
    assert [r.sample_id for r in log] == ["missing", "corrupt", "long"]
    assert log.counts() == {"missing file": 1, "unreadable image": 1, "too long": 1}
    assert shapes[2] == (0, 0)  # both samples of the last batch were skipped
    assert len(processor.bad_samples) == 0  # the workers' logs were copies: only the batches carry the records
    strict = torch.utils.data.DataLoader(ProcessedDataset(samples, processor_with_policy(model, "error")), batch_size=2, num_workers=2,
                                         collate_fn=Collator(model.tokenizer.pad_token_id))
    with pytest.raises(BadSample, match=r"sample 'missing': image\[0\]: file .*nope.png' does not exist"):
        list(strict)


def test_a_chat_template_refusing_a_conversation_is_a_bad_sample(model, tmp_path):
    strict = ("{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
              "{{ raise_exception('roles must alternate user/assistant') }}{% endif %}{{ m['content'] }}{% endfor %}")
    processor = Processor(model.tokenizer, model.media_processors, model.media_token_count, model.fusion.layout,
                          chat_template=strict)
    with pytest.raises(BadSample, match=r"sample 'x': conversations: the chat template refuses it \(roles must alternate"):
        processor(Sample("x", [Message("user", "a"), Message("user", "b"), Message("assistant", "c")]))


def test_log_counts_each_sample_once_and_summarises():
    log = BadSampleLog()
    errors = [BadSample.of(f"s{i}", "image[0]", "cannot read it", kind="unreadable image") for i in range(6)]
    errors.append(BadSample.of("t", "input_ids", "too many tokens", kind="too long"))
    records = [log.record(err) for err in errors]
    log.add(records)  # the same records arriving again in batches
    assert len(log) == 7 and log.counts() == {"unreadable image": 6, "too long": 1}
    summary = log.summary(first=2).splitlines()
    assert summary[0] == "skipped 7 bad sample(s): 6 unreadable image, 1 too long"
    assert summary[1:] == ["  sample 's0': image[0]: cannot read it", "  sample 's1': image[0]: cannot read it", "  ... and 5 more"]
    assert BadSampleLog().summary() == "skipped no bad samples"
    with pytest.raises(ValueError, match="needs a log"):
        samples_from_hf([], on_bad_sample="skip")
    with pytest.raises(ValueError, match="on_bad_sample must be one of"):
        samples_from_hf([], on_bad_sample="ignore")


# -- media details ---------------------------------------------------------------------------------------------
def test_unusual_images_convert_to_the_right_rgb_values(tmp_path):
    sixteen = Image.fromarray(np.array([[0, 32896, 65535]], np.uint16))
    assert np.asarray(load_image(sixteen)).tolist() == [[[0] * 3, [128] * 3, [255] * 3]]
    assert np.asarray(sixteen.convert("RGB"))[0, 1].tolist() == [255] * 3  # what PIL alone does: clips
    rgba = Image.new("RGBA", (2, 1), (255, 0, 0, 128))
    rgba.putpixel((1, 0), (0, 0, 0, 0))
    assert np.asarray(load_image(rgba)).tolist() == [[[255, 127, 127], [255, 255, 255]]]
    palette = _palette_with_transparency()
    palette.putpalette([0, 0, 255, 0, 0, 255] + [0] * 762)
    palette.putpixel((1, 0), 1)  # index 1: opaque blue
    palette.save(tmp_path / "p.png")
    pixels = np.asarray(load_image(tmp_path / "p.png"))
    assert pixels[0, 0].tolist() == [255, 255, 255] and pixels[0, 1].tolist() == [0, 0, 255]
    assert np.asarray(load_image(Image.new("LA", (1, 1), (0, 0))))[0, 0].tolist() == [255, 255, 255]


def test_media_items_may_be_bytes(tmp_path):
    png = _png_bytes(Image.new("RGB", (4, 4), (10, 20, 30)))
    assert np.asarray(load_image(png))[0, 0].tolist() == [10, 20, 30]
    assert np.allclose(load_audio(WAV, 16000), load_audio({"array": _tone(0.5, 16000), "sampling_rate": 16000}, 16000), atol=1e-4)
    frames = [Image.new("RGB", (4, 4), (i * 50, 0, 0)) for i in range(4)]
    gif = io.BytesIO()
    frames[0].save(gif, format="GIF", save_all=True, append_images=frames[1:])
    assert [img.getpixel((0, 0))[0] for img in load_video(gif.getvalue(), 2)] == [0, 150]
    assert len(load_video([_png_bytes(f) for f in frames], 4)) == 4
    with pytest.raises(BadSample, match=r"sample 's': image\[0\]: cannot read <60 bytes in memory> as an image"):
        load_image(CORRUPT_PNG, "s")
    with pytest.raises(BadSample, match=r"sample 's': audio\[2\]: .*<\d+ bytes in memory> is truncated"):
        load_audio(WAV[:5000], 16000, "s", 2)
    with pytest.raises(BadSample, match=r"video\[0\]: the item is empty \(0 bytes in memory\)"):
        load_video(b"", 2)
    with pytest.raises(BadSample, match=r"image\[0\]: expected a file path or the file's bytes, got int"):
        load_image(7)


def test_padding_to_a_square_respects_the_pixel_limit(model):
    processor = MediaProcessor("image", model.media_processors["image"].hf_processor, max_image_pixels=1000)
    assert processor(Image.new("RGB", (30, 30))).shape == (3, 16, 16)
    with pytest.raises(BadSample, match=r"image\[0\]: padding the 40x10 image to a square makes 1600 pixels") as err:
        processor(Image.new("RGB", (40, 10)))
    assert err.value.kind == "image too large"


def test_paths_outside_the_root_load_only_when_allowed(tmp_path):
    Image.new("RGB", (4, 4)).save(tmp_path / "outside.png")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "d.json").write_text(json.dumps([_conv(image="../outside.png")]))
    with pytest.raises(BadSample, match=r"image\[0\]: '../outside.png' resolves to .*outside the dataset directory"):
        load_samples(tmp_path / "data" / "d.json")
    (sample,) = load_samples(tmp_path / "data" / "d.json", allow_outside_root=True)
    assert sample.media["image"] == [tmp_path / "outside.png"]


def test_hf_audio_rate_may_be_a_0d_array():
    """``dataset.with_format("numpy")`` gives the sampling rate as a 0-d array."""
    rows = [_audio_conv({"array": _tone(0.5, 8000), "sampling_rate": np.array(8000)})]
    (sample,) = samples_from_hf(rows)
    assert sample.media["audio"][0]["sampling_rate"] == 8000
    assert load_audio(sample.media["audio"][0], 16000).shape == (8000,)


def test_old_configs_with_on_overflow_still_load(tokenizer_dir):
    from mmfuse.config import MultimodalConfig

    data = tiny_config(tokenizer_dir).to_dict()
    data["on_overflow"] = data.pop("on_bad_sample")
    data["on_overflow"] = "skip"
    assert MultimodalConfig.from_dict(data).on_bad_sample == "skip"


def test_json_text_details(tmp_path):
    """A byte-order mark is allowed (and counted in the offset of a bad byte); JSON lines end at "\\n"
    only, so a raw U+2028 inside a string stays in its record."""
    (tmp_path / "bom.json").write_bytes(b"\xef\xbb\xbf" + json.dumps([_conv(image="a.png")]).encode())
    assert [s.id for s in load_samples(tmp_path / "bom.json")] == ["x"]
    (tmp_path / "bad.json").write_bytes(b"\xef\xbb\xbf[\xff]")
    with pytest.raises(ValueError, match="bad.json: not valid UTF-8 at byte 4"):
        load_samples(tmp_path / "bad.json")
    line = json.dumps(_conv(image="a.png", answer="red\u2028blue"), ensure_ascii=False)
    (tmp_path / "d.jsonl").write_text(line + "\n\n" + line.replace('"x"', '"y"') + "\n")
    first, second = load_samples(tmp_path / "d.jsonl")
    assert first.messages[1].content == "red\u2028blue" and second.id == "y"
    (tmp_path / "e.jsonl").write_text(line + "\n{oops\n")
    with pytest.raises(ValueError, match=r"e.jsonl:2: invalid JSON"):
        load_samples(tmp_path / "e.jsonl")
    log = BadSampleLog()  # under skip, one bad line costs one record, not the file
    assert [s.id for s in load_samples(tmp_path / "e.jsonl", on_bad_sample="skip", log=log)] == ["x"]
    assert log.counts() == {"invalid JSON": 1} and "e.jsonl:2" in next(iter(log)).message
