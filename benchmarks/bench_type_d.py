"""mmfuse Type-D (``MultimodalLM``, tokenized early fusion) vs transformers' ``ChameleonForConditionalGeneration``.

Both models are the same function: a Llama-like decoder with Chameleon's per-head q/k LayerNorm
(mmfuse ``qk_norm=True``: forward hooks on ``q_proj``/``k_proj``; Chameleon: ``q_norm``/``k_norm``
inside its attention), one vocabulary of text rows + ``<boi>``, ``<eoi>`` + one row per VQ code, and
the same ``ChameleonVQVAE`` image tokenizer (mmfuse codec kind ``chameleon``). mmfuse's weights (LLM,
qk-norms, VQ-VAE) are copied into the Chameleon model, whose ``vocabulary_map`` sends VQ code ``k`` to
mmfuse's id ``first_code + k``; the image ids and the logits are checked to agree before anything is
timed. Figures: train-step time, greedy decode tokens/s (batch 1 and 8), time to first token, peak
memory, and ours/HF ratios, with a PASS/FAIL verdict per target.

    python benchmarks/bench_type_d.py --threads 1 --json type_d.json

(On a loaded 2-core machine ``--threads 2`` makes wall times meaningless: OpenMP barriers wait for
descheduled threads. The CPU-time and paired ratios are printed next to every verdict.)
"""

from __future__ import annotations

import gc
import sys
from pathlib import Path

import torch
from torch.nn import functional as F
from transformers import ChameleonConfig, ChameleonForConditionalGeneration

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    BOS,
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

from mmfuse.config import CodecConfig, FusionConfig, LLMConfig, MultimodalConfig  # noqa: E402
from mmfuse.fusion import PLACEHOLDER_IDS  # noqa: E402
from mmfuse.model import MultimodalLM  # noqa: E402

# One small VQ-VAE shared by all decoder sizes (common.SIZES): 32x32 images, 3 levels (factor 4) ->
# 8x8 = 64 codes per image, a codebook of 256; tiny next to the decoder, as the CLIP tower of bench_type_c.
VQ = {"model_type": "chameleon_vqgan", "resolution": 32, "in_channels": 3, "base_channels": 32,
      "channel_multiplier": [1, 2, 2], "num_res_blocks": 1, "attn_resolutions": None, "attn_type": "vanilla",
      "latent_channels": 32, "embed_dim": 32, "num_embeddings": 256, "double_latent": False, "dropout": 0.0}
LOGITS_ATOL = 1e-4
ACCEPT_TRAIN_RATIO = 1.05  # train step ours/HF at most this
ACCEPT_DECODE_RATIO = 0.98  # decode tok/s ours/HF at least this ("at least equal", with 2 % for noise)

MMFUSE, HF = "mmfuse", "hf-chameleon"


# -- models ----------------------------------------------------------------------------------------
def build_mmfuse(size: str, vocab_size: int, tokenizer_dir: Path) -> MultimodalLM:
    cfg = MultimodalConfig(
        llm=LLMConfig(hf_config=text_config(size, vocab_size), tokenizer=str(tokenizer_dir)),
        codecs={"image": CodecConfig(modality="image", settings={"kind": "chameleon", "hf_config": dict(VQ)})},
        fusion=FusionConfig(type="D", options={"qk_norm": True, "loss": "all", "init": "mean"}),
        max_length=1024,
    )
    model = MultimodalLM.from_config(cfg)
    model.codecs.requires_grad_(False)  # the tokenizer is frozen (Chameleon's vqmodel too)
    return model


def code_name(code: int) -> str:
    """Chameleon's BPE name of VQ code ``code``: ``IMGIMG`` + its decimal digits as letters A-J + ``Z``."""
    return "IMGIMG" + "".join(chr(ord("A") + int(d)) for d in str(code)) + "Z"


