"""Connectors map encoder features into the LLM's width (linear / MLP / Q-Former / perceiver / sliding windows / pooling)."""

from .connector import Connector
from .perceiver import PerceiverResampler
from .projector import build_projector
from .qformer import QFormerResampler
from .windows import SlidingWindowTransformer

__all__ = ["Connector", "PerceiverResampler", "QFormerResampler", "SlidingWindowTransformer", "build_projector"]
