"""CM3Leon's retrieval-augmented training: which samples get neighbours, which neighbours, in what order."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from conftest import tiny_config

from mmfuse.config import CodecConfig, FusionConfig
from mmfuse.data.dataset import ProcessedDataset
from mmfuse.data.schema import Message, Sample
from mmfuse.model import MultimodalLM
from mmfuse.train.config import StageConfig, TrainConfig
from mmfuse.train.retrieval import prompt_key, retrieval_augmented
from mmfuse.train.trainer import Trainer

VECTORS = {"a": (1.0, 0.0), "b": (0.9, 0.1), "c": (0.0, 1.0), "d": (0.1, 0.9)}


class Embedder(nn.Module):
    """A model stand-in whose retrieval embedding of an image file is the vector named after it."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))
        self.media_processors = {"image": lambda item, where, index: torch.tensor(VECTORS[Path(item).stem])}

    def embed_media(self, modality, inputs):
        assert not self.training  # embedded in eval mode
        return inputs


def qa(sid, image):
    return Sample(sid, [Message("user", "<image>\nwhat colour?"), Message("assistant", sid)], {"image": [f"/w/{image}.png"]})


def samples():
    draw = Sample("draw", [Message("user", "draw a"), Message("assistant", "<image>")], {"image": ["/w/a.png"]})
    text = Sample("text", [Message("user", "hi"), Message("assistant", "hello")])
    return [qa("a1", "a"), qa("a2", "a"), qa("b", "b"), qa("c", "c"), qa("d", "d"), draw, text]


def test_prompt_key_is_the_first_media_item_of_a_user_turn():
    first, *_, draw, text = samples()
    assert prompt_key(first) == "image"
    assert prompt_key(draw) is None and prompt_key(text) is None  # an answer's image, no image


def test_neighbours_come_nearest_last_and_never_share_the_samples_image():
    out = retrieval_augmented(ProcessedDataset(samples(), processor=None), Embedder(), 2, "stage 's'")
    by_id = {s.id.split("+")[0]: s for s in out.samples}
    answers = lambda s: [m.content for m in s.messages if m.role == "assistant"]  # noqa: E731
    assert answers(by_id["a1"]) == ["c", "b", "a1"] or answers(by_id["a1"]) == ["d", "b", "a1"]  # never a2: same image
    assert by_id["a1"].id == "a1+2retrieved"
    assert answers(by_id["c"]) == ["b", "d", "c"]  # d is nearest, so it sits next to the question
    assert by_id["c"].media["image"] == ["/w/b.png", "/w/d.png", "/w/c.png"]  # media in marker order
    assert by_id["c"].marker_counts()["image"] == 3
    assert by_id["draw"] == samples()[5] and by_id["text"] == samples()[6]  # an answer's image is no key
    with pytest.raises(ValueError, match="sample 'a1' has 3 neighbours with other media, fewer than retrieved=4"):
        retrieval_augmented(ProcessedDataset(samples(), processor=None), Embedder(), 4, "stage 's'")


def test_a_retrieved_stage_trains_on_augmented_samples(tokenizer_dir, tmp_path):
    """Through the Trainer on a tiny Type-D model that embeds with its codec's features."""
    rng = np.random.default_rng(0)
    for name in VECTORS:
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(tmp_path / f"{name}.png")
    codec = {"kind": "image", "quantizer": "vq", "image_size": 16, "downsample": 4, "widths": [16, 16], "latent_dim": 8,
             "codebook_size": 16, "codebook_dim": 4}
    config = tiny_config(tokenizer_dir, image=None, vocab_size=320, fusion=FusionConfig(type="D", options={}),
                         codecs={"image": CodecConfig(modality="image", settings=codec)})
    model = MultimodalLM.from_config(config)
    data = [Sample(s.id, s.messages, {"image": [tmp_path / Path(p).name for p in s.media.get("image", [])]}) for s in samples()]
    seen = []

    def recording(items):
        seen.extend(item.id for item in items)
        return model.collator()(items)

    stage = StageConfig(name="r", train=["llm"], data=["x"], retrieved=1, steps=2, lr=1e-3, batch_size=7)
    Trainer(model, TrainConfig(stages=[stage], output_dir=str(tmp_path / "run")), {"x": ProcessedDataset(data, model.processor)},
            recording, progress=False).train()
    assert sorted(seen) == sorted(([f"{s}+1retrieved" for s in ("a1", "a2", "b", "c", "d")] + ["draw", "text"]) * 2)
    drawings = ProcessedDataset([samples()[5]] * 7, model.processor)  # text-to-image only: nothing to retrieve by
    assert retrieval_augmented(drawings, model, 1, "stage 'r'") is drawings
    stage = StageConfig(name="r", train=["llm"], data=["x"], retrieved=1, steps=1, lr=1e-3, batch_size=7)
    with pytest.raises(ValueError, match=r"stage 'r': 'retrieved' found no sample in \['x'\] whose prompt shows a media item"):
        Trainer(model, TrainConfig(stages=[stage], output_dir=str(tmp_path / "none")), {"x": drawings}, recording, progress=False).train()
    with pytest.raises(ValueError, match="retrieved must be >= 0"):
        StageConfig(name="r", train=["llm"], data=["x"], retrieved=-1, steps=1, lr=1e-3)
