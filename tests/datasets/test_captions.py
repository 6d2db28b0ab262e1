"""captions.pt: RLE round trips (also through torch weights_only) and validation errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from datasets.captions import (
    CaptionsError,
    ImageMasks,
    decode_mask,
    encode_mask,
    encode_mask_row_major,
    find_masks,
    load_captions,
    rle_runs,
    save_captions,
)
from datasets.fields import bbox_from_mask


def _random_masks(height=13, width=7, count=3, seed=0) -> np.ndarray:
    masks = np.random.default_rng(seed).random((count, height, width)) > 0.6
    masks[0] = False  # empty mask
    return masks


def _entry(masks: np.ndarray, counts_as_bytes=False) -> dict:
    rles = [encode_mask(m) for m in masks]
    if counts_as_bytes:
        rles = [{"counts": r["counts"].encode(), "size": r["size"]} for r in rles]
    return {"masks_rle": rles, "bboxes": [[0.0, 0.0, 1.0, 1.0]] * len(masks), "scores": [0.5] * len(masks)}


def test_encode_decode_round_trip_non_square():
    for mask in _random_masks():
        rle = encode_mask(mask.astype(np.uint8))  # 0/1 input accepted too
        assert isinstance(rle["counts"], str)
        assert rle["size"] == [13, 7] and all(type(s) is int for s in rle["size"])
        decoded = decode_mask(rle)
        assert decoded.dtype == bool and decoded.shape == (13, 7)
        np.testing.assert_array_equal(decoded, mask)


def test_decode_accepts_bytes_counts():
    mask = _random_masks()[1]
    rle = encode_mask(mask)
    np.testing.assert_array_equal(decode_mask({"counts": rle["counts"].encode(), "size": rle["size"]}), mask)


def test_list_counts_are_row_major_runs_as_the_original_code_writes_them():
    """The original's mask script: runs of mask.flatten() (C order), starting with a 0-run."""
    assert decode_mask({"counts": [1, 3], "size": [2, 2]}).tolist() == [[False, True], [True, True]]
    assert decode_mask({"counts": [0, 2, 2], "size": [2, 2]}).tolist() == [[True, True], [False, False]]
    # The rectangle x 30-70, y 10-20 of a 100 x 80 (H x W) image, written the original's way.
    mask = np.zeros((100, 80), dtype=bool)
    mask[10:20, 30:70] = True
    flat = mask.flatten()
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    counts = np.diff(np.concatenate(([0], change, [flat.size]))).tolist()  # starts with a 0-run
    np.testing.assert_array_equal(decode_mask({"counts": counts, "size": [100, 80]}), mask)
    for shape in [(13, 7), (7, 13), (1, 9), (50, 31)]:
        for m in np.random.default_rng(1).random((4, *shape)) > 0.5:
            rle = encode_mask_row_major(m)
            assert rle["size"] == list(shape) and sum(rle["counts"]) == m.size
            np.testing.assert_array_equal(decode_mask(rle), m)


def test_rle_runs_parses_compressed_strings_exactly_like_pycocotools():
    from pycocotools import mask as mask_utils

    rng = np.random.default_rng(2)
    for shape in [(13, 7), (300, 200), (1, 1)]:
        for density in (0.0, 0.01, 0.5, 1.0):
            mask = rng.random(shape) < density
            rle = encode_mask(mask)
            runs = rle_runs(rle["counts"])
            assert runs.sum() == mask.size
            assert runs[1::2].sum() == mask_utils.area({"counts": rle["counts"].encode(), "size": rle["size"]})
            column_major = np.repeat(np.arange(len(runs)) % 2 == 1, runs)
            np.testing.assert_array_equal(column_major.reshape(shape[1], shape[0]).T, mask)


