"""datasets/gt_masks.py: the annotations' own masks (masks_from=anns) for plain anns entries, image sizes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from datasets import AnnotationError, annotation_masks, load_anns
from datasets.images import upright_size
from tests.datasets.voxdet_replica import builder_rle


def test_upright_size_applies_exif_orientation(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90: stored 100 x 80 shows 80 x 100
    Image.new("RGB", (100, 80)).save(tmp_path / "r.jpg", exif=exif)
    assert upright_size(tmp_path / "r.jpg") == (100, 80)
    Image.new("RGB", (100, 80)).save(tmp_path / "p.jpg")
    assert upright_size(tmp_path / "p.jpg") == (80, 100)


def test_plain_entries_boxes_become_rectangles_only_with_box_masks(tmp_path):
    for name in ("q.jpg", "g.jpg", "d.jpg"):
        Image.new("RGB", (40, 30)).save(tmp_path / name)
    torch.save(
        {
            "q.jpg": {"ins": 1, "is_query": True, "bbox": [2, 3, 10, 12]},
            "g.jpg": {"ins": [1], "is_query": False, "bbox": [5.5, 4, 20, 9.2]},  # rounded outward
            "d.jpg": {"ins": [], "is_query": False},
        },
        tmp_path / "anns.pt",
    )
    anns = load_anns(tmp_path / "anns.pt")
    assert annotation_masks(anns) == {}
    masks = annotation_masks(anns, box_masks=True)
    assert sorted(masks) == ["g.jpg", "q.jpg"]  # d.jpg has no box: no mask
    expected = np.zeros((30, 40), dtype=bool)
    expected[4:10, 5:20] = True
    assert np.array_equal(masks["g.jpg"].masks()[0], expected)
    assert masks["g.jpg"].bboxes == [[5.0, 4.0, 20.0, 10.0]] and masks["g.jpg"].scores == [1.0]


def test_a_mask_of_another_size_than_its_image_is_an_error_naming_it(tmp_path):
    Image.new("RGB", (64, 48)).save(tmp_path / "q.jpg")
    small = np.zeros((20, 30), dtype=bool)
    small[2:5, 3:9] = True
    torch.save(
        {"q.jpg": {"bbox": (3, 2, 8, 4), "mask": builder_rle(small), "is_query": True, "ins": 1}}, tmp_path / "anns.pt"
    )
    with pytest.raises(AnnotationError, match=r"q.jpg.*mask is \(20, 30\) \(H, W\), the image \(48, 64\)"):
        annotation_masks(load_anns(tmp_path / "anns.pt"))
