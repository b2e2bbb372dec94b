"""Trainer tests on a tiny stand-in multimodal model (a small Llama plus an image encoder/connector).

Run as a script (``python tests/test_trainer.py OUT FORWARD_CALLS THREADS``), this file trains the
staged config and SIGKILLs itself mid-step; see ``test_resume_after_sigkill``.
"""

from __future__ import annotations

import json
import math
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from mmfuse.data.schema import Sample
from mmfuse.train import StageConfig, Trainer, TrainConfig, apply_stage, lora_parameters, merge_lora
from mmfuse.train.checkpoint import list_checkpoints
from mmfuse.train.stage import optimizer_groups
from mmfuse.train.trainer import epoch_batches, epoch_seed, stage_scheduler

VOCAB, SEQ, PATCHES, FEAT = 32, 6, 2, 6


class TinyMM(nn.Module):
    """Satisfies the trainer's model contract: parameter_groups(), .llm, forward(**batch).loss."""

    def __init__(self, seed: int = 0, dropout: float = 0.1):
        super().__init__()
        torch.manual_seed(seed)
        config = LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
            max_position_embeddings=32,
        )
        self.llm = LlamaForCausalLM(config)
        self.encoders = nn.ModuleDict({"image": nn.Linear(FEAT, 8)})
        self.connectors = nn.ModuleDict({"image": nn.Sequential(nn.Linear(8, 16), nn.Dropout(dropout))})

    def parameter_groups(self) -> dict[str, list[tuple[str, nn.Parameter]]]:
        groups: dict[str, list] = {}
        for name, p in self.named_parameters():
            parts = name.split(".")
            groups.setdefault("llm" if parts[0] == "llm" else ".".join(parts[:2]), []).append((name, p))
        return groups

    def forward(self, input_ids, attention_mask, labels, media, num_items_in_batch=None, ids=None):
        image = self.connectors["image"](self.encoders["image"](media["image"]))
        embeds = torch.cat([image, self.llm.get_input_embeddings()(input_ids)], dim=1)
        ones = torch.ones(image.shape[:2], dtype=attention_mask.dtype)
        ignore = torch.full(image.shape[:2], -100, dtype=labels.dtype)
        return self.llm(
            inputs_embeds=embeds,
            attention_mask=torch.cat([ones, attention_mask], dim=1),
            labels=torch.cat([ignore, labels], dim=1),
            num_items_in_batch=num_items_in_batch,
        )

    def save_pretrained(self, directory) -> None:
        save_file({n: p.detach().contiguous() for n, p in self.named_parameters()}, Path(directory) / "model.safetensors")


def make_dataset(n: int, seed: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (n, SEQ), generator=g)
    image = torch.randn(n, PATCHES, FEAT, generator=g)
    return [{"input_ids": ids[i], "image": image[i]} for i in range(n)]


def collate(items: list[dict[str, torch.Tensor]], dtype: torch.dtype = torch.float32, ragged: bool = False) -> dict:
    """A batch of ``items``; ``ragged``: each sample has its own number of labelled tokens (1 to 4)."""
    ids = torch.stack([it["input_ids"] for it in items])
    labels = ids.clone()
    labels[:, 0] = -100  # TinyMM puts the image first, so the text's first token is never a target
    if ragged:
        for row, first in enumerate(ids[:, 0].tolist()):
            labels[row, : 2 + first % 4] = -100
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "labels": labels,
        "media": {"image": torch.stack([it["image"] for it in items]).to(dtype)},
    }


DATASETS = {"caps": make_dataset(20, 1), "chat": make_dataset(14, 2)}


