"""Training the real MultimodalLM: frozen groups do not move, LoRA merges into a plain checkpoint."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_config

from mmfuse.data.dataset import ProcessedDataset
from mmfuse.data.schema import Message, Sample
from mmfuse.model import MultimodalLM
from mmfuse.train import StageConfig, Trainer, TrainConfig
from mmfuse.train.stage import apply_stage, optimizer_groups


def _samples(media_dir, n=8):
    return [Sample(f"s{i}", [Message("user", "<image>\nwhat colour? <audio>"), Message("assistant", ["red", "blue"][i % 2])],
                   {"image": [media_dir / ("a.png" if i % 2 else "b.png")], "audio": [media_dir / "a.wav"]}) for i in range(n)]


def _snapshot(model, group):
    return {n: p.detach().clone() for n, p in model.parameter_groups()[group]}


def test_frozen_parameters_are_bit_identical_after_training(tokenizer_dir, media_dir, tmp_path):
    model = MultimodalLM.from_config(tiny_config(tokenizer_dir, audio="linear"))
    before = {g: _snapshot(model, g) for g in model.parameter_groups()}
    stage = StageConfig(name="align", train=["connectors.image"], data=["d"], steps=3, lr=1e-2, batch_size=4, warmup_ratio=0)
    trainer = Trainer(model, TrainConfig(stages=[stage], output_dir=str(tmp_path)), {"d": ProcessedDataset(_samples(media_dir), model.processor)},
                      model.collator(), progress=False)
    trainer.train()
    for group, params in before.items():
        moved = [not torch.equal(p, dict(model.named_parameters())[n]) for n, p in params.items()]
        if group == "connectors.image":
            assert all(moved), group
        else:
            assert not any(moved), f"{group} changed although frozen"
    reloaded = MultimodalLM.from_pretrained(tmp_path)
    for name, param in model.state_dict().items():
        assert torch.equal(param, reloaded.state_dict()[name]), name


def test_lora_stage_exports_a_plain_model(tokenizer_dir, media_dir, tmp_path):
    model = MultimodalLM.from_config(tiny_config(tokenizer_dir, "qwen2", audio="linear"))
    base = _snapshot(model, "llm")
    stage = StageConfig(name="lora", train=["connectors"], lora=["llm"], data=["d"], steps=3, lr=1e-2, batch_size=4,
                        lora_target_modules=["q_proj", "v_proj"])
    Trainer(model, TrainConfig(stages=[stage], output_dir=str(tmp_path)), {"d": ProcessedDataset(_samples(media_dir), model.processor)},
            model.collator(), progress=False).train()
    assert not any("lora" in n for n, _ in model.named_parameters())
    after = _snapshot(model, "llm")
    assert after.keys() == base.keys()
    changed = {n for n in base if not torch.equal(base[n], after[n])}
    assert changed and all(("q_proj" in n or "v_proj" in n) for n in changed)
    reloaded = MultimodalLM.from_pretrained(tmp_path)
    batch = model.collator()([model.processor(s) for s in _samples(media_dir, 2)])
    with torch.no_grad():
        assert torch.equal(model.eval()(**batch).logits, reloaded(**batch).logits)


def test_train_added_tokens_moves_only_the_added_rows(tokenizer_dir, media_dir):
    config = tiny_config(tokenizer_dir)
    config.llm.add_tokens = ["<|endofchunk|>"]
    model = MultimodalLM.from_config(config)
    stage = StageConfig(name="s", train=["connectors"], train_added_tokens=True, data=["d"], steps=1, lr=1e-1, weight_decay=0.1)
    params = apply_stage(model, stage)
    optimizer = torch.optim.AdamW(optimizer_groups(model, params, stage), lr=stage.lr, weight_decay=stage.weight_decay)
    weight = model.llm.get_input_embeddings().weight
    before = weight.detach().clone()
    sample = Sample("doc", [Message("document", "<image>a red circle.<|endofchunk|><image>a blue one.<|endofchunk|>")],
                    {"image": [media_dir / "a.png", media_dir / "b.png"]})
    model(**model.collator()([model.processor(sample)])).loss.backward()
    optimizer.step()
    (row,) = model.added_token_ids()
    changed = (weight.detach() != before).any(dim=1).nonzero().flatten().tolist()
    assert changed == [row]  # weight decay skipped the frozen rows too
    apply_stage(model, StageConfig(name="t", train=["llm.embeddings"], data=["d"], steps=1, lr=1e-1))
    model(**model.collator()([model.processor(sample)])).loss.backward()
    assert (weight.grad[:row] != 0).any()  # the next stage's hook is gone: every row gets its gradient
    with pytest.raises(ValueError, match="both listed"):
        apply_stage(model, StageConfig(name="u", train=["llm.embeddings"], train_added_tokens=True, data=["d"], steps=1, lr=1e-1))
    weight.grad = None
    apply_stage(model, StageConfig(name="l", lora=["llm"], train_added_tokens=True, data=["d"], steps=1, lr=1e-1,
                                   lora_target_modules=["q_proj", "v_proj"]))  # peft freezes the table as it wraps
    model(**model.collator()([model.processor(sample)])).loss.backward()
    weight = model.llm.get_input_embeddings().weight
    assert (weight.grad != 0).any(dim=1).nonzero().flatten().tolist() == [row]


def test_resume_with_added_token_rows_is_bit_identical(tokenizer_dir, media_dir, tmp_path):
    """The row-restricted embedding is checkpointed: a run resumed mid-stage ends where an
    uninterrupted one does."""
    import shutil

    from safetensors.torch import load_file

    docs = [Sample(f"d{i}", [Message("document", "<image>a red circle.<|endofchunk|><image>a blue one.<|endofchunk|>")],
                   {"image": [media_dir / "a.png", media_dir / "b.png"]}) for i in range(4)]

    def run(out, resume=False):
        torch.manual_seed(0)
        config = tiny_config(tokenizer_dir)
        config.llm.add_tokens = ["<|endofchunk|>"]
        model = MultimodalLM.from_config(config)
        stage = StageConfig(name="s", train=["connectors"], train_added_tokens=True, data=["d"], steps=4, lr=1e-2,
                            batch_size=2, warmup_ratio=0)
        Trainer(model, TrainConfig(stages=[stage], output_dir=str(out), save_every=1, keep_checkpoints=10),
                {"d": ProcessedDataset(docs, model.processor)}, model.collator(), progress=False).train(resume=resume)
        return load_file(out / "model.safetensors")

    full = run(tmp_path / "full")
    (tmp_path / "cut" / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "full" / "checkpoints" / "step-000002", tmp_path / "cut" / "checkpoints" / "step-000002")
    shutil.copy(tmp_path / "full" / "metrics.jsonl", tmp_path / "cut" / "metrics.jsonl")
    resumed = run(tmp_path / "cut", resume=True)
    assert full.keys() == resumed.keys() and all(torch.equal(full[k], resumed[k]) for k in full)
    torch.manual_seed(0)
    config = tiny_config(tokenizer_dir)
    config.llm.add_tokens = ["<|endofchunk|>"]
    built = MultimodalLM.from_config(config)
    initial, (row,) = built.llm.get_input_embeddings().weight, built.added_token_ids()
    trained = full[next(k for k in full if k.endswith("embed_tokens.weight"))]
    assert (trained != initial).any(dim=1).nonzero().flatten().tolist() == [row]  # the added row was trained


def test_a_stage_can_train_a_module_path_inside_a_group(tokenizer_dir):
    config = tiny_config(tokenizer_dir, image="qformer")
    model = MultimodalLM.from_config(config)
    params = apply_stage(model, StageConfig(name="s", train=["connectors.image.core.proj"], data=["d"], steps=1, lr=1e-3))
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names == {"connectors.image.core.proj.weight", "connectors.image.core.proj.bias"} and len(params) == 2
    with pytest.raises(ValueError, match="no parameter group or module path matches 'connectors.image.core.pro'"):
        apply_stage(model, StageConfig(name="s", train=["connectors.image.core.pro"], data=["d"], steps=1, lr=1e-3))


def test_run_training_reads_a_saved_hf_dataset_and_reports_skipped_samples(tokenizer_dir, media_dir, tmp_path, capsys):
    """A Hugging Face dataset saved with ``save_to_disk`` as ``{data}/{task}_train/`` (an ``Image()``
    column of PIL images) trains; under ``on_bad_sample: skip`` its row without an image for its marker
    is skipped, and the run's summary counts it."""
    datasets = pytest.importorskip("datasets")
    from PIL import Image

    from mmfuse.recipe import Recipe
    from mmfuse.training import run_training

    images = [Image.open(media_dir / name).convert("RGB") for name in ("a.png", "b.png")] * 4
    rows = {"id": [f"r{i}" for i in range(8)], "image": images,
            "conversations": [[{"from": "human", "value": "<image>\nwhat colour?"}, {"from": "gpt", "value": c}]
                              for c in ["red", "blue"] * 4]}
    rows["conversations"][3] = [{"from": "human", "value": "<image> and <image>?"}, {"from": "gpt", "value": "two"}]
    data = tmp_path / "data"
    datasets.Dataset.from_dict(rows).cast_column("image", datasets.Image()).save_to_disk(str(data / "colours_train"))
    config = tiny_config(tokenizer_dir)
    config.on_bad_sample = "skip"
    stage = StageConfig(name="s", train=["connectors"], data=["colours"], steps=3, lr=1e-2, batch_size=2)
    recipe = Recipe(name="hf", survey_type="C", description="", model=config,
                    train=TrainConfig(stages=[stage], output_dir="unused"))
    model = run_training(recipe, data, tmp_path / "run", progress=False)
    assert [r.sample_id for r in model.processor.bad_samples] == ["r3"]
    report = capsys.readouterr().out
    assert "trained 3 step(s) on 6 sample(s)" in report
    assert "skipped 1 bad record(s) reading the data and 0 bad sample(s) while training" in report and "'r3'" in report
    assert MultimodalLM.is_checkpoint(tmp_path / "run")
