"""Media loading and validation: files (or arrays) to the tensors an encoder takes.

Errors name the sample id and the field, and never pass silently: an unreadable image, a corrupt or
too-long audio clip, a video with too few frames raise ``ValueError``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageSequence, UnidentifiedImageError

AUDIO_RATE_DEFAULT = 16000


def _where(sample_id: str, field: str, index: int) -> str:
    return f"sample {sample_id!r}: {field}[{index}]"


def load_image(item: Any, sample_id: str = "?", index: int = 0) -> Image.Image:
    """A path or PIL image -> RGB PIL image (grayscale, palette and RGBA are converted)."""
    where = _where(sample_id, "image", index)
    if isinstance(item, Image.Image):
        return item.convert("RGB")
    path = Path(item)
    if not path.is_file():
        raise ValueError(f"{where}: file {str(path)!r} does not exist")
    try:
        with Image.open(path) as img:
            img.load()
            return img.convert("RGB")
    except (UnidentifiedImageError, OSError) as err:
        raise ValueError(f"{where}: cannot read {str(path)!r} as an image ({err})") from err


def pad_to_square(image: Image.Image, fill: tuple[int, int, int]) -> Image.Image:
    """LLaVA-1.5's ``image_aspect_ratio pad``: centre the image on a square of the mean colour."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = Image.new("RGB", (side, side), fill)
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


def load_audio(item: Any, rate: int, sample_id: str = "?", index: int = 0) -> np.ndarray:
    """A WAV/FLAC path or a 1-D array -> mono float32 at ``rate`` Hz (resampled when needed)."""
    import soundfile

    where = _where(sample_id, "audio", index)
    if isinstance(item, np.ndarray):
        wave, source_rate = item, rate
    else:
        path = Path(item)
        if not path.is_file():
            raise ValueError(f"{where}: file {str(path)!r} does not exist")
        try:
            wave, source_rate = soundfile.read(str(path), dtype="float32", always_2d=True)
        except (RuntimeError, soundfile.LibsndfileError) as err:
            raise ValueError(f"{where}: cannot read {str(path)!r} as audio ({err})") from err
        wave = wave.mean(axis=1)
    wave = np.asarray(wave, dtype=np.float32)
    if wave.ndim != 1:
        raise ValueError(f"{where}: expected mono samples, got an array of shape {wave.shape}")
    if wave.size == 0:
        raise ValueError(f"{where}: the clip is empty")
    if not np.isfinite(wave).all():
        raise ValueError(f"{where}: the clip contains NaN or infinite samples")
    if source_rate != rate:
        from math import gcd

        from scipy.signal import resample_poly

        g = gcd(int(source_rate), int(rate))
        wave = resample_poly(wave, rate // g, int(source_rate) // g).astype(np.float32)
    return wave


def load_video(item: Any, frames: int, sample_id: str = "?", index: int = 0) -> list[Image.Image]:
    """An animated GIF / directory of frames / list of images -> ``frames`` RGB frames, evenly sampled."""
    where = _where(sample_id, "video", index)
    if isinstance(item, (list, tuple)):
        all_frames = [load_image(f, sample_id, index) for f in item]
    else:
        path = Path(item)
        if path.is_dir():
            all_frames = [load_image(f, sample_id, index) for f in sorted(path.iterdir()) if f.suffix.lower() in (".png", ".jpg", ".jpeg")]
        elif path.is_file():
            try:
                with Image.open(path) as img:
                    all_frames = [frame.convert("RGB") for frame in ImageSequence.Iterator(img)]
            except (UnidentifiedImageError, OSError) as err:
                raise ValueError(f"{where}: cannot read {str(path)!r} as a video ({err})") from err
        else:
            raise ValueError(f"{where}: {str(path)!r} does not exist")
    if len(all_frames) < frames:
        raise ValueError(f"{where}: the video has {len(all_frames)} frame(s), fewer than the {frames} the encoder samples")
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
    ``(samples,)`` (wav2vec2). ``hf_processor`` is a transformers image processor or feature extractor.
    """

    def __init__(self, modality: str, hf_processor, *, pad_to_square: bool = True, frames: int = 8):
        self.modality = modality
        self.hf_processor = hf_processor
        self.pad_to_square = pad_to_square
        self.frames = frames

    @property
    def sampling_rate(self) -> int:
        return getattr(self.hf_processor, "sampling_rate", AUDIO_RATE_DEFAULT)

    def __call__(self, item: Any, sample_id: str = "?", index: int = 0) -> torch.Tensor:
        if self.modality == "image":
            return self._images([load_image(item, sample_id, index)])[0]
        if self.modality == "video":
            return self._images(load_video(item, self.frames, sample_id, index))
        return self._audio(load_audio(item, self.sampling_rate, sample_id, index), sample_id, index)

    def _images(self, images: list[Image.Image]) -> torch.Tensor:
        if self.pad_to_square:
            mean = getattr(self.hf_processor, "image_mean", None) or [0.5, 0.5, 0.5]
            fill = tuple(int(round(255 * m)) for m in mean)
            images = [pad_to_square(img, fill) for img in images]
        return self.hf_processor(images=images, return_tensors="pt")["pixel_values"]

    def _audio(self, wave: np.ndarray, sample_id: str, index: int) -> torch.Tensor:
        limit = getattr(self.hf_processor, "n_samples", None)
        if limit is not None and wave.shape[0] > limit:
            raise ValueError(
                f"{_where(sample_id, 'audio', index)}: the clip is {wave.shape[0] / self.sampling_rate:.2f} s, longer than "
                f"the encoder's {limit / self.sampling_rate:.2f} s window; split it or use a longer-window encoder"
            )
        out = self.hf_processor(wave, sampling_rate=self.sampling_rate, return_tensors="pt")
        key = "input_features" if "input_features" in out else "input_values"
        return out[key][0]
