"""utils/feature_store.py: the lazy per-shard reader (row counts, owner checks, row ranges)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.utils.synthetic_shards import dyadic_rows, write_split


@pytest.fixture()
def shards(tmp_path):
    rng = np.random.default_rng(0)
    return write_split(tmp_path / "gallery", [[0]] * 7, 3, np.array([1, 2, 3, 1, 1, 2, 4]), dyadic_rows(rng, 4))


def test_lazy_reads_give_the_rows_of_load(shards):
    store, features, owner = shards
    assert store.num_images == 7 and store.num_shards == 3
    assert [store.row_count(s) for s in range(3)] == [6, 4, 4]
    assert store.row_offsets() == [0, 6, 10, 14]
    assert torch.equal(store.read_rows(1, 1, 3), features[7:9])
    assert torch.equal(store.read_owner(2), owner[10:])
    loaded, loaded_owner, _ = store.load()
    assert torch.equal(loaded, features) and torch.equal(loaded_owner, owner)


@pytest.mark.parametrize("bad_owner", [[3, 5, 4, 5], [2, 3, 4, 5], [3, 4, 5, 6]])
def test_owner_out_of_order_or_outside_the_shard_is_refused(shards, bad_owner):
    store, _, _ = shards
    store.write(1, store.read_rows(1, 0, 4), torch.tensor(bad_owner), {})
    with pytest.raises(ValueError, match="shard-00001.safetensors: owner must hold image ids 3..5 in ascending"):
        store.read_owner(1)


def test_images_may_own_no_rows(shards):
    store, _, _ = shards
    store.write(1, store.read_rows(1, 0, 3), torch.tensor([3, 5, 5]), {})     # image 4 was unreadable
    assert store.read_owner(1).tolist() == [3, 5, 5]


def test_missing_shard_names_the_file(shards):
    store, _, _ = shards
    store.shard_path(2).unlink()
    with pytest.raises(FileNotFoundError, match="shard-00002.safetensors is missing .*rerun create_index.py"):
        store.row_count(2)


def test_read_rows_returns_a_copy_that_does_not_keep_the_file_mapped(shards):
    """A view into the memory-mapped file would keep the mapping alive; thousands of them (pass 1 of
    utils.streaming reads a few rows per positive image) counted ~1 GB of RSS on a 0.3 GB gallery."""
    store, _, _ = shards
    rows = store.read_rows(0, 2, 4)
    assert rows.untyped_storage().nbytes() == rows.numel() * rows.element_size()
