"""The multi-stage trainer, on accelerate (single process, or unchanged under ``accelerate launch``).

Per stage: freeze/unfreeze (and inject LoRA), AdamW over the trainable parameters, linear warm-up
then the stage's schedule (cosine by default), gradient accumulation and clipping, accelerate's mixed
precision. Data: the stage's datasets concatenated and shuffled per epoch by a generator seeded from (seed, stage, epoch);
epochs repeat until the stage has made ``steps`` optimizer steps. ``batch_size`` is per process:
global batch ``i`` of an epoch is ``perm[i*G:(i+1)*G]`` (``G = batch_size * processes``), cut into
one slice per process; a last incomplete global batch is dropped. A :class:`StreamingDataset`
(webdataset shards) is read as a stream instead: each process its own shards through a shuffle buffer,
the same number of batches each.

Every labelled token of a global batch weighs the same, whichever process or micro-batch holds it:
the model gets the global batch's labelled-token count (``num_items_in_batch``, all-reduced), so N
processes, or gradient accumulation, train exactly as one process with the whole batch would
(dropout aside: each process draws its own masks). Under ``accelerate launch --use_fsdp
--fsdp_version 2`` a stage trains a sharded replica (:mod:`mmfuse.train.sharding`). A step whose
loss or gradient norm is NaN or infinite stops the run or is dropped and counted (``nonfinite_loss``).

Resuming is exact: a checkpoint holds the weights every stage so far has changed, the optimizer,
scheduler and RNG states, and the data position, so a resumed run ends bit-identical to one that
never stopped (see :mod:`mmfuse.train.checkpoint`). Weights no stage has changed are not saved:
build the model the same way (same pretrained or seeded weights) before resuming.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import math
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol, runtime_checkable

import torch
from accelerate import Accelerator, PartialState
from accelerate.state import AcceleratorState
from accelerate.utils import GradientAccumulationPlugin, parse_flag_from_env, send_to_device, set_seed
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch import nn
from torch.optim.lr_scheduler import LRScheduler
from torch.utils.data import ConcatDataset, DataLoader, Dataset
from transformers import get_scheduler

from mmfuse.train.checkpoint import (
    STATE_FILE,
    WEIGHTS_FILE,
    finish_checkpoint,
    latest_checkpoint,
    list_checkpoints,
    load_json,
    load_rng,
    load_weights,
    read_optimizer,
    save_json,
    save_optimizer,
    save_rng,
    save_weights,
    start_checkpoint,
    temp_dir,
)
from mmfuse.data.badsamples import BadSampleLog
from mmfuse.data.dataset import kind_subset
from mmfuse.data.processor import IGNORE_INDEX
from mmfuse.safe_loading import require_safetensors
from mmfuse.train.config import StageConfig, TrainConfig
from mmfuse.train.lora import lora_parameters, merge_lora
from mmfuse.train.retrieval import retrieval_augmented
from mmfuse.train.sharding import (
    full_tensor,
    fsdp_requested,
    gather_parameters,
    load_optimizer_state,
    optimizer_state,
    shard_model,
)
from mmfuse.train.stage import apply_stage, group_parameters, optimizer_groups

ExportFn = Callable[[nn.Module, Path], None]


@runtime_checkable
class StreamingDataset(Protocol):
    """A dataset read as a stream (webdataset shards): the trainer asks each process for its part of
    an epoch, from an item onwards (a resumed epoch)."""

    def samples_per_rank(self, world: int) -> int:
        """Items every one of ``world`` processes can read in one epoch."""

    def epoch(self, seed: int, rank: int = 0, world: int = 1, start: int = 0) -> Iterator[Any]:
        """Process ``rank``'s items of the epoch ``seed`` orders, from its ``start``-th item on."""


@dataclass
class Position:
    """Where a run is; saved as part of ``trainer_state.json``."""

    stage_index: int = 0
    stage_step: int = 0  # optimizer steps done in this stage
    stage_done: bool = False  # the stage has ended (and its LoRA is merged)
    global_step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0  # the next micro-batch of the epoch
    samples_seen: int = 0
    nonfinite_skipped: int = 0  # steps dropped for a NaN/infinite loss or gradient norm
    bad_samples_skipped: int = 0  # samples the processor skipped (on_bad_sample: skip), all processes
    elapsed: float = 0.0


