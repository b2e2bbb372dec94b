"""Flamingo perceiver resampler: fixed output length, latents in the keys/values, frame embeddings."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_VIT, assert_every_parameter_gets_a_gradient, tiny_config

from mmfuse.config import ConnectorConfig, EncoderConfig
from mmfuse.connectors import Connector, PerceiverResampler
from mmfuse.connectors.qformer import sincos_2d
from mmfuse.data.schema import Message, Sample
from mmfuse.model import MultimodalLM


def _resampler(**kwargs) -> PerceiverResampler:
    kwargs = {"num_latents": 3, "depth": 2, "num_heads": 2, **kwargs}
    return PerceiverResampler(8, 6, **kwargs).eval()


@pytest.mark.parametrize("tokens", [1, 5, 37])
def test_output_length_is_num_latents_whatever_the_input_length(tokens):
    out = _resampler()(torch.randn(2, tokens, 8))
    assert out.shape == (2, 3, 6)
    assert torch.isfinite(out).all()


def test_first_layer_attention_matches_a_manual_computation_over_features_and_latents():
    """Recompute layer 0's attention by hand with keys/values = concat(LN(features), LN(latents))."""
    model = _resampler(depth=1, num_heads=2)
    features = torch.randn(2, 4, 8)
    captured = {}
    model.layers[0].attn.register_forward_hook(lambda mod, args, out: captured.update(out=out))
    with torch.no_grad():
        model(features)
        attn = model.layers[0].attn
        latents = attn.norm_latents(model.latents).expand(2, -1, -1)

        def manual(context):
            q = attn.to_q(latents).view(2, 3, 2, 4).transpose(1, 2)
            k, v = (t.view(2, -1, 2, 4).transpose(1, 2) for t in attn.to_kv(context).chunk(2, dim=-1))
            weights = torch.softmax(q @ k.transpose(-1, -2) / 4**0.5, dim=-1)
            return attn.to_out((weights @ v).transpose(1, 2).reshape(2, 3, 8))

        with_latents = manual(torch.cat([attn.norm_media(features), latents], dim=1))
        features_only = manual(attn.norm_media(features))
    torch.testing.assert_close(captured["out"], with_latents)
    assert not torch.allclose(captured["out"], features_only, atol=1e-4)


def test_keys_and_values_include_the_latents_so_queries_matter_with_one_feature():
    """With one feature token and features-only keys/values, softmax over one key is 1 and every
    query would get the same value, so the query projection could not change the output. Because
    the latents are keys/values too, it does."""
    model = _resampler(depth=1)
    features = torch.randn(2, 1, 8)
    with torch.no_grad():
        before = model(features)
        model.layers[0].attn.to_q.weight.mul_(3.0).add_(0.5)
        after = model(features)
    assert not torch.allclose(before, after, atol=1e-5)


