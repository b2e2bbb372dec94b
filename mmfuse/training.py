"""Run a recipe end to end: build the model, read the data, train the stages, evaluate.

The CLI's ``train`` and ``eval`` commands and the Python API share these functions.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import torch

from .data.dataset import ProcessedDataset, ProcessedStream
from .data.formats import load_samples, resolve_dataset, samples_from_hf
from .data.shards import INDEX as SHARD_INDEX
from .data.shards import ShardStream
from .eval.adapter import EvalAdapter
from .eval.tasks import evaluate_task
from .model import MultimodalLM
from .recipe import Recipe, load_recipe
from .train import Trainer

RUN_FILE = "run.json"


def prepare_recipe(
    recipe: str | Path | Recipe, out: Path, *, seed=None, steps_scale=1.0, save_every=None, batch_size=None
) -> Recipe:
    """The recipe with run-time overrides applied (output dir, seed, scaled steps, batch size)."""
    recipe = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
    stages = [
        dataclasses.replace(s, steps=max(1, math.ceil(s.steps * steps_scale)), batch_size=batch_size or s.batch_size)
        for s in recipe.train.stages
    ]
    overrides = {"output_dir": str(out), "stages": stages}
    if seed is not None:
        overrides["seed"] = seed
    if save_every is not None:
        overrides["save_every"] = save_every
    return dataclasses.replace(recipe, train=dataclasses.replace(recipe.train, **overrides))


def run_training(
    recipe: str | Path | Recipe,
    data: str | Path,
    out: str | Path,
    *,
    resume: bool = False,
    seed: int | None = None,
    steps_scale: float = 1.0,
    save_every: int | None = None,
    batch_size: int | None = None,
    progress: bool = True,
    allow_outside_root: bool = False,
    on_step=None,
) -> MultimodalLM:
    """Train ``recipe`` on ``data`` into ``out`` and return the trained model. ``allow_outside_root``:
    accept media paths outside a dataset file's directory. ``on_step(model, position)``: the trainer's
    per-step callback (see :class:`~mmfuse.train.Trainer`)."""
    out = Path(out)
    recipe = prepare_recipe(recipe, out, seed=seed, steps_scale=steps_scale, save_every=save_every, batch_size=batch_size)
    out.mkdir(parents=True, exist_ok=True)
    run_info = {
        "recipe": recipe.name,
        "survey_type": recipe.survey_type,
        "data": str(data),
        "train": recipe.train.to_dict(),
        "eval": recipe.eval,
    }
    (out / RUN_FILE).write_text(json.dumps(run_info, indent=2) + "\n")
    torch.manual_seed(recipe.train.seed)  # the same initial connector weights on every (re)start
    model = MultimodalLM.from_config(recipe.model)
    names = sorted({name for stage in recipe.train.stages for name in stage.data})
    datasets = {name: training_dataset(data, name, model.processor, recipe.train.shuffle_buffer, allow_outside_root)
                for name in names}
    read_skipped = len(model.processor.bad_samples)  # bad records left out while reading the data
    trainer = Trainer(model, recipe.train, datasets, model.collator(), progress=progress, on_step=on_step,
                      bad_samples=model.processor.bad_samples)
    trainer.train(resume=resume)
    if trainer.is_main_process:
        print(run_summary(trainer.position, read_skipped, model.processor.bad_samples))
    return model


def run_summary(position, read_skipped: int, bad_samples) -> str:
    """The end-of-run report: steps made, steps dropped, bad samples skipped when reading the data and
    while training (the latter over every process and across resumes), with this process's reasons."""
    lines = [f"trained {position.global_step} step(s) on {position.samples_seen} sample(s)"]
    if position.nonfinite_skipped:
        lines.append(f"dropped {position.nonfinite_skipped} step(s) with a NaN or infinite loss (see metrics.jsonl)")
    if read_skipped or position.bad_samples_skipped:
        lines.append(f"skipped {read_skipped} bad record(s) reading the data and {position.bad_samples_skipped} bad "
                     f"sample(s) while training; {bad_samples.summary()}")
    return "\n".join(lines)


