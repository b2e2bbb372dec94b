"""The ``mmfuse`` command line: compare, data, backbones, train, eval, generate, recipes, info."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Build, train, evaluate and compare multimodal LLMs of all four fusion types.")
data_app = typer.Typer(no_args_is_help=True, help="The built-in synthetic world and dataset tools.")
backbones_app = typer.Typer(no_args_is_help=True, help="The built-in world's small pretrained backbones.")
app.add_typer(data_app, name="data")
app.add_typer(backbones_app, name="backbones")
console = Console(stderr=True)


def _progress() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console)


@data_app.command("synth")
def data_synth(
    out: Path = typer.Option(..., help="Directory to write the world into."),
    seed: int = typer.Option(0, help="Seed; the same seed writes identical files."),
    tiny: bool = typer.Option(False, help="A few items per split (for smoke tests)."),
    sizes: Optional[Path] = typer.Option(None, help="JSON of item counts per split (WorldSizes fields, e.g. "
                                         '{"videos": {"train": 3000, "val": 50, "test": 200, "heldout": 100}}); '
                                         "fields left out keep their defaults, and every split draws its own seeded "
                                         "stream, so a split's items do not depend on another's size."),
):
    """Write the built-in synthetic world (LLaVA-style JSON + PNG/WAV/GIF files)."""
    from .data.synth.world import WorldSizes, write_world

    if tiny and sizes is not None:
        raise typer.BadParameter("give --tiny or --sizes, not both")
    chosen = WorldSizes.tiny() if tiny else WorldSizes.load(sizes) if sizes is not None else None

    start = time.time()
    with _progress() as bar:
        task = bar.add_task("writing the world", total=None)

        def report(done, total, description=""):
            bar.update(task, completed=done, total=total, description=description or "writing the world")

        write_world(out, seed=seed, sizes=chosen, progress=report)
    console.print(f"wrote {out} in {time.time() - start:.1f} s")


@data_app.command("shard")
def data_shard(
    source: Path = typer.Argument(..., help="Dataset file: LLaVA conversations, interleaved documents or caption pairs (.json/.jsonl)."),
    out: Path = typer.Option(..., help="Directory for shard-*.tar and index.json (must hold no shards yet)."),
    samples_per_shard: int = typer.Option(1000, help="At most this many samples per shard; use at least as many shards as training ranks."),
    allow_outside_root: bool = typer.Option(False, help="Accept media paths outside the dataset file's directory (refused by default)."),
    skip_bad: bool = typer.Option(False, help="Leave malformed records and samples with missing media out, and list them (default: stop at the first)."),
):
    """Convert a dataset file into webdataset tar shards that training streams."""
    from rich.markup import escape

    from .data.badsamples import BadSampleLog
    from .data.shards import write_shards

    start, log = time.time(), BadSampleLog()
    try:
        with _progress() as bar:
            task = bar.add_task(f"sharding {source.name}", total=None)
            index = write_shards(source, out, samples_per_shard=samples_per_shard, allow_outside_root=allow_outside_root,
                                 on_bad_sample="skip" if skip_bad else "error", log=log,
                                 progress=lambda done, total: bar.update(task, completed=done, total=total))
    except (ValueError, OSError) as err:  # bad input: the message names the file, sample and field
        console.print(f"[red]error:[/red] {escape(str(err))}")
        raise typer.Exit(1) from err
    sizes = sorted({s["samples"] for s in index["shards"]})
    console.print(f"wrote {index['samples']} samples in {len(index['shards'])} shard(s) of "
                  f"{'-'.join(map(str, sizes))} samples to {out} (index.json) in {time.time() - start:.1f} s")
    if len(log):
        console.print(escape(log.summary()))


@backbones_app.command("build")
def backbones_build(force: bool = typer.Option(False, help="Rebuild even when cached.")):
    """Pretrain (or find cached) the world's LLM, vision and audio encoders."""
    from .backbones.world import build_all, cache_dir

    build_all(force=force)
    console.print(f"world backbones are in {cache_dir()}")


