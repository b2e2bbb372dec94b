"""`mmfuse compare --quick` end to end on the built-in world (backbones built at 1% of their steps)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml
from PIL import Image

pytestmark = pytest.mark.slow

RECORD_FIELDS = {
    "recipe", "survey_type", "params_total", "params_trainable", "train_flops_per_sample", "train_samples_per_s",
    "peak_memory_mb", "metrics", "text_ppl_before", "text_ppl_after", "curve", "media_token_cost", "adds_modality",
    "generates", "budget",
}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return {**os.environ, "MMFUSE_CACHE": str(tmp_path_factory.mktemp("cache")), "MMFUSE_WORLD_STEPS_SCALE": "0.01",
            "OMP_NUM_THREADS": "2"}


def _compare(out, env, *args):
    return subprocess.run([sys.executable, "-m", "mmfuse.cli", "compare", "--quick", "--out", str(out), *map(str, args)],
                          capture_output=True, text=True, env=env, timeout=900)


@pytest.fixture(scope="module")
def broken_recipe(tmp_path_factory):
    recipe = yaml.safe_load(open(os.path.join(os.path.dirname(__file__), "..", "mmfuse", "recipes", "llava.yaml")))
    recipe["name"] = "broken"
    recipe["train"]["stages"][0]["data"] = ["no_such_task"]
    path = tmp_path_factory.mktemp("recipes") / "broken.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_quick_compare_writes_report_plots_and_survives_a_failing_recipe(tmp_path, env, broken_recipe):
    recipes = ["openflamingo", "llama-adapter", "llava", "blip2", "pengi", "chameleon", broken_recipe]  # A, B, C (+audio), D
    result = _compare(tmp_path / "cmp", env, *[a for r in recipes for a in ("--recipes", r)])
    assert result.returncode == 1, result.stderr[-3000:]  # one recipe failed: reported, and the run says so
    report = json.loads((tmp_path / "cmp" / "report.json").read_text())
    records = {r["recipe"]: r for r in report["recipes"]}
    assert list(records) == ["openflamingo", "llama-adapter", "llava", "blip2", "pengi", "chameleon", "broken"]
    assert "no_such_task" in records["broken"]["error"]
    budgets = set()
    types = {"openflamingo": "A", "llama-adapter": "B"}
    for name in ("openflamingo", "llama-adapter", "llava", "blip2", "pengi"):
        r = records[name]
        assert RECORD_FIELDS <= set(r), RECORD_FIELDS - set(r)
        assert r["survey_type"] == types.get(name, "C") and r["generates"].keys() == {"text"}
        assert 0 < r["params_trainable"] <= r["params_total"] and r["train_flops_per_sample"] > 0
        assert [p["samples"] for p in r["curve"]][0] == 0 and len(r["curve"]) == 3
        flops = [c["train_flops"] for c in r["media_token_cost"]]
        assert flops == sorted(flops) and flops[0] < flops[-1]
        assert r["text_ppl_before"] > 1 and r["text_ppl_after"] > 1
        budgets.add(r["budget"]["requested"])
        qa = f"{r['modalities'][0]}_qa/test"
        assert set(r["metrics"]) >= {qa, f"{r['modalities'][0]}_qa/heldout", f"{r['modalities'][0]}_caption/test"}
        assert 0 <= r["metrics"][qa]["accuracy"] <= 1 and "by_kind" in r["metrics"][qa]
    chameleon = records["chameleon"]  # Type-D: reads image codes, and draws
    assert chameleon["survey_type"] == "D" and RECORD_FIELDS <= set(chameleon)
    assert chameleon["generates"].keys() == {"text", "image"} and 0 <= chameleon["generates"]["image"]["value"] <= 1
    assert 0 <= chameleon["metrics"]["image_generation/test"]["complete"] <= 1
    added = chameleon["adds_modality"]  # a sound codec and its vocabulary rows; no new module inside the LLM
    assert added["modality"] == "audio" and added["new_params_by_component"]["codecs"] > 0
    assert added["new_params_by_component"]["llm"] > 0 and added["new_params_by_component"]["fusion"] == 0
    budgets.add(chameleon["budget"]["requested"])
    assert len(budgets) == 1  # equal budgets
    assert records["blip2"]["params_trainable"] < records["llava"]["params_trainable"]  # BLIP-2 keeps the LLM frozen
    assert records["pengi"]["modalities"] == ["audio"]  # its text_prompt encoder reads prompts, not a media modality
    assert records["openflamingo"]["params_fusion"] > 0 == records["llava"]["params_fusion"]  # blocks inside the LLM
    for name in ("openflamingo", "llama-adapter"):  # a new modality adds parameters inside the LLM (k/v, marker)
        assert records[name]["adds_modality"]["new_params_by_component"]["fusion"] > 0
    text = (tmp_path / "cmp" / "report.md").read_text()
    for axis in ("Training compute", "Training data", "Architecture complexity", "Adding a modality", "Any-to-any generation"):
        assert f"| {axis} |" in text
    assert "| image_qa/test colour and shape, 2-3 objects |" in text  # binding, beside the plain accuracy
    for png in ("learning_curves.png", "media_token_cost.png", "params_flops.png"):
        with Image.open(tmp_path / "cmp" / png) as image:
            assert image.size[0] > 300 and image.size[1] > 200

    again = _compare(tmp_path / "again", env, "--recipes", "llava", "--data", tmp_path / "cmp" / "data")
    assert again.returncode == 0, again.stderr[-3000:]
    repeat = json.loads((tmp_path / "again" / "report.json").read_text())["recipes"][0]
    for key in ("metrics", "curve", "train_flops_per_sample", "params_trainable", "text_ppl_after", "media_token_cost"):
        assert repeat[key] == records["llava"][key], key
