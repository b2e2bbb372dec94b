"""End to end through the CLI on a tiny world with tiny random backbones: synth, train (killed with
SIGKILL and resumed to identical weights), eval, generate, info, recipes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml
from conftest import TINY_LLMS, TINY_VIT
from safetensors.torch import load_file

pytestmark = pytest.mark.slow

CLI = [sys.executable, "-m", "mmfuse.cli"]


def _run(*args, env=None, timeout=300):
    result = subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, env=env, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("world")
    _run("data", "synth", "--out", out, "--tiny", "--seed", "3")
    return out


@pytest.fixture(scope="module")
def recipe(tmp_path_factory, tokenizer_dir):
    path = tmp_path_factory.mktemp("recipe") / "tiny-llava.yaml"
    path.write_text(yaml.safe_dump({
        "name": "tiny-llava", "survey_type": "C", "description": "tiny test recipe",
        "model": {
            "llm": {"hf_config": dict(TINY_LLMS["llama"], vocab_size=320), "tokenizer": str(tokenizer_dir)},
            "encoders": {"image": {"modality": "image", "hf_config": dict(TINY_VIT, image_size=48), "feature_layer": -2}},
            "connectors": {"image": {"kind": "mlp2x_gelu"}},
            "fusion": {"type": "C"}, "max_length": 256,
        },
        "train": {"seed": 5, "save_every": 3, "stages": [
            {"name": "align", "train": ["connectors"], "data": ["image_caption"], "steps": 4, "lr": 1e-3, "batch_size": 4},
            {"name": "instruct", "train": ["connectors", "llm"], "data": ["image_qa"], "steps": 20, "lr": 1e-3,
             "batch_size": 4},
        ]},
        "eval": {"data": ["image_qa"]},
    }))
    return path


def test_train_killed_and_resumed_matches_uninterrupted(world, recipe, tmp_path):
    _run("train", recipe, "--data", world, "--out", tmp_path / "a")
    reference = load_file(tmp_path / "a" / "model.safetensors")

    out = tmp_path / "b"
    proc = subprocess.Popen([*CLI, "train", str(recipe), "--data", str(world), "--out", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 240
    while not any((out / "checkpoints").glob("step-00000[6-9]")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "training finished before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "model.safetensors").exists()
    _run("train", recipe, "--data", world, "--out", out, "--resume")
    resumed = load_file(out / "model.safetensors")
    assert resumed.keys() == reference.keys()
    assert all((resumed[k] == reference[k]).all() for k in reference)
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["stage"] == "instruct"


def test_eval_generate_info_recipes(world, recipe, tmp_path):
    run = tmp_path / "run"
    _run("train", recipe, "--data", world, "--out", run)
    printed = " ".join(_run("eval", run, "--data", world, "--split", "test", "--json", tmp_path / "r.json").stdout.split())
    result = json.loads((tmp_path / "r.json").read_text())["image_qa"]
    assert result["count"] == sum(r["count"] for r in result["by_kind"].values()) > 0
    assert "image_qa (test) by objects in the scene" in printed
    assert all(sum(r["count"] for r in result["by_objects"][k].values()) == result["by_kind"][k]["count"] for k in result["by_kind"])
    assert {"colour", "shape", "count"} <= set(result["by_kind"])
    probed = _run("probe", run, "--data", world, "--kind", "colour", "--kind", "shape", "--steps", "20", "--json", tmp_path / "p.json")
    assert "probe on the connector features: image_qa (test) by objects in the scene" in " ".join(probed.stdout.split())
    result = json.loads((tmp_path / "p.json").read_text())
    assert set(result["by_kind"]) == {"colour", "shape"} and result["source"] == "connector" and result["steps"] == 20
    chains = _run("eval", run, "--data", world, "--split", "train", "--task", "chain_qa", "--limit", "4",
                  "--json", tmp_path / "c.json")
    assert "chain_qa: a box in 0.0% of first replies, 0.0% grounded (IoU >= 0.5)" in " ".join(chains.stdout.split())
    result = json.loads((tmp_path / "c.json").read_text())["chain_qa"]
    assert result["count"] == 4 and 0 <= result["grounded"] <= result["box_written"] <= 1
    assert all("step" in row and "box" in row for row in result["predictions"])
    image = next((world / "images").glob("*.png"))
    out = _run("generate", run, "--image", image, "--prompt", "What colour is the circle?", "--max-new-tokens", "4")
    assert out.returncode == 0
    info = _run("info", run).stdout
    assert "connectors.image" in info and "trains in align" in info
    recipes = _run("recipes").stdout
    assert "qwen-audio" in recipes and "wavllm" in recipes
