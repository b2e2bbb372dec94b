"""Shared measurement helpers for the mmfuse-vs-reference benchmarks.

Every benchmark wraps each model it compares in a :class:`Contender`: the model, a batch builder
and two thin adapters (``loss`` for a training step, ``generate`` for greedy decoding). The
measurement functions take contenders and return plain dicts of figures, so a Type-A/B/D benchmark
only has to write its adapters.

Timing: contenders are measured in interleaved rounds whose order alternates (A B, B A, A B, ...),
so slow machine drift (thermal, other processes) hits both sides equally. On CUDA every timed call
is bracketed by ``torch.cuda.synchronize()``.

Peak memory (MB above the memory in use just before the measured call):
* CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, minus
  ``memory_allocated`` at the start (allocator bytes; caching excluded).
* CPU: the process's resident-set high-water mark. Before the call we ``gc.collect()``,
  ``malloc_trim(0)`` (glibc returns freed heap pages to the OS so the baseline is the live set) and
  reset the kernel's high-water mark by writing ``5`` to ``/proc/self/clear_refs``; afterwards the
  figure is ``VmHWM - VmRSS(baseline)`` from ``/proc/self/status``. This is exact at page
  granularity (no sampling), but counts pages the allocator touched, i.e. it is closer to CUDA's
  "reserved" than "allocated". Where ``clear_refs`` is not writable a 0.5 ms psutil RSS sampling
  thread is used instead (it can miss very short spikes); the method used is reported.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import platform
import re
import statistics
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

Batch = dict[str, Any]

# Text decoder sizes every benchmark compares at (Llama, 4x MLP ratio, head dim 64).
SIZES = {
    "small": {"hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4, "intermediate_size": 1024},
    "large": {"hidden_size": 512, "num_hidden_layers": 8, "num_attention_heads": 8, "intermediate_size": 2048},
}


# -- environment ---------------------------------------------------------------------------------
def pick_device(name: str | None = None) -> torch.device:
    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def set_threads(n: int | None) -> int:
    if n:
        torch.set_num_threads(n)
    return torch.get_num_threads()


def machine_description(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} logical CPUs, torch threads={torch.get_num_threads()}"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


PAD, BOS, EOS = 0, 1, 2  # the special ids of :func:`train_tokenizer`'s tokenizer


def text_config(size: str, vocab_size: int) -> dict:
    """The benchmark's Llama decoder at ``SIZES[size]`` (MHA, untied head, the tokenizer's special ids)."""
    dims = SIZES[size]
    return {"model_type": "llama", "vocab_size": vocab_size, **dims, "num_key_value_heads": dims["num_attention_heads"],
            "max_position_embeddings": 1024, "tie_word_embeddings": False,
            "pad_token_id": PAD, "bos_token_id": BOS, "eos_token_id": EOS}


def train_tokenizer(directory: str | Path, chat_template: str | None = None):
    """A tiny byte-level BPE tokenizer trained on the fly (no network); returns its directory."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|pad|>", "<|begin_of_text|>", "<|end_of_text|>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = ["what colour is the circle? red.", "a small blue square at the top left.", "how many shapes? two."] * 20
    tok.train_from_iterator(
        corpus,
        trainers.BpeTrainer(vocab_size=200, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()),
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>", pad_token="<|pad|>"
    )
    fast.chat_template = chat_template or (
        "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
    )
    fast.save_pretrained(str(directory))
    return Path(directory)


# -- contenders ----------------------------------------------------------------------------------
def rows(batch: dict, n: int, for_generation: bool) -> dict:
    """The first ``n`` rows of every tensor in ``batch`` (nested dicts too); no labels for generation."""
    out = {}
    for k, v in batch.items():
        if for_generation and k == "labels":
            continue
        out[k] = rows(v, n, False) if isinstance(v, dict) else v[:n]
    return out


def lm_loss(model: nn.Module, batch: dict) -> torch.Tensor:
    return model(**batch).loss


def greedy_kwargs(new_tokens: int, use_cache: bool = True) -> dict:
    """Greedy decoding of exactly ``new_tokens`` tokens."""
    return {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "do_sample": False, "use_cache": use_cache,
            "eos_token_id": EOS, "pad_token_id": PAD}


def mmfuse_generate(model: nn.Module, batch: dict, new_tokens: int, use_cache: bool = True) -> torch.Tensor:
    return model.generate(batch["input_ids"], batch["attention_mask"], batch["media"], **greedy_kwargs(new_tokens, use_cache))


def hf_generate(model: nn.Module, batch: dict, new_tokens: int) -> torch.Tensor:
    """The new tokens only (HF's generate returns the prompt too)."""
    out = model.generate(**batch, **greedy_kwargs(new_tokens))
    return out[:, batch["input_ids"].shape[1]:]


