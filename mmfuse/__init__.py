"""mmfuse: build, train, evaluate and compare multimodal LLMs of the four survey fusion types."""

import os

# Idle OpenMP threads sleep instead of spinning: on a shared or small CPU, spinning threads slowed
# training 10x or more. Effective only when mmfuse is imported before torch (as the CLI does).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# ruff: noqa: E402

from .config import ConnectorConfig, EncoderConfig, FusionConfig, LLMConfig, MultimodalConfig
from .data.badsamples import BadSample, BadSampleLog
from .data.formats import load_samples, samples_from_hf
from .compare import CompareSettings, run_comparison
from .data.schema import Message, Sample
from .eval import EvalAdapter, evaluate_task
from .model import MultimodalLM
from .recipe import Recipe, list_recipes, load_recipe
from .train import StageConfig, TrainConfig, Trainer
from .training import run_eval, run_training

__version__ = "0.1.0"

__all__ = [
    "BadSample",
    "BadSampleLog",
    "CompareSettings",
    "ConnectorConfig",
    "EncoderConfig",
    "EvalAdapter",
    "FusionConfig",
    "LLMConfig",
    "Message",
    "MultimodalConfig",
    "MultimodalLM",
    "Recipe",
    "Sample",
    "StageConfig",
    "TrainConfig",
    "Trainer",
    "evaluate_task",
    "list_recipes",
    "load_recipe",
    "load_samples",
    "run_comparison",
    "run_eval",
    "run_training",
    "samples_from_hf",
]
