"""mmfuse: build, train, evaluate and compare multimodal LLMs of the four survey fusion types."""

from .config import ConnectorConfig, EncoderConfig, FusionConfig, LLMConfig, MultimodalConfig
from .data.formats import load_samples
from .data.schema import Message, Sample
from .model import MultimodalLM
from .recipe import Recipe, list_recipes, load_recipe
from .train import StageConfig, TrainConfig, Trainer
from .training import run_eval, run_training

__version__ = "0.1.0"

__all__ = [
    "ConnectorConfig",
    "EncoderConfig",
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
    "list_recipes",
    "load_recipe",
    "load_samples",
    "run_eval",
    "run_training",
]
