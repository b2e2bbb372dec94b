"""Evaluation: metrics, the model-agnostic adapter, tasks on the world, few-shot retrieval."""

from .adapter import EvalAdapter
from .tasks import evaluate_task

__all__ = ["EvalAdapter", "evaluate_task"]
