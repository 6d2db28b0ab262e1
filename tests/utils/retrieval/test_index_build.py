"""utils/retrieval/index_build.py: FAISS's on-disk recipe (sample-train, add in blocks, merge_ondisk) answers like the
in-RAM build of the same trained index."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import faiss
import numpy as np
import pytest

from tests.utils.retrieval.synthetic_shards import unit_rows, write_split
from utils.retrieval.index_build import (
    add_block,
    build_ondisk,
    default_train_rows,
    index_bytes,
    merge_blocks,
    num_lists,
    propose_factory,
    sample_rows,
    shard_blocks,
    to_all_gpus,
    train_index,
)
from utils.retrieval.index_io import build_index, index_path, load_index, save_index

DIM = 16


@pytest.fixture()
def gallery(tmp_path):
    rng = np.random.default_rng(0)
    shards, features, owner = write_split(
        tmp_path / "gallery", [[0]] * 600, 50, rng.integers(1, 4, 600), unit_rows(rng, DIM)
    )
    return shards, features.numpy()


def search(index: faiss.Index, queries: np.ndarray, k: int = 10, nprobe: int = 4):
    faiss.extract_index_ivf(index).nprobe = nprobe
    return index.search(queries, k)


@pytest.mark.slow  # trains IVF-PQ three times (~25 s)
def test_ivf_pq_from_three_blocks_and_merge_ondisk_equals_the_in_ram_build(gallery, tmp_path):
    shards, features = gallery
    factory = "IVF16,PQ8"
    offsets = np.asarray(shards.row_offsets())
    assert offsets[-1] == len(features)
    trained = tmp_path / "trained.faiss"
    save_index(train_index(shards, factory, offsets, train_rows=1000, seed=1), trained)
    blocks = [
        add_block(trained, shards, list(run), offsets, tmp_path / f"block-{b}.faiss")
        for b, run in enumerate(shard_blocks(shards.num_shards, 3))
    ]
    assert len(blocks) == 3
    out = index_path(tmp_path / "served", factory)
    out.parent.mkdir()
    merge_blocks(trained, blocks, out)

    in_ram = load_index(trained)
    in_ram.add(features)  # ids 0..R-1 in shard order, as build_index gives
    queries = unit_rows(np.random.default_rng(9), DIM)(25)
    expected_scores, expected_ids = search(in_ram, queries)
    for mmap in (False, True):
        merged = load_index(out, mmap=mmap)
        assert merged.ntotal == len(features)
        scores, ids = search(merged, queries)
        np.testing.assert_array_equal(ids, expected_ids)
        np.testing.assert_array_equal(scores, expected_scores)
    # The served folder can move: the index finds its .ivfdata next to it.
    moved = tmp_path / "moved"
    shutil.move(out.parent, moved)
    np.testing.assert_array_equal(search(load_index(moved / out.name), queries)[1], expected_ids)


def test_build_ondisk_resumes_a_missing_block_only(gallery, tmp_path):
    shards, _ = gallery
    work = tmp_path / "work"
    out = build_ondisk(shards, "IVF8,Flat", tmp_path / "index.faiss", work, num_blocks=3, train_rows=400)
    queries = unit_rows(np.random.default_rng(3), DIM)(10)
    expected = search(load_index(out), queries)
    kept = {p.name: p.stat().st_mtime_ns for p in work.glob("*.faiss")}
    (work / "block-00001.faiss").unlink()
    (work / "block-00001.faiss.tmp").write_bytes(b"half a file from a killed worker")
    out.unlink()
    build_ondisk(shards, "IVF8,Flat", tmp_path / "index.faiss", work, num_blocks=3, train_rows=400)
    for name, mtime in kept.items():
        assert ((work / name).stat().st_mtime_ns == mtime) == (name != "block-00001.faiss"), name
    got = search(load_index(out), queries)
    np.testing.assert_array_equal(got[1], expected[1])


def test_training_sample_is_uniform_across_shards_and_seeded(gallery):
    shards, features = gallery
    offsets = np.asarray(shards.row_offsets())
    sample = sample_rows(shards, offsets, 300, seed=5)
    assert sample.shape == (300, DIM)
    assert np.array_equal(sample, sample_rows(shards, offsets, 300, seed=5))
    # every sampled row is a gallery row, and every shard contributes about its share
    rows = {r.tobytes(): i for i, r in enumerate(features)}
    ids = np.array([rows[r.tobytes()] for r in sample])
    per_shard = np.bincount(np.searchsorted(offsets, ids, side="right") - 1, minlength=shards.num_shards)
    expected = 300 * np.diff(offsets) / offsets[-1]
    assert (
        len(set(ids)) == 300
        and (per_shard > 0).all()
        and np.abs(per_shard - expected).max() < 4 * np.sqrt(expected).max()
    )


def test_non_ivf_factories_and_bad_sample_sizes_are_refused(gallery):
    shards, _ = gallery
    offsets = np.asarray(shards.row_offsets())
    with pytest.raises(ValueError, match="needs an IVF factory"):
        train_index(shards, "HNSW32", offsets)
    with pytest.raises(ValueError, match="between the 16 inverted lists"):
        train_index(shards, "IVF16,Flat", offsets, train_rows=10)
    with pytest.raises(ValueError, match="not a valid faiss index_factory"):
        train_index(shards, "IVF16,Nonsense", offsets)


def test_default_train_rows_follow_the_list_count_within_the_memory_cap(caplog):
    assert default_train_rows("IVF1024,PQ8", 16, 10**7) == 102_400
    assert default_train_rows("IVF16,PQ8", 16, 10**7) == 39 * 256
    assert default_train_rows("IVF16,PQ8", 16, 5000) == 5000
    assert not caplog.records
    # 65536 lists of 768-d rows want 6.5M rows (20 GB); 1 GiB holds 349525 rows: 5 per list, with a warning.
    assert default_train_rows("IVF65536,PQ64", 768, 10**8, memory_bytes=2**30) == 2**30 // (4 * 768)
    assert "5 rows per inverted list" in caplog.text


@pytest.mark.parametrize(
    "rows, budget, expected",
    [
        (100_000, 2**30, "IVF1024_HNSW32,Flat"),  # 4 sqrt(N) lists, uncompressed fits
        (100_000, 50 * 2**20, "OPQ256_1024,IVF1024_HNSW32,PQ256x8"),  # too big uncompressed: largest PQ
        (10**7, 8 * 2**30, "OPQ256_1024,IVF65536_HNSW32,PQ256x8"),
        (10**8, 8 * 2**30, "OPQ64_448,IVF65536_HNSW32,PQ64x8"),
        (10**9, 64 * 2**30, "OPQ48_336,IVF131072_HNSW32,PQ48x8"),
        (5_000, 2**30, "IVF128,Flat"),  # capped: 39 rows per list
    ],
)
def test_propose_factory_follows_the_table_and_fits_the_budget(rows, budget, expected):
    factory = propose_factory(rows, 768, budget)
    assert factory == expected
    index = faiss.index_factory(768, factory, faiss.METRIC_INNER_PRODUCT)
    assert faiss.extract_index_ivf(index).nlist == num_lists(rows)


def test_propose_factory_refuses_an_impossible_budget():
    with pytest.raises(ValueError, match="raise the memory budget"):
        propose_factory(10**9, 768, 2**30)


def test_in_ram_build_index_uses_the_same_row_ids(gallery):
    shards, features = gallery
    index = build_index(features, "Flat")
    _, ids = index.search(features[[0, 123, len(features) - 1]], 1)
    assert ids[:, 0].tolist() == [0, 123, len(features) - 1]


def test_index_bytes_counts_codes_ids_and_quantizer():
    # 1000 rows x (64-byte PQ code + 8-byte id) + 1024 centroids x 768 floats + 2 x 32 links each
    assert index_bytes("IVF1024_HNSW32,PQ64", 1000, 768) == 1000 * 72 + 1024 * 768 * 4 + 1024 * 64 * 4
    assert index_bytes("IVF16,Flat", 10, 8) == 10 * (32 + 8) + 16 * 8 * 4


@pytest.mark.skipif(faiss.get_num_gpus() > 0, reason="checks the refusal on CPU-only FAISS")
def test_to_all_gpus_refuses_without_a_gpu():
    with pytest.raises(RuntimeError, match="no GPU visible to faiss"):
        to_all_gpus(faiss.IndexFlatIP(8))


@pytest.mark.slow  # a fresh process: its own peak RSS is the subject
def test_sampling_memory_does_not_grow_with_the_gallery(tmp_path):
    """Reading each whole 15 MB shard into a fresh buffer while keeping its few sampled rows grew RSS by
    ~one shard per shard (OOM at 10^7 rows). Shards as the benchmark writes them (512 images x 10 rows
    x 768), sampled in a fresh process."""
    rng = np.random.default_rng(0)
    write_split(tmp_path / "gallery", [[0]] * 20 * 512, 512, np.full(20 * 512, 10), unit_rows(rng, 768))
    script = f"""
import sys
import numpy as np
sys.path.insert(0, {str(Path(__file__).resolve().parents[3])!r})
from utils.retrieval.feature_store import FeatureShards
from utils.retrieval.index_build import sample_rows
shards = FeatureShards({str(tmp_path / "gallery")!r}, [{{}}] * (20 * 512), 512)
offsets = np.asarray(shards.row_offsets())
def peak_kb():   # VmHWM: this process's own peak (ru_maxrss carries the parent's peak over fork+exec)
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1])
before = peak_kb()
sample_rows(shards, offsets, 2000, seed=1)
print((peak_kb() - before) / 1024)
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    growth_mb = float(proc.stdout.strip().splitlines()[-1])
    assert growth_mb < 100, f"peak RSS grew {growth_mb:.0f} MB while sampling 2000 rows (6 MB) of a 300 MB gallery"