@pytest.mark.parametrize(
    "damage, message",
    [
        (
            lambda r: {"counts": r["counts"][: len(r["counts"]) // 2], "size": r["size"]},
            "not a valid compressed|sum to",
        ),
        (
            lambda r: {"counts": r["counts"], "size": [r["size"][0] + 3, r["size"][1]]},
            "sum to 2500, expected H\\*W = 2650",
        ),
        (lambda r: {"counts": r["counts"] + "~", "size": r["size"]}, "not a valid compressed RLE"),
    ],
)
def test_broken_compressed_rle_is_refused_at_load_naming_file_image_and_mask(tmp_path, damage, message):
    """Before: pycocotools decoded such masks from leftover memory (garbage, not reproducible)."""
    masks = np.random.default_rng(3).random((2, 50, 50)) > 0.7
    entry = _entry(masks)
    entry["masks_rle"][1] = damage(entry["masks_rle"][1])
    torch.save({"gallery/x.jpg": entry}, tmp_path / "caps.pt")
    with pytest.raises(CaptionsError, match=message) as info:
        load_captions(tmp_path / "caps.pt")
    assert "caps.pt" in str(info.value) and "'gallery/x.jpg', mask 1" in str(info.value)


def test_original_segmentation_results_file_loads_as_it_is(tmp_path, caplog):
    """The original mask script's output: extra keys, {"error": ...} entries, pre-NMS scores."""
    mask = np.zeros((40, 60), dtype=bool)
    mask[5:15, 10:30] = True
    original = {
        "a.jpg": {
            "image_path": "/data/a.jpg",
            "image_size": [60, 40],
            "num_objects": 1,
            "masks_rle": [encode_mask_row_major(mask)],
            "bboxes": [[10, 5, 30, 15]],
            "scores": [0.9, 0.4, 0.3],
        },
        "b.jpg": {"error": "cannot identify image file"},
        "c.jpg": {
            "image_path": "/data/c.jpg",
            "image_size": [60, 40],
            "num_objects": 1,
            "masks_rle": [encode_mask_row_major(mask)],
            "bboxes": [[-3, 5, 64, 15]],
            "scores": [0.8],
        },
    }
    torch.save(original, tmp_path / "segmentation_results.pt")
    with caplog.at_level("WARNING"):
        captions = load_captions(tmp_path / "segmentation_results.pt")
    np.testing.assert_array_equal(captions["a.jpg"].masks()[0], mask)
    assert captions["a.jpg"].scores == [] and captions["c.jpg"].scores == [0.8]
    assert captions["b.jpg"].error == "cannot identify image file" and len(captions["b.jpg"]) == 0
    assert captions["c.jpg"].bboxes == [[0.0, 5.0, 60.0, 15.0]]
    assert "2 entries; 1 failed images" in caplog.text and "1 score lists dropped" in caplog.text
    assert "1 boxes clipped" in caplog.text


def test_exif_orientation_turns_masks_like_the_image():
    from PIL import Image, ImageOps

    mask = np.zeros((4, 6), dtype=bool)
    mask[0, :3] = True
    for orientation in range(1, 9):
        image = Image.fromarray(mask.astype(np.uint8) * 255)
        exif = image.getexif()
        exif[0x0112] = orientation
        image.info["exif"] = exif.tobytes()
        turned = np.asarray(ImageOps.exif_transpose(image)) > 0
        masks = ImageMasks([encode_mask(mask)], [[0, 0, 3, 1]], [1.0], exif_orientation=orientation)
        np.testing.assert_array_equal(masks.masks()[0], turned)


def test_encode_rejects_non_2d():
    with pytest.raises(ValueError, match="shape"):
        encode_mask(np.zeros((2, 3, 4), bool))


def test_bbox_from_mask_is_pixel_edge_box():
    mask = np.zeros((10, 8), bool)
    mask[2:5, 3:6] = True
    assert bbox_from_mask(mask) == [3.0, 2.0, 6.0, 5.0]
    with pytest.raises(ValueError, match="empty"):
        bbox_from_mask(np.zeros((2, 2), bool))


@pytest.mark.parametrize("as_bytes", [False, True])
def test_raw_torch_file_with_str_or_bytes_counts_loads(tmp_path, as_bytes):
    masks = _random_masks()
    torch.save({"img.jpg": _entry(masks, as_bytes)}, tmp_path / "captions.pt")
    loaded = load_captions(tmp_path / "captions.pt")
    assert list(loaded) == ["img.jpg"] and len(loaded["img.jpg"]) == 3
    np.testing.assert_array_equal(loaded["img.jpg"].masks(), masks)


def test_save_load_round_trip_is_plain_and_atomic(tmp_path):
    masks = _random_masks()
    path = tmp_path / "out" / "captions.pt"
    save_captions(
        {
            "a.jpg": _entry(masks, counts_as_bytes=True),
            "b.jpg": ImageMasks(),  # zero detections are valid
            "c.jpg": ImageMasks([encode_mask(masks[1])], [bbox_from_mask(masks[1])], [np.float32(0.25)]),
        },
        path,
    )
    assert sorted(p.name for p in path.parent.iterdir()) == ["captions.pt"]  # no temp file left
    raw = torch.load(path, weights_only=True)
    assert isinstance(raw["a.jpg"]["masks_rle"][0]["counts"], str)  # bytes stored as str
    assert raw["c.jpg"]["scores"] == [0.25] and type(raw["c.jpg"]["scores"][0]) is float
    loaded = load_captions(path)
    np.testing.assert_array_equal(loaded["a.jpg"].masks(), masks)
    assert len(loaded["b.jpg"]) == 0 and loaded["b.jpg"].masks().shape == (0, 0, 0)
    assert loaded["b.jpg"].size is None and loaded["c.jpg"].size == (13, 7)
    assert loaded["c.jpg"].bboxes == [bbox_from_mask(masks[1])]


def test_failed_save_keeps_previous_file(tmp_path):
    path = tmp_path / "captions.pt"
    save_captions({"a.jpg": ImageMasks()}, path)
    before = path.read_bytes()
    with pytest.raises(CaptionsError, match="'bad.jpg'"):
        save_captions({"bad.jpg": {"masks_rle": [], "bboxes": [[0, 0, 1, 1]], "scores": []}}, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["captions.pt"]


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda e: e["scores"].pop(), "lengths differ: 3 masks_rle, 3 bboxes, 2 scores"),
        (lambda e: e["masks_rle"].__setitem__(2, encode_mask(np.ones((5, 5)))), "different sizes"),
        (lambda e: e["bboxes"].__setitem__(1, [4.0, 0.0, 2.0, 1.0]), "bbox 1: need x1 <= x2"),
        (lambda e: e["bboxes"].__setitem__(0, [0.0, 1.0]), "bbox 0: expected \\[x1, y1, x2, y2\\]"),
        (lambda e: e["masks_rle"][1].update(counts=123), "mask 1: 'counts' must be str, bytes"),
        (lambda e: e["masks_rle"][0].update(counts=[1, 2]), "sum to 3, expected H\\*W = 91"),
        (lambda e: e["scores"].__setitem__(0, "high"), "score 0: expected a number"),
        (lambda e: e.pop("bboxes"), "missing \\['bboxes'\\]"),
        (lambda e: e.update(labels=[]), "unexpected \\['labels'\\]"),
    ],
)
def test_invalid_entries_name_file_and_key(tmp_path, mutate, message):
    entry = _entry(_random_masks())
    mutate(entry)
    torch.save({"good.jpg": _entry(_random_masks()), "gallery/x.jpg": entry}, tmp_path / "caps.pt")
    with pytest.raises(CaptionsError, match=message) as info:
        load_captions(tmp_path / "caps.pt")
    assert "caps.pt" in str(info.value) and "'gallery/x.jpg'" in str(info.value)