@app.command()
def compare(
    out: Path = typer.Option(..., help="Directory for report.json, report.md, the plots and each recipe's run."),
    recipes: Optional[list[str]] = typer.Option(None, "--recipes", help="Recipe names or YAML files (repeat); default: openflamingo, llama-adapter, cogvlm and the Type-C recipes."),
    data: Optional[Path] = typer.Option(None, help="World directory; default: synthesize one into OUT/data."),
    budget: Optional[int] = typer.Option(None, help="Training samples per recipe (the same for all)."),
    seed: int = typer.Option(0),
    quick: bool = typer.Option(False, help="Small world and budget: about 3 minutes on a 2-core CPU."),
):
    """Train recipes on the same backbones, data and budget; write the survey's comparison, measured."""
    from .compare import DEFAULT_RECIPES, CompareSettings, run_comparison
    from .data.synth.world import WorldSizes, write_world

    start = time.time()
    settings = CompareSettings.quick(seed) if quick else CompareSettings(seed=seed)
    if budget is not None:
        settings.budget = budget
    if data is None:
        data = out / "data"
        if not (data / "world.json").is_file():
            console.print(f"writing the {'small ' if quick else ''}world into {data}")
            write_world(data, seed=seed, sizes=WorldSizes.small() if quick else None)
    records = run_comparison(list(recipes or DEFAULT_RECIPES), data, out, settings, log=console.print)
    typer.echo((out / "report.md").read_text())
    failed = [r["recipe"] for r in records if "error" in r]
    console.print(f"wrote {out}/report.json, report.md and plots in {time.time() - start:.0f} s" + (f"; failed: {failed}" if failed else ""))
    if failed:
        raise typer.Exit(1)


@app.command()
def recipes():
    """List the built-in recipes with their survey type."""
    from .recipe import list_recipes, load_recipe

    table = Table("recipe", "type", "description")
    for name in list_recipes():
        recipe = load_recipe(name)
        table.add_row(name, recipe.survey_type, recipe.description[:110] + ("..." if len(recipe.description) > 110 else ""))
    Console().print(table)


@app.command()
def train(
    recipe: str = typer.Argument(..., help="A built-in recipe name (see `mmfuse recipes`) or a YAML file."),
    data: Path = typer.Option(..., help="Dataset directory (`mmfuse data synth` output) or where the recipe's JSON files are."),
    out: Path = typer.Option(..., help="Run directory: checkpoints, metrics.jsonl and the final model."),
    resume: bool = typer.Option(False, help="Continue from the newest checkpoint in --out."),
    seed: Optional[int] = typer.Option(None, help="Override the recipe's seed."),
    steps_scale: float = typer.Option(1.0, help="Multiply every stage's steps (a quick run: 0.1)."),
    save_every: Optional[int] = typer.Option(None, help="Checkpoint every N optimizer steps."),
    batch_size: Optional[int] = typer.Option(None, help="Override every stage's batch size."),
    allow_outside_root: bool = typer.Option(False, help="Accept media paths outside the dataset file's directory (refused by default)."),
):
    """Train a recipe's stages on a dataset; kill it at any time and continue with --resume."""
    from .training import run_training

    start = time.time()
    run_training(recipe, data, out, resume=resume, seed=seed, steps_scale=steps_scale, save_every=save_every, batch_size=batch_size,
                 allow_outside_root=allow_outside_root)
    from accelerate import PartialState

    if PartialState().is_main_process:  # under `accelerate launch`, one line for the run
        console.print(f"trained {recipe} into {out} in {time.time() - start:.1f} s")


