"""mmfuse Type-B mechanisms against Hugging Face's own, same configs, same process.

1. Adapter prompts (LLaMA-Adapter V1) against peft's ``AdaptionPromptConfig`` on the same Llama
   decoder: 10 prompts in the top ``L - 1`` layers, the LLM frozen, the prompts and gates trained.
   Before timing, both are checked to give the bare LLM's logits at initialisation (zero gates).
   Figures: train-step time (fwd + bwd + AdamW) and the ours/peft ratio (target <= 1.05).
2. The visual expert (CogVLM) against the bare LLM: the same sequence with half its positions
   routed to expert copies of q/k/v/o and the MLP. Figures: forward (prefill) time and train-step time,
   each over the bare LLM's; the bare step trains the same modules of the LLM itself, so both update
   the same number of parameters.

    python benchmarks/bench_type_b.py --threads 2 --json results.json
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch
from peft import AdaptionPromptConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    SIZES,
    interleaved,
    machine_description,
    paired_ratio,
    parse_benchmark_args,
    pick_device,
    print_table,
    set_threads,
    write_json,
)

from mmfuse.fusion import AdapterPromptFusion, RoutedExpertFusion  # noqa: E402
from mmfuse.fusion.expert import ExpertContext  # noqa: E402

PROMPTS = 10


def llama(size: str, vocab_size: int, seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, max_position_embeddings=1024, num_key_value_heads=SIZES[size]["num_attention_heads"],
                         **SIZES[size])
    return LlamaForCausalLM(config)


def train_step(model, params, forward):
    optimizer = torch.optim.AdamW(params, lr=1e-4)

    def step():
        forward().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def bench_adapter(size: str, args, device) -> dict:
    base = llama(size, args.vocab_size, args.seed).to(device)
    layers = base.config.num_hidden_layers - 1
    ours_llm = copy.deepcopy(base)
    fusion = AdapterPromptFusion(prompt_length=PROMPTS, layers=layers)
    fusion.attach(ours_llm, {})
    fusion.to(device)
    peft_model = get_peft_model(copy.deepcopy(base), AdaptionPromptConfig(adapter_len=PROMPTS, adapter_layers=layers,
                                                                         task_type="CAUSAL_LM"))
    for p in ours_llm.parameters():
        p.requires_grad_(False)
    ids = torch.randint(0, args.vocab_size, (args.batch_size, args.text_tokens), generator=torch.Generator().manual_seed(args.seed)).to(device)
    with torch.no_grad():
        bare = base(input_ids=ids).logits
        for name, model in (("ours", ours_llm), ("peft", peft_model)):
            if not torch.allclose(model(input_ids=ids).logits, bare, atol=1e-5):
                raise RuntimeError(f"{name}: adapter prompts at initialisation must give the bare LLM's logits")
    steps = {
        "ours": train_step(ours_llm, list(fusion.parameters()), lambda: ours_llm(input_ids=ids, labels=ids).loss),
        "peft": train_step(peft_model, [p for p in peft_model.parameters() if p.requires_grad],
                           lambda: peft_model(input_ids=ids, labels=ids).loss),
    }
    times = interleaved(steps, args.steps, args.warmup, device)
    trainable = {"ours": sum(p.numel() for p in fusion.parameters()),
                 "peft": sum(p.numel() for p in peft_model.parameters() if p.requires_grad)}
    return {"times": times, "ratio": paired_ratio(times["ours"]["wall"], times["peft"]["wall"]), "trainable": trainable}


def bench_expert(size: str, args, device) -> dict:
    bare = llama(size, args.vocab_size, args.seed).to(device)
    ours = copy.deepcopy(bare)
    fusion = RoutedExpertFusion()
    fusion.attach(ours, {"image": bare.config.hidden_size})
    fusion.to(device)
    batch, length = args.batch_size, args.text_tokens * 2
    embeds = torch.randn(batch, length, bare.config.hidden_size, generator=torch.Generator().manual_seed(args.seed)).to(device)
    route = torch.zeros(batch, length, dtype=torch.bool, device=device)
    route[:, length // 4 : length // 4 + length // 2] = True  # half the positions are an image
    collapsed = route & torch.nn.functional.pad(route, (1, 0))[:, :-1]
    context = ExpertContext({"image": route}, collapsed, items=route.long())  # one image per row
    labels = torch.randint(0, args.vocab_size, (batch, length), generator=torch.Generator().manual_seed(1)).to(device)
    for model in (bare, ours):
        for p in model.parameters():
            p.requires_grad_(False)
    expert_params = list(fusion.experts.parameters())
    language_params = [p for layer in bare.model.layers for m in (layer.self_attn, layer.mlp) for p in m.parameters()]
    for p in expert_params + language_params:
        p.requires_grad_(True)

    def forward_ours():
        return ours(inputs_embeds=embeds, expert_context=context, labels=labels).loss

    def forward_bare():
        return bare(inputs_embeds=embeds, labels=labels).loss

    with torch.no_grad():
        prefill = interleaved({"ours": forward_ours, "bare": forward_bare}, args.steps, args.warmup, device)
    steps = interleaved({"ours": train_step(ours, expert_params, forward_ours), "bare": train_step(bare, language_params, forward_bare)},
                        args.steps, args.warmup, device)
    return {
        "forward": prefill, "step": steps,
        "forward_ratio": paired_ratio(prefill["ours"]["wall"], prefill["bare"]["wall"]),
        "step_ratio": paired_ratio(steps["ours"]["wall"], steps["bare"]["wall"]),
        "trainable": {"ours": sum(p.numel() for p in expert_params), "bare": sum(p.numel() for p in language_params)},
    }


def main(argv=None) -> int:
    args = parse_benchmark_args(__doc__, SIZES, argv)
    device = pick_device(args.device)
    threads = set_threads(args.threads)
    results = {"machine": machine_description(device), "threads": threads, "sizes": {}}
    failed = []
    for size in args.sizes:
        adapter, expert = bench_adapter(size, args, device), bench_expert(size, args, device)
        results["sizes"][size] = {"adapter": adapter, "expert": expert}
        median = lambda t: sorted(t)[len(t) // 2] * 1000  # noqa: E731
        print_table(f"Type-B {size}: train step ms (batch {args.batch_size}, {args.text_tokens} tokens)", ["metric", "ours", "reference", "ours/ref"], [
            ["adapter prompts vs peft AdaptionPrompt", f"{median(adapter['times']['ours']['wall']):.1f}",
             f"{median(adapter['times']['peft']['wall']):.1f}", f"{adapter['ratio']:.3f}"],
            ["  trainable parameters", adapter["trainable"]["ours"], adapter["trainable"]["peft"], ""],
            ["visual expert vs bare LLM, forward", f"{median(expert['forward']['ours']['wall']):.1f}",
             f"{median(expert['forward']['bare']['wall']):.1f}", f"{expert['forward_ratio']:.3f}"],
            ["visual expert vs bare LLM, train step", f"{median(expert['step']['ours']['wall']):.1f}",
             f"{median(expert['step']['bare']['wall']):.1f}", f"{expert['step_ratio']:.3f}"],
        ])
        ok = adapter["ratio"] <= 1.05
        print(f"target train step ours/peft-adaption-prompt <= 1.05 ({size}): {adapter['ratio']:.3f} {'PASS' if ok else 'FAIL'}")
        failed += [] if ok else [size]
    if args.json:
        write_json(args.json, results)
    return 1 if failed and args.strict else 0


if __name__ == "__main__":
    raise SystemExit(main())
