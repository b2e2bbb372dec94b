"""Multi-process training under ``accelerate launch`` on 2 CPU processes (gloo): DDP matches one process
with the same global batch and streams shards resumably, and FSDP (torch's FSDP2) trains a stage with
a frozen LLM, checkpoints, resumes and exports a model that one process loads.

Run as a script (``python tests/test_distributed.py MODE OUT``) under ``accelerate launch``; the tests
below launch it.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import TINY_LLMS, TINY_VIT
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parent))
from test_trainer import DATASETS, TinyMM, collate, exported  # noqa: E402

from mmfuse.data.formats import load_samples  # noqa: E402
from mmfuse.model import MultimodalLM  # noqa: E402
from mmfuse.train import StageConfig, Trainer, TrainConfig  # noqa: E402

pytestmark = pytest.mark.slow


def ddp_config(out, batch_size: int) -> TrainConfig:
    """Two stages, the second with gradient accumulation; ragged labels, so tokens must be weighed
    across processes; no dropout, so processes with their own RNG streams compute the same model."""
    stages = [
        StageConfig(name="align", train=["connectors"], data=["caps"], steps=3, lr=1e-2, batch_size=batch_size),
        StageConfig(name="tune", train=["connectors", "llm"], data=["caps", "chat"], steps=3, lr=1e-3,
                    batch_size=batch_size, grad_accum=2),
    ]
    return TrainConfig(stages=stages, output_dir=str(out), log_every=1, save_every=2)


def train_ddp(out, batch_size: int) -> None:
    model = TinyMM(dropout=0.0).double()
    trainer = Trainer(model, ddp_config(out, batch_size), DATASETS,
                      lambda items: collate(items, torch.float64, ragged=True), progress=False)
    trainer.train()


def logged(out) -> list[dict]:
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def launch(*args: str) -> subprocess.CompletedProcess:
    """``accelerate launch`` on 2 CPU processes; ``args``: launcher flags, then the script and its arguments."""
    with socket.socket() as s:  # a free port for the gloo rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port),
           *map(str, args)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    first_error = proc.stderr.find("Traceback")  # the launcher's own report that follows says little
    assert proc.returncode == 0, proc.stderr[first_error:first_error + 6000] if first_error >= 0 else proc.stderr[-4000:]
    return proc


def test_ddp_two_processes_match_one_with_the_same_global_batch(tmp_path):
    launch("--multi_gpu", __file__, "ddp", tmp_path / "ddp")
    train_ddp(tmp_path / "single", batch_size=4)
    two, one = logged(tmp_path / "ddp"), logged(tmp_path / "single")
    assert [m["step"] for m in two] == [m["step"] for m in one] == list(range(1, 7))
    for key in ("loss", "grad_norm", "samples_seen"):
        assert [m[key] for m in two] == pytest.approx([m[key] for m in one], abs=1e-5), key
    for name, tensor in exported(tmp_path / "single").items():
        torch.testing.assert_close(exported(tmp_path / "ddp")[name], tensor, rtol=0, atol=1e-6)


CLI = [sys.executable, "-m", "mmfuse.cli"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("world")
    subprocess.run([*CLI, "data", "synth", "--out", str(out), "--tiny", "--seed", "3"], check=True, capture_output=True)
    return out


@pytest.fixture(scope="module")
def flamingo_recipe(tmp_path_factory, tokenizer_dir):
    """Type-A: gated cross-attention blocks and a Perceiver resampler train, then LoRA on the blocks
    (MultiModal-GPT), then the blocks again; the LLM and the vision encoder stay frozen. Checkpoints
    every 2 steps (inside the first stage too). LoRA adapters are drawn from each process's own RNG: the
    processes must agree."""
    path = tmp_path_factory.mktemp("recipe") / "tiny-flamingo.yaml"
    path.write_text(yaml.safe_dump({
        "name": "tiny-flamingo", "survey_type": "A", "description": "tiny FSDP test recipe",
        "model": {
            "llm": {"hf_config": dict(TINY_LLMS["llama"], vocab_size=320), "tokenizer": str(tokenizer_dir)},
            "encoders": {"image": {"modality": "image", "hf_config": dict(TINY_VIT, image_size=48), "feature_layer": -1}},
            "connectors": {"image": {"kind": "perceiver", "num_latents": 4, "depth": 1, "num_heads": 4}},
            "fusion": {"type": "A", "options": {"every": 1}}, "max_length": 256,
        },
        "train": {"seed": 5, "save_every": 2, "log_every": 1, "keep_checkpoints": 10, "stages": [
            {"name": "xattn", "train": ["connectors", "fusion"], "data": ["image_caption"], "steps": 3, "lr": 1e-3,
             "batch_size": 2, "warmup_ratio": 0.0},
            {"name": "lora", "train": ["connectors"], "lora": ["fusion"], "lora_r": 4, "data": ["image_qa"], "steps": 3,
             "lr": 1e-2, "batch_size": 2, "warmup_ratio": 0.0},
            {"name": "polish", "train": ["fusion"], "data": ["image_caption"], "steps": 2, "lr": 1e-3, "batch_size": 2},
        ]},
        "eval": {"data": ["image_qa"]},
    }))
    return path


def test_fsdp_trains_a_frozen_llm_stage_and_one_process_loads_it(world, flamingo_recipe, tmp_path):
    """Two FSDP2 processes (each holding half of every parameter) train like one process with the same
    global batch; a run resumed from a mid-stage checkpoint (sharded optimizer state) ends bit-identical;
    the export loads in one process, the frozen LLM untouched, with the very logits the sharded model
    computed (and the single-process run's, within 1e-5)."""
    fsdp = ("--use_fsdp", "--fsdp_version", "2")
    launch(*fsdp, __file__, "fsdp", tmp_path / "fsdp", flamingo_recipe, world)  # run_training, keeping the sharded logits
    single = subprocess.run([*CLI, "train", str(flamingo_recipe), "--data", str(world), "--out", str(tmp_path / "single"),
                             "--batch-size", "4"], capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert single.returncode == 0, single.stderr[-3000:]
    two, one = logged(tmp_path / "fsdp"), logged(tmp_path / "single")
    assert json.loads((tmp_path / "fsdp" / "checkpoints" / "step-000002" / "trainer_state.json").read_text())["fsdp"]
    assert [m["samples_seen"] for m in two] == [m["samples_seen"] for m in one] == [4 * i for i in range(1, 9)]
    for key in ("loss", "grad_norm"):
        assert [m[key] for m in two] == pytest.approx([m[key] for m in one], abs=1e-5), key

    resumed = tmp_path / "resumed"  # a copy of the run as it was at step 2, inside the first stage
    (resumed / "checkpoints").mkdir(parents=True)
    os.rename(tmp_path / "fsdp" / "checkpoints" / "step-000002", resumed / "checkpoints" / "step-000002")
    launch(*fsdp, "--module", "mmfuse.cli", "train", flamingo_recipe, "--data", world, "--out", resumed, "--resume")
    final = load_file(tmp_path / "fsdp" / "model.safetensors")
    assert {k: v.tolist() for k, v in load_file(resumed / "model.safetensors").items()} == {k: v.tolist() for k, v in final.items()}

    model, reference = MultimodalLM.from_pretrained(tmp_path / "fsdp"), MultimodalLM.from_pretrained(tmp_path / "single")
    torch.manual_seed(5)
    built = MultimodalLM.from_config(model.config)
    for name, param in built.llm.named_parameters():
        assert torch.equal(param, model.llm.get_parameter(name)), f"frozen {name} moved"
    batch = probe_batch(model, world)
    with torch.no_grad():
        logits = model(**batch).logits
    assert torch.equal(logits, load_file(tmp_path / "fsdp" / "sharded_logits.safetensors")["logits"])
    with torch.no_grad():
        torch.testing.assert_close(logits, reference(**batch).logits, rtol=0, atol=1e-5)


def test_ddp_streams_shards_and_resumes_mid_epoch(world, flamingo_recipe, tmp_path):
    """Two processes stream the tasks from shards, each its own shards; a run resumed from a checkpoint
    inside the first stage (each process skips what it had read) ends bit-identical."""
    from mmfuse.data.shards import write_shards

    data = tmp_path / "data"
    for task in ("image_caption", "image_qa"):
        write_shards(world / f"{task}_train.json", data / f"{task}_train", samples_per_shard=4)
    ddp = ("--multi_gpu", "--module", "mmfuse.cli", "train", flamingo_recipe, "--data", data)
    launch(*ddp, "--out", tmp_path / "full")
    assert [m["samples_seen"] for m in logged(tmp_path / "full")] == [4 * i for i in range(1, 9)]
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    os.rename(tmp_path / "full" / "checkpoints" / "step-000002", resumed / "checkpoints" / "step-000002")
    launch(*ddp, "--out", resumed, "--resume")
    final = load_file(tmp_path / "full" / "model.safetensors")
    assert {k: v.tolist() for k, v in load_file(resumed / "model.safetensors").items()} == {k: v.tolist() for k, v in final.items()}


def probe_batch(model, world: Path) -> dict:
    return model.collator()([model.processor(s) for s in load_samples(world / "image_qa_test.json")[:4]])


def train_fsdp_keeping_logits(out: str, recipe: str, world: str) -> None:
    """``run_training`` under FSDP; after the last step the sharded model (every process takes part)
    computes the logits of a probe batch, and the main process saves them."""
    from accelerate import PartialState
    from safetensors.torch import save_file

    from mmfuse.recipe import load_recipe
    from mmfuse.training import run_training

    last = sum(stage.steps for stage in load_recipe(recipe).train.stages)

    def keep_logits(model, position) -> None:
        if position.global_step == last:
            with torch.no_grad():
                logits = model.eval()(**probe_batch(model, Path(world))).logits
            if PartialState().is_main_process:
                save_file({"logits": logits.contiguous()}, Path(out) / "sharded_logits.safetensors")

    run_training(recipe, world, out, progress=False, on_step=keep_logits)


if __name__ == "__main__":
    mode, out = sys.argv[1], sys.argv[2]
    if mode == "ddp":
        train_ddp(out, batch_size=2)
    elif mode == "fsdp":
        train_fsdp_keeping_logits(out, *sys.argv[3:])
