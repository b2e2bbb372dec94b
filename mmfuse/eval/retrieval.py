"""Nearest-neighbour retrieval of few-shot examples by cosine similarity (faiss when available)."""

from __future__ import annotations

import random

import numpy as np
import torch
import torch.nn.functional as F

_BACKENDS = ("auto", "faiss", "torch")


def _faiss_available() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def _as_unit_rows(x, name: str) -> torch.Tensor:
    """``x`` as a 2-D float32 tensor with L2-normalised rows (zero rows stay zero)."""
    t = (x.detach() if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))).cpu().float()
    if t.ndim != 2:
        raise ValueError(f"{name} must be 2-D (count, dim), got shape {tuple(t.shape)}")
    return F.normalize(t, dim=1)


@torch.no_grad()
def embed_items(model, modality: str, items: list, batch_size: int = 32, device: torch.device | str = "cpu") -> torch.Tensor:
    """``(len(items), d)`` retrieval embeddings (``model.embed_media``) of media files or arrays, each run
    through the model's media processor; errors name the item's index."""
    process = model.media_processors[modality]
    out = []
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        inputs = torch.stack([process(item, f"item {start + i}", 0) for i, item in enumerate(chunk)]).to(device)
        out.append(model.embed_media(modality, inputs).cpu())
    return torch.cat(out)


class NearestNeighbours:
    """Cosine-similarity index over ``embeddings`` (N, D); faiss ``IndexFlatIP`` or exact torch top-k.

    ``backend`` is "faiss", "torch" or "auto" (faiss when ``import faiss`` works, else torch).
    """

    def __init__(self, embeddings, *, backend: str = "auto") -> None:
        if backend not in _BACKENDS:
            raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
        if backend == "faiss" and not _faiss_available():
            raise ImportError("backend='faiss' needs faiss: pip install 'mmfuse[retrieval]'")
        self.backend = "faiss" if backend == "faiss" or (backend == "auto" and _faiss_available()) else "torch"
        self._keys = _as_unit_rows(embeddings, "embeddings")
        if self._keys.shape[0] == 0:
            raise ValueError("embeddings is empty")
        self._faiss_index = self._build_faiss() if self.backend == "faiss" else None

    def _build_faiss(self):
        import faiss

        index = faiss.IndexFlatIP(self.dim)
        index.add(self._keys.numpy())
        return index

    @property
    def size(self) -> int:
        return self._keys.shape[0]

    @property
    def dim(self) -> int:
        return self._keys.shape[1]

    def search(self, queries, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-``k`` cosine similarities ``(Q, k)`` float32 and indices ``(Q, k)`` int64, best first."""
        q = _as_unit_rows(queries, "queries")
        if q.shape[1] != self.dim:
            raise ValueError(f"queries have dim {q.shape[1]} but the index has dim {self.dim}")
        if not 1 <= k <= self.size:
            raise ValueError(f"k must be in [1, {self.size}], got {k}")
        if self._faiss_index is not None:
            scores, indices = self._faiss_index.search(q.numpy(), k)
            return torch.from_numpy(scores), torch.from_numpy(indices).long()
        return torch.topk(q @ self._keys.T, k, dim=1)


def choose_shots(pool_size: int, k: int, *, rng: random.Random, query_embeddings=None,
                 index: NearestNeighbours | None = None) -> list[list[int]]:
    """Pool indices of ``k`` few-shot examples per query.

    Without ``index``: random shots, ``rng.sample`` without replacement, one list per row of
    ``query_embeddings`` (a single list when it is None). With ``index`` (built over the pool):
    the ``k`` pool examples most similar to each query, best first.
    """
    if not 0 <= k <= pool_size:
        raise ValueError(f"k must be in [0, {pool_size}], got {k}")
    if index is None:
        count = 1 if query_embeddings is None else len(query_embeddings)
        return [rng.sample(range(pool_size), k) for _ in range(count)]
    if query_embeddings is None:
        raise ValueError("choose_shots with an index needs query_embeddings")
    if index.size != pool_size:
        raise ValueError(f"the index holds {index.size} examples but pool_size is {pool_size}")
    if k == 0:
        return [[] for _ in range(len(query_embeddings))]
    return index.search(query_embeddings, k)[1].tolist()
