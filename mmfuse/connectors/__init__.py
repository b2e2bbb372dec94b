"""Connectors map encoder features into the LLM's width (linear / MLP / Q-Former / perceiver / mapping network /
sliding windows / pooling)."""

from .connector import Connector
from .mapper import MappingNetwork
from .perceiver import PerceiverResampler
from .projector import build_projector
from .qformer import QFormerResampler
from .windows import SlidingWindowTransformer

__all__ = ["Connector", "MappingNetwork", "PerceiverResampler", "QFormerResampler", "SlidingWindowTransformer", "build_projector"]
