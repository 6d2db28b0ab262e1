"""scripts/convert_captions.py: the original code's segmentation_results.pt -> SoIR's captions.pt."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from datasets import encode_mask_row_major, load_captions
from scripts import convert_captions


def test_converts_row_major_masks_turns_exif_and_leaves_failed_images_out(tmp_path, capsys):
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 60 x 40, shown 40 x 60
    Image.new("RGB", (60, 40)).save(tmp_path / "phone.jpg", exif=exif)
    Image.new("RGB", (30, 20)).save(tmp_path / "plain.png")
    stored = np.zeros((40, 60), dtype=bool)
    stored[5:15, 10:30] = True
    small = np.zeros((20, 30), dtype=bool)
    small[2:4, 3:9] = True
    original = {
        "phone.jpg": {
            "image_path": "phone.jpg",
            "image_size": [60, 40],
            "num_objects": 1,
            "masks_rle": [encode_mask_row_major(stored)],
            "bboxes": [[10, 5, 30, 15]],
            "scores": [0.9],
        },
        "plain.png": {
            "image_path": "plain.png",
            "image_size": [30, 20],
            "num_objects": 1,
            "masks_rle": [encode_mask_row_major(small)],
            "bboxes": [[3, 2, 9, 4]],
            "scores": [0.8, 0.1],
        },
        "gone.jpg": {"error": "cannot identify image file"},
    }
    torch.save(original, tmp_path / "segmentation_results.pt")
    out = tmp_path / "clean" / "captions.pt"
    assert convert_captions.main([str(tmp_path / "segmentation_results.pt"), "--out", str(out)]) == 0
    captions = load_captions(out)
    assert set(captions) == {"phone.jpg", "plain.png"}
    assert all(isinstance(r["counts"], str) for m in captions.values() for r in m.masks_rle)
    np.testing.assert_array_equal(captions["phone.jpg"].masks()[0], np.rot90(stored, k=-1))
    assert captions["phone.jpg"].bboxes == [[25.0, 10.0, 35.0, 30.0]]
    np.testing.assert_array_equal(captions["plain.png"].masks()[0], small)
    assert captions["plain.png"].scores == []  # pre-NMS scores dropped
    assert "gone.jpg" in capsys.readouterr().out
    assert convert_captions.main([str(tmp_path / "segmentation_results.pt"), "--out", str(out)]) == 1
    assert "already exists; SoIR does not replace files it did not write" in capsys.readouterr().err
