"""``mmfuse compare``: train several recipes on the same backbones, data and sample budget, measure
each, and write the survey's comparison table with numbers in it.

Each recipe runs in its own process (``python -m mmfuse.compare JOB.json``), so its peak memory is
its own and a recipe that fails is reported with its error while the others still run. A run:

1. scales the recipe's stages to the budget (training samples, the same for every recipe, split
   over the stages in the recipe's own proportions);
2. measures the fresh model: parameters, training FLOPs per sample of every stage, FLOPs against
   media tokens per sample, what adding a modality costs, text perplexity, the metric at 0 samples;
3. trains, scoring the learning-curve task at evenly spaced sample counts;
4. scores the evaluation tasks and the text perplexity again.

The records go to ``report.json``; :mod:`mmfuse.report` turns them into ``report.md`` and the plots.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import resource
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from .config import MODALITIES, ConnectorConfig
from .data.dataset import ProcessedDataset
from .data.formats import load_samples, resolve_dataset
from .eval.adapter import EvalAdapter
from .eval.tasks import evaluate_task
from .measure import WORLD_CODECS, WORLD_ENCODERS, adds_modality, media_token_cost, parameter_summary, train_flops_per_sample, trainable_parameters
from .model import MultimodalLM
from .recipe import Recipe, list_recipes, load_recipe
from .report import write_markdown, write_plots
from .train import Trainer

# one recipe per fusion type (and Type-B mechanism), plus the Type-C connector variants
DEFAULT_RECIPES = ("openflamingo", "llama-adapter", "cogvlm", "llava", "llava-1.5", "blip2", "qwen-audio", "chameleon")
RECORD_FILE = "record.json"
FLOP_BATCH = 4  # samples per FLOP measurement


@dataclass
class CompareSettings:
    """What every recipe of a comparison shares. ``budget``: training samples per recipe."""

    budget: int = 8000
    seed: int = 0
    eval_limit: int = 200  # samples per evaluation task
    curve_points: int = 4  # learning-curve evaluations after 0 samples
    curve_limit: int = 100  # val samples per learning-curve point
    fewshot: int = 2  # shots of the retrieval few-shot task (0: none)
    fewshot_limit: int = 100
    ppl_lines: int = 200  # text corpus lines for perplexity
    media_items: tuple[int, ...] = (1, 2, 4, 8)

    @classmethod
    def quick(cls, seed: int = 0) -> "CompareSettings":
        """About 30 s per recipe on a 2-core CPU once the world's backbones are cached."""
        return cls(budget=640, seed=seed, eval_limit=32, curve_points=2, curve_limit=16, fewshot=0, ppl_lines=32,
                   media_items=(1, 2, 4))


@dataclass
class Job:
    recipe: str
    data: str
    out: str
    settings: CompareSettings = field(default_factory=CompareSettings)


def budget_stages(recipe: Recipe, budget: int) -> Recipe:
    """``recipe`` with each stage's steps set so the stages see ``budget`` samples in all, shared in
    the recipe's own proportions (each stage at least one step)."""
    if budget < 1:
        raise ValueError(f"budget must be >= 1 sample, got {budget}")
    planned = [s.steps * s.batch_size * s.grad_accum for s in recipe.train.stages]
    stages = [
        dataclasses.replace(s, steps=max(1, round(budget * n / sum(planned) / (s.batch_size * s.grad_accum))))
        for s, n in zip(recipe.train.stages, planned)
    ]
    return dataclasses.replace(recipe, train=dataclasses.replace(recipe.train, stages=stages))


def eval_tasks(modalities: list[str], settings: CompareSettings, generates: tuple[str, ...] = ("text",),
               retrieval: bool = True) -> list[dict[str, Any]]:
    """The tasks each recipe is scored on, for the modalities its model reads and the media it
    ``generates`` (Type-D: ``<m>_generation``); ``retrieval`` few-shot needs media the model can embed
    (an encoder, or a codec with continuous features)."""
    tasks = []
    for m in modalities:
        tasks += [
            {"task": f"{m}_qa", "split": "test", "choices": True},
            {"task": f"{m}_qa", "split": "heldout"},
            {"task": f"{m}_caption", "split": "test"},
        ]
        if m == "image":
            tasks.append({"task": "digits_qa", "split": "test"})
        if settings.fewshot and retrieval:
            tasks.append({"task": f"{m}_qa", "split": "test", "shots": settings.fewshot, "shot_selection": "retrieval",
                          "limit": settings.fewshot_limit})
    tasks += [{"task": f"{m}_generation", "split": "test"} for m in generates if m != "text"]
    return tasks


