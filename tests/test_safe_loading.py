"""Safe loading: pickle-based weights are refused with a message saying why and how to convert; YAML is
read with the safe loader; nothing in mmfuse unpickles."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from conftest import TINY_LLMS

from mmfuse.backbones.loading import load_encoder_model, load_llm
from mmfuse.codecs import load_codec
from mmfuse.config import EncoderConfig, LLMConfig
from mmfuse.model import MultimodalLM
from mmfuse.recipe import load_recipe
from mmfuse.safe_loading import PICKLE_SUFFIXES, UnsafeCheckpoint, require_safetensors

REFUSAL = r"pickle-based .*safetensors only, because unpickling runs arbitrary code.*torch.load\('{name}', weights_only=True\)"


def _pickle(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"weight": torch.zeros(2)}, path)
    return path


@pytest.mark.parametrize("suffix", PICKLE_SUFFIXES)
def test_pickle_files_are_refused(tmp_path, suffix):
    path = _pickle(tmp_path / f"model{suffix}")
    with pytest.raises(UnsafeCheckpoint, match=REFUSAL.format(name=re.escape(path.name))):
        require_safetensors(path)


def test_directories_need_their_safetensors(tmp_path):
    _pickle(tmp_path / "pytorch_model.bin")
    with pytest.raises(UnsafeCheckpoint, match=r"holds pickle-based weights \['pytorch_model.bin'\] and no \*.safetensors"):
        require_safetensors(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"")
    require_safetensors(tmp_path)  # the safetensors are what gets read; the pickle is never opened
    with pytest.raises(UnsafeCheckpoint, match=r"and no weights.safetensors"):
        require_safetensors(tmp_path, "weights.safetensors")  # a trainer checkpoint's weights file
    require_safetensors(tmp_path / "nothing-here")  # nothing to judge: the caller reports what is missing


def test_mmfuse_checkpoints_refuse_pickles(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"mmfuse_version": 1, "model": {}}))
    _pickle(tmp_path / "model.bin")
    with pytest.raises(UnsafeCheckpoint, match=REFUSAL.format(name="model.bin")):
        MultimodalLM.from_pretrained(tmp_path)
    with pytest.raises(UnsafeCheckpoint, match=r"model.bin is a pickle-based file \(.bin\)"):
        MultimodalLM.from_pretrained(tmp_path / "model.bin")
    codec = tmp_path / "codec"
    codec.mkdir()
    (codec / "codec.json").write_text(json.dumps({"kind": "image"}))
    _pickle(codec / "model.pt")
    with pytest.raises(UnsafeCheckpoint, match=r"\['model.pt'\] and no model.safetensors"):
        load_codec(codec)


def test_hugging_face_backbones_load_safetensors_only(tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(**TINY_LLMS["llama"], vocab_size=64)
    llm = AutoModelForCausalLM.from_config(config)
    pickled = tmp_path / "pickled"
    config.save_pretrained(pickled)
    torch.save(llm.state_dict(), pickled / "pytorch_model.bin")
    with pytest.raises(UnsafeCheckpoint, match=r"pickled holds pickle-based weights \['pytorch_model.bin'\]"):
        load_llm(LLMConfig(name_or_path=str(pickled)))
    bare = tmp_path / "bare"
    config.save_pretrained(bare)  # no weights at all: transformers' own error, named as a safetensors one
    with pytest.raises(UnsafeCheckpoint, match=r"bare: no safetensors weights \(.*model.safetensors"):
        load_encoder_model(EncoderConfig(modality="image", name_or_path=str(bare)))
    llm.save_pretrained(tmp_path / "safe")
    assert load_llm(LLMConfig(name_or_path=str(tmp_path / "safe"))).config.vocab_size == 64


def test_yaml_recipes_cannot_build_python_objects(tmp_path):
    marker = tmp_path / "ran"
    recipe = tmp_path / "evil.yaml"
    recipe.write_text(f'name: !!python/object/apply:os.system ["touch {marker}"]\nsurvey_type: C\n')
    with pytest.raises(ValueError, match="recipe evil.yaml: not a plain YAML recipe"):
        load_recipe(recipe)
    assert not marker.exists()
    recipe.write_text("- a list\n")
    with pytest.raises(ValueError, match="recipe evil.yaml: expected a mapping of recipe fields, got list"):
        load_recipe(recipe)


def test_no_unsafe_loader_in_mmfuse():
    """Every YAML read is safe_load, and nothing unpickles (torch.load, pickle, an unsafe YAML loader);
    safe_loading.py only names torch.load in its conversion hint."""
    unsafe = re.compile(r"yaml\.(load|unsafe_load|full_load)\(|torch\.load\(|pickle\.loads?\(|Loader=")
    root = Path(__file__).parents[1] / "mmfuse"
    found = [f"{path.relative_to(root)}:{n}" for path in root.rglob("*.py") if path.name != "safe_loading.py"
             for n, line in enumerate(path.read_text().splitlines(), 1) if unsafe.search(line)]
    assert found == []