def test_bad_files(tmp_path):
    with pytest.raises(CaptionsError, match="missing.pt' does not exist"):
        load_captions(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_text("not a torch file")
    with pytest.raises(CaptionsError, match="junk.pt' could not be loaded"):
        load_captions(tmp_path / "junk.pt")
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(CaptionsError, match="top level must be a dict"):
        load_captions(tmp_path / "list.pt")
    torch.save({3: {}}, tmp_path / "intkey.pt")
    with pytest.raises(CaptionsError, match="keys must be str"):
        load_captions(tmp_path / "intkey.pt")


def test_find_masks_by_key_then_by_resolved_path(tmp_path):
    image = tmp_path / "g" / "a.jpg"
    by_key, by_path = (
        ImageMasks(scores=[]),
        ImageMasks(masks_rle=[encode_mask(np.ones((2, 2)))], bboxes=[[0, 0, 2, 2]], scores=[1.0]),
    )
    captions = {"g/a.jpg": by_key, str(image.resolve()): by_path}
    assert find_masks(captions, "g/a.jpg", image) is by_key
    assert find_masks(captions, "other/key.jpg", tmp_path / "g" / ".." / "g" / "a.jpg") is by_path
    assert find_masks(captions, "nope.jpg", tmp_path / "nope.jpg") is None


def test_upright_turns_boxes_exactly_like_masks():
    mask = np.zeros((5, 9), dtype=bool)
    mask[1:3, 2:7] = True
    box = bbox_from_mask(mask)
    for orientation in range(1, 9):
        turned = ImageMasks([encode_mask(mask)], [box], [0.5], exif_orientation=orientation).upright()
        assert turned.exif_orientation == 1 and turned.scores == [0.5]
        assert turned.bboxes == [bbox_from_mask(turned.masks()[0])]