def _swap_frames(features: torch.Tensor, frames: int, a: int, b: int) -> torch.Tensor:
    n, total, dim = features.shape
    per_frame = features.reshape(n, frames, total // frames, dim).clone()
    per_frame[:, [a, b]] = per_frame[:, [b, a]]
    return per_frame.reshape(n, total, dim)


def test_frame_embeddings_make_frame_order_matter():
    features = torch.randn(2, 3 * 4, 8)  # 3 frames of 4 tokens
    swapped = _swap_frames(features, 3, 0, 2)
    with torch.no_grad():
        without = _resampler(max_frames=0)
        # attention over the concatenated set is invariant to the order of the keys
        torch.testing.assert_close(without(features, frames=3), without(swapped, frames=3))
        with_frames = _resampler(max_frames=4)
        assert with_frames.frame_embeddings.shape == (4, 8)
        assert not torch.allclose(with_frames(features, frames=3), with_frames(swapped, frames=3), atol=1e-5)
        # one frame's tokens shuffled among themselves: still the same set, same embedding
        shuffled = features.clone()
        shuffled[:, :4] = shuffled[:, [3, 1, 0, 2]]
        torch.testing.assert_close(with_frames(features, frames=3), with_frames(shuffled, frames=3))


def test_positions_2d_make_the_place_of_a_token_in_its_frame_matter():
    features = torch.randn(2, 2 * 4, 8)  # 2 frames of a 2x2 grid
    moved = features.clone()
    moved[:, :4] = moved[:, [3, 1, 0, 2]]  # frame 0's tokens at other grid cells
    with torch.no_grad():
        without = _resampler()
        torch.testing.assert_close(without(features, frames=2), without(moved, frames=2))  # a set: order is lost
        placed = _resampler(positions_2d=True)
        placed.load_state_dict(without.state_dict())
        assert not torch.allclose(placed(features, frames=2), placed(moved, frames=2), atol=1e-5)
        swapped = _swap_frames(features, 2, 0, 1)  # the same grid in every frame: frames stay a set without frame embeddings
        torch.testing.assert_close(placed(features, frames=2), placed(swapped, frames=2))
    with pytest.raises(ValueError, match="perceiver positions_2d: 2-D positions need a square grid of tokens, got 3"):
        placed(torch.randn(1, 6, 8), frames=2)
    config = ConnectorConfig(kind="perceiver", num_latents=2, depth=1, num_heads=2, positions_2d=True)
    assert Connector(config, 8, 6).core.positions_2d


def test_projector_positions_2d_add_each_grid_cells_position_before_the_projector():
    """A token-wise projector maps each feature alone, so it cannot tell where a patch was; with
    ``positions_2d`` a feature moved to another cell of its frame's grid maps differently (CogCoM's boxes)."""
    features = torch.randn(2, 2 * 4, 8)  # 2 frames of a 2x2 grid
    plain = Connector(ConnectorConfig(kind="glu"), 8, 12)
    placed = Connector(ConnectorConfig(kind="glu", positions_2d=True), 8, 12)
    placed.load_state_dict(plain.state_dict())
    order = torch.tensor([3, 1, 0, 2, 4, 5, 6, 7])  # frame 0's tokens moved to other cells
    with torch.no_grad():
        torch.testing.assert_close(plain(features, frames=2)[:, order], plain(features[:, order], frames=2))
        out = placed(features, frames=2)
        grid = sincos_2d(4, 8).repeat(2, 1)
        torch.testing.assert_close(out, plain(features + grid, frames=2))  # each frame's grid, the same in both
        assert not torch.allclose(out[:, order], placed(features[:, order], frames=2), atol=1e-5)
    with pytest.raises(ValueError, match="connector positions_2d: 2-D positions need a square grid of tokens, got 3"):
        placed(torch.randn(1, 6, 8), frames=2)
    with pytest.raises(ValueError, match="positions_2d applies to projectors, 'perceiver' and 'qformer', not 'mapper'"):
        Connector(ConnectorConfig(kind="mapper", positions_2d=True), 8, 12)


def test_bad_frames_raise():
    model = _resampler(max_frames=2)
    with pytest.raises(ValueError, match="7 feature tokens cannot be split into 2 frames"):
        model(torch.randn(1, 7, 8), frames=2)
    with pytest.raises(ValueError, match="3 frames but the frame embeddings cover 2 frames"):
        model(torch.randn(1, 6, 8), frames=3)
    with pytest.raises(ValueError, match="frames must be at least 1"):
        model(torch.randn(1, 6, 8), frames=0)
    with pytest.raises(ValueError, match="cannot be split"):
        _resampler(max_frames=0)(torch.randn(1, 7, 8), frames=2)  # no embeddings: still checked
    _resampler(max_frames=0)(torch.randn(1, 6, 8), frames=3)  # no embeddings: any frame count


def test_gradients_reach_every_parameter():
    model = _resampler(max_frames=3).train()
    model(torch.randn(2, 6, 8), frames=3).pow(2).sum().backward()
    assert_every_parameter_gets_a_gradient(model, {"latents", "frame_embeddings", "proj.weight", "out_norm.weight"})


def test_connector_builds_the_perceiver_and_forwards_frames():
    cfg = ConnectorConfig(kind="perceiver", num_latents=5, depth=1, num_heads=4, max_frames=2)
    connector = Connector(cfg, 8, 12)
    assert isinstance(connector.core, PerceiverResampler)
    assert connector(torch.randn(2, 6, 8), frames=2).shape == (2, 5, 12)
    with pytest.raises(ValueError, match="cover 2 frames"):
        connector(torch.randn(2, 6, 8), frames=3)
    pooled = Connector(ConnectorConfig(kind="perceiver", num_latents=5, depth=1, pool_stride=2), 8, 12)
    assert pooled(torch.randn(2, 6, 8)).shape == (2, 5, 12)  # one frame: pooling is fine
    with pytest.raises(ValueError, match="pool_stride 2 cannot be combined with a resampler over 3 frames"):
        pooled(torch.randn(2, 6, 8), frames=3)
    # other kinds ignore frames
    assert Connector(ConnectorConfig(kind="linear"), 8, 12)(torch.randn(2, 6, 8), frames=3).shape == (2, 6, 12)


def test_end_to_end_image_perceiver(tokenizer_dir, media_dir):
    cfg = tiny_config(tokenizer_dir, image=None)
    cfg.encoders["image"] = EncoderConfig(modality="image", hf_config=dict(TINY_VIT), feature_layer=-2)
    cfg.connectors["image"] = ConnectorConfig(kind="perceiver", num_latents=4, depth=2, num_heads=4)
    model = MultimodalLM.from_config(cfg)
    assert model.media_token_count("image", (3, 16, 16)) == 4
    samples = [Sample(f"s{i}", [Message("user", "<image>\nwhat colour is it?"), Message("assistant", answer)],
                      {"image": [media_dir / image]}) for i, (image, answer) in enumerate([("a.png", "red"), ("b.png", "blue")])]
    batch = model.collator()([model.processor(s) for s in samples])
    out = model(**batch)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.connectors["image"].parameters())


