"""Nearest-neighbour retrieval of few-shot examples: known neighbours, backend agreement, errors."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from mmfuse.eval import retrieval
from mmfuse.eval.retrieval import NearestNeighbours, choose_shots

BACKENDS = [
    "torch",
    pytest.param("faiss", marks=pytest.mark.skipif(not retrieval._faiss_available(), reason="faiss not installed")),
]


def _clusters(points_per_direction: int = 3, directions: int = 4, dim: int = 8, seed: int = 0):
    """Keys along distinct axes with small noise and very different norms, plus one query per axis."""
    gen = torch.Generator().manual_seed(seed)
    axes = torch.eye(dim)[:directions]
    keys = axes.repeat_interleave(points_per_direction, dim=0)
    keys = keys + 0.01 * torch.randn(keys.shape, generator=gen)
    keys = keys * torch.logspace(-1, 2, len(keys))[:, None]  # cosine similarity must ignore the norm
    queries = axes + 0.01 * torch.randn(axes.shape, generator=gen)
    return keys, queries


@pytest.mark.parametrize("backend", BACKENDS)
def test_search_finds_the_known_neighbours(backend):
    keys, queries = _clusters()
    index = NearestNeighbours(keys, backend=backend)
    scores, indices = index.search(queries, 3)
    assert scores.shape == indices.shape == (4, 3)
    assert indices.dtype == torch.int64
    for axis, row in enumerate(indices.tolist()):
        assert sorted(row) == [3 * axis, 3 * axis + 1, 3 * axis + 2]
    assert (scores > 0.99).all()
    assert (scores[:, :-1] >= scores[:, 1:]).all()  # best first


@pytest.mark.skipif(not retrieval._faiss_available(), reason="faiss not installed")
def test_faiss_and_torch_agree_on_random_data():
    rng = np.random.default_rng(0)
    keys, queries = rng.normal(size=(200, 16)), rng.normal(size=(20, 16))  # numpy float64 input
    by_faiss = NearestNeighbours(keys, backend="faiss").search(queries, 5)
    by_torch = NearestNeighbours(torch.from_numpy(keys), backend="torch").search(torch.from_numpy(queries), 5)
    assert torch.equal(by_faiss[1], by_torch[1])
    torch.testing.assert_close(by_faiss[0], by_torch[0], atol=1e-5, rtol=1e-5)


def test_auto_backend_follows_faiss_availability(monkeypatch):
    expected = "faiss" if retrieval._faiss_available() else "torch"
    assert NearestNeighbours(torch.eye(3)).backend == expected
    monkeypatch.setattr(retrieval, "_faiss_available", lambda: False)
    assert NearestNeighbours(torch.eye(3)).backend == "torch"
    with pytest.raises(ImportError):
        NearestNeighbours(torch.eye(3), backend="faiss")


@pytest.mark.parametrize("backend", BACKENDS)
def test_search_rejects_bad_inputs(backend):
    index = NearestNeighbours(torch.eye(4), backend=backend)
    with pytest.raises(ValueError):
        index.search(torch.ones(2, 4), 5)  # k > N
    with pytest.raises(ValueError):
        index.search(torch.ones(2, 4), 0)
    with pytest.raises(ValueError):
        index.search(torch.ones(2, 3), 1)  # dim mismatch
    with pytest.raises(ValueError):
        index.search(torch.ones(4), 1)  # not 2-D


def test_index_rejects_bad_inputs():
    with pytest.raises(ValueError):
        NearestNeighbours(torch.eye(3), backend="annoy")
    with pytest.raises(ValueError):
        NearestNeighbours(torch.ones(3))
    with pytest.raises(ValueError):
        NearestNeighbours(torch.ones(0, 3))


def test_choose_shots_random_is_seeded_and_without_replacement():
    shots = choose_shots(10, 4, rng=random.Random(0), query_embeddings=torch.ones(3, 2))
    again = random.Random(0)
    assert shots == [again.sample(range(10), 4) for _ in range(3)]
    assert all(len(set(row)) == 4 and all(0 <= i < 10 for i in row) for row in shots)
    assert len(choose_shots(10, 4, rng=random.Random(0))) == 1


def test_choose_shots_with_an_index_takes_the_nearest():
    keys, queries = _clusters()
    index = NearestNeighbours(keys, backend="torch")
    shots = choose_shots(len(keys), 3, rng=random.Random(0), query_embeddings=queries, index=index)
    assert shots == index.search(queries, 3)[1].tolist()
    assert [sorted(row) for row in shots] == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 10, 11]]
    assert choose_shots(len(keys), 0, rng=random.Random(0), query_embeddings=queries, index=index) == [[]] * 4


def test_choose_shots_rejects_bad_inputs():
    index = NearestNeighbours(torch.eye(4), backend="torch")
    with pytest.raises(ValueError):
        choose_shots(4, 5, rng=random.Random(0))
    with pytest.raises(ValueError):
        choose_shots(4, 2, rng=random.Random(0), index=index)  # no queries
    with pytest.raises(ValueError):
        choose_shots(5, 2, rng=random.Random(0), query_embeddings=torch.eye(4), index=index)  # pool size mismatch
