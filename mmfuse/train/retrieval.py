"""CM3Leon's retrieval-augmented training: each sample is preceded by the samples of its own dataset
that are nearest to it, as earlier turns, so that the model learns to use retrieved documents.

The key of a sample is its first media item, when that item is in a user turn (what the prompt shows);
samples whose first media item is an answer (text-to-image) are left alone, since retrieving by the
answer would show the model near copies of what it must produce. Similarity is the cosine of the
model's retrieval embeddings (:meth:`~mmfuse.model.MultimodalLM.embed_media`: for Type-D the codec's
continuous features; CM3Leon uses a CLIP bi-encoder); a neighbour never shares the sample's first
media item (a question about the same picture would give the answer away).
"""

from __future__ import annotations

import torch
from torch.utils.data import Dataset, Subset

from ..data.dataset import ProcessedDataset
from ..data.schema import MARKER_RE, MARKERS, Sample, with_earlier
from ..eval.retrieval import NearestNeighbours, embed_items
from ..modes import training_mode

CANDIDATES = 32  # neighbours searched per sample before those sharing its media item are dropped


def prompt_key(sample: Sample) -> str | None:
    """The modality of the sample's first media marker when that marker is in a user turn; else None."""
    for message in sample.messages:
        found = MARKER_RE.search(message.content)
        if found:
            return next(m for m, marker in MARKERS.items() if marker == found.group()) if message.role == "user" else None
    return None


def _samples(dataset: Dataset, where: str) -> tuple[list[Sample], object]:
    """The samples of an in-memory dataset (or a subset of one) and its processor."""
    if isinstance(dataset, Subset):
        samples, processor = _samples(dataset.dataset, where)
        return [samples[i] for i in dataset.indices], processor
    if not isinstance(dataset, ProcessedDataset):
        raise ValueError(f"{where}: 'retrieved' needs an in-memory dataset of samples, got {type(dataset).__name__}")
    return dataset.samples, dataset.processor


def _identity(item) -> object:
    return str(item) if isinstance(item, (str, bytes)) or hasattr(item, "__fspath__") else id(item)


def retrieval_augmented(dataset: Dataset, model, k: int, where: str, batch_size: int = 64) -> Dataset:
    """``dataset`` with each keyed sample preceded by its ``k`` nearest keyed samples (nearest last, next
    to the sample), the rest unchanged; ``dataset`` itself when no sample is keyed (text-to-image
    data); ValueError when fewer than ``k`` neighbours qualify."""
    samples, processor = _samples(dataset, where)
    keys = {i: key for i, key in enumerate(map(prompt_key, samples)) if key is not None}
    if not keys:
        return dataset
    keyed, modalities = list(keys), set(keys.values())
    if len(modalities) > 1:
        raise ValueError(f"{where}: 'retrieved' compares one modality, but the prompts show {sorted(modalities)}")
    modality = modalities.pop()
    items = [samples[i].media[modality][0] for i in keyed]
    identities = [_identity(item) for item in items]
    first: dict[object, int] = {}  # each distinct media item -> its first position, embedded once
    for position, key in enumerate(identities):
        first.setdefault(key, position)
    device = next(model.parameters()).device
    with training_mode(model, False):
        vectors = embed_items(model, modality, [items[n] for n in first.values()], batch_size, device)
    row = {key: n for n, key in enumerate(first)}
    embeddings = vectors[torch.tensor([row[key] for key in identities])]
    index = NearestNeighbours(embeddings)
    _, candidates = index.search(embeddings, min(len(keyed), k + CANDIDATES))
    augmented = list(samples)
    for position, (i, found) in enumerate(zip(keyed, candidates.tolist())):
        shots = [keyed[j] for j in found if identities[j] != identities[position]][:k]
        if len(shots) < k:
            raise ValueError(f"{where}: sample {samples[i].id!r} has {len(shots)} neighbours with other media, fewer than "
                             f"retrieved={k}")
        augmented[i] = with_earlier(samples[i], [samples[j] for j in reversed(shots)], f"{samples[i].id}+{k}retrieved")
    return ProcessedDataset(augmented, processor)