def staged_config(output_dir, **overrides) -> TrainConfig:
    """Three stages: the connector (accum 2), then LoRA on the LLM plus the encoder, then the connector
    again. Checkpoints land at steps 4 (inside stage 1), 6 (its end), 8 (inside the LoRA stage),
    10 (its end, LoRA merged) and 12 (the end)."""
    stages = [
        StageConfig(
            name="align", train=["connectors"], data=["caps"], steps=6, lr=1e-2, batch_size=3, grad_accum=2, warmup_ratio=0.2
        ),
        StageConfig(
            name="tune", train=["encoders"], lora=["llm"], lora_dropout=0.1, data=["caps", "chat"], steps=4, lr=1e-2,
            batch_size=4, weight_decay=0.1,
        ),
        StageConfig(name="polish", train=["connectors"], data=["chat"], steps=2, lr=1e-3, batch_size=4,
                    lr_scale={"connectors.*.bias": 3.0}),  # two optimizer groups through checkpoint and resume
    ]
    return TrainConfig(stages=stages, output_dir=str(output_dir), save_every=4, log_every=1, **overrides)


def trainer(model, config, collate_fn=collate) -> Trainer:
    return Trainer(model, config, DATASETS, collate_fn, progress=False)


def exported(output_dir) -> dict[str, torch.Tensor]:
    return load_file(Path(output_dir) / "model.safetensors")