def build_hf(ours: MultimodalLM, image_token_id: int) -> ChameleonForConditionalGeneration:
    """A Chameleon config matching ``ours``: the same decoder dims, eps, RoPE, special ids, the extended
    vocabulary size, VQ code k -> mmfuse's id ``first_code + k``, ``<image>`` = ``image_token_id``."""
    llm = ours.llm.config
    vocab = ours.fusion.vocabularies["image"]
    vocabulary_map = {"<image>": image_token_id}
    vocabulary_map.update({code_name(k): vocab.first_code + k for k in range(vocab.codebook_size)})
    cfg = ChameleonConfig(
        vocab_size=ours.fusion.vocab_size,
        hidden_size=llm.hidden_size,
        intermediate_size=llm.intermediate_size,
        num_hidden_layers=llm.num_hidden_layers,
        num_attention_heads=llm.num_attention_heads,
        num_key_value_heads=llm.num_key_value_heads,
        hidden_act=llm.hidden_act,
        max_position_embeddings=llm.max_position_embeddings,
        rms_norm_eps=llm.rms_norm_eps,  # Llama's 1e-6; Chameleon's default is 1e-5
        rope_parameters=dict(llm.rope_parameters),
        attention_bias=llm.attention_bias,
        mlp_bias=llm.mlp_bias,
        tie_word_embeddings=False,
        pad_token_id=llm.pad_token_id,
        bos_token_id=llm.bos_token_id,
        eos_token_id=llm.eos_token_id,
        swin_norm=False,  # Llama's pre-norm layer order
        model_parallel_size=1,
        vq_config=ours.codecs["image"].model.config.to_dict(),
        vocabulary_map=vocabulary_map,
    )
    cfg._attn_implementation = llm._attn_implementation
    model = ChameleonForConditionalGeneration(cfg)
    model.model.vqmodel.requires_grad_(False)
    return model


def hf_key(key: str) -> str:
    """mmfuse state-dict key -> ChameleonForConditionalGeneration key."""
    if key.startswith("fusion.qk_norms."):  # order: layer0 q, layer0 k, layer1 q, ...
        index, param = key[len("fusion.qk_norms."):].split(".")
        layer, which = divmod(int(index), 2)
        return f"model.layers.{layer}.self_attn.{'qk'[which]}_norm.{param}"
    for src, dst in (("llm.model.", "model."), ("llm.lm_head.", "lm_head."), ("codecs.image.model.", "model.vqmodel.")):
        if key.startswith(src):
            return dst + key[len(src):]
    raise KeyError(f"no Chameleon counterpart for mmfuse parameter {key!r}")


def copy_weights(ours: MultimodalLM, hf: ChameleonForConditionalGeneration) -> None:
    hf.load_state_dict({hf_key(k): v for k, v in ours.state_dict().items()}, strict=True)


# -- batches ---------------------------------------------------------------------------------------
def make_batches(batch_size: int, text_tokens: int, image_tokens: int, ours: MultimodalLM, image_token_id: int,
                 device: torch.device, seed: int):
    """The same tensors for both models; only the placeholder id differs. Row layout (mmfuse's
    processor layout): ``<bos> <boi> <image x image_tokens> <eoi> text x (text_tokens - 1)``; labels on
    the text after the image. Pixels uniform in [-1, 1] (Chameleon's normalisation)."""
    vocab = ours.fusion.vocabularies["image"]
    g = torch.Generator().manual_seed(seed)
    side = VQ["resolution"]
    pixel_values = torch.rand(batch_size, 3, side, side, generator=g) * 2 - 1
    text = torch.randint(8, ours.fusion.text_vocab_size - 1, (batch_size, text_tokens - 1), generator=g)
    column = lambda v: torch.full((batch_size, 1), v)  # noqa: E731

    def ids(placeholder: int) -> torch.Tensor:
        return torch.cat([column(BOS), column(vocab.begin), torch.full((batch_size, image_tokens), placeholder),
                          column(vocab.end), text], dim=1)

    ours_ids, hf_ids = ids(PLACEHOLDER_IDS["image"]), ids(image_token_id)
    labels = ours_ids.clone()
    labels[:, : 3 + image_tokens] = -100
    mask = torch.ones_like(ours_ids)
    to = lambda t: t.to(device)  # noqa: E731
    ours_b = {"input_ids": to(ours_ids), "attention_mask": to(mask), "labels": to(labels), "media": {"image": to(pixel_values)}}
    hf_b = {"input_ids": to(hf_ids), "attention_mask": to(mask), "labels": to(labels), "pixel_values": to(pixel_values)}
    return ours_b, hf_b


