"""Multi-stage training with exact resume: configs, freezing and LoRA, the trainer, checkpoints."""

from mmfuse.train.checkpoint import latest_checkpoint, list_checkpoints
from mmfuse.train.config import StageConfig, TrainConfig
from mmfuse.train.lora import add_lora, lora_parameters, merge_lora
from mmfuse.train.stage import apply_stage, group_parameters, resolve_groups
from mmfuse.train.trainer import Trainer

__all__ = [
    "StageConfig",
    "TrainConfig",
    "Trainer",
    "add_lora",
    "apply_stage",
    "group_parameters",
    "latest_checkpoint",
    "list_checkpoints",
    "lora_parameters",
    "merge_lora",
    "resolve_groups",
]