def assert_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"differ: {different}"


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One uninterrupted run of the staged config that keeps every checkpoint."""
    out = tmp_path_factory.mktemp("reference")
    trainer(TinyMM(), staged_config(out, keep_checkpoints=10)).train()
    return out


def test_frozen_parameters_stay_bit_identical(tmp_path):
    model = TinyMM()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    stage = StageConfig(name="s", train=["connectors"], data=["caps"], steps=1, lr=1e-2, batch_size=4, warmup_ratio=0.0)
    trainer(model, TrainConfig(stages=[stage], output_dir=str(tmp_path))).train()
    for name, p in model.named_parameters():
        if name.startswith("connectors."):
            assert not torch.equal(p, before[name]), name
        else:
            assert torch.equal(p, before[name]), name
            assert not p.requires_grad


def test_lr_scale_puts_matching_parameters_in_their_own_group(tmp_path):
    model = TinyMM()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    stage = StageConfig(name="s", train=["connectors", "encoders"], data=["caps"], steps=2, lr=1e-2, batch_size=4,
                        warmup_ratio=0.0, lr_scale={"connectors.*.bias": 0.0, "encoders.*": 2.0})
    groups = optimizer_groups(model, apply_stage(model, stage), stage)
    assert [g["lr"] for g in groups] == [1e-2, 0.0, 2e-2]
    trainer(model, TrainConfig(stages=[stage], output_dir=str(tmp_path))).train()
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert moved == {"connectors.image.0.weight", "encoders.image.weight", "encoders.image.bias"}  # lr 0 holds the bias
    unmatched = StageConfig(name="s", train=["connectors"], data=["caps"], steps=1, lr=1e-2, lr_scale={"llm.*": 2.0})
    with pytest.raises(ValueError, match=r"lr_scale pattern\(s\) \['llm\.\*'\] match no parameter"):
        optimizer_groups(model, apply_stage(model, unmatched), unmatched)


def test_unknown_group_lists_available():
    stage = StageConfig(name="s", train=["projector"], data=["caps"], steps=1, lr=1e-3)
    with pytest.raises(ValueError, match=r"'projector'.*connectors\.image.*encoders\.image.*llm"):
        apply_stage(TinyMM(), stage)


def test_lora_only_on_llm():
    with pytest.raises(ValueError, match="LoRA is supported on"):
        StageConfig(name="s", lora=["encoders.image"], data=["caps"], steps=1, lr=1e-3)


def test_lora_trains_only_adapters_and_merges_exactly():
    model = TinyMM(dropout=0.0)
    stage = StageConfig(name="s", lora=["llm"], data=["caps"], steps=1, lr=1e-2)
    params = apply_stage(model, stage)
    lora_ids = {id(p) for _, p in lora_parameters(model)}
    assert lora_ids and {id(p) for p in params} == lora_ids
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    batch = collate(DATASETS["caps"][:4])
    for _ in range(2):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]) != (id(p) in lora_ids), name
    model.eval()
    with torch.no_grad():
        unmerged = model(**batch).logits
        merge_lora(model.llm)
        merged = model(**batch).logits
    assert not any("lora_" in n or "base_layer" in n for n, _ in model.named_parameters())
    assert type(model.llm) is LlamaForCausalLM and not hasattr(model.llm, "peft_config")
    torch.testing.assert_close(merged, unmerged, rtol=1e-5, atol=1e-5)
    model.llm.generate(input_ids=batch["input_ids"][:1], max_new_tokens=2, do_sample=False)


def test_checkpoints_hold_no_pickle(reference):
    checkpoints = list_checkpoints(reference / "checkpoints")
    assert [p.name for p in checkpoints] == ["step-000004", "step-000006", "step-000008", "step-000010", "step-000012"]
    for checkpoint in checkpoints:
        for path in checkpoint.iterdir():
            assert path.suffix in (".safetensors", ".json"), path
            load_file(path) if path.suffix == ".safetensors" else json.loads(path.read_text())
    mid_lora = checkpoints[2]
    assert {p.name for p in mid_lora.iterdir()} == {
        "trainer_state.json", "weights.safetensors", "optimizer.safetensors", "optimizer.json", "scheduler.json",
        "rng-0.safetensors", "rng-0.json",
    }
    weights = load_file(mid_lora / "weights.safetensors")
    assert {k.split(".")[0] for k in weights} == {"llm", "connectors", "encoders"}  # stage 1's, stage 2's, LoRA
    assert all("lora_" in k for k in weights if k.startswith("llm."))
    assert any(k.startswith("llm.") and "lora_" not in k for k in load_file(checkpoints[3] / "weights.safetensors"))
    source = "".join(p.read_text() for p in Path(__file__).parents[1].joinpath("mmfuse", "train").glob("*.py"))
    assert not any(word in source for word in ("import pickle", "torch.save(", "torch.load("))


def _copy_run(reference, out, up_to: int) -> Path:
    """``reference``'s checkpoints up to step ``up_to`` and its metrics, copied to ``out``; the last one's directory."""
    for checkpoint in list_checkpoints(reference / "checkpoints"):
        if int(checkpoint.name.split("-")[1]) <= up_to:
            (out / "checkpoints" / checkpoint.name).mkdir(parents=True)
            for f in checkpoint.iterdir():
                (out / "checkpoints" / checkpoint.name / f.name).write_bytes(f.read_bytes())
            last = out / "checkpoints" / checkpoint.name
    (out / "metrics.jsonl").write_bytes((reference / "metrics.jsonl").read_bytes())
    return last


@pytest.mark.parametrize("resume_from", [4, 6, 8, 10])
def test_resume_is_bit_identical(reference, tmp_path, resume_from):
    """Resume inside stage 1, at its end, inside the LoRA stage, and after the LoRA stage merged."""
    _copy_run(reference, tmp_path, resume_from)
    torch.manual_seed(12345)  # resuming must not depend on the process's RNG
    trainer(TinyMM(), staged_config(tmp_path, keep_checkpoints=10)).train(resume=True)
    assert_identical(exported(tmp_path), exported(reference))
    metrics = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(1, 13))


def _run_and_kill(out, kill_at: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, __file__, str(out), kill_at, str(torch.get_num_threads())],
                          timeout=120, capture_output=True, text=True)


def _metrics(run) -> list[dict]:
    """``metrics.jsonl`` without the wall-clock field."""
    return [{k: v for k, v in json.loads(line).items() if k != "elapsed"} for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_resume_after_sigkill(reference, tmp_path):
    """A run SIGKILLed mid-step inside the LoRA stage (after checkpoint 8) resumes to identical weights."""
    proc = _run_and_kill(tmp_path, "forward:16")
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert [p.name for p in list_checkpoints(tmp_path / "checkpoints")] == ["step-000006", "step-000008"]
    trainer(TinyMM(), staged_config(tmp_path)).train(resume=True)
    assert_identical(exported(tmp_path), exported(reference))


@pytest.mark.slow
def test_random_sigkills_during_steps_and_saves_resume_bit_identical(reference, tmp_path):
    """Four trials: SIGKILL at a random event (a forward, a checkpoint file write, a checkpoint's rename),
    resume and SIGKILL again at another random event, then resume to the end. Every trial ends with the
    uninterrupted run's weights and metrics."""
    total = int(_run_and_kill(tmp_path / "count", "any:0").stdout.split("events")[-1])
    rng = random.Random(7)
    landed = []
    for trial in range(4):
        out = tmp_path / f"trial{trial}"
        for _ in range(2):  # a resumed run's events are counted afresh; past its end it just finishes
            proc = _run_and_kill(out, f"any:{rng.randint(1, total)}")
            if proc.returncode == -signal.SIGKILL:
                landed.append(proc.stdout.split("killed at ")[-1].strip())
            else:
                assert proc.returncode == 0, proc.stderr[-2000:]
        if not (out / "model.safetensors").exists():
            assert _run_and_kill(out, "any:0").returncode == 0
        assert_identical(exported(out), exported(reference))
        assert _metrics(out) == _metrics(reference)
    print(f"kills: {len(landed)} landed over 4 trials: {landed}")
    assert len(landed) >= 5 and {"save", "rename"} & set(landed) and "forward" in landed


class ListStream:
    """A stand-in :class:`StreamingDataset`: each epoch a seeded order, process ``rank`` every
    ``world``-th item of it; records how many items each epoch call skipped."""

    def __init__(self, items):
        self.items, self.starts = items, []

    def samples_per_rank(self, world: int) -> int:
        return len(self.items) // world

    def epoch(self, seed: int, rank: int = 0, world: int = 1, start: int = 0):
        self.starts.append(start)
        order = torch.randperm(len(self.items), generator=torch.Generator().manual_seed(seed % 2**31)).tolist()
        mine = order[rank::world][: self.samples_per_rank(world)]
        return iter([self.items[i] for i in mine[start:]])


def test_streamed_data_resumes_mid_epoch_bit_identical(tmp_path):
    """A stage streams 13 items in batches of 3 (4 batches an epoch, 5 steps cross into epoch 1);
    resuming from the checkpoint at step 2 continues the stream at item 6 and ends identical."""
    def run(out, resume=False):
        stage = StageConfig(name="s", train=["connectors"], data=["stream"], steps=5, lr=1e-2, batch_size=3)
        config = TrainConfig(stages=[stage], output_dir=str(out), save_every=2, keep_checkpoints=5, log_every=1)
        stream = ListStream(make_dataset(13, 3))
        Trainer(TinyMM(dropout=0.0), config, {"stream": stream}, collate, progress=False).train(resume=resume)
        return stream

    assert run(tmp_path / "full").starts == [0, 0]
    (tmp_path / "resumed" / "checkpoints").mkdir(parents=True)
    os.rename(tmp_path / "full" / "checkpoints" / "step-000002", tmp_path / "resumed" / "checkpoints" / "step-000002")
    (tmp_path / "resumed" / "metrics.jsonl").write_text("".join((tmp_path / "full" / "metrics.jsonl").read_text().splitlines(True)[:2]))
    assert run(tmp_path / "resumed", resume=True).starts == [6, 0]
    assert_identical(exported(tmp_path / "resumed"), exported(tmp_path / "full"))
    assert _metrics(tmp_path / "resumed") == _metrics(tmp_path / "full")
    stage = StageConfig(name="s", train=["connectors"], data=["stream", "caps"], steps=1, lr=1e-2)
    config = TrainConfig(stages=[stage], output_dir=str(tmp_path / "mixed"))
    with pytest.raises(ValueError, match="a streamed dataset must be the stage's only data"):
        Trainer(TinyMM(), config, {"stream": ListStream(make_dataset(8, 3)), **DATASETS}, collate, progress=False).train()


def test_crash_while_saving_leaves_previous_checkpoint(reference, tmp_path, monkeypatch):
    """A crash halfway through writing checkpoint 6 leaves only its temp dir; resume starts from 4."""
    import mmfuse.train.trainer as trainer_module

    def crash(path, params):
        if path.parent.name == ".step-000006.tmp":
            raise KeyboardInterrupt
        save_weights(path, params)

    save_weights = trainer_module.save_weights
    monkeypatch.setattr(trainer_module, "save_weights", crash)
    with pytest.raises(KeyboardInterrupt):
        trainer(TinyMM(), staged_config(tmp_path)).train()
    assert [p.name for p in list_checkpoints(tmp_path / "checkpoints")] == ["step-000004"]
    assert (tmp_path / "checkpoints" / ".step-000006.tmp").is_dir()
    monkeypatch.undo()
    trainer(TinyMM(), staged_config(tmp_path)).train(resume=True)
    assert_identical(exported(tmp_path), exported(reference))
    assert not list((tmp_path / "checkpoints").glob(".*.tmp"))


def test_lr_follows_warmup_cosine(reference):
    metrics = [json.loads(line) for line in (reference / "metrics.jsonl").read_text().splitlines()]
    lrs = [m["lr"] for m in metrics if m["stage"] == "align"]
    warmup, steps = math.ceil(0.2 * 6), 6
    expected = [1e-2 * (s / warmup if s < warmup else 0.5 * (1 + math.cos(math.pi * (s - warmup) / (steps - warmup)))) for s in range(steps)]
    assert lrs == pytest.approx(expected, rel=1e-12, abs=1e-15)
    assert [m["samples_seen"] for m in metrics][:2] == [6, 12]
    assert all(math.isfinite(m["loss"]) and m["grad_norm"] > 0 for m in metrics[1:])


def test_warmup_stable_decay_schedule():
    stage = StageConfig(name="s", train=["llm"], data=["x"], steps=20, lr=1.0, warmup_ratio=0.1, lr_schedule="warmup_stable_decay",
                        decay_ratio=0.25)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = stage_scheduler(optimizer, stage)
    lrs = []
    for _ in range(20):
        lrs.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    assert lrs[:2] == [0.0, 0.5]  # 2 warm-up steps
    assert lrs[2:15] == [1.0] * 13  # stable until the last 5 steps
    assert lrs[15:] == pytest.approx([0.5 * (1 + math.cos(math.pi * i / 5)) for i in range(5)])
    with pytest.raises(ValueError, match="lr_schedule"):
        StageConfig(name="s", train=["llm"], data=["x"], steps=2, lr=1.0, lr_schedule="step")


def test_grad_accum_matches_bigger_batch(tmp_path):
    """Micro-batches with different numbers of labelled tokens: every token weighs the same."""
    def run(batch_size, grad_accum, out):
        model = TinyMM(dropout=0.0).double()
        stage = StageConfig(
            name="s", train=["connectors", "llm"], data=["caps"], steps=3, lr=1e-3, batch_size=batch_size, grad_accum=grad_accum
        )
        config = TrainConfig(stages=[stage], output_dir=str(out), log_every=1)
        trainer(model, config, lambda items: collate(items, torch.float64, ragged=True)).train()
        return {n: p.detach() for n, p in model.named_parameters()}

    accumulated, big = run(2, 2, tmp_path / "accum"), run(4, 1, tmp_path / "big")
    for name in big:
        torch.testing.assert_close(accumulated[name], big[name], rtol=0, atol=1e-6)
    logged = [[json.loads(line) for line in (tmp_path / d / "metrics.jsonl").read_text().splitlines()] for d in ("accum", "big")]
    for key in ("loss", "grad_norm", "samples_seen"):  # AdamW hides a wrongly scaled gradient; the norm does not
        assert [m[key] for m in logged[0]] == pytest.approx([m[key] for m in logged[1]], rel=1e-6)


def test_nonfinite_loss_stops_or_skips_and_counts(tmp_path):
    """Samples 3 and 11 carry NaN image features. ``stop`` names them; ``skip`` drops the two steps that
    hold them (the optimizer and schedule do not move), still makes every step, and counts them."""
    data = make_dataset(16, 5)
    for bad in (3, 11):
        data[bad]["image"] = torch.full_like(data[bad]["image"], float("nan"))
    for i, item in enumerate(data):
        item["id"] = f"s{i}"

    def with_ids(items):
        return {**collate(items), "ids": [it["id"] for it in items]}

    def run(policy, out):
        stage = StageConfig(name="s", train=["connectors"], data=["x"], steps=8, lr=1e-2, batch_size=2)  # an epoch
        config = TrainConfig(stages=[stage], output_dir=str(out), log_every=1, nonfinite_loss=policy)
        model = TinyMM(dropout=0.0)
        Trainer(model, config, {"x": data}, with_ids, progress=False).train()
        return model

    with pytest.raises(FloatingPointError, match=r"stage 's', step \d.*not finite on samples \[.*'s(3|11)'"):
        run("stop", tmp_path / "stop")
    model = run("skip", tmp_path / "skip")
    assert all(torch.isfinite(p).all() for p in model.parameters())
    records = [json.loads(line) for line in (tmp_path / "skip" / "metrics.jsonl").read_text().splitlines()]
    skipped = [r for r in records if "nonfinite" in r]
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 9))
    assert all(math.isfinite(r["loss"]) for r in steps)
    assert 1 <= len(skipped) <= 2 and skipped[-1]["nonfinite_skipped"] == len(skipped)  # both NaNs may share a batch
    assert all({"s3", "s11"} & set(r["ids"]) for r in skipped)
    state = json.loads((tmp_path / "skip" / "checkpoints" / "step-000008" / "trainer_state.json").read_text())
    assert state["position"]["nonfinite_skipped"] == len(skipped)
    with pytest.raises(ValueError, match="nonfinite_loss must be one of"):
        TrainConfig(stages=[StageConfig(name="s", train=["llm"], data=["x"], steps=1, lr=1.0)], output_dir="x", nonfinite_loss="ignore")