# -- checks ----------------------------------------------------------------------------------------
def check_same_function(ours: MultimodalLM, hf: ChameleonForConditionalGeneration, batches) -> dict:
    """Image ids, logits and loss of the two models on the benchmark batch.

    Chameleon's forward sets the logits of every VQ-code id to ``finfo.min`` (always, training included),
    so the logits are compared on the other columns, the code columns are checked to be masked, and
    the loss is compared both raw and with mmfuse's logits masked the same way. The loss with labels on
    the image codes as well (Chameleon's own training) is recorded: finite for mmfuse, infinite for HF."""
    ob, hb = batches
    code_ids = torch.tensor(hf.model.vocabulary_mapping.image_tokens, device=ob["input_ids"].device)
    vocab = ours.fusion.vocabularies["image"]
    assert torch.equal(code_ids.cpu(), torch.arange(vocab.first_code, vocab.first_code + vocab.codebook_size)), \
        "Chameleon's image tokens are not mmfuse's code ids"
    ours.eval(), hf.eval()
    with torch.no_grad():
        our_ids = ours.llm_inputs(ob["input_ids"], ob["media"])["input_ids"]
        hf_codes = hf.model.get_image_tokens(hb["pixel_values"])
        image_positions = ob["input_ids"] == PLACEHOLDER_IDS["image"]
        assert torch.equal(our_ids[image_positions].view_as(hf_codes), hf_codes.to(our_ids.dtype)), "image ids differ"
        o, h = ours(**ob), hf(**hb)
        # Chameleon trains on the image codes too; with labels on them, HF's masked logits give an infinite loss
        code_labels = torch.where(image_positions, our_ids, ob["labels"])
        o_codes = ours(**{**ob, "labels": code_labels}).loss.item()
        h_codes = hf(**{**hb, "labels": code_labels}).loss.item()
    assert o.logits.shape == h.logits.shape, (o.logits.shape, h.logits.shape)
    keep = torch.ones(o.logits.shape[-1], dtype=torch.bool, device=code_ids.device)
    keep[code_ids] = False
    max_diff = (o.logits[..., keep] - h.logits[..., keep]).abs().max().item()
    codes_masked = bool((h.logits[..., code_ids] == torch.finfo(h.logits.dtype).min).all())
    masked = o.logits.masked_fill(~keep, torch.finfo(o.logits.dtype).min)
    masked_loss = F.cross_entropy(masked[:, :-1].flatten(0, 1), ob["labels"][:, 1:].flatten(), ignore_index=-100)
    out = {
        "max_abs_logit_diff": max_diff,
        "hf_code_logits_masked": codes_masked,
        "loss_ours": o.loss.item(),
        "loss_hf": h.loss.item(),
        "loss_diff": abs(o.loss.item() - h.loss.item()),
        "masked_loss_diff": abs(masked_loss.item() - h.loss.item()),
        "distinct_codes_in_batch": int(hf_codes.unique().numel()),
        "loss_with_code_labels_ours": o_codes,
        "loss_with_code_labels_hf": h_codes,
    }
    assert max_diff <= LOGITS_ATOL, f"logits differ by {max_diff:.2e}"
    assert codes_masked, "Chameleon did not mask its image-token logits"
    assert out["masked_loss_diff"] <= LOGITS_ATOL, f"losses differ by {out['masked_loss_diff']:.2e} with the same mask"
    return out


