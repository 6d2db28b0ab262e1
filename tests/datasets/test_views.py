"""datasets/views.py: what each descriptor mode turns an image and its masks into (no model)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode

from datasets.preprocessing import Preprocess
from datasets.views import NO_MASK, ViewMaker, padded_box, zero_outside

PRE = Preprocess(size=(16, 16), mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), resample=InterpolationMode.BILINEAR)


@pytest.fixture()
def scene():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 96, 3), dtype=np.uint8))
    masks = np.zeros((3, 64, 96), dtype=bool)
    masks[0, 8:30, 10:50] = True  # big
    masks[1, 40, 70] = True  # one pixel: vanishes at 16 x 16
    masks[2, 40:60, 60:90] = True
    return image, masks


def test_global_view_ignores_masks(scene):
    views = ViewMaker(PRE, "global")(*scene)
    assert len(views.views) == 1 and views.views[0].masks is None and views.views[0].mask_index is None


def test_per_mask_drops_and_counts_masks_that_vanish(scene):
    views = ViewMaker(PRE, "per_mask")(*scene)
    assert views.dropped_masks == 1 and views.views[0].mask_index.tolist() == [0, 2]
    kept = ViewMaker(PRE, "per_mask", keep_empty=True)(*scene)  # compat: missing_masks=full_mask
    assert kept.dropped_masks == 0 and kept.views[0].mask_index.tolist() == [0, 1, 2]
    assert kept.views[0].masks[1].sum() == 0


def test_union_is_one_mask_of_no_single_source(scene):
    views = ViewMaker(PRE, "union")(*scene)
    assert views.views[0].masks.shape == (1, 16, 16) and views.views[0].mask_index.tolist() == [NO_MASK]


def test_smart_crop_geometry(scene):
    image, masks = scene
    assert padded_box(torch.from_numpy(masks[0]), 0.1) == (6, 4, 54, 34)  # 40 x 22 box, 4 px margin
    assert padded_box(torch.from_numpy(masks[0]), 0.1, pad_pixels=5) == (5, 3, 55, 35)
    views = ViewMaker(PRE, "smart_crop", 0.1)(image, masks)
    assert [v.mask_index.tolist() for v in views.views] == [[0], [1], [2]]  # a crop keeps small masks
    torch.testing.assert_close(views.views[0].pixel_values, PRE.image(image.crop((6, 4, 54, 34))))


def test_unknown_mode_and_mismatched_masks_are_errors(scene):
    with pytest.raises(ValueError, match="unknown view mode"):
        ViewMaker(PRE, "tiles")
    with pytest.raises(ValueError, match="do not match the image"):
        ViewMaker(PRE, "per_mask")(scene[0], scene[1][:, :10])


def test_zero_outside_keeps_only_the_masked_pixels(scene):
    image, masks = scene
    zeroed = np.asarray(zero_outside(image, masks[[0, 2]]))
    keep = masks[0] | masks[2]
    assert (zeroed[~keep] == 0).all() and (zeroed[keep] == np.asarray(image)[keep]).all()