def shard_directory(data: str | Path, name: str, split: str) -> Path | None:
    """Where ``name``'s shards are, if it has any: ``name`` itself, or ``{data}/{name}_{split}/``, a
    directory holding the ``index.json`` that ``mmfuse data shard`` writes."""
    for candidate in (Path(name), Path(data) / f"{name}_{split}"):
        if (candidate / SHARD_INDEX).is_file():
            return candidate
    return None


def training_dataset(data: str | Path, name: str, processor, shuffle_buffer: int,
                     allow_outside_root: bool = False) -> ProcessedDataset | ProcessedStream:
    """The stage dataset ``name``: streamed from its shards when it has them (see :func:`shard_directory`),
    else a saved Hugging Face dataset (:func:`hf_directory`), else its JSON file. Bad samples follow the
    model's ``on_bad_sample`` policy and are logged in ``processor.bad_samples``."""
    shards = shard_directory(data, name, "train")
    if shards is not None:
        return ProcessedStream(ShardStream(shards, shuffle_buffer=shuffle_buffer), processor)
    policy, log = processor.on_bad_sample, processor.bad_samples
    saved = hf_directory(data, name, "train")
    if saved is not None:
        from datasets import load_from_disk

        samples = samples_from_hf(load_from_disk(str(saved)), root=saved, name=name, on_bad_sample=policy, log=log,
                                  allow_outside_root=allow_outside_root)
    else:
        samples = load_samples(resolve_dataset(data, name, "train"), on_bad_sample=policy, log=log,
                               allow_outside_root=allow_outside_root)
    return ProcessedDataset(samples, processor)


def hf_directory(data: str | Path, name: str, split: str) -> Path | None:
    """A Hugging Face dataset saved with ``Dataset.save_to_disk`` for ``name``: ``name`` itself or
    ``{data}/{name}_{split}/`` holding its ``dataset_info.json`` and ``state.json``."""
    for candidate in (Path(name), Path(data) / f"{name}_{split}"):
        if (candidate / "state.json").is_file() and (candidate / "dataset_info.json").is_file():
            return candidate
    return None


def run_eval(
    run: str | Path,
    data: str | Path,
    split: str = "test",
    *,
    tasks: list[str] | None = None,
    limit: int | None = None,
    batch_size: int = 32,
    shots: int = 0,
    shot_selection: str = "random",
    shot_format: str = "turns",
    choices: bool = False,
    console=None,
    model: MultimodalLM | None = None,
    allow_outside_root: bool = False,
) -> dict[str, dict]:
    """Score a trained model (or any HF causal LM, text-only) on ``split`` of each task:
    ``{task: evaluate_task(...) result}``; tasks default to the recipe's eval data."""
    run = Path(run)
    adapter = EvalAdapter(model, batch_size) if model is not None else EvalAdapter.load(run, batch_size)
    if not tasks:
        info_path = run / RUN_FILE
        tasks = json.loads(info_path.read_text())["eval"].get("data", []) if info_path.is_file() else []
        if not tasks:
            raise ValueError(f"{run}: no --task given and no recipe eval data recorded in {RUN_FILE}")
    results = {}
    for task in tasks:
        if console is not None:
            console.print(f"scoring {task} ({split})" + (f", {shots}-shot {shot_selection} {shot_format}" if shots else ""))
        results[task] = evaluate_task(
            adapter, data, task, split, limit=limit, shots=shots, shot_selection=shot_selection, shot_format=shot_format,
            choices=choices, seed=seed_of(run), allow_outside_root=allow_outside_root,
        )
    return results


def seed_of(run: Path) -> int:
    """The seed recorded in a run directory (0 when there is none)."""
    info_path = run / RUN_FILE
    return json.loads(info_path.read_text())["train"].get("seed", 0) if info_path.is_file() else 0
