"""A small FSQ / VQ convolutional autoencoder for the world's 48x48 images (Chameleon-style image tokens).

The encoder halves the resolution ``log2(downsample)`` times (48 px -> 6x6 cells at the default 8),
a vector_quantize_pytorch quantizer (``FSQ``, the default, or ``VectorQuantize`` with an EMA codebook
and k-means init) turns each cell into one code, and a mirrored decoder upsamples the quantized cells
back to pixels. Codes are the cells in raster order: ``(items, (H / downsample) * (W / downsample), 1)``, or, with
``num_queries`` (SEED's learned-query tokenizer), ``num_queries`` codes in a causal 1-D order
(:class:`QueryBottleneck`). :func:`pretrain_image_codec` trains it on fresh world scenes and video frames.

FSQ is the default because its codes are a product of per-dimension levels: trained on the same
world images (held-out pairs excluded, objects repainted off-palette), the FSQ codec decodes held-out
(colour, shape) pairs as recognisably as seen ones, where a learned VQ codebook, which holds only
the cell patterns it saw, turned small green triangles blue and yellow squares round.
"""

from __future__ import annotations

import json
import math
import random
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import ViTImageProcessorPil
from vector_quantize_pytorch import FSQ, SimVQ, VectorQuantize

from mmfuse.backbones.schedules import warmup_cosine
from mmfuse.backbones.world_vision import _off_palette_rgb
from mmfuse.codecs.base import MediaCodec
from mmfuse.data.synth import video
from mmfuse.data.synth.scenes import COLOUR_RGB, COLOURS, IMAGE_SIZE, Scene, Shape, object_map, render_array, sample_scene

QUANTIZERS = ("fsq", "vq", "simvq")
DEFAULT_STEPS = 1200
VIDEO_FRACTION = 0.3  # share of each training batch that is a single frame of a motion video
# Held-out (colour, shape) pairs never appear in training images; repainting objects off-palette with
# this probability shows every shape in many colours, so the codec also reproduces held-out pairs.
RECOLOUR_PROB = 0.3
EVAL_IMAGES = 512


def _norm(width: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(8, width), width)


