"""mmfuse Type-C (``MultimodalLM``) vs transformers' ``LlavaForConditionalGeneration``, same sizes.

Both models are the same architecture (CLIP vision tower, penultimate layer, CLS dropped; LLaVA-1.5
``mlp2x_gelu`` projector; Llama decoder), hold the same weights (copied mmfuse -> HF) and see the same
tensors; their logits are checked to agree before anything is timed. Figures: train-step time,
greedy decode tokens/s (batch 1 and 8), time to first token, peak memory, and ours/HF ratios.

    python benchmarks/bench_type_c.py --threads 2 --json results.json
"""

from __future__ import annotations

import gc
import sys
from pathlib import Path

import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    BOS,
    PAD,
    SIZES,
    Contender,
    hf_generate,
    lm_loss,
    mmfuse_generate,
    rows,
    text_config,
    measure_generation,
    measure_training,
    paired_ratio,
    parse_benchmark_args,
    print_table,
    ratio,
    run_sizes,
    timing_rows,
)

from mmfuse.config import ConnectorConfig, EncoderConfig, LLMConfig, MultimodalConfig  # noqa: E402
from mmfuse.fusion import PLACEHOLDER_IDS  # noqa: E402
from mmfuse.model import MultimodalLM  # noqa: E402

# One small CLIP vision tower shared by all decoder sizes (common.SIZES).
VISION = {"image_size": 64, "patch_size": 8, "hidden_size": 128, "intermediate_size": 512,
          "num_hidden_layers": 3, "num_attention_heads": 4}
LOGITS_ATOL = 1e-4
ACCEPT_TRAIN_RATIO = 1.05

MMFUSE, HF = "mmfuse", "hf-llava"


# -- models ----------------------------------------------------------------------------------------

def build_mmfuse(size: str, vocab_size: int, vision: CLIPVisionConfig, tokenizer_dir: Path) -> MultimodalLM:
    cfg = MultimodalConfig(
        llm=LLMConfig(hf_config=text_config(size, vocab_size), tokenizer=str(tokenizer_dir)),
        encoders={"image": EncoderConfig(modality="image", hf_config=vision.to_dict(), feature_layer=-2, drop_cls="auto")},
        connectors={"image": ConnectorConfig(kind="mlp2x_gelu")},
        max_length=1024,
    )
    model = MultimodalLM.from_config(cfg)
    model.encoders.requires_grad_(False)  # LLaVA-1.5 stage 2: vision tower frozen, projector + LLM trained
    return model


def build_hf(size: str, vocab_size: int, vision: CLIPVisionConfig, image_tokens: int) -> LlavaForConditionalGeneration:
    text = dict(text_config(size, vocab_size))
    text.pop("model_type")
    cfg = LlavaConfig(
        vision_config=vision,
        text_config=LlamaConfig(**text),
        image_token_id=vocab_size - 1,  # the last id is reserved for the image placeholder
        image_seq_length=image_tokens,
        projector_hidden_act="gelu",
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        multimodal_projector_bias=True,
        tie_word_embeddings=False,
        pad_token_id=PAD,
    )
    model = LlavaForConditionalGeneration(cfg)
    model.model.vision_tower.requires_grad_(False)
    return model


def hf_key(key: str) -> str:
    """mmfuse state-dict key -> LlavaForConditionalGeneration key."""
    for src, dst in (
        ("llm.model.", "model.language_model."),
        ("llm.lm_head.", "lm_head."),
        ("encoders.image.model.", "model.vision_tower."),
        ("connectors.image.core.0.", "model.multi_modal_projector.linear_1."),
        ("connectors.image.core.2.", "model.multi_modal_projector.linear_2."),
    ):
        if key.startswith(src):
            return dst + key[len(src):]
    raise KeyError(f"no LLaVA counterpart for mmfuse parameter {key!r}")


def copy_weights(ours: MultimodalLM, hf: LlavaForConditionalGeneration) -> None:
    hf.load_state_dict({hf_key(k): v for k, v in ours.state_dict().items()}, strict=True)


