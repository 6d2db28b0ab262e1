"""anns.pt: parsing, path resolution, validation errors, relevance and crop_box."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from datasets.anns import (
    Annotation,
    AnnotationError,
    crop_box,
    drop_queries_without_positives,
    load_anns,
    relevance,
    split,
)


def _touch(root: Path, *names: str) -> None:
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"")


def _write(root: Path, anns: dict) -> Path:
    torch.save(anns, root / "anns.pt")
    return root / "anns.pt"


def test_load_resolves_against_anns_folder_and_sorts(tmp_path):
    _touch(tmp_path, "q/a.jpg", "g/1.jpg", "g/2.jpg", "g/3.jpg")
    path = _write(
        tmp_path,
        {
            "g/2.jpg": {"ins": [7, 9], "is_query": False},
            "q/a.jpg": {"ins": 7, "is_query": True, "bbox": [1, 2, 30, 40], "obj_name": "mug"},
            "g/3.jpg": {"ins": [], "is_query": False},
            "g/1.jpg": {"ins": 9, "is_query": False},
        },
    )
    anns = load_anns(path)
    assert [a.key for a in anns] == ["g/1.jpg", "g/2.jpg", "g/3.jpg", "q/a.jpg"]
    assert anns[3] == Annotation("q/a.jpg", tmp_path / "q/a.jpg", (7,), True, (1.0, 2.0, 30.0, 40.0), "mug")
    assert [a.ins for a in anns[:3]] == [(9,), (7, 9), ()]
    assert all(a.file.is_file() for a in anns)


def test_numpy_and_torch_ints_are_accepted(tmp_path):
    _touch(tmp_path, "q.jpg", "g.jpg")
    path = _write(
        tmp_path,
        {
            "q.jpg": {"ins": np.int64(3), "is_query": np.bool_(True), "bbox": torch.tensor([0.0, 0.0, 4.0, 5.0])},
            "g.jpg": {"ins": [torch.tensor(3), np.int32(4)], "is_query": False},
        },
    )
    g, q = load_anns(path)
    assert q.ins == (3,) and q.is_query is True and q.bbox == (0.0, 0.0, 4.0, 5.0)
    assert g.ins == (3, 4) and all(type(i) is int for i in g.ins)


def test_dirs_and_absolute_paths(tmp_path):
    queries_dir, galleries_dir, elsewhere = tmp_path / "Q", tmp_path / "G", tmp_path / "abs"
    _touch(queries_dir, "a.jpg")
    _touch(galleries_dir, "a.jpg")
    (galleries_dir / "sub").mkdir()
    _touch(elsewhere, "x.jpg")
    anns_dir = tmp_path / "meta"
    anns_dir.mkdir()
    absolute = str(elsewhere / "x.jpg")
    path = _write(
        anns_dir,
        {
            "a.jpg": {"ins": [1], "is_query": True},
            "../a.jpg": {"ins": [1], "is_query": False},
            absolute: {"ins": [], "is_query": False},
        },
    )
    files = {
        a.key: a.file
        for a in load_anns(path, galleries_dir=galleries_dir / "sub", queries_dir=queries_dir, check_files=False)
    }
    assert files == {
        "a.jpg": queries_dir / "a.jpg",
        "../a.jpg": galleries_dir / "sub" / "../a.jpg",
        absolute: Path(absolute),
    }
    load_anns(path, galleries_dir=galleries_dir / "sub", queries_dir=queries_dir)  # all exist


def test_missing_files_are_listed_with_count(tmp_path):
    _touch(tmp_path, "g/000.jpg")
    path = _write(tmp_path, {f"g/{i:03d}.jpg": {"ins": [1], "is_query": False} for i in range(13)})
    with pytest.raises(AnnotationError) as info:
        load_anns(path)
    message = str(info.value)
    assert "anns.pt" in message and "12 of 13 image files do not exist" in message
    assert "g/001.jpg" in message and "g/010.jpg" in message and "g/011.jpg" not in message  # first 10 only
    assert len(load_anns(path, check_files=False)) == 13


@pytest.mark.parametrize(
    "entry, message",
    [
        ({"is_query": True}, "missing 'ins'"),
        ({"ins": [], "is_query": True}, "exactly one instance, got ins=\\[\\]"),
        ({"ins": [1, 2], "is_query": True}, "exactly one instance"),
        ({"ins": 1}, "missing 'is_query'"),
        ({"ins": 1, "is_query": "yes"}, "'is_query' must be a bool"),
        ({"ins": 1.5, "is_query": False}, "'ins' must hold ints, got 1.5"),
        ({"ins": [1, "2"], "is_query": False}, "'ins' must hold ints"),
        ({"ins": True, "is_query": False}, "'ins' must hold ints"),
        ({"ins": 1, "is_query": True, "bbox": [1, 2, 3]}, "'bbox' must be \\[x1, y1, x2, y2\\]"),
        ({"ins": 1, "is_query": True, "bbox": [5, 0, 5, 9]}, "empty or inverted"),
        ({"ins": 1, "is_query": True, "bbox": [0, 9, 5, 3]}, "empty or inverted"),
        ({"ins": 1, "is_query": True, "bbox": [-1, 0, 5, 3]}, "negative"),
        ({"ins": 1, "is_query": True, "bbox": [0, 0, float("nan"), 3]}, "4 finite numbers"),
        ({"ins": 1, "is_query": True, "obj_name": 3}, "'obj_name' must be str"),
        ({"ins": 1, "is_query": True, "box": [0, 0, 1, 1]}, "unknown keys \\['box'\\]"),
        ([1, True], "expected a dict"),
    ],
)
def test_bad_entries_name_file_key_and_problem(tmp_path, entry, message):
    path = _write(tmp_path, {"ok.jpg": {"ins": [1], "is_query": False}, "bad.jpg": entry})
    with pytest.raises(AnnotationError, match=message) as info:
        load_anns(path, check_files=False)
    assert "anns.pt" in str(info.value) and "'bad.jpg'" in str(info.value)


def test_bad_files(tmp_path):
    with pytest.raises(AnnotationError, match="nope.pt' does not exist"):
        load_anns(tmp_path / "nope.pt")
    (tmp_path / "junk.pt").write_text("junk")
    with pytest.raises(AnnotationError, match="junk.pt' could not be loaded"):
        load_anns(tmp_path / "junk.pt")
    torch.save([1], tmp_path / "list.pt")
    with pytest.raises(AnnotationError, match="top level must be a dict"):
        load_anns(tmp_path / "list.pt")


def _ann(key: str, ins, is_query: bool) -> Annotation:
    return Annotation(key, Path(key), tuple(ins), is_query)


def test_split_relevance_and_positive_policy(caplog):
    anns = [
        _ann("q1", [1], True),
        _ann("g1", [1, 2], False),
        _ann("q2", [2], True),
        _ann("g2", [], False),
        _ann("q3", [3], True),
        _ann("g3", [2], False),
        _ann("q4", [1], True),
    ]
    queries, gallery = split(anns)
    assert [q.key for q in queries] == ["q1", "q2", "q3", "q4"] and [g.key for g in gallery] == ["g1", "g2", "g3"]
    np.testing.assert_array_equal(relevance(queries, gallery), [[1, 0, 0], [1, 0, 1], [0, 0, 0], [1, 0, 0]])
    with pytest.raises(AnnotationError, match="1 of 4 queries have no positive gallery image: q3 \\(ins 3\\)"):
        drop_queries_without_positives(queries, gallery)
    with caplog.at_level(logging.WARNING, logger="soir.datasets"):
        kept = drop_queries_without_positives(queries, gallery, policy="skip")
    assert [q.key for q in kept] == ["q1", "q2", "q4"]
    assert [r.levelname for r in caplog.records] == ["WARNING"] and "Skipping 1 of 4" in caplog.text
    assert drop_queries_without_positives(kept, gallery) == kept
    with pytest.raises(ValueError, match="policy"):
        drop_queries_without_positives(queries, gallery, policy="ignore")


def test_crop_box_rounds_outward_and_clips_subpixel_overshoot():
    image = Image.fromarray(np.arange(20 * 30, dtype=np.uint32).reshape(20, 30).astype(np.int32))
    crop = crop_box(image, [2.4, 3.6, 10.2, 8.0], "q.jpg")
    assert crop.size == (9, 5)  # x 2..11, y 3..8
    assert np.asarray(crop)[0, 0] == 3 * 30 + 2
    assert crop_box(image, (-0.7, -1.0, 30.9, 20.5), "q.jpg").size == (30, 20)
    assert crop_box(image, np.array([0, 0, 5, 5]), "q.jpg").size == (5, 5)


@pytest.mark.parametrize(
    "bbox, message",
    [
        ([0, 0, 31.5, 10], "outside the 30x20 image"),
        ([-2, 0, 10, 10], "outside"),
        ([0, 0, 10, 21.01], "outside"),
        ([30.2, 0, 30.8, 10], "empty after clipping"),
        ([5, 5, 3, 8], "empty after clipping"),
        ([0, 0, 10], "4 finite numbers"),
    ],
)
def test_crop_box_errors_name_source(bbox, message):
    with pytest.raises(AnnotationError, match=message) as info:
        crop_box(Image.new("RGB", (30, 20)), bbox, "queries/mug.jpg")
    assert "queries/mug.jpg" in str(info.value)


def test_is_query_as_0_or_1_is_a_bool_other_integers_stay_errors(tmp_path):
    _touch(tmp_path, "q.jpg", "g.jpg")
    g, q = load_anns(_write(tmp_path, {"q.jpg": {"ins": 1, "is_query": 1}, "g.jpg": {"ins": 1, "is_query": 0}}))
    assert q.is_query is True and g.is_query is False
    with pytest.raises(AnnotationError, match="'is_query' must be a bool \\(or 0 / 1\\), got 2"):
        load_anns(_write(tmp_path, {"q.jpg": {"ins": 1, "is_query": 2}}))


def test_keys_naming_one_file_are_duplicates(tmp_path):
    """./g/x.jpg, g/x.jpg and the absolute path are one image; before, they were three."""
    _touch(tmp_path, "g/x.jpg", "g/y.jpg", "q.jpg")
    same = {
        "./g/x.jpg": {"ins": 1, "is_query": False},
        "g/x.jpg": {"ins": 1, "is_query": False},
        str(tmp_path / "g/x.jpg"): {"ins": 1, "is_query": False},
        "g/y.jpg": {"ins": 2, "is_query": False},
        "q.jpg": {"ins": 1, "is_query": True},
    }
    with pytest.raises(AnnotationError, match="1 files are listed under several keys.*duplicates=merge") as info:
        load_anns(_write(tmp_path, same))
    assert f"./g/x.jpg = {tmp_path / 'g/x.jpg'} = g/x.jpg" in str(info.value)
    merged = load_anns(_write(tmp_path, same), duplicates="merge")
    assert [a.key for a in merged] == ["./g/x.jpg", "g/y.jpg", "q.jpg"]  # the first key in sorted order
    conflicting = dict(same, **{"g/x.jpg": {"ins": 5, "is_query": False}})
    with pytest.raises(AnnotationError, match="with different annotations"):
        load_anns(_write(tmp_path, conflicting), duplicates="merge")
    # A query and a gallery entry may show the same file (the query is cropped to its box).
    both = {"g/x.jpg": {"ins": 1, "is_query": False}, "./g/x.jpg": {"ins": 1, "is_query": True}}
    assert len(load_anns(_write(tmp_path, both))) == 2


def test_square_query_crop_near_a_corner_fills_beyond_the_border_with_zeros():
    """The original's query crop: side max(w, h) centred on the box, image around it, zeros outside."""
    image = Image.fromarray(np.full((50, 80, 3), 200, dtype=np.uint8))
    tight = crop_box(image, [2, 5, 30, 15], "q.jpg")  # 28 x 10 near the top-left corner
    square = crop_box(image, [2, 5, 30, 15], "q.jpg", square=True)
    assert tight.size == (28, 10) and square.size == (28, 28)
    pixels = np.asarray(square)
    # centred: 9 rows above the box (y from -4 to 23), so the top 4 rows lie outside the image
    assert (pixels[:4] == 0).all() and (pixels[4:] == 200).all()
    # the box itself sits in the middle rows of the square
    np.testing.assert_array_equal(pixels[9:19, :, 0], np.asarray(tight)[..., 0])
    inside = crop_box(image, [20, 10, 30, 40], "q.jpg", square=True)  # 10 x 30: widened to 30 x 30
    assert inside.size == (30, 30) and (np.asarray(inside) == 200).all()


def test_select_indices_by_file_or_count(tmp_path):
    from datasets.anns import select_indices

    anns = [_ann(f"g/{i}.jpg", [i], False) for i in range(6)]
    (tmp_path / "i.txt").write_text("4, 0 2")
    assert [a.key for a in select_indices(anns, tmp_path / "i.txt")] == ["g/0.jpg", "g/2.jpg", "g/4.jpg"]
    np.save(tmp_path / "i.npy", np.array([5, 1]))
    assert [a.key for a in select_indices(anns, tmp_path / "i.npy", max_index=3)] == ["g/1.jpg"]
    assert len(select_indices(anns, None, max_index=2)) == 2
    (tmp_path / "bad.txt").write_text("1 9")
    with pytest.raises(AnnotationError, match=r"bad.txt': indices \[9\] are outside \[0, 6\)"):
        select_indices(anns, tmp_path / "bad.txt")


def test_no_positive_zero_keeps_the_query(caplog):
    queries = [_ann("q1", [1], True), _ann("q2", [9], True)]
    gallery = [_ann("g1", [1], False)]
    with caplog.at_level("WARNING"):
        assert drop_queries_without_positives(queries, gallery, "zero") == queries
    assert "count as AP 0" in caplog.text
