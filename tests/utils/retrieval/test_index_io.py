"""utils/retrieval/index_io.py: index files by factory, checks before any feature, atomic saves, neighbour recall."""

from __future__ import annotations

import numpy as np
import pytest

from utils.errors import SoIRError
from utils.retrieval.index_io import (
    build_index,
    check_factory,
    index_path,
    is_exact,
    load_index,
    neighbour_recall,
    save_index,
)


def _unit(n: int, d: int, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_index_path_keeps_kinds_apart(tmp_path):
    assert index_path(tmp_path, "Flat").name == "index-Flat.faiss"
    assert index_path(tmp_path, "IVF16,PQ8").name == "index-IVF16_PQ8.faiss"
    assert index_path(tmp_path, "HNSW32") != index_path(tmp_path, "HNSW64")


@pytest.mark.parametrize(
    "factory,message",
    [
        ("Flatt", "could not parse index string Flatt"),
        ("PQ7", "multiple of the number of subquantizers"),
        ("IVF64,Flat", "has 64 inverted lists but the gallery will have about 10 rows"),
    ],
)
def test_bad_factories_are_refused_before_any_feature(factory, message):
    with pytest.raises(SoIRError, match=message):
        check_factory(factory, 32, rows=10)
    check_factory("IVF4,Flat", 32, rows=10)
    check_factory("HNSW32", 32)


def test_exact_index_returns_the_exact_neighbours_after_a_round_trip(tmp_path):
    gallery, queries = _unit(50, 16), _unit(5, 16, seed=1)
    index = build_index(gallery, "Flat")
    path = index_path(tmp_path, "Flat")
    save_index(index, path)
    loaded = load_index(path)
    assert is_exact(loaded) and loaded.ntotal == 50
    scores, ids = loaded.search(queries, 3)
    expected = np.argsort(-(queries @ gallery.T), axis=1)[:, :3]
    np.testing.assert_array_equal(ids, expected)
    assert neighbour_recall(loaded, queries, expected) == 1.0
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary left


def test_approximate_index_recall_is_measured_and_damaged_files_are_explained(tmp_path):
    gallery, queries = _unit(400, 16), _unit(20, 16, seed=2)
    index = build_index(gallery, "IVF8,Flat")
    index.nprobe = 1
    exact = np.argsort(-(queries @ gallery.T), axis=1)[:, :10]
    recall = neighbour_recall(index, queries, exact)
    assert 0 < recall < 1
    path = tmp_path / "index-bad.faiss"
    path.write_bytes(b"not an index")
    with pytest.raises(SoIRError, match="is not a readable FAISS index"):
        load_index(path)
    with pytest.raises(SoIRError, match="no FAISS index at"):
        load_index(tmp_path / "missing.faiss")