def test_skipped_samples_are_counted_and_an_all_skipped_batch_drops_its_step(tmp_path):
    """Batches carry the records of samples the processor skipped (``batch["skipped"]``); the trainer
    counts them, and a micro-batch left empty drops its step (on every process) instead of crashing."""
    data = make_dataset(8, 6)
    bad = {1, 4, 5}  # with batch_size 1 and 8 steps over 8 samples, three batches are empty

    def skipping_collate(items):
        kept = [it for it in items if not it["bad"]]
        batch = collate(kept) if kept else {"input_ids": torch.zeros(0, SEQ, dtype=torch.long),
                                            "attention_mask": torch.zeros(0, SEQ, dtype=torch.long),
                                            "labels": torch.zeros(0, SEQ, dtype=torch.long), "media": {}}
        return {**batch, "skipped": [it["id"] for it in items if it["bad"]]}

    for i, item in enumerate(data):
        item["id"], item["bad"] = f"s{i}", i in bad
    stage = StageConfig(name="s", train=["connectors"], data=["x"], steps=5, lr=1e-2, batch_size=1)
    config = TrainConfig(stages=[stage], output_dir=str(tmp_path), log_every=1)
    trainer = Trainer(TinyMM(dropout=0.0), config, {"x": data}, skipping_collate, progress=False)
    trainer.train()
    pos = trainer.position
    order = [b[0] for b in epoch_batches(8, 1, 1, 0, epoch_seed(0, 0, 0))]
    seen_bad = [i for i in order[: pos.batch_in_epoch] if i in bad]
    assert pos.epoch == 0 and pos.batch_in_epoch == 5 + len(seen_bad) and seen_bad
    assert pos.bad_samples_skipped == len(seen_bad) and pos.global_step == 5
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["bad_samples_skipped"] for r in records if "dropped" in r] == list(range(1, len(seen_bad) + 1))
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4, 5]


