"""The world's LLM: a byte-level BPE tokenizer with a chat template and a small Llama pretrained on world text.

Everything is generated in memory from the seed (no data directory is read), and the result is an
ordinary Hugging Face directory: ``AutoModelForCausalLM.from_pretrained`` and
``AutoTokenizer.from_pretrained`` load it offline. Besides the plain world text, the model trains on
chat-formatted questions: text-only ones (``"What is one plus two?"`` -> ``"three"``) and questions
about a caption given in the prompt (``"a small red circle on the left.\\nWhat colour is the circle?"``
-> ``"red"``), which teach it the chat format, the answer vocabulary and to read attributes from its
context. The tokenizer adds no BOS by itself; the chat template starts with it.
"""

from __future__ import annotations

import json
import math
import random
import time
from pathlib import Path
from typing import Callable, Iterable

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from ..data.synth import scenes, sounds, video
from ..data.synth.heldout import event_allowed, shape_allowed
from ..data.synth.text import text_corpus, text_question
from .loading import progress_bars_off

BOS, EOS, PAD = "<|begin_of_text|>", "<|end_of_text|>", "<|pad|>"
ROLE_TOKENS = ("<|user|>", "<|assistant|>", "<|system|>", "<|end|>")
END = "<|end|>"
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "<|assistant|>\n{% generation %}{{ message['content'] }}<|end|>{% endgeneration %}{{ '\\n' }}"
    "{% else %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}<|end|>\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

DEFAULT_STEPS = 400
BLOCK_SIZE = 128
BATCH_SIZE = 16
LEARNING_RATE = 3e-3
WARMUP_FRACTION = 0.05
MIN_LR_FRACTION = 0.1
TOKENS_PER_EXAMPLE = 16  # a low estimate of the mean example length: the corpus covers every step once
MIN_EXAMPLES = 2000
EVAL_LINES = 500
EVAL_CHATS = 400

Progress = Callable[[int, int, dict], None]


def train_tokenizer(texts: Iterable[str], vocab_size: int = 1024) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on ``texts``; returns a fast tokenizer with the world's special tokens
    and chat template (assistant turns wrapped in ``{% generation %}`` for assistant masks)."""
    specials = [BOS, EOS, PAD, *ROLE_TOKENS]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        extra_special_tokens=list(ROLE_TOKENS),
        padding_side="right",
        chat_template=CHAT_TEMPLATE,
    )


def llm_config(vocab_size: int) -> LlamaConfig:
    """The world LLM's architecture: a 4-layer Llama, hidden 256, GQA 4 heads / 2 KV heads, tied embeddings."""
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=512,
        max_position_embeddings=512,
        tie_word_embeddings=True,
    )


def _described_question(rng: random.Random) -> tuple[str, str, str]:
    """A ``(kind, user text, answer)`` whose user text is a scene, sound or video caption and a question on it."""
    source = rng.choice(("scene", "sound", "video"))
    if source == "scene":
        scene = scenes.sample_scene(rng, allowed=shape_allowed)
        text, qas = scenes.caption(scene), scenes.questions(scene, rng, allowed=shape_allowed)
    elif source == "sound":
        clip = sounds.sample_clip(rng, allowed=event_allowed)
        text, qas = sounds.caption(clip), sounds.questions(clip, rng)
    else:
        motion = video.sample_motion(rng, allowed=shape_allowed)
        text, qas = video.caption(motion), video.questions(motion, rng)
    _, question, answer = rng.choice(qas)
    return source, f"{text}\n{question}", answer


def chat_examples(rng: random.Random, n: int) -> list[tuple[str, list[dict[str, str]]]]:
    """``n`` single-turn ``(kind, messages)`` chats, half text-only questions and half described ones."""
    out = []
    for _ in range(n):
        if rng.random() < 0.5:
            _, question, answer = text_question(rng)
            kind = "text"
        else:
            kind, question, answer = _described_question(rng)
        out.append((kind, [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]))
    return out


