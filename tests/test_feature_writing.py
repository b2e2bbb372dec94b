"""Type-D writing continuous features (VL-GPT, ``fusion.options.write: features``): every item is read as
its projected features, a regression head predicts the next position's features where the model writes an
item, and generation regresses them one position at a time before the codec quantizes them."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_config
from torch.nn import functional as F

from mmfuse.codecs.base import MediaCodec
from mmfuse.codecs.image import ImageCodec
from mmfuse.config import CodecConfig, FusionConfig
from mmfuse.data.processor import IGNORE_INDEX
from mmfuse.data.schema import Message, Sample
from mmfuse.fusion.embedding import PLACEHOLDER_IDS
from mmfuse.measure import adds_modality
from mmfuse.model import MultimodalLM
from mmfuse.train.config import StageConfig
from mmfuse.train.stage import apply_stage
from mmfuse.train.trainer import label_count

CODEC = {"kind": "image", "quantizer": "vq", "image_size": 16, "downsample": 4, "widths": [16, 16], "latent_dim": 8,
         "codebook_size": 16, "codebook_dim": 4}
SPAN = 16  # (16 / 4) ** 2 cells


def vl_gpt(tokenizer_dir, llm: str = "llama", **options) -> MultimodalLM:
    options = {"read": "features", "write": "features", **options}
    config = tiny_config(tokenizer_dir, llm, image=None, fusion=FusionConfig(type="D", options=options),
                         codecs={"image": CodecConfig(modality="image", settings=dict(CODEC))})
    return MultimodalLM.from_config(config)


def redraw(media_dir) -> Sample:  # reads one image, writes another
    return Sample("redraw", [Message("user", "<image> draw it again"), Message("assistant", "<image>")],
                  {"image": [media_dir / "a.png", media_dir / "b.png"]})


def test_written_items_are_read_as_features_and_regressed_one_position_ahead(tokenizer_dir, media_dir, tmp_path):
    model = vl_gpt(tokenizer_dir).eval()
    batch = model.collator()([model.processor(redraw(media_dir))])
    inputs = model.llm_inputs(batch["input_ids"], batch["media"], batch["labels"])
    placeholders = (batch["input_ids"][0] == PLACEHOLDER_IDS["image"]).nonzero().flatten()
    read, written = placeholders[:SPAN], placeholders[SPAN:]
    features = model.codecs["image"].features(batch["media"]["image"])  # (2, SPAN, 8)
    projected = model.fusion.read_projections["image"](features)
    embeds = inputs["inputs_embeds"][0]
    torch.testing.assert_close(embeds[read], projected[0])
    torch.testing.assert_close(embeds[written], projected[1])  # the written image is read as features too
    mask, values = inputs["feature_targets"]["image"]
    assert torch.equal(mask[0].nonzero().flatten(), written)
    torch.testing.assert_close(values, features[1])
    labels = model.fusion.labels(batch["labels"], inputs)
    assert (labels[0, placeholders] == IGNORE_INDEX).all()  # regressed, not classified
    end = written[-1] + 1
    assert labels[0, end] == model.fusion.vocabularies["image"].end  # the end token stays a token to learn

    # the loss: each written position's squared error (from the position before it) weighs as one text token
    with torch.no_grad():
        out = model.llm(inputs_embeds=inputs["inputs_embeds"], attention_mask=batch["attention_mask"], output_hidden_states=True)
        hidden = out.hidden_states[-1][0]
        squared = F.mse_loss(model.fusion.regression_heads["image"](hidden[written - 1]), features[1], reduction="none").sum()
        shifted = labels[0, 1:]
        text_sum = F.cross_entropy(out.logits[0, :-1], shifted, ignore_index=IGNORE_INDEX, reduction="sum")
        text = (shifted != IGNORE_INDEX).sum()
        torch.testing.assert_close(model(**batch).loss, (text_sum + squared) / (text + SPAN))
        count = label_count(batch, torch.device("cpu"))  # what the trainer divides by: text and written positions
        assert count == text + SPAN
        torch.testing.assert_close(model(**batch, num_items_in_batch=count).loss, (text_sum + squared) / count)
        weighted = vl_gpt(tokenizer_dir, regression_weight=0.0).eval()
        weighted.load_state_dict(model.state_dict())
        torch.testing.assert_close(weighted(**batch).loss, text_sum / (text + SPAN))

    apply_stage(model, StageConfig(name="s", train=["fusion", "llm"], data=["d"], steps=1, lr=1e-2))
    model.train()(**batch).loss.backward()
    assert model.fusion.regression_heads["image"].weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.codecs["image"].parameters())
    model.eval().save_pretrained(tmp_path / "ckpt")
    loaded = MultimodalLM.from_pretrained(tmp_path / "ckpt")
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).loss, model(**batch).loss)


def _regressed_without_cache(model, sample: Sample) -> torch.Tensor:
    """The reference: the whole sequence rerun at every position, no KV cache, one row, no padding."""
    vocab = model.fusion.vocabularies["image"]
    batch = model.collator("left")([model.processor(sample, for_generation=True)])
    ids = torch.cat([batch["input_ids"], torch.tensor([[vocab.begin]])], dim=1)
    embeds = model.llm_inputs(ids, batch["media"])["inputs_embeds"]
    regressed = []
    for _ in range(SPAN):
        hidden = model.llm(inputs_embeds=embeds, output_hidden_states=True).hidden_states[-1][:, -1]
        regressed.append(model.fusion.regression_heads["image"](hidden))
        embeds = torch.cat([embeds, model.fusion.read_projections["image"](regressed[-1]).unsqueeze(1)], dim=1)
    codes = model.codecs["image"].quantize_features(torch.stack(regressed, 1))
    return torch.cat([torch.tensor([[vocab.begin]]), vocab.code_ids(codes), torch.tensor([[vocab.end]])], dim=1)


@pytest.mark.parametrize("llm", ["llama", "gpt2"])  # GPT-2's absolute positions tell a left-padded row's apart
def test_generation_regresses_features_with_the_cache_as_without_and_under_left_padding(tokenizer_dir, media_dir, llm):
    model = vl_gpt(tokenizer_dir, llm).eval()
    for p in model.fusion.regression_heads.parameters():  # an untrained head regresses ~0 everywhere
        torch.nn.init.normal_(p, std=1.0)
    samples = [Sample("look", [Message("user", "<image> draw it again")], {"image": [media_dir / "a.png"]}),
               Sample("ask", [Message("user", "draw a red circle in the top left corner please")])]
    batch = model.collator("left")([model.processor(s, for_generation=True) for s in samples])
    assert (batch["attention_mask"] == 0).any()  # one row is left-padded
    with torch.no_grad():
        ids = model.generate(batch["input_ids"], batch["attention_mask"], batch["media"], outputs=("image",),
                             max_new_tokens=SPAN + 2, do_sample=False)
        for row, sample in enumerate(samples):
            assert torch.equal(ids[row: row + 1], _regressed_without_cache(model, sample))
    assert len(set(ids[0, 1:-1].tolist())) > 1  # the positions differ: each reads the one before
    image = model.decode_output(ids)[0][1][0]
    assert image[0] == "image" and tuple(image[1].shape) == (3, 16, 16)
    assert torch.equal(model.generate(batch["input_ids"], batch["attention_mask"], batch["media"], outputs=("image",),
                                      max_new_tokens=5), ids[:, :5])
    with pytest.raises(ValueError, match="deterministically"):
        model.generate(batch["input_ids"], batch["attention_mask"], batch["media"], outputs=("image",), do_sample=True)
    with pytest.raises(ValueError, match="one\\s+media item as the whole reply"):
        model.generate(batch["input_ids"], batch["attention_mask"], batch["media"], outputs=("text", "image"))
    text = model.generate(batch["input_ids"], batch["attention_mask"], batch["media"], max_new_tokens=4, do_sample=False)
    assert (text < model.fusion.text_vocab_size).all()  # a text reply stays text


def test_training_on_one_drawing_makes_generation_draw_it(tokenizer_dir, media_dir):
    model = vl_gpt(tokenizer_dir)
    sample = Sample("draw", [Message("user", "draw it"), Message("assistant", "<image>")], {"image": [media_dir / "a.png"]})
    batch = model.collator()([model.processor(sample)])
    target = model.codecs["image"].encode(batch["media"]["image"])
    apply_stage(model, StageConfig(name="s", train=["fusion", "llm"], data=["d"], steps=1, lr=1e-2))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    model.train()
    for _ in range(150):
        loss = model(**batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    prompt = model.collator("left")([model.processor(Sample("p", sample.messages[:1]), for_generation=True)])
    with torch.no_grad():
        ids = model.generate(prompt["input_ids"], prompt["attention_mask"], outputs=("image",))
    codes = model.fusion.vocabularies["image"].codes(ids[0, 1:-1])
    assert (codes.flatten() == target.flatten()).float().mean() >= 0.9


def test_writing_features_needs_read_features_and_codecs_with_features_that_quantize_back(tokenizer_dir, monkeypatch):
    with pytest.raises(ValueError, match="needs read 'features'"):
        vl_gpt(tokenizer_dir, read="codes")
    with pytest.raises(ValueError, match="write must be one of"):
        vl_gpt(tokenizer_dir, write="pixels")
    audio = CodecConfig(modality="audio", settings={"kind": "audio", "n_fft": 256, "hop": 128, "stride": 2, "width": 16, "dim": 8,
                                                    "num_quantizers": 1, "codebook_size": 16})
    added = adds_modality(vl_gpt(tokenizer_dir, write="codes"), {"codecs": audio})  # a sound codec added to a LaVIT model
    assert added["modality"] == "audio" and "the audio codec has 1 codebooks and feature width 0" in added["error"]
    added = adds_modality(vl_gpt(tokenizer_dir), {"codecs": audio})  # and to a VL-GPT model
    assert added["modality"] == "audio" and "the ['audio'] codec(s) cannot quantize regressed features" in added["error"]
    monkeypatch.setattr(ImageCodec, "quantize_features", MediaCodec.quantize_features)
    with pytest.raises(ValueError, match="cannot quantize regressed features"):
        vl_gpt(tokenizer_dir)