def test_loader_workers_give_the_same_run(reference, tmp_path):
    """Two DataLoader workers build the same batches in the same order: the run is bit-identical."""
    trainer(TinyMM(), staged_config(tmp_path, num_workers=2)).train()
    assert_identical(exported(tmp_path), exported(reference))
    assert _metrics(tmp_path) == _metrics(reference)


def test_fsdp_refuses_what_it_cannot_shard(tmp_path, monkeypatch):
    """Under ``accelerate launch --use_fsdp``: FSDP1 is refused, and so is train_added_tokens (a gradient
    hook on the plain model's tables, which the sharded replica would not have)."""
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    stage = StageConfig(name="rows", train_added_tokens=True, data=["caps"], steps=1, lr=1e-3)
    with pytest.raises(ValueError, match="--fsdp_version 2"):
        trainer(TinyMM(), TrainConfig(stages=[stage], output_dir=str(tmp_path / "v1"))).train()
    monkeypatch.setenv("FSDP_VERSION", "2")
    with pytest.raises(ValueError, match="train_added_tokens is not supported under FSDP"):
        trainer(TinyMM(), TrainConfig(stages=[stage], output_dir=str(tmp_path / "v2"))).train()


def test_bf16_stage_runs_and_fp16_needs_gpu(tmp_path):
    stage = StageConfig(name="s", train=["connectors"], data=["caps"], steps=2, lr=1e-3, batch_size=4, mixed_precision="bf16")
    trainer(TinyMM(), TrainConfig(stages=[stage], output_dir=str(tmp_path / "bf16"))).train()
    if not torch.cuda.is_available():
        stage = StageConfig(name="s", train=["connectors"], data=["caps"], steps=1, lr=1e-3, mixed_precision="fp16")
        with pytest.raises(ValueError, match="fp16 mixed precision needs a GPU"):
            trainer(TinyMM(), TrainConfig(stages=[stage], output_dir=str(tmp_path / "fp16"))).train()


