"""Connectors map encoder features into the LLM's width (Type-C's linear / MLP / Q-Former / pooling)."""

from .connector import Connector
from .projector import build_projector
from .qformer import QFormerResampler

__all__ = ["Connector", "QFormerResampler", "build_projector"]