# -- one size --------------------------------------------------------------------------------------
def bench_size(size: str, args, device: torch.device, tokenizer_dir: Path) -> dict:
    torch.manual_seed(args.seed)
    ours = build_mmfuse(size, args.vocab_size, tokenizer_dir).to(device)
    side = VQ["resolution"]
    image_tokens = ours.media_token_count("image", (3, side, side))
    image_token_id = ours.fusion.text_vocab_size - 1  # the last text id stands for <image> in Chameleon's input
    hf = build_hf(ours, image_token_id).to(device)
    copy_weights(ours, hf)
    with torch.no_grad():
        hf_image_tokens = hf.model.get_image_tokens(torch.zeros(1, 3, side, side, device=device)).shape[1]
    factor = 2 ** (len(VQ["channel_multiplier"]) - 1)
    assert image_tokens == hf_image_tokens == (side // factor) ** 2, (image_tokens, hf_image_tokens)

    batches = make_batches(args.batch_size, args.text_tokens, image_tokens, ours, image_token_id, device, args.seed)
    ours_c = Contender(MMFUSE, ours, lambda n, g: rows(batches[0], n, g), lm_loss, mmfuse_generate)
    hf_c = Contender(HF, hf, lambda n, g: rows(batches[1], n, g), lm_loss, hf_generate)
    params = {c.name: c.parameter_count() for c in (ours_c, hf_c)}
    assert params[MMFUSE] == params[HF], f"parameter counts differ: {params}"
    attn = {MMFUSE: ours.llm.config._attn_implementation, HF: hf.config._attn_implementation}
    assert attn[MMFUSE] == attn[HF], f"attention implementations differ: {attn}"
    check = check_same_function(ours, hf, batches)

    vocab = ours.fusion.vocabularies["image"]
    result = {
        "size": size,
        "text_config": text_config(size, args.vocab_size),
        "vq_config": VQ,
        "vocabulary": {"text": ours.fusion.text_vocab_size, "boi": vocab.begin, "eoi": vocab.end,
                       "first_code": vocab.first_code, "codebook_size": vocab.codebook_size,
                       "total": ours.fusion.vocab_size, "hf_image_token_id": image_token_id},
        "image_tokens": image_tokens,
        "sequence_length": 1 + image_tokens + 2 + args.text_tokens - 1,
        "parameters": params,
        "attn_implementation": attn,
        "check": check,
        "generation": {},
    }
    # Generation first: training changes the weights.
    for b in args.gen_batch_sizes:
        gen = measure_generation([ours_c, hf_c], device, batch_size=b, new_tokens=args.new_tokens,
                                 repeats=args.gen_repeats, warmup=1)
        result["generation"][b] = {"identical_tokens": gen[MMFUSE]["tokens"] == gen[HF]["tokens"], **gen}
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
    # name -> (wall-time ratio that decides, paired wall ratio, CPU-time ratio, pass); the two others are
    # printed next to it because wall time on a loaded machine can swing by tens of percent
    targets = {f"train step ours/HF <= {ACCEPT_TRAIN_RATIO}": (
        result["train_step_ratio"], ratios["train_step_paired"], ratios["train_step_cpu_median"],
        result["train_step_ratio"] <= ACCEPT_TRAIN_RATIO)}
    for b, gen in result["generation"].items():
        o, h = gen[MMFUSE], gen[HF]
        ratios[f"decode_tokens_per_s_b{b}"] = r = ratio(o["tokens_per_s"], h["tokens_per_s"])
        ratios[f"decode_tokens_per_s_paired_b{b}"] = 1 / paired_ratio(o["generate"]["samples_s"], h["generate"]["samples_s"])
        ratios[f"decode_only_tokens_per_s_b{b}"] = ratio(o["decode_only_tokens_per_s"], h["decode_only_tokens_per_s"])
        ratios[f"generate_cpu_b{b}"] = ratio(o["generate_cpu"]["median_s"], h["generate_cpu"]["median_s"])
        ratios[f"ttft_b{b}"] = ratio(o["ttft"]["median_s"], h["ttft"]["median_s"])
        ratios[f"ttft_cpu_b{b}"] = ratio(o["ttft_cpu"]["median_s"], h["ttft_cpu"]["median_s"])
        ratios[f"generate_peak_memory_b{b}"] = ratio(o["peak_memory_mb"], h["peak_memory_mb"])
        targets[f"decode tok/s b={b} ours/HF >= {ACCEPT_DECODE_RATIO}"] = (
            r, ratios[f"decode_tokens_per_s_paired_b{b}"], 1 / ratios[f"generate_cpu_b{b}"], r >= ACCEPT_DECODE_RATIO)
    result["ratios_ours_over_hf"] = ratios
    result["targets"] = {name: {"value": v, "paired": p, "cpu": c, "pass": ok} for name, (v, p, c, ok) in targets.items()}
    result["accept"] = all(t["pass"] for t in result["targets"].values())
    del ours, hf, ours_c, hf_c
    gc.collect()
    return result


# -- report ----------------------------------------------------------------------------------------
def report(res: dict, args) -> None:
    p, ph = res["parameters"][MMFUSE], res["parameters"][HF]
    c = res["check"]
    rows_ = [
        ["parameters (total / trainable)", f"{p['total']:,} / {p['trainable']:,}", f"{ph['total']:,} / {ph['trainable']:,}", "equal"],
        ["max |logit diff| (non-code ids)", f"{c['max_abs_logit_diff']:.1e}", "", ""],
        ["loss (text labels)", f"{c['loss_ours']:.5f}", f"{c['loss_hf']:.5f}", f"masked diff {c['masked_loss_diff']:.1e}"],
        ["loss (labels on image codes + text)", f"{c['loss_with_code_labels_ours']:.5f}", f"{c['loss_with_code_labels_hf']:.5f}", ""],
    ]
    paired = {b: res["ratios_ours_over_hf"][f"decode_tokens_per_s_paired_b{b}"] for b in res["generation"]}
    rows_ += timing_rows(res, MMFUSE, HF, args.batch_size, args.new_tokens, paired)
    cfg = res["text_config"]
    title = (f"Type-D {res['size']}: Llama+qk-norm {cfg['num_hidden_layers']}L/{cfg['hidden_size']}d, vocabulary "
             f"{res['vocabulary']['total']}, <boi> {res['image_tokens']} codes <eoi> + {args.text_tokens} text tokens")
    print_table(title, ["metric", "mmfuse", "HF Chameleon", "ours/HF"], rows_)
    for name, t in res["targets"].items():
        print(f"{res['size']}: {name}: {t['value']:.3f} {'PASS' if t['pass'] else 'FAIL'} "
              f"(paired {t['paired']:.3f}, CPU time {t['cpu']:.3f})")


def main(argv=None) -> int:
    args = parse_benchmark_args(__doc__, SIZES, argv, strict_help="exit 1 when a target (train step, decode tok/s) fails")
    return run_sizes(args, bench_size, report, lambda r: r["accept"], "accept")


if __name__ == "__main__":
    sys.exit(main())
