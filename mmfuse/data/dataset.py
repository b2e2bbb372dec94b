"""A map-style dataset that runs the processor on each sample."""

from __future__ import annotations

from collections.abc import Iterator

from torch.utils.data import Dataset

from .badsamples import Skipped
from .processor import Encoded, Processor
from .schema import Sample


class ProcessedDataset(Dataset):
    """``dataset[i] -> Encoded`` (or the :class:`Skipped` record of a sample the processor skipped)."""

    def __init__(self, samples: list[Sample], processor: Processor):
        self.samples = samples
        self.processor = processor

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Encoded | Skipped:
        return self.processor(self.samples[index])


class ProcessedStream:
    """A stream of samples (:class:`~mmfuse.data.shards.ShardStream`) run through the processor: the
    trainer's ``StreamingDataset``, yielding ``Encoded`` (or ``Skipped``) items."""

    def __init__(self, stream, processor: Processor):
        self.stream = stream
        self.processor = processor

    def samples_per_rank(self, world: int) -> int:
        return self.stream.samples_per_rank(world)

    def epoch(self, seed: int, rank: int = 0, world: int = 1, start: int = 0) -> Iterator[Encoded | Skipped]:
        return map(self.processor, self.stream.epoch(seed, rank, world, start))