@dataclass
class Contender:
    """One model under test.

    make_batch(batch_size, for_generation) -> the model's own batch (tensors on the device);
    loss(model, batch) -> scalar training loss; generate(model, batch, new_tokens) -> ``(B, new)``
    token ids (greedy, KV cache, exactly ``new_tokens`` of them).
    """

    name: str
    model: nn.Module
    make_batch: Callable[[int, bool], Batch]
    loss: Callable[[nn.Module, Batch], torch.Tensor]
    generate: Callable[[nn.Module, Batch, int], torch.Tensor]
    extra: dict[str, Any] = field(default_factory=dict)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def parameter_count(self) -> dict[str, int]:
        params = list(self.model.parameters())
        return {"total": sum(p.numel() for p in params), "trainable": sum(p.numel() for p in params if p.requires_grad)}


def summarize(seconds: list[float]) -> dict[str, Any]:
    return {
        "median_s": statistics.median(seconds),
        "mean_s": statistics.fmean(seconds),
        "min_s": min(seconds),
        "stdev_s": statistics.stdev(seconds) if len(seconds) > 1 else 0.0,
        "n": len(seconds),
        "samples_s": seconds,
    }


def interleaved(
    calls: dict[str, Callable[[], Any]], rounds: int, warmup: int, device: torch.device
) -> dict[str, dict[str, list[float]]]:
    """Time each callable ``rounds`` times, alternating the order every round (A B, B A, ...);
    ``warmup`` untimed rounds first. Returns name -> {"wall": [s, ...], "cpu": [s, ...]}, where
    ``cpu`` is the process CPU time (all threads) of the call: less sensitive than wall time to
    other processes competing for the cores, but it includes OpenMP spin-waiting."""
    names = list(calls)
    for _ in range(warmup):
        for name in names:
            calls[name]()
    sync(device)
    times: dict[str, dict[str, list[float]]] = {name: {"wall": [], "cpu": []} for name in names}
    for r in range(rounds):
        for name in names if r % 2 == 0 else reversed(names):
            sync(device)
            cpu, wall = time.process_time(), time.perf_counter()
            calls[name]()
            sync(device)
            times[name]["wall"].append(time.perf_counter() - wall)
            times[name]["cpu"].append(time.process_time() - cpu)
    return times


def paired_ratio(ours: list[float], ref: list[float]) -> float:
    """Median over rounds of ours[i] / ref[i]: the two were measured back to back, so slow drift
    of the machine cancels within each pair."""
    return statistics.median(a / b for a, b in zip(ours, ref))