def epoch_seed(seed: int, stage_index: int, epoch: int) -> int:
    digest = hashlib.sha256(f"{seed}/{stage_index}/{epoch}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def epoch_batches(size: int, batch_size: int, num_processes: int, rank: int, seed: int) -> list[list[int]]:
    """This process's micro-batches (dataset indices) of one epoch, from the permutation ``seed`` draws."""
    order = torch.randperm(size, generator=torch.Generator().manual_seed(seed)).tolist()
    width = batch_size * num_processes
    return [order[i * width + rank * batch_size : i * width + (rank + 1) * batch_size] for i in range(size // width)]


def label_count(batch: dict[str, Any], device: torch.device) -> torch.Tensor:
    """The labelled next-token positions of a batch (``labels[:, 1:] != -100``), as the loss counts them."""
    return (batch["labels"][:, 1:] != IGNORE_INDEX).sum().to(device)


class NonFiniteLoss(FloatingPointError):
    """A step's loss or gradient norm was NaN or infinite (``nonfinite_loss: stop``)."""


def stage_accelerator(mixed_precision: str) -> Accelerator:
    """An Accelerator for one stage. accelerate fixes mixed precision once per process; stages may
    differ, so its state is reset when a stage asks for another one."""
    current = AcceleratorState._shared_state.get("_mixed_precision")
    if current is not None and current != mixed_precision:
        AcceleratorState._reset_state()
    # the trainer accumulates gradients itself (stage.grad_accum); a plugin, unlike the plain argument,
    # also overrides accelerate's own setting from `accelerate launch`
    no_accumulation = GradientAccumulationPlugin(num_steps=1)
    accelerator = Accelerator(mixed_precision=mixed_precision, gradient_accumulation_plugin=no_accumulation)
    if mixed_precision == "fp16" and accelerator.scaler is None:
        raise ValueError(f"fp16 mixed precision needs a GPU (device is {accelerator.device}); use 'bf16' or 'no'")
    return accelerator


def stage_scheduler(optimizer: torch.optim.Optimizer, stage: StageConfig) -> LRScheduler:
    """The stage's warm-up + ``lr_schedule`` learning-rate schedule (transformers' schedulers)."""
    extra = {"num_decay_steps": math.ceil(stage.decay_ratio * stage.steps)} if stage.lr_schedule == "warmup_stable_decay" else None
    return get_scheduler(stage.lr_schedule, optimizer, num_warmup_steps=math.ceil(stage.warmup_ratio * stage.steps),
                         num_training_steps=stage.steps, scheduler_specific_kwargs=extra)


class Trainer:
    """Trains ``model`` through ``config.stages``; see the module docstring.

    ``datasets`` maps the names stages list in ``data`` to datasets whose items ``collate_fn`` turns
    into the batch dict ``model(**batch, num_items_in_batch=n)`` takes; its ``.loss`` must be the
    batch's summed token loss over ``n``, the global batch's labelled tokens (as transformers' LMs do). ``export_fn(model, output_dir)`` writes the final
    model (default: ``model.save_pretrained(output_dir)``). Metrics go to ``metrics_path``
    (default ``output_dir/metrics.jsonl``), one JSON object per logged step. ``on_step(model, position)``
    runs after every optimizer step (and after that step's checkpoint, so work it does is not
    repeated on resume); it must not change the weights or draw from the RNGs. Batches may carry
    ``"skipped"``: records of samples the processor skipped; they are counted (``Position``) and added
    to ``bad_samples`` (the processor's :class:`~mmfuse.data.badsamples.BadSampleLog`).
    """

    def __init__(
        self,
        model: nn.Module,
        config: TrainConfig,
        datasets: dict[str, Dataset],
        collate_fn: Callable[[list[Any]], dict[str, Any]],
        *,
        progress: bool = True,
        metrics_path: str | Path | None = None,
        export_fn: ExportFn | None = None,
        on_step: Callable[[nn.Module, Position], None] | None = None,
        bad_samples: BadSampleLog | None = None,
    ):
        missing = sorted({name for s in config.stages for name in s.data} - set(datasets))
        if missing:
            raise ValueError(f"stages use dataset(s) {missing} that were not given; given: {sorted(datasets)}")
        if export_fn is None and not hasattr(model, "save_pretrained"):
            raise TypeError(f"{type(model).__name__} has no save_pretrained(); pass export_fn")
        self.model = model
        self.config = config
        self.datasets = datasets
        self.collate_fn = collate_fn
        self.progress = progress
        self.output_dir = Path(config.output_dir)
        self.checkpoint_dir = self.output_dir / "checkpoints"
        self.metrics_path = Path(metrics_path) if metrics_path else self.output_dir / "metrics.jsonl"
        self.export_fn = export_fn or (lambda m, path: m.save_pretrained(path))
        self.on_step = on_step
        self.bad_samples = bad_samples

    def train(self, resume: bool = False) -> None:
        """Run every stage, then export. ``resume``: continue from the newest complete checkpoint
        (starting afresh when there is none)."""
        state = _process_state()
        checkpoint = latest_checkpoint(self.checkpoint_dir) if resume else None
        if not resume and list_checkpoints(self.checkpoint_dir):
            raise FileExistsError(f"{self.checkpoint_dir} holds checkpoints; pass resume=True or use a new output_dir")
        if checkpoint is None:
            position = Position()
            set_seed(self.config.seed + state.process_index)
        else:
            require_safetensors(checkpoint, WEIGHTS_FILE)
            position = self._read_position(checkpoint)
            if position.stage_done:  # the next stage starts afresh from these weights and RNG states
                load_weights(self.model, checkpoint / WEIGHTS_FILE)
                load_rng(checkpoint, state.process_index)
                checkpoint = None
        if state.is_main_process:
            self._trim_metrics(position.global_step)
        self._clock = time.monotonic() - position.elapsed
        self.position = position  # where the run is; after train(), its end (e.g. ``nonfinite_skipped``)
        self.is_main_process = state.is_main_process
        first = position.stage_index + 1 if position.stage_done else position.stage_index
        show = self.progress and state.is_main_process and Console().is_terminal
        with _progress_bar(disable=not show) as bar:
            total = sum(s.steps for s in self.config.stages)
            task = bar.add_task("train", total=total, completed=position.global_step, loss=float("nan"))
            for index in range(first, len(self.config.stages)):
                advance = partial(bar.update, task, advance=1)
                self._run_stage(index, position, checkpoint, advance)
                checkpoint = None
        if state.is_main_process:
            self.export_fn(self.model, self.output_dir)
        state.wait_for_everyone()

    def _run_stage(self, index: int, pos: Position, checkpoint: Path | None, advance: Callable[..., None]) -> None:
        """Run stage ``index`` from ``pos``; ``checkpoint``: a mid-stage checkpoint to continue from."""
        stage = self.config.stages[index]
        accelerator = stage_accelerator(stage.mixed_precision)
        sharded = fsdp_requested()
        if sharded and stage.train_added_tokens:  # its row mask is a gradient hook on the plain model's tables
            raise ValueError(f"stage {stage.name!r}: train_added_tokens is not supported under FSDP; train "
                             "llm.embeddings (and llm.head) whole, or launch with DDP")
        groups = optimizer_groups(self.model, apply_stage(self.model, stage), stage)
        names = _names(self.model, [p for group in groups for p in group["params"]])
        self._set_gradient_checkpointing(stage.gradient_checkpointing)
        if checkpoint is not None:
            load_weights(self.model, checkpoint / WEIGHTS_FILE)
        if sharded:  # the stage trains a sharded replica; see mmfuse.train.sharding
            model = shard_model(self.model, accelerator.device, stage.mixed_precision)
            replica = dict(model.named_parameters())
            groups = [{**g, "params": [replica[n] for n in _names(self.model, g["params"])]} for g in groups]
        else:
            model = accelerator.prepare(self.model)
        params = [p for group in groups for p in group["params"]]
        optimizer = torch.optim.AdamW(groups, lr=stage.lr, weight_decay=stage.weight_decay)
        scheduler = stage_scheduler(optimizer, stage)
        if not sharded:
            optimizer = accelerator.prepare(optimizer)
        if checkpoint is not None:
            load_optimizer_state(model, optimizer, read_optimizer(checkpoint, optimizer, names), names, sharded)
            scheduler.load_state_dict(load_json(checkpoint / "scheduler.json"))
            if accelerator.scaler is not None:
                accelerator.scaler.load_state_dict(load_json(checkpoint / "scaler.json"))
            load_rng(checkpoint, accelerator.process_index)  # last: nothing above may draw from it
        else:
            pos.stage_index, pos.stage_step, pos.stage_done, pos.epoch, pos.batch_in_epoch = index, 0, False, 0, 0
        stage_run = _StageRun(model, optimizer, scheduler, names, sharded)
        batches = self._micro_batches(index, stage, accelerator, pos.epoch, pos.batch_in_epoch)
        max_norm = stage.max_grad_norm if stage.max_grad_norm > 0 else math.inf
        model.train()
        while pos.stage_step < stage.steps:
            micro_batches = [next(batches) for _ in range(stage.grad_accum)]
            pos.epoch, pos.batch_in_epoch = micro_batches[-1][:2]
            counts = torch.stack([label_count(b, accelerator.device) for *_, b in micro_batches])
            skipped = [r for *_, b in micro_batches for r in b.pop("skipped", [])]  # bad samples the processor skipped
            if self.bad_samples is not None:
                self.bad_samples.add(skipped)  # a loader worker's records reach the main process only this way
            # every labelled token of the global batch weighs the same, whatever process or micro-batch it is in
            labelled, empty, skipped = accelerator.reduce(
                torch.stack([counts.sum(), (counts == 0).sum(), counts.new_tensor(len(skipped))]), "sum").tolist()
            pos.bad_samples_skipped += skipped
            if empty:  # a micro-batch whose samples were all skipped: every process drops the step together
                self._record(accelerator, stage, pos, dropped="a micro-batch of skipped samples only")
                continue
            step_loss = torch.zeros((), device=accelerator.device)
            for micro, (*_, batch) in enumerate(micro_batches):
                last = micro == stage.grad_accum - 1
                with nullcontext() if last or sharded else accelerator.no_sync(model):
                    loss = model(**send_to_device(batch, accelerator.device), num_items_in_batch=counts.new_tensor(labelled)).loss
                    # gradients are averaged over processes; the loss is already this process's share
                    accelerator.backward(loss * accelerator.num_processes)
                step_loss += loss.detach().float()
            step_loss = accelerator.reduce(step_loss, "sum")
            if sharded:
                grad_norm = full_tensor(torch.nn.utils.clip_grad_norm_(params, max_norm))
            else:
                grad_norm = accelerator.clip_grad_norm_(params, max_norm)
            if not (math.isfinite(step_loss.item()) and math.isfinite(float(grad_norm))):
                optimizer.zero_grad(set_to_none=True)
                self._nonfinite(accelerator, stage, pos, step_loss.item(), [i for *_, b in micro_batches for i in b.get("ids", [])])
                continue
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            pos.stage_step += 1
            pos.global_step += 1
            pos.samples_seen += stage.batch_size * stage.grad_accum * accelerator.num_processes
            advance(description=stage.name, loss=step_loss.item())
            if pos.global_step % self.config.log_every == 0 or pos.stage_step == stage.steps:
                self._log(accelerator, stage, pos, loss=step_loss.item(), lr=lr, grad_norm=float(grad_norm))
            if pos.stage_step == stage.steps:
                if sharded:
                    gather_parameters(model, self.model, names)
                else:
                    self.model = accelerator.unwrap_model(model, keep_fp32_wrapper=False)  # also drops the autocast
                for group in stage.lora:
                    merge_lora(self.model.get_submodule(group))
                pos.stage_done = True
                self._save(accelerator, pos)
            elif pos.global_step % self.config.save_every == 0:
                self._save(accelerator, pos, stage_run)
            if self.on_step is not None:
                self.on_step(accelerator.unwrap_model(model), pos)

    def _nonfinite(self, accelerator: Accelerator, stage: StageConfig, pos: Position, loss: float, ids: list[str]) -> None:
        """A step with a NaN/infinite loss or gradient norm: stop, or drop its update and count it."""
        where = f"stage {stage.name!r}, step {pos.stage_step + 1} (epoch {pos.epoch}, batch {pos.batch_in_epoch})"
        shown = f"samples {ids[:16]}{' ...' if len(ids) > 16 else ''}" if ids else "samples without ids"
        if self.config.nonfinite_loss == "stop":
            raise NonFiniteLoss(f"{where}: loss {loss} is not finite on {shown}; set nonfinite_loss: skip to drop such steps")
        pos.nonfinite_skipped += 1
        self._record(accelerator, stage, pos, nonfinite=loss, ids=ids)

    def _record(self, accelerator: Accelerator, stage: StageConfig, pos: Position, **values: Any) -> None:
        """Log a step that was dropped (``metrics.jsonl``, with the run's counts so far)."""
        if accelerator.is_main_process:
            record = {"step": pos.global_step, "stage": stage.name, **values, "nonfinite_skipped": pos.nonfinite_skipped,
                      "bad_samples_skipped": pos.bad_samples_skipped}
            with self.metrics_path.open("a") as f:
                f.write(json.dumps(record) + "\n")

    def _micro_batches(
        self, index: int, stage: StageConfig, accelerator: Accelerator, epoch: int, start: int
    ) -> Iterator[tuple[int, int, Any]]:
        """Endless micro-batches from (epoch, start), each with the position right after it."""
        parts = [self.datasets[name] for name in stage.data]
        streams = [d for d in parts if isinstance(d, StreamingDataset)]
        if stage.kinds:
            if streams:
                raise ValueError(f"stage {stage.name!r}: 'kinds' picks samples from in-memory datasets; {stage.data} is streamed")
            parts = [kind_subset(d, stage.kinds, f"stage {stage.name!r}, data {name!r}") for name, d in zip(stage.data, parts)]
        if stage.retrieved:
            if streams:
                raise ValueError(f"stage {stage.name!r}: 'retrieved' searches in-memory datasets; {stage.data} is streamed")
            augmented = [retrieval_augmented(d, self.model, stage.retrieved, f"stage {stage.name!r}, data {name!r}")
                         for name, d in zip(stage.data, parts)]
            if all(a is d for a, d in zip(augmented, parts)):
                raise ValueError(f"stage {stage.name!r}: 'retrieved' found no sample in {stage.data} whose prompt shows a "
                                 "media item to retrieve by")
            parts = augmented
        if streams:
            if len(parts) > 1:
                raise ValueError(f"stage {stage.name!r}: a streamed dataset must be the stage's only data, got {stage.data}")
            yield from self._streamed_batches(index, stage, accelerator, streams[0], epoch, start)
            return
        dataset = ConcatDataset(parts)
        processes, rank = accelerator.num_processes, accelerator.process_index
        width = stage.batch_size * processes
        if len(dataset) < width:
            raise ValueError(f"stage {stage.name!r}: {len(dataset)} samples, fewer than one global batch of {width}")
        while True:
            seed = epoch_seed(self.config.seed, index, epoch)
            batches = epoch_batches(len(dataset), stage.batch_size, processes, rank, seed)[start:]
            # its own generator, so that starting a loader draws nothing from the global RNG
            loader = DataLoader(dataset, batch_sampler=batches, collate_fn=self.collate_fn, num_workers=self.config.num_workers,
                                generator=torch.Generator())
            for after, batch in enumerate(loader, start + 1):
                yield epoch, after, batch
            epoch, start = epoch + 1, 0

    def _streamed_batches(
        self, index: int, stage: StageConfig, accelerator: Accelerator, stream: StreamingDataset, epoch: int, start: int
    ) -> Iterator[tuple[int, int, Any]]:
        """Micro-batches of a streamed dataset: each epoch, every process reads its own part of the
        stream (in the order ``epoch_seed`` draws) and takes the same number of whole batches; a resumed
        epoch skips the items its batches so far consumed."""
        processes, rank = accelerator.num_processes, accelerator.process_index
        per_epoch = stream.samples_per_rank(processes) // stage.batch_size
        if per_epoch == 0:
            raise ValueError(f"stage {stage.name!r}: each of {processes} process(es) streams "
                             f"{stream.samples_per_rank(processes)} samples, fewer than a batch of {stage.batch_size}")
        while True:
            seed = epoch_seed(self.config.seed, index, epoch)
            items = stream.epoch(seed, rank, processes, start * stage.batch_size)
            for after in range(start + 1, per_epoch + 1):
                yield epoch, after, self.collate_fn(list(itertools.islice(items, stage.batch_size)))
            epoch, start = epoch + 1, 0

    def _set_gradient_checkpointing(self, on: bool) -> None:
        llm = self.model.llm
        kwargs = {"use_reentrant": False}
        if hasattr(llm, "activation_checkpointing_enable"):  # transformers renamed gradient_* to activation_*
            enable, disable = llm.activation_checkpointing_enable, llm.activation_checkpointing_disable
            enable = functools.partial(enable, activation_checkpointing_kwargs=kwargs)
        else:
            disable = llm.gradient_checkpointing_disable
            enable = functools.partial(llm.gradient_checkpointing_enable, gradient_checkpointing_kwargs=kwargs)
        if on:
            enable()
        else:
            disable()

    def _changed_parameters(self, pos: Position) -> list[tuple[str, nn.Parameter]]:
        """Parameters that differ from the model as built: groups trained by the stages so far, LLM
        weights a finished LoRA stage merged into, LoRA adapters in progress, and the vocabulary tables
        (input embedding, untied LM head) when a stage trained their added rows."""
        stages = self.config.stages
        done = stages[: pos.stage_index + 1]
        entries = [e for s in done[:-1] for e in s.train + s.lora]
        current = stages[pos.stage_index]
        entries += current.train + (current.lora if pos.stage_done else [])
        if any(s.train_added_tokens for s in done):
            entries += [g for g in ("llm.embeddings", "llm.head") if g in self.model.parameter_groups()]
        return group_parameters(self.model, entries) + lora_parameters(self.model)

    def _save(self, accelerator: Accelerator, pos: Position, run: "_StageRun | None" = None) -> None:
        """Write a checkpoint; ``run``: the stage in progress (none at a stage's end: the next stage
        starts a new optimizer)."""
        pos.elapsed = time.monotonic() - self._clock
        step = pos.global_step
        if run is not None and run.sharded:  # collectives: every process gathers
            gather_parameters(run.model, self.model, run.names)
        # a sharded state is gathered by every process (a collective); otherwise only the writer builds it
        builds = run is not None and (run.sharded or accelerator.is_main_process)
        optimizer = optimizer_state(run.model, run.optimizer, run.names, run.sharded) if builds else None
        if accelerator.is_main_process:
            start_checkpoint(self.checkpoint_dir, step)
        accelerator.wait_for_everyone()
        tmp = temp_dir(self.checkpoint_dir, step)
        save_rng(tmp, accelerator.process_index)
        if accelerator.is_main_process:
            changed = dict(self._changed_parameters(pos))  # a name may come from a group and from LoRA
            save_weights(tmp / WEIGHTS_FILE, list(changed.items()))
            if run is not None:
                save_optimizer(tmp, optimizer, run.names)
                save_json(tmp / "scheduler.json", run.scheduler.state_dict())
                if accelerator.scaler is not None:
                    save_json(tmp / "scaler.json", accelerator.scaler.state_dict())
            state = {
                "position": asdict(pos),
                "stage_name": self.config.stages[pos.stage_index].name,
                "num_processes": accelerator.num_processes,
                "fsdp": fsdp_requested(),  # whether the stage's parameters and optimizer state were sharded
                "config": self.config.to_dict(),
            }
            save_json(tmp / STATE_FILE, state)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            finish_checkpoint(self.checkpoint_dir, step, self.config.keep_checkpoints)

    def _read_position(self, checkpoint: Path) -> Position:
        state = load_json(checkpoint / STATE_FILE)
        saved = state["config"]
        if "stages" in saved:  # filled with the defaults of stage settings added since it was written
            saved = {**saved, "stages": [StageConfig.from_dict(stage).to_dict() for stage in saved["stages"]]}
        if any(saved.get(key, value) != value for key, value in self.config.to_dict().items() if key in ("stages", "seed", "shuffle_buffer")):
            raise ValueError(f"{checkpoint} was written by a run with other stages, seed or shuffle buffer; resume with that config")
        if state["num_processes"] != _process_state().num_processes:
            raise ValueError(f"{checkpoint} was written by {state['num_processes']} process(es); resume with as many")
        return Position(**state["position"])

    def _log(self, accelerator: Accelerator, stage: StageConfig, pos: Position, **values: float) -> None:
        if not accelerator.is_main_process:
            return
        record = {
            "step": pos.global_step,
            "stage": stage.name,
            **values,
            "samples_seen": pos.samples_seen,
            "bad_samples_skipped": pos.bad_samples_skipped,
            "elapsed": round(time.monotonic() - self._clock, 3),
        }
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def _trim_metrics(self, step: int) -> None:
        """Drop metrics logged after ``step`` (by a run that died before its next checkpoint)."""
        self.metrics_path.parent.mkdir(parents=True, exist_ok=True)
        lines = self.metrics_path.read_text().splitlines() if self.metrics_path.exists() else []
        kept = [line for line in lines if json.loads(line)["step"] <= step]
        self.metrics_path.write_text("".join(line + "\n" for line in kept))


@dataclass
class _StageRun:
    """What a checkpoint inside a stage needs: the (possibly sharded) model, optimizer, schedule, and
    the names of the parameters the optimizer updates, in its order."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: LRScheduler
    names: list[str]
    sharded: bool


def _process_state() -> PartialState:
    # read the CPU flag as Accelerator does, or a first PartialState() misses multi-process CPU runs
    return PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))


def _progress_bar(disable: bool) -> Progress:
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    return Progress(*columns, TextColumn("loss {task.fields[loss]:.4f}"), disable=disable)


def _names(model: nn.Module, params: list[nn.Parameter]) -> list[str]:
    name_of = {id(p): n for n, p in model.named_parameters()}
    return [name_of[id(p)] for p in params]
