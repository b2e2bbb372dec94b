"""Training configs: a run is a list of stages (LLaVA's pretrain-then-finetune, and so on).

A stage names the parameter groups it trains fully (``train``) and those it adapts with LoRA
(``lora``); everything else is frozen. Group names are the keys of ``model.parameter_groups()``
(``"llm"``, ``"encoders.image"``, ``"connectors.audio"``, ``"fusion"``); an entry also matches the
groups below it, so ``"connectors"`` trains every connector.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mmfuse.config import JsonConfig

MIXED_PRECISION = ("no", "bf16", "fp16")
LR_SCHEDULES = ("cosine", "linear", "constant_with_warmup", "warmup_stable_decay")
LORA_GROUPS = ("llm", "fusion")
NONFINITE_LOSS = ("stop", "skip")


@dataclass(kw_only=True)
class StageConfig(JsonConfig):
    """One training stage.

    ``steps`` counts optimizer steps; one step sees ``batch_size * grad_accum`` samples per process.
    ``warmup_ratio``: the first ``ceil(warmup_ratio * steps)`` steps warm the learning rate up
    linearly from 0 (as in transformers' Trainer, the first of them runs at lr 0), then
    ``lr_schedule`` (a transformers scheduler) takes it: ``cosine`` down to 0, ``linear`` down to 0,
    ``constant_with_warmup``, or ``warmup_stable_decay`` (constant, then a cosine to 0 over the last
    ``ceil(decay_ratio * steps)`` steps). ``lr_scale`` maps parameter-name patterns (``fnmatch``, e.g.
    ``"fusion.*_gate"``) to a multiplier of ``lr`` for the trainable parameters they match (the first
    matching pattern wins; a pattern that matches none is an error). ``train_added_tokens`` trains only
    the embedding rows of the tokens ``llm.add_tokens`` added (OpenFlamingo's ``<|endofchunk|>``): the
    embedding is trainable with every other row's gradient zeroed, and without weight decay, so the
    other rows (and, when tied, the output layer's) stay bit-identical. ``max_grad_norm`` <= 0 turns clipping off. ``mixed_precision`` is
    accelerate's: "bf16" works on CPU and GPU, "fp16" needs a GPU.
    ``kinds``: when not empty, the stage reads only the samples of its ``data`` whose ``meta["kind"]``
    is listed (e.g. a curriculum stage on some question kinds); in-memory datasets only.
    ``retrieved`` > 0 (CM3Leon): each sample whose prompt shows a media item is preceded, as earlier
    turns, by that many of its dataset's samples nearest to it (:mod:`mmfuse.train.retrieval`);
    in-memory datasets only.
    A LoRA stage merges its adapters into the base weights when it ends.
    """

    name: str
    train: list[str] = field(default_factory=list)
    lora: list[str] = field(default_factory=list)
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    lora_target_modules: list[str] | str = "all-linear"
    data: list[str] = field(default_factory=list)
    kinds: list[str] = field(default_factory=list)
    retrieved: int = 0
    steps: int
    lr: float
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03
    lr_schedule: str = "cosine"
    decay_ratio: float = 0.1
    lr_scale: dict[str, float] = field(default_factory=dict)
    train_added_tokens: bool = False
    batch_size: int = 8
    grad_accum: int = 1
    max_grad_norm: float = 1.0
    mixed_precision: str = "no"
    gradient_checkpointing: bool = False

    def __post_init__(self):
        where = f"stage {self.name!r}"
        if not self.train and not self.lora and not self.train_added_tokens:
            raise ValueError(f"{where}: nothing to train; list parameter groups in 'train' or 'lora', or set train_added_tokens")
        unsupported = sorted(set(self.lora) - set(LORA_GROUPS))
        if unsupported:
            raise ValueError(f"{where}: LoRA is supported on {list(LORA_GROUPS)} only, got {unsupported}")
        both = sorted(set(self.train) & set(self.lora))
        if both:
            raise ValueError(f"{where}: {both} listed in both 'train' and 'lora'; pick one")
        if not self.data:
            raise ValueError(f"{where}: 'data' names no dataset")
        if self.mixed_precision not in MIXED_PRECISION:
            raise ValueError(f"{where}: mixed_precision must be one of {MIXED_PRECISION}, got {self.mixed_precision!r}")
        for key in ("steps", "batch_size", "grad_accum", "lora_r"):
            if getattr(self, key) < 1:
                raise ValueError(f"{where}: {key} must be >= 1, got {getattr(self, key)}")
        if self.retrieved < 0:
            raise ValueError(f"{where}: retrieved must be >= 0, got {self.retrieved}")
        if self.lr < 0:
            raise ValueError(f"{where}: lr must be >= 0, got {self.lr}")
        bad_scale = {k: v for k, v in self.lr_scale.items() if not isinstance(v, (int, float)) or v < 0}
        if bad_scale:
            raise ValueError(f"{where}: lr_scale values must be numbers >= 0, got {bad_scale}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"{where}: lr_schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}")
        if not 0.0 <= self.decay_ratio <= 1.0:
            raise ValueError(f"{where}: decay_ratio must be in [0, 1], got {self.decay_ratio}")
        if not 0.0 <= self.warmup_ratio <= 1.0:
            raise ValueError(f"{where}: warmup_ratio must be in [0, 1], got {self.warmup_ratio}")


@dataclass(kw_only=True)
class TrainConfig(JsonConfig):
    """A run: stages in order, the seed, and how often to log and checkpoint (in optimizer steps,
    counted over the whole run). ``nonfinite_loss``: what a step whose loss or gradient norm is NaN or
    infinite does: ``"stop"`` raises naming the step and its samples; ``"skip"`` drops that step's
    update (the optimizer, schedule and step count do not move; the data does) and counts it in
    ``metrics.jsonl`` and the run's summary. ``shuffle_buffer``: samples a streamed (sharded) dataset
    shuffles over on each process. ``num_workers``: DataLoader worker processes (per training process)
    that load, process and collate a JSON dataset's batches in parallel; the batches and their order are
    the same as with none. Streamed shards are read in the training process."""

    stages: list[StageConfig]
    seed: int = 0
    save_every: int = 50
    log_every: int = 10
    keep_checkpoints: int = 2
    nonfinite_loss: str = "stop"
    shuffle_buffer: int = 1000
    num_workers: int = 0
    output_dir: str

    def __post_init__(self):
        if not self.stages:
            raise ValueError("TrainConfig: 'stages' is empty")
        names = [s.name for s in self.stages]
        if len(set(names)) != len(names):
            raise ValueError(f"TrainConfig: stage names must be unique, got {names}")
        if self.nonfinite_loss not in NONFINITE_LOSS:
            raise ValueError(f"TrainConfig: nonfinite_loss must be one of {NONFINITE_LOSS}, got {self.nonfinite_loss!r}")
        if self.num_workers < 0:
            raise ValueError(f"TrainConfig: num_workers must be >= 0, got {self.num_workers}")
        for key in ("save_every", "log_every", "keep_checkpoints", "shuffle_buffer"):
            if getattr(self, key) < 1:
                raise ValueError(f"TrainConfig: {key} must be >= 1, got {getattr(self, key)}")