def test_gradient_checkpointing_with_lora(tmp_path):
    model = TinyMM()
    llm_before = {n: p.detach().clone() for n, p in model.llm.named_parameters()}
    stage = StageConfig(name="s", lora=["llm"], data=["caps"], steps=2, lr=1e-2, batch_size=4, gradient_checkpointing=True)
    trainer(model, TrainConfig(stages=[stage], output_dir=str(tmp_path))).train()
    assert model.llm.is_gradient_checkpointing
    assert {n for n, _ in model.llm.named_parameters()} == set(llm_before)  # merged back into plain layers
    assert any(not torch.equal(p, llm_before[n]) for n, p in model.llm.named_parameters())


def test_resumes_a_checkpoint_written_before_a_stage_setting_existed(reference, tmp_path):
    state_file = _copy_run(reference, tmp_path, 8) / "trainer_state.json"
    state = json.loads(state_file.read_text())
    for stage in state["config"]["stages"]:
        del stage["retrieved"]  # an earlier mmfuse had no such setting; its default is what that run did
    state_file.write_text(json.dumps(state))
    trainer(TinyMM(), staged_config(tmp_path, keep_checkpoints=10)).train(resume=True)
    assert_identical(exported(tmp_path), exported(reference))
    other = _copy_run(reference, tmp_path / "other", 8) / "trainer_state.json"
    state["config"]["stages"][0]["retrieved"] = 2  # a setting that differs still refuses
    other.write_text(json.dumps(state))
    with pytest.raises(ValueError, match="other stages, seed or shuffle buffer"):
        trainer(TinyMM(), staged_config(tmp_path / "other", keep_checkpoints=10)).train(resume=True)