@app.command("eval")
def evaluate(
    run: Path = typer.Argument(..., help="A trained model directory (`mmfuse train --out`), or any HF causal LM (text-only)."),
    data: Path = typer.Option(..., help="Dataset directory."),
    split: str = typer.Option("test", help="train | val | test | heldout"),
    task: Optional[list[str]] = typer.Option(None, help="Dataset task(s) to score (image_qa, image_caption, ...); default: the recipe's eval data."),
    limit: Optional[int] = typer.Option(None, help="Score only the first N samples of each task."),
    batch_size: int = typer.Option(32),
    shots: int = typer.Option(0, help="Few-shot: solved train examples put before each question."),
    shot_selection: str = typer.Option("random", help="random | retrieval (nearest neighbours of the media)"),
    shot_format: str = typer.Option("turns", help="turns (earlier conversation turns) | document (<image>answer<|endofchunk|> per shot)"),
    choices: bool = typer.Option(False, help="QA: also rank the answers of each kind by likelihood."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the results as JSON."),
    allow_outside_root: bool = typer.Option(False, help="Accept media paths outside the dataset file's directory (refused by default)."),
):
    """Accuracy per question kind (QA tasks), CIDEr-D / BLEU-4 (caption tasks) or, for a Type-D model's
    generation tasks, the share of generated items a probe judges right, on a split."""
    from .training import run_eval

    results = run_eval(
        run, data, split, tasks=task, limit=limit, batch_size=batch_size, shots=shots, shot_selection=shot_selection,
        shot_format=shot_format, choices=choices, console=console, allow_outside_root=allow_outside_root,
    )
    out = Console()
    for name, result in results.items():
        if "by_attribute" in result:  # a generation task, judged by the world's probe
            table = Table("attribute", "right", title=f"{name} ({split}) - {result['accuracy']:.1%} of {result['count']} right, "
                                                      f"{result['complete']:.1%} complete")
            for attribute, share in result["by_attribute"].items():
                table.add_row(attribute, f"{share:.1%}")
            out.print(table)
            continue
        if "by_kind" not in result:
            out.print(f"{name} ({split}): CIDEr-D {result['cider_d']:.3f}, BLEU-4 {result['bleu4']:.3f} over {result['count']}")
            continue
        extra = f", choice accuracy {result['choice_accuracy']:.1%}" if "choice_accuracy" in result else ""
        _print_qa(out, f"{name} ({split})", result, extra)
        if "grounded" in result:  # a chain of manipulations (chain_qa)
            out.print(f"{name}: a box in {result['box_written']:.1%} of first replies, {result['grounded']:.1%} grounded (IoU >= 0.5)")
    if json_out:
        json_out.write_text(json.dumps(results, indent=2) + "\n")


def _print_qa(out: Console, title: str, result: dict, extra: str = "") -> None:
    """A QA result's table per kind and, on the world's images, per number of objects in the scene."""
    table = Table("kind", "accuracy", "count", title=f"{title} - overall {result['accuracy']:.1%} of {result['count']}{extra}")
    for kind, row in result["by_kind"].items():
        table.add_row(kind, f"{row['accuracy']:.1%}", str(row["count"]))
    out.print(table)
    if "by_objects" in result:  # the world's images: does the answer come from the object the question names?
        counts = sorted({n for row in result["by_objects"].values() for n in row}, key=int)
        table = Table("kind", *(f"{n} object{'s' * (n != '1')}" for n in counts), title=f"{title} by objects in the scene")
        for kind, row in result["by_objects"].items():
            table.add_row(kind, *(f"{row[n]['accuracy']:.1%} of {row[n]['count']}" if n in row else "-" for n in counts))
        out.print(table)


@app.command()
def probe(
    run: Path = typer.Argument(..., help="A trained model directory (`mmfuse train --out`)."),
    data: Path = typer.Option(..., help="Dataset directory."),
    task: str = typer.Option("image_qa", help="A QA task whose samples hold one media item each."),
    split: str = typer.Option("test", help="The split to score; the probe trains on the train split."),
    kind: Optional[list[str]] = typer.Option(None, help="Only these question kinds (repeat); default: all."),
    source: str = typer.Option("connector", help="connector (what the fusion receives) | encoder (what the encoder offers)"),
    steps: int = typer.Option(3000, help="Probe training steps (batch 64)."),
    limit: Optional[int] = typer.Option(None, help="Use only the first N samples of each split (after --kind)."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the result as JSON."),
    allow_outside_root: bool = typer.Option(False, help="Accept media paths outside the dataset file's directory (refused by default)."),
):
    """What the run's media features carry: a probe reads their average and the question and names the
    answer. High where the model is low means the fusion, not the features, loses the answer."""
    from .data.formats import load_samples, resolve_dataset
    from .eval.feature_probe import probe_features
    from .model import MultimodalLM

    def samples(which: str) -> list:
        read = load_samples(resolve_dataset(data, task, which), allow_outside_root=allow_outside_root)
        return [s for s in read if not kind or s.meta.get("kind") in kind][:limit]

    model = MultimodalLM.from_pretrained(run)
    result = probe_features(model, samples("train"), samples(split), source=source, steps=steps)
    out = Console()
    _print_qa(out, f"probe on the {source} features: {task} ({split})", result,
              f"; train {result['train_accuracy']:.1%}, {len(result['answers'])} answers")
    if json_out:
        json_out.write_text(json.dumps(result, indent=2) + "\n")


@app.command()
def generate(
    run: Path = typer.Argument(..., help="A trained model directory."),
    prompt: str = typer.Option(..., help="The user's message."),
    image: Optional[list[Path]] = typer.Option(None, help="Image file(s); each goes where an <image> marker is (prepended if none)."),
    audio: Optional[list[Path]] = typer.Option(None, help="Audio file(s); likewise with <audio>."),
    output: str = typer.Option("text", help="What the reply may hold, comma-separated: text, image, audio (Type-D models)."),
    out_dir: Path = typer.Option(Path("."), help="Where generated images (PNG) and sounds (WAV) are written."),
    max_new_tokens: int = typer.Option(32, help="New tokens; a generated media item needs its whole span (e.g. 38 for a 36-code image)."),
    temperature: float = typer.Option(0.0, help="0 = greedy; otherwise sample with this temperature."),
    top_p: float = typer.Option(1.0),
    guidance_scale: float = typer.Option(1.0, help="Classifier-free guidance (> 1 turns it on; the unconditional branch sees only the last prompt token)."),
    seed: int = typer.Option(0),
):
    """Answer a prompt about media, streaming the tokens as they come; a Type-D model may answer with
    images and sounds, which are written to ``out_dir``."""
    import torch
    from transformers import TextStreamer

    from .data.media import save_media
    from .data.schema import MARKERS, Message, Sample
    from .model import MultimodalLM

    model = MultimodalLM.from_pretrained(run)
    outputs = tuple(o.strip() for o in output.split(",") if o.strip())
    media = {m: list(files) for m, files in (("image", image), ("audio", audio)) if files}
    text = prompt
    for modality, files in media.items():
        missing = len(files) - text.count(MARKERS[modality])
        text = (MARKERS[modality] + "\n") * max(missing, 0) + text
    torch.manual_seed(seed)
    sample = Sample("cli", [Message("user", text)], media)
    sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 else {"do_sample": False}
    if guidance_scale != 1.0:
        sampling["guidance_scale"] = guidance_scale
    if outputs == ("text",):
        streamer = TextStreamer(model.tokenizer, skip_prompt=True, skip_special_tokens=True)
        model.answer([sample], max_new_tokens=max_new_tokens, streamer=streamer, **sampling)
        return
    batch = model.collator("left")([model.processor(sample, for_generation=True)])
    tokens = model.generate(batch["input_ids"], batch["attention_mask"], batch["media"], outputs=outputs,
                            max_new_tokens=max_new_tokens, **sampling)
    reply, items = model.decode_output(tokens)[0]
    out_dir.mkdir(parents=True, exist_ok=True)
    for i, (modality, item) in enumerate(items):
        path = out_dir / f"generated-{i}.{'wav' if modality == 'audio' else 'png'}"
        save_media(modality, item, path, sampling_rate=model.media_processors[modality].sampling_rate)
        typer.echo(f"{modality} -> {path}")
    typer.echo(reply)


@app.command()
def info(target: str = typer.Argument(..., help="A model directory or a recipe name.")):
    """Parameters per component (llm, encoders, connectors, fusion), and what each stage trains."""
    from .model import MultimodalLM
    from .recipe import load_recipe
    from .train import TrainConfig
    from .train.stage import group_parameters
    from .training import RUN_FILE

    if Path(target).is_dir():
        model = MultimodalLM.from_pretrained(target)
        run_file = Path(target) / RUN_FILE
        stages = TrainConfig.from_dict(json.loads(run_file.read_text())["train"]).stages if run_file.is_file() else []
        title = f"{target} (survey type {model.fusion.survey_type})"
    else:
        recipe = load_recipe(target)
        model = MultimodalLM.from_config(recipe.model)
        stages = recipe.train.stages
        title = f"recipe {recipe.name} (survey type {recipe.survey_type})"
    groups = model.parameter_groups()
    table = Table("component", "parameters", *[f"trains in {s.name}" for s in stages], title=title)
    selected = [{id(p) for _, p in group_parameters(model, s.train)} for s in stages]
    for group, params in [*groups.items(), ("total", [np for v in groups.values() for np in v])]:
        row = [f"{sum(p.numel() for _, p in params):,}"]
        for stage, ids in zip(stages, selected):
            count = sum(p.numel() for _, p in params if id(p) in ids)
            lora = " + LoRA" if (group in stage.lora or group == "total") and stage.lora else ""
            row.append(f"{count:,}{lora}")
        table.add_row(group, *row)
    Console().print(table)


if __name__ == "__main__":
    app()
