"""FAISS index I/O: build from an index-factory string (inner product), save, load, check recall."""

from __future__ import annotations

import re
from pathlib import Path

import faiss
import numpy as np

from utils.errors import SoIRError
from utils.files import atomic_write


def index_path(folder: Path, factory: str) -> Path:
    """``index-<factory>.faiss`` in ``folder``: indexes of different kinds never overwrite each other."""
    return Path(folder) / f"index-{re.sub(r'[^A-Za-z0-9]+', '_', factory).strip('_')}.faiss"


def check_factory(factory: str, dim: int, rows: int | None = None) -> None:
    """Parse ``factory`` with faiss for ``dim``-d vectors, before any feature is computed; with
    ``rows`` (the expected gallery rows), also check an IVF index has no more lists than rows.

    Raises SoIRError naming the string and faiss's reason.
    """
    try:
        index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as err:
        reason = re.sub(r"^Error in .*? at \S+:\d+: (Error: )?", "", str(err).strip().splitlines()[-1])
        raise SoIRError(
            f"index={factory!r} is not a valid faiss index_factory string for {dim}-d vectors "
            f"({reason}); e.g. index=Flat, index=HNSW32, 'index=\"IVF1024,Flat\"'"
        ) from None
    try:
        nlist = faiss.extract_index_ivf(index).nlist
    except RuntimeError:  # not an IVF index
        return
    if rows is not None and rows < nlist:
        raise SoIRError(
            f"index={factory!r} has {nlist} inverted lists but the gallery will have about {rows} "
            f"rows; faiss needs at least one training row per list (and ~39 per list to train well)"
        )


def is_ivf(factory: str, dim: int) -> bool:
    """Whether ``factory`` (a valid index_factory string) makes an index with inverted lists."""
    try:
        faiss.extract_index_ivf(faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT))
    except RuntimeError:
        return False
    return True


def build_index(features: np.ndarray, factory: str = "Flat") -> faiss.Index:
    """Inner-product index over unit vectors ``features`` [N, D] float32 (trained if it needs to be)."""
    features = np.ascontiguousarray(features, dtype=np.float32)
    try:
        index = faiss.index_factory(features.shape[1], factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as err:
        raise ValueError(f"index={factory!r} is not a valid faiss index_factory string: {err}") from None
    if not index.is_trained:
        try:
            index.train(features)
        except RuntimeError as err:  # e.g. IVF with more lists than training vectors
            raise ValueError(f"index={factory!r} cannot be trained on {len(features)} gallery rows: {err}") from None
    index.add(features)
    return index


def save_index(index: faiss.Index, path: Path) -> None:
    atomic_write(path, lambda handle: handle.write(faiss.serialize_index(index).tobytes()))


def load_index(path: Path, mmap: bool = False) -> faiss.Index:
    """Read an index file. An on-disk IVF (utils.retrieval.index_build) finds its ``.ivfdata`` next to the file,
    wherever the folder was moved, and is always memory-mapped. ``mmap``: map the vectors or codes of
    other indexes too, instead of reading them into RAM."""
    path = Path(path)
    if not path.is_file():
        raise SoIRError(f"no FAISS index at {path}; run create_index.py with this index= first")
    flags = faiss.IO_FLAG_ONDISK_SAME_DIR
    if mmap and not path.with_suffix(".ivfdata").is_file():  # FAISS crashes on IO_FLAG_MMAP + on-disk lists
        flags |= faiss.IO_FLAG_MMAP | faiss.IO_FLAG_MMAP_IFC
    try:
        return faiss.read_index(str(path), flags)
    except RuntimeError as err:
        raise SoIRError(
            f"{path} is not a readable FAISS index ({str(err).strip().splitlines()[-1]}); delete it "
            "and rerun create_index.py with the same settings"
        ) from None


def is_exact(index: faiss.Index) -> bool:
    return isinstance(faiss.downcast_index(index), faiss.IndexFlat)


def neighbour_recall(index: faiss.Index, queries: np.ndarray, exact_top: np.ndarray) -> float:
    """Share of the exact top-k rows (``exact_top`` [Q, k] row ids) that ``index.search`` also returns
    in its top k: how much an approximate index loses against exhaustive search (1.0 = nothing)."""
    k = exact_top.shape[1]
    _, found = index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
    hits = [len(set(e.tolist()) & set(f.tolist())) for e, f in zip(exact_top, found)]
    return float(np.sum(hits) / exact_top.size)