def test_refuses_to_overwrite_or_resume_a_different_run(reference):
    with pytest.raises(FileExistsError, match="resume=True"):
        trainer(TinyMM(), staged_config(reference)).train()
    with pytest.raises(ValueError, match="other stages, seed or shuffle buffer"):
        trainer(TinyMM(), staged_config(reference, seed=1)).train(resume=True)


def test_config_round_trips(tmp_path):
    config = staged_config(tmp_path)
    config.save(tmp_path / "train.json")
    assert TrainConfig.load(tmp_path / "train.json") == config


def _train_and_die(out: str, kill_at: str, threads: str) -> None:
    """Train (or resume) the staged config and SIGKILL this process at an event: ``kill_at`` is
    ``forward:N`` (the N-th model forward) or ``any:N`` (the N-th of forwards and, inside checkpoint
    saves, each file write and the final rename); N = 0 never kills. Prints each event's kind."""
    import mmfuse.train.checkpoint as checkpoint_module
    import mmfuse.train.trainer as trainer_module

    torch.set_num_threads(int(threads))
    which, number = kill_at.split(":")
    counts = {"forward": 0, "any": 0}

    def event(kind, fn):
        def counted(*args, **kwargs):
            counts["forward"] += kind == "forward"
            counts["any"] += 1
            if counts[which] == int(number):
                print(f"killed at {kind}", flush=True)
                os.kill(os.getpid(), signal.SIGKILL)
            return fn(*args, **kwargs)
        return counted

    TinyMM.forward = event("forward", TinyMM.forward)
    checkpoint_module.save_file = event("save", checkpoint_module.save_file)
    checkpoint_module.save_json = trainer_module.save_json = event("save", checkpoint_module.save_json)
    checkpoint_module.os.replace = event("rename", checkpoint_module.os.replace)
    trainer(TinyMM(), staged_config(out)).train(resume=bool(list_checkpoints(Path(out) / "checkpoints")))
    print(f"events {counts['any']}", flush=True)


