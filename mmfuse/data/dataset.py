"""A map-style dataset that runs the processor on each sample."""

from __future__ import annotations

from collections.abc import Iterator

from torch.utils.data import Dataset, Subset

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


def kind_subset(dataset: Dataset, kinds: list[str], where: str) -> Subset:
    """The samples of ``dataset`` (an in-memory dataset with ``.samples``) whose ``meta["kind"]`` is in
    ``kinds``, in their order; an error naming ``where`` when it has no samples list or none match."""
    samples = getattr(dataset, "samples", None)
    if samples is None:
        raise ValueError(f"{where}: 'kinds' picks samples by meta['kind'] and needs an in-memory dataset of samples, "
                         f"got {type(dataset).__name__}")
    keep = [i for i, sample in enumerate(samples) if sample.meta.get("kind") in kinds]
    if not keep:
        found = sorted({str(sample.meta.get("kind")) for sample in samples})
        raise ValueError(f"{where}: no sample has a meta kind in {kinds}; the kinds found are {found}")
    return Subset(dataset, keep)