def _documents(tokenizer, lines: list[str], chats: list[list[dict[str, str]]]) -> list[list[int]]:
    """Token ids of each line (BOS text EOS) and each rendered chat (the template's BOS ... EOS)."""
    texts = [BOS + line + EOS for line in lines]
    texts += [tokenizer.apply_chat_template(c, tokenize=False) + EOS for c in chats]
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def _pack(documents: list[list[int]], block_size: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedily fill (n, block_size) rows with whole documents, so every row starts at a BOS as a
    single conversation does later; returns input ids and labels (-100 on the padding at row ends)."""
    rows, row = [], []
    for doc in documents:
        doc = doc[:block_size]
        if len(row) + len(doc) > block_size:
            rows.append(row)
            row = []
        row = row + doc
    rows.append(row)
    ids = torch.full((len(rows), block_size), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), block_size), -100, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        labels[i, : len(r)] = torch.tensor(r)
    return ids, labels


def _lr_factor(step: int, steps: int) -> float:
    """Linear warmup then cosine decay to MIN_LR_FRACTION."""
    warmup = max(1, int(WARMUP_FRACTION * steps))
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return MIN_LR_FRACTION + (1 - MIN_LR_FRACTION) * 0.5 * (1 + math.cos(math.pi * progress))


@torch.no_grad()
def _perplexity(model, tokenizer, lines: list[str]) -> float:
    """exp(mean next-token NLL) over ``BOS line EOS`` sequences, every token after BOS counted."""
    enc = tokenizer([BOS + line + EOS for line in lines], add_special_tokens=False, padding=True, return_tensors="pt")
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    logits = model(**enc).logits[:, :-1]
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels[:, 1:], ignore_index=-100, reduction="sum")
    return math.exp(nll.item() / (labels[:, 1:] != -100).sum().item())


@torch.no_grad()
def _answer_accuracy(model, tokenizer, chats: list[list[dict[str, str]]]) -> float:
    """Teacher-forced exact match: every assistant token (answer and ``<|end|>``) is the argmax."""
    enc = tokenizer.apply_chat_template(
        chats, tokenize=True, return_dict=True, return_assistant_tokens_mask=True, padding=True, return_tensors="pt"
    )
    mask = enc.pop("assistant_masks").bool()
    predicted = model(**enc).logits.argmax(-1)
    correct = (predicted[:, :-1] == enc["input_ids"][:, 1:]) | ~mask[:, 1:]
    return correct.all(dim=1).float().mean().item()


def pretrain_llm(out_dir: Path, *, seed: int = 0, steps: int = DEFAULT_STEPS, progress: Progress | None = None) -> Path:
    """Train the world tokenizer and LLM from scratch and save both (plus ``pretrain_metrics.json``) to
    ``out_dir``. ``progress(step, steps, {"loss": float})`` is called after every step."""
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    start = time.perf_counter()
    out_dir = Path(out_dir)
    rng = random.Random(seed)
    n_examples = max(MIN_EXAMPLES, steps * BATCH_SIZE * BLOCK_SIZE // TOKENS_PER_EXAMPLE)
    lines = text_corpus(rng, n_examples // 2)
    chats = chat_examples(rng, n_examples // 2)
    eval_rng = random.Random(f"world-llm-eval-{seed}")
    eval_lines = text_corpus(eval_rng, EVAL_LINES)
    eval_chats = chat_examples(eval_rng, EVAL_CHATS)

    tokenizer = train_tokenizer(lines + [m["content"] for _, chat in chats for m in chat])
    train_chats = [c for _, c in chats]
    documents = _documents(tokenizer, lines, train_chats)
    rng.shuffle(documents)
    blocks, block_labels = _pack(documents, BLOCK_SIZE, tokenizer.pad_token_id)

    torch.manual_seed(seed)
    config = llm_config(len(tokenizer))
    config.bos_token_id, config.eos_token_id, config.pad_token_id = (
        tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    )
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(END)]
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, betas=(0.9, 0.95), weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_factor(s, steps))
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(blocks), generator=generator)

    model.train()
    losses = []
    for step in range(steps):
        idx = order[(torch.arange(BATCH_SIZE) + step * BATCH_SIZE) % len(blocks)]
        loss = model(input_ids=blocks[idx], labels=block_labels[idx]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if progress is not None:
            progress(step + 1, steps, {"loss": losses[-1]})

    model.eval()
    by_kind: dict[str, list] = {}
    for kind, chat in eval_chats:
        by_kind.setdefault(kind, []).append(chat)
    metrics = {
        "seed": seed,
        "steps": steps,
        "batch_size": BATCH_SIZE,
        "block_size": BLOCK_SIZE,
        "corpus_tokens": int((block_labels != -100).sum()),
        "final_train_loss": sum(losses[-20:]) / len(losses[-20:]),
        "heldout_perplexity": _perplexity(model, tokenizer, eval_lines),
        "answer_accuracy": {k: _answer_accuracy(model, tokenizer, v) for k, v in sorted(by_kind.items())},
        "parameters": sum(p.numel() for p in model.parameters()),
        "vocab_size": len(tokenizer),
        "transformers_version": transformers.__version__,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    with progress_bars_off():
        model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    metrics["wall_seconds"] = round(time.perf_counter() - start, 1)
    (out_dir / "pretrain_metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return out_dir
