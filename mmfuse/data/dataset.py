"""A map-style dataset that runs the processor on each sample."""

from __future__ import annotations

from torch.utils.data import Dataset

from .processor import Encoded, Processor
from .schema import Sample


class ProcessedDataset(Dataset):
    """``dataset[i] -> Encoded`` (or ``None`` for a sample the processor skipped and counted)."""

    def __init__(self, samples: list[Sample], processor: Processor):
        self.samples = samples
        self.processor = processor

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Encoded | None:
        return self.processor(self.samples[index])
