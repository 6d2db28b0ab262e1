"""utils/retrieval/feature_store.py: shards (atomic, validated, readable errors) and the features folder."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tests.utils.retrieval.synthetic_shards import dyadic_rows, write_split
from utils.errors import SoIRError
from utils.files import claim_folder
from utils.retrieval.feature_store import FeaturesFolder, FeatureShards


def _records(n: int) -> list[dict]:
    return [
        {"key": f"g/{i}.jpg", "file": f"/data/g/{i}.jpg", "ins": [i], "bbox": None, "obj_name": None} for i in range(n)
    ]


def _write(shards: FeatureShards, shard: int, features: torch.Tensor) -> None:
    owner = torch.tensor(list(shards.image_range(shard)))
    shards.write(shard, features, owner, {"dropped_masks": 0}, torch.full((len(owner),), -1))


def test_shards_round_trip_with_mask_index_and_stats(tmp_path):
    shards = FeatureShards(tmp_path / "gallery", _records(3), shard_size=2)
    shards.prepare()
    _write(shards, 0, torch.nn.functional.normalize(torch.randn(2, 4), dim=1))
    assert shards.missing() == [1]
    _write(shards, 1, torch.nn.functional.normalize(torch.randn(1, 4), dim=1))
    features, owner, stats = shards.load()
    assert features.shape == (3, 4) and owner.tolist() == [0, 1, 2] and stats == {"dropped_masks": 0}
    assert shards.read(0)["mask_index"].tolist() == [-1, -1]
    assert [p.name for p in shards.folder.iterdir() if p.name.startswith(".")] == []  # no temporaries left


def test_non_finite_features_are_refused_naming_the_image(tmp_path):
    """Before: mi_lr=inf wrote all-NaN shards that were then searched."""
    shards = FeatureShards(tmp_path / "gallery", _records(2), shard_size=2)
    shards.prepare()
    features = torch.ones(2, 4)
    features[1, 2] = float("nan")
    with pytest.raises(SoIRError, match=r"1 non-finite feature vectors \(NaN/inf\), images \['g/1.jpg'\]"):
        _write(shards, 0, features)
    assert shards.missing() == [0]


def test_missing_and_damaged_shards_say_how_to_recover(tmp_path):
    shards = FeatureShards(tmp_path / "gallery", _records(4), shard_size=2)
    shards.prepare()
    _write(shards, 0, torch.ones(2, 4))
    with pytest.raises(
        SoIRError,
        match=r"1 of 2 shards are missing \(first: \['shard-00001.safetensors'\]\).*"
        r"rerun create_index.py with the same settings, it resumes",
    ):
        shards.load()
    _write(shards, 1, torch.ones(2, 4))
    data = shards.shard_path(1).read_bytes()
    shards.shard_path(1).write_bytes(data[: len(data) // 2])  # truncated on a full disk
    with pytest.raises(SoIRError, match=r"shard-00001.safetensors is damaged .*delete it and rerun"):
        shards.load()


def test_changed_labels_keep_the_shards_other_images_are_refused(tmp_path, caplog):
    shards = FeatureShards(tmp_path / "gallery", _records(2), shard_size=2)
    shards.prepare()
    relabelled = _records(2)
    relabelled[1]["ins"] = [7]
    with caplog.at_level("WARNING"):
        FeatureShards(tmp_path / "gallery", relabelled, shard_size=2).prepare()
    assert "labels changed" in caplog.text
    assert json.loads((tmp_path / "gallery" / "images.json").read_text())[1]["ins"] == [7]
    other = _records(2)
    other[1]["file"] = "/data/other.jpg"
    with pytest.raises(SoIRError, match="lists other images than this run"):
        FeatureShards(tmp_path / "gallery", other, shard_size=2).prepare()


def test_features_folder_never_touches_a_users_folder(tmp_path):
    """Before: features_dir=<the dataset folder> deleted the user's queries/ folder (rmtree)."""
    dataset = tmp_path / "dataset"
    (dataset / "queries").mkdir(parents=True)
    (dataset / "queries" / "q_000.jpg").write_bytes(b"a user's query image")
    (dataset / "gallery").mkdir()
    with pytest.raises(SoIRError, match="not empty and was not made by SoIR"):
        FeaturesFolder(dataset).open({"a": 1}, {"a": 1, "q": 1}, "")
    assert (dataset / "queries" / "q_000.jpg").read_bytes() == b"a user's query image"
    assert sorted(p.name for p in dataset.iterdir()) == ["gallery", "queries"]


def test_query_only_change_removes_only_soir_query_files(tmp_path, caplog):
    root = tmp_path / "feats"
    with FeaturesFolder(root).open({"g": 1}, {"g": 1, "q": 1}, "cfg"):
        (root / "queries" / "shard-00000.safetensors").write_bytes(b"old queries")
        (root / "queries" / "my_notes.txt").write_text("mine")
    with caplog.at_level("WARNING"), FeaturesFolder(root).open({"g": 1}, {"g": 1, "q": 2}, "cfg"):
        pass
    assert "recomputing the query features" in caplog.text
    assert sorted(p.name for p in (root / "queries").iterdir()) == ["identity.json", "my_notes.txt"]
    with pytest.raises(SoIRError, match=r"made with other settings or inputs \(g: 1 -> 2\)"):
        FeaturesFolder(root).open({"g": 2}, {"g": 2, "q": 2}, "cfg")


@pytest.mark.slow  # a second process: the lock between processes is the subject
def test_a_locked_folder_is_refused(tmp_path):
    root = tmp_path / "feats"
    with FeaturesFolder(root).open({"g": 1}, {"g": 1}, "cfg"):
        # The lock is per process (flock on an open file): a second open in this process is not a
        # second writer, so check from the lock's own message through a fresh file descriptor.
        import subprocess
        import sys
        import textwrap
        from pathlib import Path

        code = textwrap.dedent(f"""
            import sys; sys.path.insert(0, {str(Path(__file__).resolve().parents[3])!r})
            from utils.retrieval.feature_store import FeaturesFolder
            FeaturesFolder({str(root)!r}).open({{"g": 1}}, {{"g": 1}}, "cfg")
            """)
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        assert proc.returncode != 0 and "is being written by process" in proc.stderr
    assert claim_folder(root, "features") == root


# --- the lazy per-shard reader (row counts, owner checks, row ranges) --------------------------
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
    store.write(1, store.read_rows(1, 0, 4), torch.tensor(bad_owner), {}, torch.full((4,), -1))
    with pytest.raises(SoIRError, match="shard-00001.safetensors: owner must hold image ids 3..5 in ascending"):
        store.read_owner(1)


def test_images_may_own_no_rows(shards):
    store, _, _ = shards
    store.write(
        1, store.read_rows(1, 0, 3), torch.tensor([3, 5, 5]), {}, torch.full((3,), -1)
    )  # image 4 was unreadable
    assert store.read_owner(1).tolist() == [3, 5, 5]


def test_missing_shard_names_the_file(shards):
    store, _, _ = shards
    store.shard_path(2).unlink()
    with pytest.raises(SoIRError, match="shard-00002.safetensors is missing .*rerun create_index.py"):
        store.row_count(2)


def test_read_rows_returns_a_copy_that_does_not_keep_the_file_mapped(shards):
    """A view into the memory-mapped file would keep the mapping alive; thousands of them (pass 1 of
    utils.retrieval.streaming reads a few rows per positive image) counted ~1 GB of RSS on a 0.3 GB gallery."""
    store, _, _ = shards
    rows = store.read_rows(0, 2, 4)
    assert rows.untyped_storage().nbytes() == rows.numel() * rows.element_size()
