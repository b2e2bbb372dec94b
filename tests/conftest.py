"""Shared fixtures: tiny random backbones built from configs and a tiny tokenizer; no network."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mmfuse.config import ConnectorConfig, EncoderConfig, LLMConfig, MultimodalConfig
from mmfuse.data.processor import Processor
from mmfuse.data.schema import Message, Sample

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n"
    "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}<|end|>{% endgeneration %}"
    "{% else %}{{ m['content'] }}<|end|>{% endif %}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

TINY_LLMS = {
    "llama": {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256},
    "qwen2": {"model_type": "qwen2", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256},
    "gpt2": {"model_type": "gpt2", "n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 256},
}

TINY_VIT = {"model_type": "vit", "image_size": 16, "patch_size": 8, "hidden_size": 24, "num_hidden_layers": 2,
            "num_attention_heads": 4, "intermediate_size": 48}
TINY_WHISPER = {"model_type": "whisper", "num_mel_bins": 16, "d_model": 24, "encoder_layers": 1,
                "encoder_attention_heads": 4, "encoder_ffn_dim": 48, "decoder_layers": 1,
                "decoder_attention_heads": 4, "decoder_ffn_dim": 48, "max_source_positions": 50,
                "vocab_size": 8, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2,
                "decoder_start_token_id": 1, "max_target_positions": 8}


def _train_tokenizer(directory: Path, chat_template: str | None) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|pad|>", "<|begin_of_text|>", "<|end_of_text|>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = ["what colour is the circle? red.", "a small blue square at the top left.", "how many shapes are there? two.",
              "what is the pitch of the tone? high.", "User: Assistant: hello world"] * 20
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=200, special_tokens=specials,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>",
                                   pad_token="<|pad|>")
    if chat_template:
        fast.chat_template = chat_template
    fast.save_pretrained(str(directory))
    return directory


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    return _train_tokenizer(tmp_path_factory.mktemp("tok_chat"), CHAT_TEMPLATE)


@pytest.fixture(scope="session")
def plain_tokenizer_dir(tmp_path_factory) -> Path:
    return _train_tokenizer(tmp_path_factory.mktemp("tok_plain"), None)


def tiny_config(tokenizer_dir: Path, llm: str = "llama", *, image: str | None = "linear", audio: str | None = None,
                vocab_size: int = 320, **kwargs) -> MultimodalConfig:
    llm_cfg = dict(TINY_LLMS[llm], vocab_size=vocab_size)
    encoders, connectors = {}, {}
    if image:
        encoders["image"] = EncoderConfig(modality="image", hf_config=dict(TINY_VIT), feature_layer=-2)
        connectors["image"] = ConnectorConfig(kind=image, num_queries=4, depth=2, num_heads=4)
    if audio:
        encoders["audio"] = EncoderConfig(modality="audio", hf_config=dict(TINY_WHISPER))
        connectors["audio"] = ConnectorConfig(kind=audio, pool_stride=2)
    return MultimodalConfig(llm=LLMConfig(hf_config=llm_cfg, tokenizer=str(tokenizer_dir)), encoders=encoders,
                            connectors=connectors, **kwargs)


@pytest.fixture
def media_dir(tmp_path) -> Path:
    """Two small PNGs (one non-square) and a 0.5 s WAV."""
    import soundfile

    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    Image.fromarray(rng.integers(0, 255, (12, 20, 3), dtype=np.uint8)).save(tmp_path / "b.png")
    t = np.arange(8000) / 16000
    soundfile.write(str(tmp_path / "a.wav"), (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), 16000)
    return tmp_path


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def assert_every_parameter_gets_a_gradient(module: torch.nn.Module, names: set[str]) -> None:
    """``names`` are among the module's parameters, and every parameter has a non-zero gradient."""
    params = dict(module.named_parameters())
    assert names <= set(params), names - set(params)
    for name, p in params.items():
        assert p.grad is not None and p.grad.abs().sum() > 0, name



def processor_with_policy(model, on_bad_sample: str) -> Processor:
    """``model``'s processor, but with its own bad-sample policy and log."""
    return Processor(model.tokenizer, model.media_processors, model.media_token_count, model.fusion.layout,
                     max_length=model.processor.max_length, on_bad_sample=on_bad_sample)


def two_image_prompts(media_dir: Path) -> list[Sample]:
    """Two generation prompts of different lengths, one image each (left padding differs between rows)."""
    return [Sample(f"g{i}", [Message("user", f"{'look ' * i}<image> what colour?")], {"image": [media_dir / f]})
            for i, f in enumerate(("a.png", "b.png"))]


def cached_and_uncached(model, samples: list[Sample], new_tokens: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy replies of exactly ``new_tokens`` tokens to ``samples`` (left-padded), with and without the KV cache."""
    batch = model.collator("left")([model.processor(s, for_generation=True) for s in samples])
    kw = dict(max_new_tokens=new_tokens, do_sample=False, min_new_tokens=new_tokens)
    return tuple(model.generate(batch["input_ids"], batch["attention_mask"], batch["media"], use_cache=c, **kw) for c in (True, False))