# -- batches ---------------------------------------------------------------------------------------
def make_batches(batch_size: int, text_tokens: int, image_tokens: int, image_size: int, vocab_size: int,
                 image_token_id: int, device: torch.device, seed: int):
    """The same tensors for both models; only the placeholder id differs. Row layout:
    ``<bos> <image x image_tokens> text x (text_tokens - 1)``; labels on the text after the image."""
    g = torch.Generator().manual_seed(seed)
    pixel_values = torch.randn(batch_size, 3, image_size, image_size, generator=g)
    text = torch.randint(8, vocab_size - 1, (batch_size, text_tokens - 1), generator=g)
    bos = torch.full((batch_size, 1), BOS)

    def ids(placeholder: int) -> torch.Tensor:
        return torch.cat([bos, torch.full((batch_size, image_tokens), placeholder), text], dim=1)

    ours_ids, hf_ids = ids(PLACEHOLDER_IDS["image"]), ids(image_token_id)
    labels = ours_ids.clone()
    labels[:, : 1 + image_tokens] = -100
    mask = torch.ones_like(ours_ids)
    to = lambda t: t.to(device)  # noqa: E731
    ours = {"input_ids": to(ours_ids), "attention_mask": to(mask), "labels": to(labels), "media": {"image": to(pixel_values)}}
    hf = {"input_ids": to(hf_ids), "attention_mask": to(mask), "labels": to(labels), "pixel_values": to(pixel_values)}
    return ours, hf


