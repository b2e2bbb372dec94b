"""The processor: chat templates, label masking, marker expansion, overflow policy, media errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import tiny_config
from PIL import Image

from mmfuse.config import ConnectorConfig
from mmfuse.connectors import Connector
from mmfuse.data.processor import IGNORE_INDEX, SampleTooLong
from mmfuse.data.schema import Message, Sample
from mmfuse.fusion import PLACEHOLDER_IDS
from mmfuse.model import MultimodalLM


def _labelled_text(model, enc):
    return model.tokenizer.decode([t for t in enc.labels if t != IGNORE_INDEX])


def _conversation(media_dir):
    return Sample("conv", [
        Message("system", "be brief"),
        Message("user", "<image>\nwhat colour is the circle?"),
        Message("assistant", "red"),
        Message("user", "and the square? <image>"),
        Message("assistant", "blue square"),
    ], {"image": [media_dir / "a.png", media_dir / "b.png"]})


def test_labels_only_on_assistant_turns_with_chat_template(tokenizer_dir, media_dir):
    model = MultimodalLM.from_config(tiny_config(tokenizer_dir))
    enc = model.processor(_conversation(media_dir))
    assert _labelled_text(model, enc) == "red<|end|>blue square<|end|>"
    # Every labelled position holds its own token; everything else is -100.
    for token, label in zip(enc.input_ids, enc.labels):
        assert label in (IGNORE_INDEX, token)
    # The chat template's own assistant mask (from its {% generation %} blocks) agrees.
    tok = model.tokenizer
    msgs = [{"role": m.role, "content": m.content.replace("<image>", "")} for m in _conversation(media_dir).messages]
    ref = tok.apply_chat_template(msgs, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    ref_text = tok.decode([t for t, m in zip(ref["input_ids"], ref["assistant_masks"]) if m])
    assert ref_text == "red<|end|>blue square<|end|>"


def test_document_labels_follow_openflamingo(tokenizer_dir, media_dir):
    config = tiny_config(tokenizer_dir)
    config.llm.add_tokens = ["<|endofchunk|>"]
    model = MultimodalLM.from_config(config)
    text = "intro <image>a red circle.<|endofchunk|> an ad. <image>a blue square.<|endofchunk|> tail"
    sample = Sample("doc", [Message("document", text)], {"image": [media_dir / "a.png", media_dir / "b.png"]})
    enc = model.processor(sample)
    # learned: the text after each image up to and including its <|endofchunk|>; not the text before the
    # first image, between an <|endofchunk|> and the next image, or after the last one
    assert _labelled_text(model, enc) == "a red circle.<|endofchunk|>a blue square.<|endofchunk|>"
    assert model.tokenizer.convert_tokens_to_ids("<|endofchunk|>") in enc.labels  # one token, learned
    assert all(label in (IGNORE_INDEX, token) for token, label in zip(enc.input_ids, enc.labels))
    # generation continues the document: same ids up to the end, nothing labelled
    prefix = Sample("p", [Message("document", "<image>a red circle.<|endofchunk|><image>")], {"image": [media_dir / "a.png"] * 2})
    assert all(label == IGNORE_INDEX for label in model.processor(prefix, for_generation=True).labels)
    with pytest.raises(ValueError, match="sample 'bare'.*no media marker"):
        model.processor(Sample("bare", [Message("document", "just text")]))
    with pytest.raises(ValueError, match="'document' turn must be the sample's only turn"):
        model.processor(Sample("mixed", [Message("document", "<image>x"), Message("assistant", "y")], {"image": [media_dir / "a.png"]}))


def test_labels_with_plain_template(plain_tokenizer_dir, media_dir):
    model = MultimodalLM.from_config(tiny_config(plain_tokenizer_dir))
    enc = model.processor(_conversation(media_dir))
    assert _labelled_text(model, enc) == "red<|end_of_text|>blue square<|end_of_text|>"
    assert model.processor.stop_token_ids == [model.tokenizer.eos_token_id]


def test_markers_expand_in_place_and_prompt_matches_generation(tokenizer_dir, media_dir):
    model = MultimodalLM.from_config(tiny_config(tokenizer_dir))
    sample = _conversation(media_dir)
    enc = model.processor(sample)
    ids = enc.input_ids
    runs = [i for i in range(len(ids)) if ids[i] == PLACEHOLDER_IDS["image"] and (i == 0 or ids[i - 1] != ids[i])]
    assert len(runs) == 2 and enc.media["image"].shape[0] == 2
    assert ids.count(PLACEHOLDER_IDS["image"]) == 2 * 4
    # The prompt of the first turn is tokenized exactly as at generation time.
    prompt = model.processor(Sample("p", sample.messages[:2], {"image": sample.media["image"][:1]}), for_generation=True)
    assert ids[: len(prompt.input_ids)] == prompt.input_ids
    assert model.processor.stop_token_ids == sorted({model.tokenizer.eos_token_id, model.tokenizer.convert_tokens_to_ids("<|end|>")})


def test_marker_and_media_count_mismatch_is_an_error(tokenizer_dir, media_dir):
    model = MultimodalLM.from_config(tiny_config(tokenizer_dir))
    bad = Sample("bad-1", [Message("user", "<image> <image>"), Message("assistant", "x")], {"image": [media_dir / "a.png"]})
    with pytest.raises(ValueError, match=r"sample 'bad-1': image: lists 1 item.*2 <image> marker"):
        model.processor(bad)


def test_overflow_errors_or_skips_and_counts(tokenizer_dir, media_dir):
    long_text = "what colour is the circle? " * 40
    sample = Sample("long", [Message("user", "<image>" + long_text), Message("assistant", "red")], {"image": [media_dir / "a.png"]})
    model = MultimodalLM.from_config(tiny_config(tokenizer_dir, max_length=64))
    with pytest.raises(SampleTooLong, match="long.*exceed max_length 64"):
        model.processor(sample)
    skipping = MultimodalLM.from_config(tiny_config(tokenizer_dir, max_length=64, on_bad_sample="skip"))
    skipped = skipping.processor(sample)
    assert skipped.sample_id == "long" and skipped.kind == "too long" and list(skipping.processor.bad_samples) == [skipped]


def test_media_errors_name_sample_and_field(tokenizer_dir, media_dir):
    model = MultimodalLM.from_config(tiny_config(tokenizer_dir, audio="linear"))
    (media_dir / "not_audio.wav").write_text("hello")
    cases = [
        ({"image": [media_dir / "missing.png"]}, "<image>", r"sample 'm': image\[0\]: file .* does not exist"),
        ({"audio": [media_dir / "not_audio.wav"]}, "<audio>", r"sample 'm': audio\[0\]: cannot read"),
        ({"audio": [np.full(100, np.nan, dtype=np.float32)]}, "<audio>", r"audio\[0\]: the clip contains NaN"),
        ({"audio": [np.zeros(16000 * 3, dtype=np.float32)]}, "<audio>", r"audio\[0\]: the clip is 3.00 s, longer than the encoder's 1.00 s"),
    ]
    for media, marker, pattern in cases:
        with pytest.raises(ValueError, match=pattern):
            model.processor(Sample("m", [Message("user", marker), Message("assistant", "x")], media))
    image_only = MultimodalLM.from_config(tiny_config(tokenizer_dir))
    with pytest.raises(ValueError, match="sample 'm': audio: has media but the model has no audio encoder"):
        image_only.processor(Sample("m", [Message("user", "<audio>"), Message("assistant", "x")], {"audio": [media_dir / "a.wav"]}))


def test_images_become_rgb_and_non_square_images_are_padded(tokenizer_dir, media_dir):
    model = MultimodalLM.from_config(tiny_config(tokenizer_dir))
    Image.new("L", (20, 10), 0).save(media_dir / "grey.png")
    pixels = model.media_processors["image"](media_dir / "grey.png")
    assert pixels.shape == (3, 16, 16)
    # Top and bottom rows are the pad colour (the processor's mean, i.e. 0 after normalisation).
    assert torch.allclose(pixels[:, 0], torch.zeros_like(pixels[:, 0]), atol=0.02)
    assert pixels[:, 8].mean() < -0.9  # the black image itself


def test_audio_is_resampled_to_the_encoder_rate(tokenizer_dir, tmp_path):
    import soundfile

    from mmfuse.data.media import load_audio

    t = np.arange(8000) / 8000
    soundfile.write(str(tmp_path / "s.wav"), np.stack([np.sin(2 * np.pi * 500 * t)] * 2, 1).astype(np.float32), 8000)
    wave = load_audio(tmp_path / "s.wav", 16000)
    assert wave.shape == (16000,)
    peak = np.argmax(np.abs(np.fft.rfft(wave))) * 16000 / wave.shape[0]
    assert abs(peak - 500) < 5


@pytest.mark.parametrize("kind,extra", [("linear", {}), ("mlp2x_gelu", {}), ("qformer", {"num_queries": 5}),
                                        ("linear", {"pool_stride": 2}), ("linear", {"boundary_tokens": True})])
def test_connector_shapes(kind, extra):
    connector = Connector(ConnectorConfig(kind=kind, **extra), encoder_dim=12, llm_dim=20)
    out = connector(torch.randn(3, 10, 12))
    expected = {"qformer": 5}.get(kind, 10)
    expected = expected // extra.get("pool_stride", 1) + (2 if extra.get("boundary_tokens") else 0)
    assert out.shape == (3, expected, 20)


def test_mlp2x_gelu_is_linear_gelu_linear():
    connector = Connector(ConnectorConfig(kind="mlp2x_gelu"), encoder_dim=4, llm_dim=6)
    layers = list(connector.core)
    assert [type(m).__name__ for m in layers] == ["Linear", "GELU", "Linear"]
    x = torch.randn(1, 2, 4)
    assert torch.allclose(connector(x), layers[2](torch.nn.functional.gelu(layers[0](x))))


def test_pooling_averages_neighbours():
    connector = Connector(ConnectorConfig(kind="identity", pool_stride=2), encoder_dim=3, llm_dim=3)
    x = torch.arange(12.0).reshape(1, 4, 3)
    assert torch.equal(connector(x), torch.stack([(x[0, 0] + x[0, 1]) / 2, (x[0, 2] + x[0, 3]) / 2])[None])


def test_input_norm_makes_the_connector_scale_invariant():
    plain = Connector(ConnectorConfig(kind="linear"), encoder_dim=6, llm_dim=4)
    normed = Connector(ConnectorConfig(kind="linear", input_norm=True), encoder_dim=6, llm_dim=4)
    x = torch.randn(2, 3, 6)
    assert torch.allclose(normed(10 * x), normed(x), atol=1e-3)
    assert not torch.allclose(plain(10 * x), plain(x), atol=1e-4)


def test_qformer_2d_positions_make_it_see_where_features_are():
    from mmfuse.connectors.qformer import QFormerResampler, sincos_2d

    positions = sincos_2d(36, 16)
    assert positions.shape == (36, 16) and len({tuple(row.tolist()) for row in positions}) == 36  # every cell distinct
    # cells 6 and 7 share row 1: the row half matches, the column half does not
    assert torch.equal(positions[6, :8], positions[7, :8]) and not torch.equal(positions[6, 8:], positions[7, 8:])
    features = torch.randn(2, 36, 16)
    shuffled = features[:, torch.randperm(36)]
    plain = QFormerResampler(16, 8, num_queries=4, depth=1, num_heads=2, cross_attention_every=1).eval()
    torch.testing.assert_close(plain(features), plain(shuffled))  # without positions: a bag of features
    torch.manual_seed(0)
    placed = QFormerResampler(16, 8, num_queries=4, depth=1, num_heads=2, cross_attention_every=1, positions_2d=True).eval()
    assert not torch.allclose(placed(features), placed(shuffled), atol=1e-4)
    with pytest.raises(ValueError, match="square grid"):
        placed(torch.randn(1, 35, 16))


def test_task_prefix_goes_before_the_first_user_turn_of_its_task_only(tokenizer_dir, media_dir):
    model = MultimodalLM.from_config(tiny_config(tokenizer_dir, task_prefixes={"image_caption": "[CAP] "}))
    tagged = Sample("t", [Message("system", "be brief"), Message("user", "<image>\ndescribe"), Message("assistant", "red")],
                    {"image": [media_dir / "a.png"]}, {"task": "image_caption"})
    other = Sample("o", tagged.messages, tagged.media, {"task": "image_qa"})
    with_tag, without = model.processor(tagged), model.processor(other)
    text = model.tokenizer.decode([t for t in with_tag.input_ids if t >= 0])
    assert "be brief<|end|><|user|>\n[CAP] \ndescribe" in text and "[CAP]" not in model.tokenizer.decode([t for t in without.input_ids if t >= 0])
    assert _labelled_text(model, with_tag) == _labelled_text(model, without) == "red<|end|>"  # the tag is never learned
    assert tagged.messages[1].content == "<image>\ndescribe"  # the caller's sample is left as it was