# -- memory --------------------------------------------------------------------------------------
def _status_kb(key: str) -> int:
    match = re.search(rf"^{key}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
    if match is None:
        raise OSError(f"no {key} in /proc/self/status")
    return int(match.group(1))


def _malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _can_reset_hwm() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        _status_kb("VmHWM")
        return True
    except OSError:
        return False


def cpu_memory_method() -> str:
    return "VmHWM-reset" if _can_reset_hwm() else "psutil-sampling"


def peak_memory_mb(fn: Callable[[], Any], device: torch.device, repeats: int = 1) -> tuple[float, str]:
    """Peak memory (MB) ``fn()`` uses above what was in use when it started, and the method; with
    ``repeats`` > 1 the smallest of that many measurements (the allocator's state adds noise on CPU)."""
    results = [_peak_memory_once(fn, device) for _ in range(max(repeats, 1))]
    return min(r[0] for r in results), results[0][1]


def _peak_memory_once(fn: Callable[[], Any], device: torch.device) -> tuple[float, str]:
    gc.collect()
    if device.type == "cuda":
        sync(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        sync(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20, "cuda-max-allocated"
    _malloc_trim()
    if _can_reset_hwm():
        base = _status_kb("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")
        fn()
        return max(_status_kb("VmHWM") - base, 0) / 1024, "VmHWM-reset"
    import psutil

    proc = psutil.Process()
    base = proc.memory_info().rss
    peak = [base]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.0005)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        fn()
    finally:
        done.set()
        thread.join()
    peak[0] = max(peak[0], proc.memory_info().rss)
    return (peak[0] - base) / 2**20, "psutil-sampling"


# -- the measurements ----------------------------------------------------------------------------
def make_train_step(c: Contender, batch: Batch, lr: float = 1e-4) -> Callable[[], float]:
    """forward + backward + AdamW step over the contender's trainable parameters."""
    opt = torch.optim.AdamW(c.trainable_parameters(), lr=lr)

    def step() -> float:
        loss = c.loss(c.model, batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def measure_training(
    contenders: list[Contender], device: torch.device, *, batch_size: int, steps: int, warmup: int = 3, lr: float = 1e-4
) -> dict[str, dict[str, Any]]:
    """Train-step time (interleaved) and peak memory of one step, per contender.

    The models are trained in place (their weights change); run generation checks before this.
    """
    for c in contenders:
        c.model.train()
    steps_fns = {c.name: make_train_step(c, c.make_batch(batch_size, False), lr) for c in contenders}
    times = interleaved(steps_fns, steps, warmup, device)
    out = {}
    for c in contenders:
        mem, method = peak_memory_mb(steps_fns[c.name], device, repeats=2)
        out[c.name] = {
            "step": summarize(times[c.name]["wall"]),
            "step_cpu": summarize(times[c.name]["cpu"]),
            "samples_per_s": batch_size / statistics.median(times[c.name]["wall"]),
            "peak_memory_mb": mem,
            "memory_method": method,
        }
    return out


def measure_generation(
    contenders: list[Contender],
    device: torch.device,
    *,
    batch_size: int,
    new_tokens: int,
    repeats: int,
    warmup: int = 1,
) -> dict[str, dict[str, Any]]:
    """Greedy decoding of exactly ``new_tokens`` tokens, and time to first token (a generate call
    with one new token: media encoding + prefill + first token), interleaved; peak memory of the
    full generate call."""
    for c in contenders:
        c.model.eval()
    batches = {c.name: c.make_batch(batch_size, True) for c in contenders}
    with torch.inference_mode():
        full = {c.name: (lambda c=c: c.generate(c.model, batches[c.name], new_tokens)) for c in contenders}
        first = {c.name: (lambda c=c: c.generate(c.model, batches[c.name], 1)) for c in contenders}
        tokens = {name: fn() for name, fn in full.items()}
        for name, toks in tokens.items():
            if toks.shape != (batch_size, new_tokens):
                raise RuntimeError(f"{name}: generated shape {tuple(toks.shape)}, expected {(batch_size, new_tokens)}")
        t_full = interleaved(full, repeats, warmup, device)
        t_first = interleaved(first, repeats, warmup, device)
        out = {}
        for c in contenders:
            mem, method = peak_memory_mb(full[c.name], device, repeats=3)
            gen, ttft = statistics.median(t_full[c.name]["wall"]), statistics.median(t_first[c.name]["wall"])
            out[c.name] = {
                "generate": summarize(t_full[c.name]["wall"]),
                "generate_cpu": summarize(t_full[c.name]["cpu"]),
                "ttft": summarize(t_first[c.name]["wall"]),
                "ttft_cpu": summarize(t_first[c.name]["cpu"]),
                "tokens_per_s": batch_size * new_tokens / gen,
                # steady-state decoding only: tokens 2..N over the time after the first token
                "decode_only_tokens_per_s": batch_size * (new_tokens - 1) / max(gen - ttft, 1e-9),
                "peak_memory_mb": mem,
                "memory_method": method,
                "tokens": tokens[c.name].tolist(),
            }
    return out


def ratio(ours: float, ref: float) -> float:
    return ours / ref if ref else float("nan")


def timing_rows(res: dict, ours: str, ref: str, batch_size: int, new_tokens: int,
                paired_decode: dict | None = None) -> list[list[str]]:
    """The training and decoding rows of a report against one reference: ``[metric, ours, ref, ours/ref]``.

    ``res`` holds ``training`` and ``generation`` (per batch size) keyed by the contenders' names and
    ``train_step_paired_ratio``; ``paired_decode``: batch size -> paired decode ratio, shown when given."""
    ms = lambda s: f"{1e3 * s:.1f}"  # noqa: E731
    mb = lambda v: f"{v:.0f}"  # noqa: E731

    def line(label: str, o: float, h: float, fmt=ms) -> list[str]:
        return [label, fmt(o), fmt(h), f"{ratio(o, h):.3f}"]

    o, h = res["training"][ours], res["training"][ref]
    out = [
        line(f"train step median ms (b={batch_size})", o["step"]["median_s"], h["step"]["median_s"]),
        line("train step mean ms", o["step"]["mean_s"], h["step"]["mean_s"]),
        ["  paired per-round ratio (median)", "", "", f"{res['train_step_paired_ratio']:.3f}"],
        line("  train step CPU-time median ms", o["step_cpu"]["median_s"], h["step_cpu"]["median_s"]),
        line("train peak MB (one step)", o["peak_memory_mb"], h["peak_memory_mb"], mb),
    ]
    for b, gen in res["generation"].items():
        o, h = gen[ours], gen[ref]
        out.append(line(f"decode tok/s b={b} ({new_tokens} new)", o["tokens_per_s"], h["tokens_per_s"], mb))
        if paired_decode is not None:
            out.append(["  paired per-round ratio (median)", "", "", f"{paired_decode[b]:.3f}"])
        out += [
            line(f"  decode-only tok/s b={b}", o["decode_only_tokens_per_s"], h["decode_only_tokens_per_s"], mb),
            line(f"  generate CPU-time ms b={b}", o["generate_cpu"]["median_s"], h["generate_cpu"]["median_s"]),
            line(f"TTFT ms b={b}", o["ttft"]["median_s"], h["ttft"]["median_s"]),
            line(f"  TTFT CPU-time ms b={b}", o["ttft_cpu"]["median_s"], h["ttft_cpu"]["median_s"]),
            line(f"generate peak MB b={b}", o["peak_memory_mb"], h["peak_memory_mb"], mb),
            [f"greedy tokens identical b={b}", "", "", "yes" if gen["identical_tokens"] else "NO"],
        ]
    return out


def write_json(path: str | Path, payload: dict[str, Any]) -> None:
    Path(path).write_text(json.dumps(payload, indent=2, default=str) + "\n")


def print_table(title: str, columns: list[str], rows: list[list[str]]) -> None:
    """A rich table when rich is installed, plain text otherwise."""
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        widths = [max(len(str(r[i])) for r in [columns, *rows]) for i in range(len(columns))]
        print(f"\n{title}")
        for r in [columns, ["-" * w for w in widths], *rows]:
            print("  ".join(str(v).ljust(w) if i == 0 else str(v).rjust(w) for i, (v, w) in enumerate(zip(r, widths))))
        return
    table = Table(title=title)
    for i, col in enumerate(columns):
        table.add_column(col, justify="left" if i == 0 else "right")
    for r in rows:
        table.add_row(*map(str, r))
    Console(width=max(100, sum(len(c) for c in columns) + 20)).print(table)


def parse_benchmark_args(doc: str, sizes: dict, argv=None, strict_help: str = "exit 1 when a target fails") -> argparse.Namespace:
    """The command line every benchmark shares: sizes, steps, batch, decode settings, threads, JSON."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="small,large", help=f"comma-separated, from {sorted(sizes)}")
    ap.add_argument("--steps", type=int, default=8, help="timed train steps per model")
    ap.add_argument("--warmup", type=int, default=2, help="untimed train steps per model")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--text-tokens", type=int, default=64, help="text tokens per sample (incl. BOS)")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--gen-batch-sizes", default="1,8")
    ap.add_argument("--gen-repeats", type=int, default=5)
    ap.add_argument("--vocab-size", type=int, default=8192)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--device", default=None, help="default: cuda if available else cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="write every figure to this file")
    ap.add_argument("--strict", action="store_true", help=strict_help)
    args = ap.parse_args(argv)
    args.gen_batch_sizes = [int(b) for b in args.gen_batch_sizes.split(",") if b]
    args.sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    unknown = [s for s in args.sizes if s not in sizes]
    if unknown:
        ap.error(f"unknown size(s) {unknown}; choose from {sorted(sizes)}")
    if args.new_tokens < 2:
        ap.error("--new-tokens must be at least 2 (decode time per token leaves the first token out)")
    return args



def run_sizes(args: argparse.Namespace, bench_size: Callable[..., dict], report: Callable[[dict, argparse.Namespace], None],
              passed: Callable[[dict], bool], verdict: str) -> int:
    """The shared driver: set up the device and threads, train a tokenizer, run ``bench_size(size, args,
    device, tokenizer_dir)`` and ``report`` for each size, record ``passed(result)`` over all sizes under
    ``verdict``, write ``--json``; the exit code is 1 only with ``--strict`` and a failed verdict."""
    import transformers

    set_threads(args.threads)
    device = pick_device(args.device)
    transformers.logging.set_verbosity_error()
    machine = machine_description(device)
    print(f"device: {device} ({machine}); torch {torch.__version__}, transformers {transformers.__version__}")
    payload = {"machine": machine, "device": str(device), "torch": torch.__version__,
               "transformers": transformers.__version__, "args": vars(args), "results": {}}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer_dir = train_tokenizer(Path(tmp) / "tokenizer")
        for size in args.sizes:
            t0 = time.perf_counter()
            res = bench_size(size, args, device, tokenizer_dir)
            res["wall_s"] = time.perf_counter() - t0
            payload["results"][size] = res
            report(res, args)
    payload["wall_s"] = time.perf_counter() - start
    payload[verdict] = all(passed(r) for r in payload["results"].values())
    print(f"total {payload['wall_s']:.0f}s")
    if args.json:
        write_json(args.json, payload)
        print(f"wrote {args.json}")
    return 0 if payload[verdict] or not args.strict else 1
