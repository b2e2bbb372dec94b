"""Connectors map encoder features into the LLM's width (linear / MLP / Q-Former / perceiver / pooling)."""

from .connector import Connector
from .perceiver import PerceiverResampler
from .projector import build_projector
from .qformer import QFormerResampler

__all__ = ["Connector", "PerceiverResampler", "QFormerResampler", "build_projector"]