def test_video_encode_media_passes_the_frame_count(tokenizer_dir):
    cfg = tiny_config(tokenizer_dir, image=None)
    cfg.encoders["video"] = EncoderConfig(modality="video", hf_config=dict(TINY_VIT), feature_layer=-2, frames=3)
    cfg.connectors["video"] = ConnectorConfig(kind="perceiver", num_latents=4, depth=1, num_heads=4, max_frames=3)
    model = MultimodalLM.from_config(cfg).eval()
    clip = torch.randn(2, 3, 3, 16, 16)  # (n, frames, 3, H, W)
    with torch.no_grad():
        out = model.encode_media({"video": clip})["video"]
        assert out.shape == (2, 4, 32)
        assert model.media_token_count("video", (3, 3, 16, 16)) == 4
        # the frame embeddings were used: reversing the frames changes the output
        assert not torch.allclose(out, model.encode_media({"video": clip.flip(1)})["video"], atol=1e-5)
        with pytest.raises(ValueError, match="4 frames but the frame embeddings cover 3 frames"):
            model.encode_media({"video": torch.randn(1, 4, 3, 16, 16)})


def test_qformer_frame_embeddings_make_frame_order_matter():
    from mmfuse.connectors.qformer import QFormerResampler

    torch.manual_seed(0)
    qformer = QFormerResampler(8, 8, num_queries=2, depth=1, num_heads=2, cross_attention_every=1, max_frames=4).eval()
    video = torch.randn(1, 4 * 3, 8)  # 4 frames of 3 tokens
    reversed_frames = video.reshape(1, 4, 3, 8).flip(1).reshape(1, 12, 8)
    assert not torch.allclose(qformer(video, frames=4), qformer(reversed_frames, frames=4), atol=1e-5)
    plain = QFormerResampler(8, 8, num_queries=2, depth=1, num_heads=2, cross_attention_every=1).eval()
    torch.testing.assert_close(plain(video, frames=4), plain(reversed_frames, frames=4))  # a bag of tokens without them
    with pytest.raises(ValueError, match="qformer: the input has 5 frames but the frame embeddings cover 4"):
        qformer(torch.randn(1, 10, 8), frames=5)
