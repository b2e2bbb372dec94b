"""Audio Flamingo sliding-window connector: window count, window means, window order, errors, end to end."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_every_parameter_gets_a_gradient, tiny_config

from mmfuse.config import ConnectorConfig
from mmfuse.connectors import Connector, SlidingWindowTransformer
from mmfuse.data.schema import Message, Sample
from mmfuse.fusion import PLACEHOLDER_IDS
from mmfuse.model import MultimodalLM


def _windows(**kwargs) -> SlidingWindowTransformer:
    kwargs = {"window": 4, "hop": 2, "depth": 2, "num_heads": 2, **kwargs}
    return SlidingWindowTransformer(8, 6, **kwargs).eval()


def _manual_means(features: torch.Tensor, window: int, hop: int) -> torch.Tensor:
    """Window means by an explicit loop over the window starts."""
    starts = range(0, features.shape[1] - window + 1, hop)
    return torch.stack([features[:, s : s + window].mean(dim=1) for s in starts], dim=1)


@pytest.mark.parametrize(
    ("frames", "window", "hop"),
    [(4, 4, 2), (5, 4, 2), (6, 4, 2), (7, 4, 2), (50, 4, 2), (10, 3, 3), (11, 3, 3), (9, 2, 5), (100, 12, 8), (8, 1, 1)],
)
def test_window_count_formula(frames, window, hop):
    model = _windows(window=window, hop=hop, depth=1, max_windows=64)
    expected = len(range(0, frames - window + 1, hop))
    assert expected == 1 + (frames - window) // hop
    assert model.num_windows(frames) == expected
    with torch.no_grad():
        assert model(torch.randn(2, frames, 8)).shape == (2, expected, 6)


@pytest.mark.parametrize(("window", "hop"), [(4, 2), (3, 1), (4, 4), (2, 3), (5, 3)])
def test_each_window_is_the_mean_of_exactly_its_frames(window, hop):
    """depth 0: the input of the final norm is window mean + position embedding; depth 2: the same
    is the input of the first encoder layer. Off-by-one windows or an ignored hop would differ."""
    features = torch.randn(2, 17, 8)
    expected = _manual_means(features, window, hop)
    for depth, module in ((0, "out_norm"), (2, "layers.0")):
        model = _windows(window=window, hop=hop, depth=depth)
        captured = {}
        model.get_submodule(module).register_forward_pre_hook(lambda mod, args: captured.update(x=args[0]))
        with torch.no_grad():
            out = model(features)
        assert out.shape == (2, expected.shape[1], 6)
        positions = model.position_embeddings[: expected.shape[1]].detach()
        torch.testing.assert_close(captured["x"], expected + positions)
        torch.testing.assert_close(model.window_means(features), expected)


def test_frames_outside_every_window_do_not_matter():
    model = _windows(window=2, hop=3, depth=1)  # windows [0,1], [3,4], [6,7]; 2, 5, 8 unused
    features = torch.randn(2, 9, 8)
    changed = features.clone()
    changed[:, [2, 5, 8]] = torch.randn(2, 3, 8)
    inside = features.clone()
    inside[:, 4] = torch.randn(2, 8)  # a random change (a constant shift would vanish in the LayerNorms)
    with torch.no_grad():
        torch.testing.assert_close(model(features), model(changed))
        assert not torch.allclose(model(features), model(inside), atol=1e-5)


def test_order_within_a_window_does_not_matter_but_window_order_does():
    model = _windows(window=4, hop=4, depth=2)
    features = torch.randn(2, 12, 8)  # three non-overlapping windows of 4 frames
    within = features.clone()
    within[:, 4:8] = within[:, [7, 5, 4, 6]]
    swapped = features.clone()
    swapped[:, 0:4], swapped[:, 8:12] = features[:, 8:12], features[:, 0:4]
    with torch.no_grad():
        base = model(features)
        torch.testing.assert_close(model(within), base)
        assert not torch.allclose(model(swapped), base[:, [2, 1, 0]], atol=1e-4)
        # it is the position embeddings that make the order matter: without them the layers are
        # permutation-equivariant and swapping windows just swaps the outputs
        model.position_embeddings.zero_()
        torch.testing.assert_close(model(swapped), model(features)[:, [2, 1, 0]])


def test_too_short_and_too_many_windows_raise():
    model = _windows(window=4, hop=2, max_windows=5)
    with pytest.raises(ValueError, match="3 frames is fewer than one window of 4 frames"):
        model(torch.randn(1, 3, 8))
    assert model(torch.randn(1, 12, 8)).shape == (1, 5, 6)  # exactly max_windows
    with pytest.raises(ValueError, match="14 frames give 6 windows .* cover 5 windows"):
        model(torch.randn(1, 14, 8))
    with pytest.raises(ValueError, match="window and hop must be at least 1"):
        SlidingWindowTransformer(8, 6, window=0, hop=2)
    with pytest.raises(ValueError, match="feature_dim 8 is not divisible by num_heads 3"):
        SlidingWindowTransformer(8, 6, window=2, hop=2, num_heads=3)


def test_gradients_reach_every_parameter():
    model = _windows(depth=2).train()
    model(torch.randn(2, 10, 8)).pow(2).sum().backward()
    assert_every_parameter_gets_a_gradient(
        model, {"position_embeddings", "proj.weight", "out_norm.weight", "layers.1.self_attn.in_proj_weight"}
    )


def test_connector_builds_and_validates_the_windows_kind():
    cfg = ConnectorConfig(kind="windows", window=4, hop=2, depth=1, num_heads=4)
    assert ConnectorConfig.from_dict(cfg.to_dict()) == cfg
    connector = Connector(cfg, 8, 12)
    assert isinstance(connector.core, SlidingWindowTransformer)
    assert len(connector.core.layers) == 1 and connector.core.layers[0].self_attn.num_heads == 4
    assert connector(torch.randn(2, 10, 8)).shape == (2, 4, 12)
    pooled = Connector(ConnectorConfig(kind="windows", window=4, hop=2, depth=1, pool_stride=2), 8, 12)
    assert pooled(torch.randn(2, 20, 8)).shape == (2, 4, 12)  # windows over the 10 pooled frames
    long = Connector(ConnectorConfig(kind="windows", window=4, hop=4, depth=1, max_windows=375), 8, 12)
    assert long(torch.randn(1, 1500, 8)).shape == (1, 375, 12)  # Whisper's 1500 frames, one window per 80 ms
    with pytest.raises(ValueError, match="cover 64 windows"):
        Connector(ConnectorConfig(kind="windows", window=4, hop=4, depth=1), 8, 12)(torch.randn(1, 1500, 8))
    for window, hop in ((0, 2), (4, 0), (0, 0)):
        with pytest.raises(ValueError, match=f"kind 'windows' needs window >= 1 and hop >= 1.*window {window}, hop {hop}"):
            Connector(ConnectorConfig(kind="windows", window=window, hop=hop), 8, 12)


def test_end_to_end_audio_windows(tokenizer_dir, media_dir):
    cfg = tiny_config(tokenizer_dir, image=None, audio="linear")
    cfg.connectors["audio"] = ConnectorConfig(kind="windows", window=4, hop=2, depth=1, num_heads=4)
    model = MultimodalLM.from_config(cfg)
    item = model.media_processors["audio"](media_dir / "a.wav")
    with torch.no_grad():
        frames = model.encoders["audio"](item[None]).shape[1]
    assert frames == 50  # TINY_WHISPER max_source_positions
    expected = 1 + (frames - 4) // 2
    assert model.media_token_count("audio", tuple(item.shape)) == expected == 24

    samples = [Sample(f"s{i}", [Message("user", "<audio>\nwhat is the pitch of the tone?"), Message("assistant", answer)],
                      {"audio": [media_dir / "a.wav"]}) for i, answer in enumerate(["high", "low"])]
    encoded = [model.processor(s) for s in samples]
    assert int((torch.tensor(encoded[0].input_ids) == PLACEHOLDER_IDS["audio"]).sum()) == expected
    out = model(**model.collator()(encoded))
    assert torch.isfinite(out.loss)
    out.loss.backward()
    for name, p in model.connectors["audio"].named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
