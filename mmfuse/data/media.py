"""Media loading and validation: files, bytes or loaded items to the tensors an encoder takes.

An item is a file path, the file's bytes (e.g. from a webdataset shard), or an already loaded item: a
PIL image, an audio array. Every problem raises :class:`BadSample` naming the sample id and the field
(``image[0]``), and the file (or ``<N bytes in memory>``): a missing, empty or undecodable file, an image
over ``max_pixels`` (decompression bombs), a truncated WAV, an absurd sampling rate, NaN samples, a clip
longer than the encoder's window, a video with too few frames. Nothing is dropped silently.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageSequence

from ..config import TEXT_PROMPT
from .badsamples import BadSample

AUDIO_RATE_DEFAULT = 16000
AUDIO_RATE_RANGE = (1000, 384_000)  # Hz; a file claiming a rate outside it is corrupt
AUDIO_PEAK_LIMIT = 100.0  # 40 dB over full scale: larger samples are not audio (corrupt floats, unscaled integers)
AUDIO_MAX_SECONDS = 600  # a longer file is refused before it is read (a header may claim days of audio)
AUDIO_MAX_CHANNELS = 32
MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS  # about 89.5 M, PIL's own decompression-bomb threshold
BACKGROUND = (255, 255, 255)  # transparent pixels are composited on white
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
# what PIL raises for data it cannot decode (its plugins' SyntaxError "broken PNG file", ValueError "Truncated
# IHDR chunk", ...); a BadSample raised inside is re-raised first
_UNDECODABLE = (OSError, SyntaxError, ValueError, EOFError)


def _source(item: Any, sample_id: str, field: str) -> tuple[Any, str]:
    """A path or bytes -> (what PIL / soundfile open, how errors name it)."""
    if isinstance(item, (bytes, bytearray)):
        if not item:
            raise BadSample.of(sample_id, field, "the item is empty (0 bytes in memory)", kind="empty file")
        return io.BytesIO(item), f"<{len(item)} bytes in memory>"
    if not isinstance(item, (str, Path)):
        raise BadSample.of(sample_id, field, f"expected a file path or the file's bytes, got {type(item).__name__}")
    path = Path(item)
    if not path.is_file():
        raise BadSample.of(sample_id, field, f"file {str(path)!r} does not exist", kind="missing file")
    if path.stat().st_size == 0:
        raise BadSample.of(sample_id, field, f"file {str(path)!r} is empty (0 bytes)", kind="empty file")
    return path, repr(str(path))


def to_rgb(image: Image.Image, background: tuple[int, int, int] = BACKGROUND) -> Image.Image:
    """Any PIL mode -> RGB. 16-bit grayscale is scaled (65535 -> 255; PIL's own conversion clips it) and
    32-bit integer images are read as 16-bit; transparency (RGBA, LA, a palette's or RGB's transparent
    colour) is composited on ``background`` rather than dropped."""
    if image.mode in _SIXTEEN_BIT_MODES:
        levels = np.asarray(image).astype(np.float64).clip(0, 65535) / 257
        image = Image.fromarray(levels.round().astype(np.uint8), "L")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        canvas = Image.new("RGBA", image.size, (*background, 255))
        canvas.alpha_composite(image.convert("RGBA"))
        return canvas.convert("RGB")
    return image.convert("RGB")


def _decoded(image: Image.Image, sample_id: str, field: str, name: str, max_pixels: int) -> Image.Image:
    """Check the size from the header, then decode; ``image`` is not decoded before the check."""
    width, height = image.size
    if width < 1 or height < 1:
        raise BadSample.of(sample_id, field, f"{name} is {width}x{height} pixels", kind="unreadable image")
    if width * height > max_pixels:
        raise BadSample.of(sample_id, field, f"{name} is {width}x{height} = {width * height} pixels, more than the "
                           f"limit of {max_pixels} (a decompression bomb?); raise max_image_pixels to read it",
                           kind="image too large")
    image.load()
    return to_rgb(image)


def load_image(item: Any, sample_id: str = "?", index: int = 0, *, max_pixels: int = MAX_IMAGE_PIXELS,
               field: str = "image") -> Image.Image:
    """A path, the file's bytes or a PIL image -> RGB PIL image (see :func:`to_rgb`). An image of more
    than ``max_pixels`` is refused from its header, before decoding (PIL itself refuses above twice
    ``PIL.Image.MAX_IMAGE_PIXELS``, so a larger ``max_pixels`` also needs that raised)."""
    field, name = f"{field}[{index}]", "the image"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # max_pixels decides instead
            if isinstance(item, Image.Image):  # may still be undecoded (a Hugging Face datasets image)
                return _decoded(item, sample_id, field, name, max_pixels)
            source, name = _source(item, sample_id, field)
            with Image.open(source) as img:
                return _decoded(img, sample_id, field, name, max_pixels)
    except BadSample:
        raise
    except Image.DecompressionBombError as err:
        raise BadSample.of(sample_id, field, f"{str(err).rstrip('.')}; raise max_image_pixels and PIL.Image.MAX_IMAGE_PIXELS "
                           "to read it", kind="image too large") from err
    except _UNDECODABLE as err:
        raise BadSample.of(sample_id, field, f"cannot read {name} as an image ({err})", kind="unreadable image") from err


def pad_to_square(image: Image.Image, fill: tuple[int, int, int]) -> Image.Image:
    """LLaVA-1.5's ``image_aspect_ratio pad``: centre the image on a square of the mean colour."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = Image.new("RGB", (side, side), fill)
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


def _wav_declared_frames(head: bytes) -> int | None:
    """The frame count a RIFF/WAVE header declares; None when ``head`` is not a WAV header or the
    length is unknown (a streamed WAV, or chunks before ``data`` longer than ``head``)."""
    if head[:4] != b"RIFF" or head[8:12] != b"WAVE":
        return None
    pos, block_align = 12, 0
    while pos + 8 <= len(head):
        chunk, size = head[pos : pos + 4], int.from_bytes(head[pos + 4 : pos + 8], "little")
        if chunk == b"fmt " and pos + 22 <= len(head):
            block_align = int.from_bytes(head[pos + 20 : pos + 22], "little")
        if chunk == b"data":
            return size // block_align if block_align and size not in (0, 0xFFFFFFFF) else None
        pos += 8 + size + (size & 1)
    return None


def _checked_rate(rate: Any, sample_id: str, field: str) -> int:
    if isinstance(rate, bool) or not isinstance(rate, (int, np.integer)):
        raise BadSample.of(sample_id, field, f"the sampling rate must be an integer, got {rate!r}", kind="bad audio")
    low, high = AUDIO_RATE_RANGE
    if not low <= rate <= high:
        raise BadSample.of(sample_id, field, f"sampling rate {rate} Hz is outside {low}..{high} Hz", kind="bad audio")
    return int(rate)


def _read_audio(item: Any, sample_id: str, field: str) -> tuple[np.ndarray, int]:
    """A path or bytes -> ``(samples, channels)`` float32 and the file's rate. A WAV holding fewer frames
    than its header declares is an error (libsndfile would silently read the part that is there)."""
    import soundfile

    source, name = _source(item, sample_id, field)
    try:
        with soundfile.SoundFile(source) as f:
            rate = _checked_rate(f.samplerate, sample_id, field)
            if f.channels > AUDIO_MAX_CHANNELS:
                raise BadSample.of(sample_id, field, f"{name} has {f.channels} channels, more than {AUDIO_MAX_CHANNELS}",
                                   kind="bad audio")
            if f.frames > AUDIO_MAX_SECONDS * rate:
                raise BadSample.of(sample_id, field, f"{name} is {f.frames / rate:.0f} s long by its header, more than the "
                                   f"{AUDIO_MAX_SECONDS} s read", kind="too long")
            wave = f.read(dtype="float32", always_2d=True)
    except soundfile.LibsndfileError as err:
        raise BadSample.of(sample_id, field, f"cannot read {name} as audio ({err.error_string})",
                           kind="unreadable audio") from err
    if isinstance(source, io.BytesIO):
        head = source.getvalue()[:65536]
    else:
        with open(source, "rb") as f:
            head = f.read(65536)
    declared = _wav_declared_frames(head)
    if declared is not None and wave.shape[0] < declared:
        raise BadSample.of(sample_id, field, f"{name} is truncated: its header declares {declared} frames, the file "
                           f"holds {wave.shape[0]}", kind="truncated audio")
    return wave, rate


def load_audio(item: Any, rate: int, sample_id: str = "?", index: int = 0) -> np.ndarray:
    """An audio file (path or bytes: WAV, FLAC, OGG, ...), a 1-D array already at ``rate`` Hz, or a
    Hugging Face audio dict ``{"array", "sampling_rate"}`` -> mono float32 ``(samples,)`` at ``rate`` Hz.

    Several channels are downmixed to their mean; another sampling rate is resampled (polyphase). A
    rate outside ``AUDIO_RATE_RANGE``, an empty clip, NaN or infinite samples, samples beyond
    ``AUDIO_PEAK_LIMIT``, and files longer than ``AUDIO_MAX_SECONDS`` or with more than
    ``AUDIO_MAX_CHANNELS`` are errors.
    """
    field = f"audio[{index}]"
    if isinstance(item, dict) and "array" in item:
        wave, source_rate = item["array"], item.get("sampling_rate")
    elif isinstance(item, np.ndarray):
        wave, source_rate = item, rate
    else:
        wave, source_rate = _read_audio(item, sample_id, field)
        with np.errstate(invalid="ignore", over="ignore"):  # a corrupt file's inf/NaN samples: refused just below
            wave = wave.mean(axis=1)
    source_rate = _checked_rate(source_rate, sample_id, field)
    try:
        wave = np.asarray(wave, dtype=np.float32)
    except (TypeError, ValueError) as err:
        raise BadSample.of(sample_id, field, f"the samples are not numbers ({err})", kind="bad audio") from err
    if wave.ndim != 1:
        raise BadSample.of(sample_id, field, f"expected mono samples, got an array of shape {wave.shape}", kind="bad audio")
    if wave.size == 0:
        raise BadSample.of(sample_id, field, "the clip is empty", kind="bad audio")
    if not np.isfinite(wave).all():
        raise BadSample.of(sample_id, field, "the clip contains NaN or infinite samples", kind="bad audio")
    peak = float(np.abs(wave).max())
    if peak > AUDIO_PEAK_LIMIT:
        raise BadSample.of(sample_id, field, f"samples reach {peak:.3g}; audio is expected within [-1, 1] (at most "
                           f"{AUDIO_PEAK_LIMIT:g}): integer samples need scaling, or the file is corrupt", kind="bad audio")
    if source_rate != rate:
        from math import gcd

        from scipy.signal import resample_poly

        g = gcd(int(source_rate), int(rate))
        wave = resample_poly(wave, rate // g, int(source_rate) // g).astype(np.float32)
    return wave


def load_video(item: Any, frames: int, sample_id: str = "?", index: int = 0, *,
               max_pixels: int = MAX_IMAGE_PIXELS) -> list[Image.Image]:
    """An animated GIF (path or bytes) / directory of frames / list of frames (paths, bytes or images)
    -> ``frames`` RGB frames, evenly sampled."""
    field = f"video[{index}]"
    if isinstance(item, (list, tuple)):
        all_frames = [load_image(f, sample_id, index, max_pixels=max_pixels, field="video") for f in item]
    elif isinstance(item, (str, Path)) and Path(item).is_dir():
        files = sorted(f for f in Path(item).iterdir() if f.suffix.lower() in (".png", ".jpg", ".jpeg"))
        all_frames = [load_image(f, sample_id, index, max_pixels=max_pixels, field="video") for f in files]
    else:
        source, name = _source(item, sample_id, field)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                with Image.open(source) as img:
                    _decoded(img, sample_id, field, name, max_pixels)  # the size check, on the first frame
                    all_frames = [to_rgb(frame) for frame in ImageSequence.Iterator(img)]
        except BadSample:
            raise
        except (*_UNDECODABLE, Image.DecompressionBombError) as err:
            raise BadSample.of(sample_id, field, f"cannot read {name} as a video ({err})", kind="unreadable video") from err
    if len(all_frames) < frames:
        raise BadSample.of(sample_id, field, f"the video has {len(all_frames)} frame(s), fewer than the {frames} the "
                           "encoder samples", kind="unreadable video")
    picks = np.linspace(0, len(all_frames) - 1, frames).round().astype(int)
    return [all_frames[i] for i in picks]


def save_media(modality: str, item: torch.Tensor, path: str | Path, sampling_rate: int = AUDIO_RATE_DEFAULT) -> None:
    """Write a decoded item: an image ``(3, H, W)`` in [0, 1] as PNG, audio ``(samples,)`` in [-1, 1] as
    16-bit WAV at ``sampling_rate``."""
    import soundfile

    if modality == "audio":
        soundfile.write(str(path), item.detach().float().clamp(-1, 1).cpu().numpy(), sampling_rate, subtype="PCM_16")
    elif modality == "image":
        pixels = (item.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
        Image.fromarray(pixels).save(path, format="PNG")
    else:
        raise ValueError(f"cannot save generated {modality!r}: only image and audio are written")


class MediaProcessor:
    """Turns one modality's raw items into the encoder's input tensor.

    image: ``(3, H, W)``; video: ``(frames, 3, H, W)``; audio: ``(mel, frames)`` (Whisper) or
    ``(samples,)`` (wav2vec2); text_prompt: a string to its token ids ``(max_tokens,)``, -1 after its
    end. ``hf_processor`` is a transformers image processor or feature extractor (a tokenizer for
    text_prompt). ``max_image_pixels``: larger images (or, with ``pad_to_square``, images whose padded
    square is larger) are refused.
    """

    def __init__(self, modality: str, hf_processor, *, pad_to_square: bool = True, frames: int = 8,
                 max_image_pixels: int = MAX_IMAGE_PIXELS, max_tokens: int = 40):
        self.modality = modality
        self.hf_processor = hf_processor
        self.pad_to_square = pad_to_square
        self.frames = frames
        self.max_image_pixels = max_image_pixels
        self.max_tokens = max_tokens

    @property
    def sampling_rate(self) -> int:
        return getattr(self.hf_processor, "sampling_rate", AUDIO_RATE_DEFAULT)

    def save_pretrained(self, directory: str | Path) -> None:
        """Write the Hugging Face processor into ``directory`` (a checkpoint's ``processors/<m>``)."""
        self.hf_processor.save_pretrained(str(directory))

    def __call__(self, item: Any, sample_id: str = "?", index: int = 0) -> torch.Tensor:
        """One item -> the encoder's input; :class:`BadSample` naming ``sample_id`` and the field otherwise."""
        if self.modality == "image":
            return self._images([load_image(item, sample_id, index, max_pixels=self.max_image_pixels)], sample_id, index)[0]
        if self.modality == "video":
            frames = load_video(item, self.frames, sample_id, index, max_pixels=self.max_image_pixels)
            return self._images(frames, sample_id, index)
        if self.modality == TEXT_PROMPT:
            return self._prompt(item, sample_id, index)
        return self._audio(load_audio(item, self.sampling_rate, sample_id, index), sample_id, index)

    def _images(self, images: list[Image.Image], sample_id: str, index: int) -> torch.Tensor:
        if self.pad_to_square:
            width, height = max((img.size for img in images), key=max)
            side = max(width, height)
            if side * side > self.max_image_pixels:
                raise BadSample.of(sample_id, f"{self.modality}[{index}]", f"padding the {width}x{height} image to a square "
                                   f"makes {side * side} pixels, more than the limit of {self.max_image_pixels}; raise "
                                   "max_image_pixels to read it", kind="image too large")
            mean = getattr(self.hf_processor, "image_mean", None) or [0.5, 0.5, 0.5]
            fill = tuple(int(round(255 * m)) for m in mean)
            images = [pad_to_square(img, fill) for img in images]
        return self.hf_processor(images=images, return_tensors="pt")["pixel_values"]

    def _prompt(self, text: str, sample_id: str, index: int) -> torch.Tensor:
        ids = self.hf_processor(text)["input_ids"]
        if not ids or len(ids) > self.max_tokens:
            raise BadSample.of(sample_id, f"text_prompt[{index}]", f"the prompt {text[:40]!r} is {len(ids)} tokens; the text "
                               f"encoder takes 1 to {self.max_tokens} (encoders.text_prompt.max_tokens)", kind="prompt length")
        return torch.tensor(ids + [-1] * (self.max_tokens - len(ids)))

    def _audio(self, wave: np.ndarray, sample_id: str, index: int) -> torch.Tensor:
        limit = getattr(self.hf_processor, "n_samples", None)
        if limit is not None and wave.shape[0] > limit:
            raise BadSample.of(
                sample_id, f"audio[{index}]", f"the clip is {wave.shape[0] / self.sampling_rate:.2f} s, longer than the "
                f"encoder's {limit / self.sampling_rate:.2f} s window; split it or use a longer-window encoder", kind="too long"
            )
        out = self.hf_processor(wave, sampling_rate=self.sampling_rate, return_tensors="pt")
        key = "input_features" if "input_features" in out else "input_values"
        return out[key][0]