def task_key(spec: dict[str, Any]) -> str:
    """``image_qa/test``, ``image_qa/test/2shot-retrieval``."""
    key = f"{spec['task']}/{spec['split']}"
    return key + f"/{spec['shots']}shot-{spec['shot_selection']}" if spec.get("shots") else key


def run_recipe(job: Job, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Measure, train and score one recipe; returns its ``report.json`` record."""
    settings, data, out = job.settings, Path(job.data), Path(job.out)
    recipe = budget_stages(load_recipe(job.recipe), settings.budget)
    recipe = dataclasses.replace(recipe, train=dataclasses.replace(recipe.train, seed=settings.seed, output_dir=str(out / "run"),
                                                                   save_every=10**9))
    stages = recipe.train.stages
    torch.manual_seed(settings.seed)
    model = MultimodalLM.from_config(recipe.model)
    adapter = EvalAdapter(model)
    modalities = [m for m in [*recipe.model.encoders, *recipe.model.codecs] if m in MODALITIES]  # not a text_prompt encoder
    corpus = (data / "text_corpus_test.txt").read_text().splitlines()[: settings.ppl_lines]
    train_sets = {name: load_samples(resolve_dataset(data, name, "train")) for s in stages for name in s.data}
    record: dict[str, Any] = {"recipe": recipe.name, "survey_type": recipe.survey_type, "modalities": modalities}

    log("measuring the fresh model")
    probe = copy.deepcopy(model)
    flops = [train_flops_per_sample(probe, s, train_sets[s.data[0]][:FLOP_BATCH]) for s in stages]
    samples = [s.steps * s.batch_size * s.grad_accum for s in stages]
    first_item = load_samples(resolve_dataset(data, f"{modalities[0]}_qa", "test"))[0].media[modalities[0]][0]
    world = ("audio", "image") if recipe.model.codecs else ("audio", "image", "video")  # the world has no video codec
    added = next((m for m in world if m not in modalities), None)  # None: it has them all
    record.update(
        parameter_summary(model),
        params_trainable=trainable_parameters(probe, stages),
        budget={"samples": sum(samples), "requested": settings.budget,
                "stages": [{"name": s.name, "steps": s.steps, "batch_size": s.batch_size, "samples": n, "train": s.train + s.lora,
                            "data": s.data, "kinds": s.kinds} for s, n in zip(stages, samples)]},
        train_flops_per_sample=sum(f * n for f, n in zip(flops, samples)) / sum(samples),
        train_flops_by_stage={s.name: f for s, f in zip(stages, flops)},
        media_token_cost=media_token_cost(probe, stages[-1], first_item, modalities[0], settings.media_items),
        adds_modality=None if added is None else adds_modality(model, _addition(recipe, added)),
        text_ppl_before=adapter.text_perplexity(corpus),
    )
    del probe

    curve_task = f"{modalities[0]}_qa"
    curve = []
    marks = [round(sum(samples) * (i + 1) / settings.curve_points) for i in range(settings.curve_points)]

    def score_curve(m: MultimodalLM, seen: int) -> float:
        start = time.monotonic()
        result = evaluate_task(EvalAdapter(m), data, curve_task, "val", limit=settings.curve_limit)
        curve.append({"samples": seen, "accuracy": result["accuracy"]})
        log(f"{curve_task} val accuracy {result['accuracy']:.1%} after {seen} samples")
        return time.monotonic() - start

    curve_seconds = [score_curve(model, 0)]

    def on_step(m, position) -> None:
        if marks and position.samples_seen >= marks[0]:
            marks.pop(0)
            curve_seconds.append(score_curve(m, position.samples_seen))

    log(f"training {sum(samples)} samples")
    torch.manual_seed(settings.seed)
    datasets = {name: ProcessedDataset(items, model.processor) for name, items in train_sets.items()}
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    start = time.monotonic()
    Trainer(model, recipe.train, datasets, model.collator(), progress=True, on_step=on_step).train()
    train_seconds = time.monotonic() - start - sum(curve_seconds[1:])
    record.update(
        train_seconds=train_seconds,
        train_samples_per_s=sum(samples) / train_seconds,
        peak_memory_mb=_peak_memory_mb(),
        peak_memory_kind="CUDA allocated" if torch.cuda.is_available() else "process resident set (CPU)",
        curve=curve,
        curve_task=f"{curve_task}/val",
    )

    metrics = {}
    for spec in eval_tasks(modalities, settings, model.fusion.output_modalities, retrieval=all(model.can_embed(m) for m in modalities)):
        key = task_key(spec)
        log(f"scoring {key}")
        result = evaluate_task(adapter, data, spec["task"], spec["split"], limit=spec.get("limit", settings.eval_limit),
                               shots=spec.get("shots", 0), shot_selection=spec.get("shot_selection", "random"),
                               choices=spec.get("choices", False), seed=settings.seed)
        result.pop("predictions")
        metrics[key] = result
    caption = metrics.get(f"{modalities[0]}_caption/test", {})
    record.update(
        metrics=metrics,
        text_ppl_after=adapter.text_perplexity(corpus),
        generates={m: {"metric": f"{modalities[0]}_caption CIDEr-D", "value": caption.get("cider_d")} if m == "text" else
                   {"metric": f"{m}_generation {'colour and shape' if m == 'image' else 'pitch'} right (probe)",
                    "value": metrics[f"{m}_generation/test"]["accuracy"]}
                   for m in model.fusion.output_modalities},
    )
    return record


def _addition(recipe: Recipe, modality: str) -> dict[str, Any] | None:
    """The world's config entries that give ``recipe``'s model ``modality``: a codec for a Type-D
    recipe, else an encoder with a connector of the kind the recipe already uses."""
    if recipe.model.codecs:
        return {"codecs": WORLD_CODECS[modality]}
    first = recipe.model.connectors[next(m for m in recipe.model.encoders if m in MODALITIES)]
    return {"encoders": WORLD_ENCODERS[modality], "connectors": ConnectorConfig(kind=first.kind)}


def _peak_memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kilobytes on Linux


def run_comparison(
    recipes: list[str], data: str | Path, out: str | Path, settings: CompareSettings, *, log: Callable[[str], None] = print
) -> list[dict[str, Any]]:
    """Run each recipe in its own process; write ``report.json``, ``report.md`` and the plots into
    ``out``; return the records."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    unknown = [r for r in recipes if r not in list_recipes() and not Path(r).is_file()]
    if unknown:
        raise ValueError(f"unknown recipe(s) {unknown}; built-in recipes: {', '.join(list_recipes())}")
    records = []
    for i, name in enumerate(recipes):
        label = recipe_label(name)
        run_dir = out / "runs" / label
        run_dir.mkdir(parents=True, exist_ok=True)
        job_path = run_dir / "job.json"
        job_path.write_text(json.dumps(dataclasses.asdict(Job(name, str(data), str(run_dir), settings)), indent=2))
        (run_dir / RECORD_FILE).unlink(missing_ok=True)
        log(f"[{i + 1}/{len(recipes)}] {name}")
        start = time.monotonic()
        with (run_dir / "stderr.log").open("w") as stderr:
            code = subprocess.run([sys.executable, "-m", "mmfuse.compare", str(job_path)], stderr=stderr).returncode
        record_path = run_dir / RECORD_FILE
        if code == 0 and record_path.is_file():
            record = json.loads(record_path.read_text())
        else:
            tail = (run_dir / "stderr.log").read_text().strip().splitlines()[-15:]
            record = {"recipe": label, "survey_type": _survey_type(name), "error": "\n".join(tail) or f"exit code {code}"}
            log(f"{name} failed: {tail[-1] if tail else code}")
        record["wall_seconds"] = time.monotonic() - start
        records.append(record)
    report = {"settings": dataclasses.asdict(settings), "data": str(data), "recipes": records}
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    write_markdown(report, out / "report.md")
    write_plots(report, out)
    return records


def recipe_label(name: str) -> str:
    """A built-in recipe's name, or a recipe file's stem."""
    return Path(name).stem if Path(name).suffix in (".yaml", ".yml") else name


def _survey_type(name: str) -> str | None:
    try:
        return load_recipe(name).survey_type
    except ValueError:
        return None


def _main(job_path: str) -> None:
    job = json.loads(Path(job_path).read_text())
    job = Job(job["recipe"], job["data"], job["out"], CompareSettings(**{**job["settings"], "media_items": tuple(job["settings"]["media_items"])}))
    try:
        record = run_recipe(job, log=lambda text: print(f"  {recipe_label(job.recipe)}: {text}", flush=True))
    except Exception:
        traceback.print_exc()
        sys.exit(1)
    (Path(job.out) / RECORD_FILE).write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    _main(sys.argv[1])