class _ResBlock(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.body = nn.Sequential(
            _norm(width), nn.SiLU(), nn.Conv2d(width, width, 3, padding=1),
            _norm(width), nn.SiLU(), nn.Conv2d(width, width, 3, padding=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


def resampling(out_side: int, in_side: int) -> torch.Tensor:
    """``(out_side**2, in_side**2)`` weights that resample an ``in_side`` square grid (raster order) to an
    ``out_side`` one bilinearly; each row sums to 1."""
    grid = torch.eye(in_side * in_side).view(-1, 1, in_side, in_side)
    weights = F.interpolate(grid, size=(out_side, out_side), mode="bilinear", align_corners=True).flatten(1).T
    return weights / weights.sum(1, keepdim=True)


class QueryBottleneck(nn.Module):
    """SEED's causal Q-Former, small. ``num_queries`` learned queries read the encoder's cells
    ``(B, cells, dim)`` through cross-attention and each other causally (query ``i`` sees queries
    ``<= i``), so the code at ``i`` never depends on a later one: the left-to-right order an LLM
    generates in (SEED: "causal dependency"), where raster-order grid codes have a 2-D one. The way
    back: one learned query per cell reads the quantized queries ``(B, num_queries, dim)``.

    Each query starts from a learned pooling of the cells (initialised to bilinear resampling of the
    cell grid to a ``sqrt(num_queries)`` square grid) and each cell query from a learned unpooling of
    the queries: from scratch, with neither, the two transformers sat at the mean image for hundreds of
    steps (SEED starts from BLIP-2's pretrained Q-Former). SEED decodes through unCLIP Stable Diffusion
    from the quantized embeddings; here the decoder is this transformer and the codec's conv decoder."""

    def __init__(self, dim: int, side: int, num_queries: int, depth: int, num_heads: int):
        super().__init__()
        query_side = math.isqrt(max(num_queries, 0))
        if num_queries < 1 or query_side**2 != num_queries or depth < 1 or dim % num_heads:
            raise ValueError(f"image codec: num_queries must be a square number, query_depth >= 1 and latent_dim ({dim}) a "
                             f"multiple of query_heads ({num_heads}); got {num_queries}, {depth}, {num_heads}")

        def transformer() -> nn.TransformerDecoder:
            layer = nn.TransformerDecoderLayer(dim, num_heads, 4 * dim, dropout=0.0, batch_first=True, norm_first=True)
            return nn.TransformerDecoder(layer, depth, norm=nn.LayerNorm(dim))

        self.pool = nn.Parameter(resampling(query_side, side))  # (queries, cells)
        self.unpool = nn.Parameter(resampling(side, query_side))  # (cells, queries)
        self.queries = nn.Parameter(torch.randn(num_queries, dim) * 0.02)
        self.cell_positions = nn.Parameter(torch.randn(side * side, dim) * 0.02)
        self.query_positions = nn.Parameter(torch.randn(num_queries, dim) * 0.02)
        self.cell_queries = nn.Parameter(torch.randn(side * side, dim) * 0.02)
        self.reader, self.writer = transformer(), transformer()
        self.register_buffer("causal", nn.Transformer.generate_square_subsequent_mask(num_queries), persistent=False)

    def encode(self, cells: torch.Tensor) -> torch.Tensor:
        """Encoder cells ``(B, cells, dim)`` -> query latents ``(B, num_queries, dim)`` (before quantization)."""
        queries = self.pool @ cells + self.queries
        return self.reader(queries, cells + self.cell_positions, tgt_mask=self.causal, tgt_is_causal=True)

    def decode(self, quantized: torch.Tensor) -> torch.Tensor:
        """Quantized queries ``(B, num_queries, dim)`` -> cells ``(B, cells, dim)`` for the conv decoder."""
        return self.writer(self.unpool @ quantized + self.cell_queries, quantized + self.query_positions)


class ImageCodec(MediaCodec):
    """Conv encoder -> FSQ or VQ -> conv decoder over ``image_size`` RGB images.

    ``widths[i]`` is the channel width after the ``i``-th halving, so ``len(widths)`` must be
    ``log2(downsample)``; ``latent_dim`` is the quantizer's input width; the full-resolution stem has
    ``widths[0] // 2`` channels. ``quantizer="fsq"`` has ``prod(levels)`` codes (1000 by default);
    ``"vq"`` has ``codebook_size`` codes of ``codebook_dim`` dims; settings keep only the chosen
    quantizer's arguments. ``"simvq"`` (SimVQ, Zhu et al. 2024) quantises to a learned linear map of a
    frozen ``(codebook_size, codebook_dim)`` codebook: every code moves with the map, so none is left
    dead. ``text_ids_start`` (SimVQ, UniCode): the frozen codebook holds an LLM's input embeddings of its
    text ids ``text_ids_start + c``, set before training (``pretrain_image_codec(codebook=...)``), so
    image code ``c`` is a linear image of word ``text_ids_start + c``'s vector.
    """

    modality = "image"

    def __init__(
        self,
        *,
        image_size: int = IMAGE_SIZE,
        downsample: int = 8,
        widths: tuple[int, ...] | list[int] = (32, 64, 128),
        latent_dim: int = 64,
        quantizer: str = "fsq",
        codebook_size: int = 512,
        codebook_dim: int = 8,
        levels: tuple[int, ...] | list[int] = (8, 5, 5, 5),
        commitment_weight: float = 0.25,
        num_queries: int = 0,
        query_depth: int = 2,
        query_heads: int = 4,
        text_ids_start: int | None = None,
    ):
        super().__init__()
        halvings = round(math.log2(downsample)) if downsample >= 1 else -1
        if downsample < 2 or 2**halvings != downsample:
            raise ValueError(f"image codec: downsample must be a power of 2 >= 2, got {downsample}")
        if len(widths) != halvings:
            raise ValueError(f"image codec: widths needs one width per halving, log2(downsample={downsample}) = {halvings}; got {list(widths)}")
        if image_size % downsample:
            raise ValueError(f"image codec: image_size {image_size} is not a multiple of downsample {downsample}")
        if quantizer not in QUANTIZERS:
            raise ValueError(f"image codec: quantizer must be one of {QUANTIZERS}, got {quantizer!r}")
        if text_ids_start is not None and quantizer != "simvq":
            raise ValueError(f"image codec: text_ids_start (a codebook of text embeddings) needs quantizer 'simvq', got {quantizer!r}")
        self._settings = {
            "kind": "image", "image_size": image_size, "downsample": downsample, "widths": list(widths),
            "latent_dim": latent_dim, "quantizer": quantizer,
            **({"levels": list(levels)} if quantizer == "fsq" else
               {"codebook_size": codebook_size, "codebook_dim": codebook_dim, "commitment_weight": commitment_weight}),
            **({"num_queries": num_queries, "query_depth": query_depth, "query_heads": query_heads} if num_queries else {}),
            **({"text_ids_start": text_ids_start} if text_ids_start is not None else {}),
        }
        self.text_ids_start = text_ids_start
        self.image_size, self.downsample = image_size, downsample
        stem = widths[0] // 2
        encoder: list[nn.Module] = [nn.Conv2d(3, stem, 3, padding=1)]
        decoder: list[nn.Module] = [nn.Conv2d(latent_dim, widths[-1], 3, padding=1), _ResBlock(widths[-1])]
        for before, after in zip([stem, *widths[:-1]], widths):
            encoder += [nn.Conv2d(before, after, 4, stride=2, padding=1), _ResBlock(after)]
        for before, after in zip(widths[::-1], [*widths[-2::-1], stem]):
            decoder += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(before, after, 3, padding=1), _ResBlock(after)]
        encoder += [_norm(widths[-1]), nn.SiLU(), nn.Conv2d(widths[-1], latent_dim, 1)]
        decoder += [_norm(stem), nn.SiLU(), nn.Conv2d(stem, 3, 3, padding=1)]
        self.encoder, self.decoder = nn.Sequential(*encoder), nn.Sequential(*decoder)
        side = image_size // downsample
        self.bottleneck = QueryBottleneck(latent_dim, side, num_queries, query_depth, query_heads) if num_queries else None
        self.frames = num_queries or side * side
        self.feature_dim = latent_dim
        if quantizer == "vq":
            self.quantizer = VectorQuantize(
                dim=latent_dim, codebook_size=codebook_size, codebook_dim=codebook_dim, decay=0.95,
                kmeans_init=True, threshold_ema_dead_code=2, commitment_weight=commitment_weight,
            )
            self.codebook_size = codebook_size
        elif quantizer == "simvq":
            self.quantizer = SimVQ(dim=latent_dim, codebook_size=codebook_size, frozen_codebook_dim=codebook_dim,
                                   commitment_weight=commitment_weight)
            self.codebook_size = codebook_size
        else:
            self.quantizer = FSQ(levels=list(levels), dim=latent_dim)
            self.codebook_size = self.quantizer.codebook_size
        self._processor = ViTImageProcessorPil(
            size={"height": image_size, "width": image_size}, image_mean=[0.5] * 3, image_std=[0.5] * 3
        )

    def settings(self) -> dict:
        return dict(self._settings)

    def processor(self):
        """Resize to ``image_size``, rescale to [0, 1], normalise with mean = std = 0.5 (pixels in [-1, 1])."""
        return self._processor

    def num_frames(self, item_shape: tuple[int, ...]) -> int:
        self._check_shape(item_shape)
        return self.frames

    def _check_shape(self, item_shape: tuple[int, ...]) -> None:
        expected = (3, self.image_size, self.image_size)
        if tuple(item_shape) != expected:
            raise ValueError(f"image codec: expected pixel_values items of shape {expected}, got {tuple(item_shape)}")

    def quantize(self, pixel_values: torch.Tensor, freeze: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Pixel values (B, 3, H, W) in [-1, 1] -> quantized latents (B, frames, latent_dim), codes
        (B, frames) and the quantizer's auxiliary loss (a scalar; zero for FSQ); frames are the cells
        or the bottleneck's queries. In training mode the VQ codebook follows the batch (EMA, dead-code
        replacement) unless ``freeze``."""
        return self.quantize_latents(self.latents(pixel_values), freeze)

    def quantize_latents(self, latents: torch.Tensor, freeze: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """:meth:`quantize` from the encoder's latents (B, frames, latent_dim)."""
        if isinstance(self.quantizer, FSQ):
            quantized, codes = self.quantizer(latents)
            return quantized, codes.long(), latents.new_zeros(())
        if isinstance(self.quantizer, SimVQ):  # its codebook is a buffer: nothing follows the batch
            quantized, codes, loss = self.quantizer(latents)
        else:
            quantized, codes, loss = self.quantizer(latents, freeze_codebook=freeze)
        return quantized, codes, loss.sum()

    def latents(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Pixel values (B, 3, H, W) in [-1, 1] -> the quantizer's input (B, frames, latent_dim)."""
        self._check_shape(pixel_values.shape[1:])
        latents = self.encoder(pixel_values).flatten(2).transpose(1, 2)
        return latents if self.bottleneck is None else self.bottleneck.encode(latents)

    @torch.no_grad()
    def features(self, inputs: torch.Tensor) -> torch.Tensor:
        """Pixel values (items, 3, H, W) -> the latents before quantization (items, frames, latent_dim)."""
        return self.latents(inputs)

    def reconstruct(self, quantized: torch.Tensor) -> torch.Tensor:
        """Quantized latents (B, frames, latent_dim) -> pixel values (B, 3, H, W) in the processor's [-1, 1] scale."""
        side = self.image_size // self.downsample
        if self.bottleneck is not None:
            quantized = self.bottleneck.decode(quantized)
        return self.decoder(quantized.transpose(1, 2).unflatten(2, (side, side)))

    @torch.no_grad()
    def encode(self, inputs: torch.Tensor) -> torch.Tensor:
        """Pixel values (items, 3, H, W) from :meth:`processor` -> codes (items, frames, 1); never
        changes the codebook, whatever the module's mode."""
        return self.quantize_features(self.latents(inputs))

    @torch.no_grad()
    def encode_with_features(self, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`encode` and :meth:`features` from one encoder pass."""
        latents = self.latents(inputs)
        return self.quantize_features(latents), latents

    @torch.no_grad()
    def quantize_features(self, features: torch.Tensor) -> torch.Tensor:
        """Latents (items, frames, latent_dim), e.g. regressed by an LLM -> their codes (items, frames, 1)."""
        return self.quantize_latents(features, freeze=True)[1].unsqueeze(-1)

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes (items, frames, 1) -> images (items, 3, H, W) in [0, 1]."""
        if codes.dim() != 3 or codes.shape[1:] != (self.frames, 1):
            raise ValueError(f"image codec: expected codes of shape (items, {self.frames}, 1), got {tuple(codes.shape)}")
        if isinstance(self.quantizer, (FSQ, SimVQ)):
            quantized = self.quantizer.indices_to_codes(codes[..., 0])
        else:
            quantized = self.quantizer.get_output_from_indices(codes[..., 0])
        return ((self.reconstruct(quantized) + 1) / 2).clamp(0, 1)


def world_images(
    rng: random.Random, n: int, allowed: Callable[[Shape], bool] | None = None, video_fraction: float = VIDEO_FRACTION,
    recolour: float = 0.0,
) -> np.ndarray:
    """``n`` fresh uint8 (n, 48, 48, 3) world images: scenes and a ``video_fraction`` share of single
    frames of motion videos at random times, whose shapes pass ``allowed``. Each object is repainted,
    with probability ``recolour``, in a random colour far from every world colour (the vision
    encoder's off-palette augmentation)."""
    n_frames = round(n * video_fraction)
    drawn = []
    for _ in range(n - n_frames):
        scene = sample_scene(rng, allowed=allowed)
        drawn.append((render_array(scene), [s.colour for s in scene.shapes]))
    for _ in range(n_frames):
        motion = video.sample_motion(rng, allowed=allowed)
        frames = rng.randrange(2, 9)  # a random frame of a 2-8 frame video
        drawn.append((np.array(video.render_video(motion, frames)[rng.randrange(frames)]), [motion.colour]))
    for image, colours in drawn:
        for colour in colours:  # rendering is exact and a colour appears once per image, so its pixels are its object
            if rng.random() < recolour:
                image[(image == COLOUR_RGB[colour]).all(-1)] = _off_palette_rgb(rng)
    return np.stack([image for image, _ in drawn])


def pixel_values(images: np.ndarray) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> (B, 3, H, W) in [-1, 1], exactly as :meth:`ImageCodec.processor` makes them."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1)


@torch.no_grad()
def psnr(codec: ImageCodec, images: np.ndarray, batch: int = 128) -> float:
    """Mean PSNR (dB, [0, 1] pixels) of ``codec``'s round trip over uint8 images (B, H, W, 3)."""
    scores = []
    for i in range(0, len(images), batch):
        chunk = images[i : i + batch]
        decoded = codec.decode(codec.encode(pixel_values(chunk)))
        target = torch.from_numpy(chunk).permute(0, 3, 1, 2).float() / 255
        mse = (decoded - target).pow(2).flatten(1).mean(1).clamp_min(1e-10)
        scores.append(-10 * torch.log10(mse))
    return torch.cat(scores).mean().item()


@torch.no_grad()
def colour_kept(codec: ImageCodec, scenes: list[Scene]) -> float:
    """Share of the scenes' objects whose decoded mean colour (over the object's pixels) is nearest,
    among the world's colours, to the object's own colour."""
    images = np.stack([render_array(scene) for scene in scenes])
    decoded = codec.decode(codec.encode(pixel_values(images))).permute(0, 2, 3, 1) * 255
    palette = torch.tensor(list(COLOUR_RGB.values()), dtype=torch.float32)
    hits = []
    for scene, image in zip(scenes, decoded):
        owner = torch.from_numpy(object_map(scene))
        for i, shape in enumerate(scene.shapes):
            mean = image[owner == i + 1].mean(0)
            hits.append(COLOURS[int((palette - mean).norm(dim=1).argmin())] == shape.colour)
    return float(np.mean(hits))


def pretrain_image_codec(
    out_dir: str | Path,
    *,
    seed: int = 0,
    steps: int = DEFAULT_STEPS,
    batch_size: int = 32,
    lr: float = 2e-3,
    codec_settings: dict | None = None,
    codebook: torch.Tensor | None = None,
    allowed: Callable[[Shape], bool] | None = None,
    progress: Callable[[int, int, dict], None] | None = None,
) -> Path:
    """Train an :class:`ImageCodec` (``codec_settings`` override its defaults) on fresh world images
    whose shapes pass ``allowed``, and save it with ``mmfuse.codecs.save_codec``.

    Deterministic for a given seed and thread count. Objects are repainted off-palette with
    ``RECOLOUR_PROB``; the loss is pixel MSE plus the quantizer's commitment loss (VQ).
    ``pretrain_metrics.json`` holds PSNR (dB) on ``EVAL_IMAGES`` fresh scenes and as many video
    frames, the share of codebook entries in use, a blurry baseline on the scenes (each code cell's
    mean colour, bilinearly upsampled: what 36 exact colours per image give) and, when ``allowed``
    rejects any shape, PSNR and :func:`colour_kept` on one-shape scenes of held-out shapes. ``codebook``
    ``(codebook_size, codebook_dim)``: the frozen codebook of a ``text_ids_start`` codec (UniCode).
    ``progress(step, steps, {"loss": float, "mse": float})`` is called after every step.
    """
    from mmfuse.codecs import save_codec

    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps and batch_size must be positive, got steps={steps}, batch_size={batch_size}")
    start = time.perf_counter()
    torch.manual_seed(seed)
    rng = random.Random(seed)
    codec = ImageCodec(**(codec_settings or {}))
    if (codebook is None) != (codec.text_ids_start is None):
        raise ValueError("pretrain_image_codec: a codebook is given exactly when the codec's text_ids_start is set")
    if codebook is not None:
        frozen = codec.quantizer.frozen_codebook
        if tuple(codebook.shape) != tuple(frozen.shape):
            raise ValueError(f"pretrain_image_codec: codebook of shape {tuple(codebook.shape)}, the codec's is {tuple(frozen.shape)}")
        frozen.copy_(codebook.detach())
    optimizer = torch.optim.AdamW(codec.parameters(), lr=lr, weight_decay=0.0)
    schedule = warmup_cosine(optimizer, steps)
    codec.train()
    for step in range(1, steps + 1):
        pixels = pixel_values(world_images(rng, batch_size, allowed, recolour=RECOLOUR_PROB))
        quantized, _, aux = codec.quantize(pixels)
        mse = F.mse_loss(codec.reconstruct(quantized), pixels)
        loss = mse + aux
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(codec.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if progress is not None:
            progress(step, steps, {"loss": loss.item(), "mse": mse.item()})
    train_seconds = time.perf_counter() - start

    codec.eval()
    eval_rng = random.Random(f"image_codec-eval-{seed}")
    scenes_eval = world_images(eval_rng, EVAL_IMAGES, allowed, video_fraction=0.0)
    frames_eval = world_images(eval_rng, EVAL_IMAGES, allowed, video_fraction=1.0)
    with torch.no_grad():
        used = torch.cat([codec.encode(pixel_values(scenes_eval)), codec.encode(pixel_values(frames_eval))]).unique().numel()
    target = torch.from_numpy(scenes_eval).permute(0, 3, 1, 2).float() / 255
    blurry = F.interpolate(F.avg_pool2d(target, codec.downsample), scale_factor=codec.downsample, mode="bilinear")
    blurry_mse = (blurry - target).pow(2).flatten(1).mean(1).clamp_min(1e-10)
    metrics = {
        "seed": seed,
        "steps": steps,
        "batch_size": batch_size,
        "train_seconds": round(train_seconds, 1),
        "eval_images": EVAL_IMAGES,
        "psnr_scenes_db": round(psnr(codec, scenes_eval), 2),
        "psnr_video_frames_db": round(psnr(codec, frames_eval), 2),
        "psnr_blurry_baseline_db": round((-10 * torch.log10(blurry_mse)).mean().item(), 2),
        "codebook_usage": round(used / codec.codebook_size, 4),
    }
    if allowed is not None:
        held_out = lambda s: not allowed(s)  # noqa: E731
        held = [sample_scene(eval_rng, n_shapes=1, allowed=held_out) for _ in range(EVAL_IMAGES)]
        metrics["psnr_held_out_scenes_db"] = round(psnr(codec, np.stack([render_array(scene) for scene in held])), 2)
        metrics["held_out_colour_kept"] = round(colour_kept(codec, held), 4)
    out_dir = save_codec(codec, out_dir)
    (out_dir / "pretrain_metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return out_dir
