"""FAISS indexes over galleries larger than RAM, with FAISS's own recipe (``faiss.contrib.ondisk``,
``benchs/distributed_ondisk``): train once, add in blocks, merge the inverted lists on disk.

1. :func:`train_index`: train the ``index_factory`` string (an IVF) on a uniform sample of gallery rows
   drawn across all shards (``train_rows``; default :func:`default_train_rows`).
2. :func:`add_block`: one block of consecutive shards is added to a copy of the trained index and written
   to its own file: a resumable task (a block whose file exists is done), so blocks can run anywhere.
3. :func:`merge_blocks`: ``faiss.contrib.ondisk.merge_ondisk`` concatenates the blocks' inverted lists
   into one ``.ivfdata`` file next to the index, reading the blocks memory-mapped.
4. Serving: ``utils.retrieval.index_io.load_index(path, mmap=True)`` maps the lists instead of reading them;
   :func:`to_all_gpus` shards the index over the GPUs.

Features are read one shard at a time, never all at once. Ids are global gallery row ids (shards in
order, rows in shard order), the ids ``utils.retrieval.index_io.build_index`` gives, so both indexes answer alike.
:func:`propose_factory` suggests a factory string for a row count and a memory budget.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Sequence
from pathlib import Path

import faiss
import numpy as np
import torch
from faiss.contrib.ondisk import merge_ondisk

from utils.errors import SoIRError
from utils.retrieval.feature_store import FeatureShards
from utils.retrieval.index_io import load_index, save_index

log = logging.getLogger("soir.index_build")

# k-means wants 30-256 points per centroid (FAISS warns below 39 and subsamples above 256); autofaiss
# trains on 100 per centroid. PQ codebooks have 256 centroids each: 39 * 256 points avoid FAISS's warning.
TRAIN_ROWS_PER_LIST = 100
MIN_TRAIN_ROWS = 39 * 256
PQ_SIZES = (256, 128, 64, 48, 32, 24, 16, 8, 4)  # bytes per code, autofaiss's list, best first
ID_BYTES = 8  # an int64 id per vector in the inverted lists
DEFAULT_TRAIN_BYTES = 8 << 30  # RAM for the training sample


# ----------------------------------------------------------------------------------------------------
# Choosing the index
# ----------------------------------------------------------------------------------------------------
def num_lists(num_rows: int) -> int:
    """IVF list count for ``num_rows`` vectors: autofaiss's table (after FAISS's guidelines): 4 sqrt(N)
    rounded to a power of two below 10^6 rows, 2^14 below 10^7, 2^16 below 3 10^8, 2^17 above; never more
    lists than the rows can train (39 rows per list)."""
    if num_rows < 1_000_000:
        lists = 2 ** round(math.log2(4 * math.sqrt(max(num_rows, 1))))
    elif num_rows < 10_000_000:
        lists = 2**14
    elif num_rows < 300_000_000:
        lists = 2**16
    else:
        lists = 2**17
    return max(1, min(lists, 2 ** int(math.log2(max(num_rows // 39, 1)))))


def index_bytes(factory: str, num_rows: int, dim: int) -> int:
    """Bytes of an index of ``num_rows`` vectors: inverted lists (code + 8-byte id per vector) plus the
    coarse quantizer and transforms, measured on an empty instance of ``factory``."""
    empty = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    ivf = _ivf(empty, factory)
    quantizer = ivf.nlist * ivf.d * 4  # the centroids
    if hnsw := re.search(r"_HNSW(\d+)", factory):  # + 2M int32 links per centroid at level 0
        quantizer += ivf.nlist * 2 * int(hnsw.group(1)) * 4
    transform = dim * ivf.d * 4 if factory.startswith("OPQ") else 0
    return num_rows * (ivf.code_size + ID_BYTES) + quantizer + transform


def propose_factory(num_rows: int, dim: int, memory_bytes: int) -> str:
    """An IVF ``index_factory`` string for ``num_rows`` vectors of ``dim`` whose index fits ``memory_bytes``,
    following autofaiss's choices (without depending on it): uncompressed ``IVF{n},Flat`` below 10^6 rows
    when it fits, else the largest ``OPQ{m}_{y},IVF{n},PQ{m}x8`` that fits; an HNSW coarse quantizer from
    1000 lists on. Always IVF, because the on-disk recipe (add in blocks, merge) needs inverted lists.
    Raises ValueError when even 4-byte codes do not fit."""
    lists = num_lists(num_rows)
    ivf = f"IVF{lists}_HNSW32" if lists >= 1000 else f"IVF{lists}"
    flat = f"{ivf},Flat"
    if num_rows < 1_000_000 and index_bytes(flat, num_rows, dim) <= memory_bytes:
        return flat
    for m in (m for m in PQ_SIZES if m < dim):
        # OPQ output size: a multiple of m, at most ~6 m and just above dim // m * m (autofaiss's rule)
        factory = f"OPQ{m}_{(min(dim // m, 6) + 1) * m},{ivf},PQ{m}x8"
        if index_bytes(factory, num_rows, dim) <= memory_bytes:
            return factory
    raise SoIRError(
        f"no IVF-PQ index of {num_rows} vectors of {dim} dims fits in {memory_bytes / 2**30:.2f} GiB "
        f"(PQ4 needs {index_bytes(f'OPQ4_28,{ivf},PQ4x8', num_rows, dim) / 2**30:.2f} GiB); "
        "raise the memory budget"
    )


def default_train_rows(factory: str, dim: int, num_rows: int, memory_bytes: int = DEFAULT_TRAIN_BYTES) -> int:
    """``TRAIN_ROWS_PER_LIST`` per inverted list, at least ``MIN_TRAIN_ROWS``, at most all rows and at most
    ``memory_bytes`` of float32 rows (the sample is held in RAM while training). Logs a warning when the
    cap leaves fewer than 39 rows per list (FAISS's k-means minimum): train on a bigger machine then."""
    lists = _ivf(faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT), factory).nlist
    rows = min(num_rows, max(TRAIN_ROWS_PER_LIST * lists, MIN_TRAIN_ROWS), memory_bytes // (4 * dim))
    if rows < min(num_rows, 39 * lists):
        log.warning(
            "index_train_rows=%d gives %.0f rows per inverted list of %s (k-means wants >= 39): "
            "raise the training memory (%.1f GiB now)",
            rows,
            rows / lists,
            factory,
            memory_bytes / 2**30,
        )
    return rows


def _ivf(index: faiss.Index, factory: str) -> faiss.IndexIVF:
    try:
        return faiss.extract_index_ivf(index)
    except RuntimeError:
        raise SoIRError(
            f"index={factory!r} has no inverted lists; building in blocks and merging on disk "
            "needs an IVF factory (e.g. IVF4096,PQ64 or propose_factory())"
        ) from None


# ----------------------------------------------------------------------------------------------------
# Training on a uniform sample
# ----------------------------------------------------------------------------------------------------
def sample_rows(gallery: FeatureShards, offsets: np.ndarray, num: int, seed: int = 0) -> np.ndarray:
    """[num, D] float32: rows drawn uniformly without replacement from the whole gallery (global ids
    sorted, so each shard is read once, alone)."""
    ids = np.sort(np.random.default_rng(seed).choice(int(offsets[-1]), size=num, replace=False))
    shard_of = np.searchsorted(offsets, ids, side="right") - 1
    parts = []
    for shard in np.unique(shard_of):
        with gallery.mapped(int(shard)) as rows:  # copies the sampled rows only
            parts.append(rows[torch.from_numpy(ids[shard_of == shard] - offsets[shard])])
    return torch.cat(parts).numpy()


def train_index(
    gallery: FeatureShards, factory: str, offsets: np.ndarray, train_rows: int | None = None, seed: int = 0
) -> faiss.Index:
    """The trained, empty inner-product index of ``factory`` (an IVF), trained on ``train_rows`` rows
    sampled uniformly across the shards."""
    dim = gallery.read_rows(0, 0, 1).shape[1]
    try:
        index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as err:
        raise SoIRError(f"index={factory!r} is not a valid faiss index_factory string: {err}") from None
    lists = _ivf(index, factory).nlist
    num = default_train_rows(factory, dim, int(offsets[-1])) if train_rows is None else int(train_rows)
    if not lists <= num <= offsets[-1]:
        raise SoIRError(
            f"index_train_rows={num} must lie between the {lists} inverted lists of {factory!r} "
            f"and the {int(offsets[-1])} gallery rows"
        )
    log.info("training %s on %d of %d gallery rows (%.2f GiB)", factory, num, int(offsets[-1]), num * dim * 4 / 2**30)
    index.train(sample_rows(gallery, offsets, num, seed))
    return index


# ----------------------------------------------------------------------------------------------------
# Blocks and merge
# ----------------------------------------------------------------------------------------------------
def shard_blocks(num_shards: int, num_blocks: int) -> list[range]:
    """Split shards 0..num_shards-1 into ``num_blocks`` runs of consecutive shards (sizes differ by <= 1)."""
    bounds = np.linspace(0, num_shards, min(num_blocks, num_shards) + 1).round().astype(int)
    return [range(a, b) for a, b in zip(bounds[:-1], bounds[1:])]


def add_block(trained: Path, gallery: FeatureShards, shards: Sequence[int], offsets: np.ndarray, out: Path) -> Path:
    """Add the rows of ``shards`` (global row ids) to a copy of the ``trained`` index file and save it to
    ``out`` atomically. A resumable task: if ``out`` exists the block is done and is not recomputed."""
    out = Path(out)
    if out.is_file():
        return out
    index = load_index(trained)
    for shard in shards:
        with gallery.mapped(shard) as rows:  # FAISS reads the mapped file
            index.add_with_ids(rows.numpy(), np.arange(offsets[shard], offsets[shard + 1]))
    save_index(index, out)
    return out


def merge_blocks(trained: Path, blocks: Sequence[Path], out: Path) -> Path:
    """Merge the blocks' inverted lists (in block order) into ``out`` and ``out.ivfdata`` with
    ``faiss.contrib.ondisk.merge_ondisk``; blocks are memory-mapped, never all in RAM. The index file is
    written last (atomically), so an ``.ivfdata`` without it is an unfinished merge."""
    out = Path(out)
    index = load_index(trained)
    merge_ondisk(index, [str(b) for b in blocks], str(out.with_suffix(".ivfdata").resolve()))
    save_index(index, out)
    return out


def build_ondisk(
    gallery: FeatureShards,
    factory: str,
    out: Path,
    work_dir: Path,
    num_blocks: int,
    train_rows: int | None = None,
    seed: int = 0,
) -> Path:
    """Train, add ``num_blocks`` blocks and merge, in one process; each stage is skipped when its file
    exists (``work_dir``: trained.faiss, block-NNNNN.faiss). Workers can run ``add_block`` for their blocks
    instead and one process ``merge_blocks`` after them."""
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    offsets = np.asarray(gallery.row_offsets())
    trained = work_dir / "trained.faiss"
    if not trained.is_file():
        save_index(train_index(gallery, factory, offsets, train_rows, seed), trained)
    blocks = [
        add_block(trained, gallery, shards, offsets, work_dir / f"block-{b:05d}.faiss")
        for b, shards in enumerate(shard_blocks(gallery.num_shards, num_blocks))
    ]
    return merge_blocks(trained, blocks, out)


def to_all_gpus(index: faiss.Index, fp16: bool = True) -> faiss.Index:
    """Serve ``index`` sharded over all GPUs (each holds 1/n of the vectors; fp16 lookup tables when
    ``fp16``, needed for PQ codes above 48 bytes on most GPUs). Needs faiss-gpu; untested on CPU-only CI."""
    if not hasattr(faiss, "GpuMultipleClonerOptions") or faiss.get_num_gpus() == 0:
        raise RuntimeError(
            "no GPU visible to faiss (faiss-cpu, or no device): install faiss-gpu-cu12 on a "
            "GPU machine, or search on the CPU with the memory-mapped index"
        )
    options = faiss.GpuMultipleClonerOptions()
    options.shard = True
    options.useFloat16 = fp16
    return faiss.index_cpu_to_all_gpus(index, co=options)