if __name__ == "__main__":
    _train_and_die(*sys.argv[1:])


class KindedData(torch.utils.data.Dataset):
    """``make_dataset`` items with an id, and the ``samples`` (meta kinds alternating colour / count)
    that a stage's ``kinds`` selects from, as in :class:`~mmfuse.data.dataset.ProcessedDataset`."""

    def __init__(self, n: int):
        self.items = [{**item, "id": f"s{i}"} for i, item in enumerate(make_dataset(n, 6))]
        self.samples = [Sample(f"s{i}", [], meta={"kind": "colour" if i % 2 else "count"}) for i in range(n)]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def test_stage_kinds_train_only_on_those_samples(tmp_path):
    """A ``kinds`` stage sees only its kinds (every colour sample over its epochs), the next stage all."""
    seen: dict[str, list[str]] = {"colour": [], "all": []}
    stages = [StageConfig(name="colour", train=["connectors"], data=["x"], kinds=["colour"], steps=4, lr=1e-2, batch_size=2),
              StageConfig(name="all", train=["connectors"], data=["x"], steps=4, lr=1e-2, batch_size=4)]
    current = iter(["colour"] * 4 + ["all"] * 4)

    def recording(items):
        seen[next(current)].extend(it["id"] for it in items)
        return collate(items)

    config = TrainConfig(stages=stages, output_dir=str(tmp_path / "run"), log_every=1)
    Trainer(TinyMM(dropout=0.0), config, {"x": KindedData(8)}, recording, progress=False).train()
    assert sorted(seen["colour"]) == sorted([f"s{i}" for i in (1, 3, 5, 7)] * 2)  # two epochs of the 4 colour samples
    assert {int(s[1:]) % 2 for s in seen["all"]} == {0, 1}
    with pytest.raises(ValueError, match=r"stage 'c', data 'x': no sample has a meta kind in \['size'\]; the kinds found are \['colour', 'count'\]"):
        bad = StageConfig(name="c", train=["connectors"], data=["x"], kinds=["size"], steps=1, lr=1e-2, batch_size=2)
        Trainer(TinyMM(), TrainConfig(stages=[bad], output_dir=str(tmp_path / "bad")), {"x": KindedData(8)}, collate,
                progress=False).train()
    with pytest.raises(ValueError, match="needs an in-memory dataset of samples"):
        bad = StageConfig(name="c", train=["connectors"], data=["x"], kinds=["colour"], steps=1, lr=1e-2, batch_size=2)
        Trainer(TinyMM(), TrainConfig(stages=[bad], output_dir=str(tmp_path / "plain")), {"x": make_dataset(8, 0)}, collate,
                progress=False).train()