# -- one size --------------------------------------------------------------------------------------
def bench_size(size: str, args, device: torch.device, tokenizer_dir: Path) -> dict:
    vision = CLIPVisionConfig(**VISION)
    torch.manual_seed(args.seed)
    ours = build_mmfuse(size, args.vocab_size, vision, tokenizer_dir).to(device)
    image_tokens = ours.media_token_count("image", (3, vision.image_size, vision.image_size))
    hf = build_hf(size, args.vocab_size, vision, image_tokens).to(device)
    copy_weights(ours, hf)

    # Same architecture: image tokens, parameter counts, trainable set, attention kernels.
    with torch.no_grad():
        hf_image_tokens = hf.model.get_image_features(
            pixel_values=torch.zeros(1, 3, vision.image_size, vision.image_size, device=device)
        ).pooler_output[0].shape[0]
    assert image_tokens == hf_image_tokens == (vision.image_size // vision.patch_size) ** 2, (image_tokens, hf_image_tokens)
    batches = make_batches(args.batch_size, args.text_tokens, image_tokens, vision.image_size, args.vocab_size,
                           hf.config.image_token_id, device, args.seed)
    ours_c = Contender(MMFUSE, ours, lambda n, g: rows(batches[0], n, g), lm_loss, mmfuse_generate)
    hf_c = Contender(HF, hf, lambda n, g: rows(batches[1], n, g), lm_loss, hf_generate)
    params = {c.name: c.parameter_count() for c in (ours_c, hf_c)}
    assert params[MMFUSE] == params[HF], f"parameter counts differ: {params}"
    attn = {MMFUSE: ours.llm.config._attn_implementation, HF: hf.config.text_config._attn_implementation}
    assert attn[MMFUSE] == attn[HF], f"attention implementations differ: {attn}"


    # Same function: logits and loss agree on the benchmark batch.
    ours.eval(), hf.eval()
    with torch.no_grad():
        o, h = ours(**batches[0]), hf(**batches[1])
    max_diff = (o.logits - h.logits).abs().max().item()
    loss_diff = abs(o.loss.item() - h.loss.item())
    assert o.logits.shape == h.logits.shape and max_diff <= LOGITS_ATOL, f"logits differ by {max_diff:.2e}"
    del o, h

    result = {
        "size": size,
        "text_config": text_config(size, args.vocab_size),
        "vision_config": VISION,
        "image_tokens": image_tokens,
        "sequence_length": 1 + image_tokens + args.text_tokens - 1,
        "parameters": params,
        "attn_implementation": attn,
        "check": {"max_abs_logit_diff": max_diff, "loss_diff": loss_diff},
        "generation": {},
    }
    # Generation first: training changes the weights.
    for b in args.gen_batch_sizes:
        gen = measure_generation([ours_c, hf_c], device, batch_size=b, new_tokens=args.new_tokens,
                                 repeats=args.gen_repeats, warmup=1)
        same = gen[MMFUSE]["tokens"] == gen[HF]["tokens"]
        result["generation"][b] = {"identical_tokens": same, **gen}
    result["training"] = measure_training([ours_c, hf_c], device, batch_size=args.batch_size, steps=args.steps,
                                          warmup=args.warmup)
    tr = result["training"]
    result["train_step_ratio"] = ratio(tr[MMFUSE]["step"]["median_s"], tr[HF]["step"]["median_s"])
    result["train_step_paired_ratio"] = paired_ratio(tr[MMFUSE]["step"]["samples_s"], tr[HF]["step"]["samples_s"])
    ratios = {
        "train_step_median": result["train_step_ratio"],
        "train_step_paired": result["train_step_paired_ratio"],
        "train_step_cpu_median": ratio(tr[MMFUSE]["step_cpu"]["median_s"], tr[HF]["step_cpu"]["median_s"]),
        "train_peak_memory": ratio(tr[MMFUSE]["peak_memory_mb"], tr[HF]["peak_memory_mb"]),
    }
    for b, gen in result["generation"].items():
        o, h = gen[MMFUSE], gen[HF]
        ratios[f"decode_tokens_per_s_b{b}"] = ratio(o["tokens_per_s"], h["tokens_per_s"])
        ratios[f"generate_cpu_b{b}"] = ratio(o["generate_cpu"]["median_s"], h["generate_cpu"]["median_s"])
        ratios[f"ttft_b{b}"] = ratio(o["ttft"]["median_s"], h["ttft"]["median_s"])
        ratios[f"ttft_cpu_b{b}"] = ratio(o["ttft_cpu"]["median_s"], h["ttft_cpu"]["median_s"])
        ratios[f"generate_peak_memory_b{b}"] = ratio(o["peak_memory_mb"], h["peak_memory_mb"])
    result["ratios_ours_over_hf"] = ratios
    result["train_step_accept"] = result["train_step_ratio"] <= ACCEPT_TRAIN_RATIO
    del ours, hf, ours_c, hf_c
    gc.collect()
    return result


# -- report ----------------------------------------------------------------------------------------
def report(res: dict, args) -> None:
    p = res["parameters"][MMFUSE]
    rows_ = [
        ["parameters (total / trainable)", f"{p['total']:,} / {p['trainable']:,}",
         f"{res['parameters'][HF]['total']:,} / {res['parameters'][HF]['trainable']:,}", "equal"],
        ["max |logit diff| / |loss diff|", f"{res['check']['max_abs_logit_diff']:.1e}", f"{res['check']['loss_diff']:.1e}", ""],
    ]
    rows_ += timing_rows(res, MMFUSE, HF, args.batch_size, args.new_tokens)
    cfg = res["text_config"]
    title = (f"Type-C {res['size']}: Llama {cfg['num_hidden_layers']}L/{cfg['hidden_size']}d, "
             f"{res['image_tokens']} image + {args.text_tokens} text tokens")
    print_table(title, ["metric", "mmfuse", "HF Llava", "ours/HF"], rows_)
    verdict = "PASS" if res["train_step_accept"] else "FAIL"
    print(f"train-step ratio {res['train_step_ratio']:.3f} (accept <= {ACCEPT_TRAIN_RATIO}): {verdict}")


def main(argv=None) -> int:
    args = parse_benchmark_args(__doc__, SIZES, argv, strict_help="exit 1 when the train-step ratio exceeds the acceptance bound")
    return run_sizes(args, bench_size, report, lambda r: r["train_step_accept"], "accept")


if __name__ == "__main__":
    sys.exit(main())
