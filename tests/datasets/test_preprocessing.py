"""datasets/preprocessing.py: the whole image resized to the model's input, masks aligned with it."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode

from datasets.preprocessing import Preprocess, to_binary_masks


@pytest.fixture()
def preprocess() -> Preprocess:
    return Preprocess(size=(8, 12), mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), resample=InterpolationMode.BILINEAR)


def test_image_is_resized_whole_and_normalised(preprocess):
    image = Image.fromarray(np.full((40, 30, 3), 255, dtype=np.uint8))  # portrait, 30 x 40
    pixels = preprocess.image(image)
    assert pixels.shape == (3, 8, 12)  # aspect ratio not kept
    torch.testing.assert_close(pixels, torch.full((3, 8, 12), (1 - 0.5) / 0.25))
    assert preprocess.resize(image).size == (12, 8)
    with pytest.raises(ValueError, match="expected an RGB image, got mode L"):
        preprocess.image(image.convert("L"))


def test_masks_resize_with_the_image_and_stay_binary(preprocess):
    masks = np.zeros((2, 40, 60), dtype=np.uint8)
    masks[0, :, :30] = 255  # left half, 0/255
    resized = preprocess.masks(masks)
    assert resized.shape == (2, 8, 12) and set(resized.unique().tolist()) <= {0.0, 1.0}
    assert resized[0, :, :6].all() and not resized[0, :, 6:].any()  # still the left half
    assert not resized[1].any()


@pytest.mark.parametrize(
    "masks,expected",
    [
        (np.array([[[True, False]]]), [[[True, False]]]),
        (np.array([[[1, 0]]], dtype=np.uint8), [[[True, False]]]),
        (np.array([[[255, 0]]], dtype=np.uint8), [[[True, False]]]),
        (torch.tensor([[[0.0, 1.0]]]), [[[False, True]]]),
    ],
)
def test_mask_value_conventions(masks, expected):
    assert to_binary_masks(masks).tolist() == expected


def test_other_mask_values_and_shapes_are_errors():
    with pytest.raises(ValueError, match="bool, 0/1 or 0/255; found values \\[0, 7\\]"):
        to_binary_masks(np.array([[[0, 7]]], dtype=np.uint8))
    with pytest.raises(ValueError, match="\\[P, H, W\\]"):
        to_binary_masks(np.zeros((4, 4)))


def test_a_read_only_mask_array_is_read_without_a_warning():
    """Masks that numpy marks read-only (np.broadcast_to, a memory map, a decoded RLE buffer) give the same
    bool tensor, without torch's "non-writable tensor" UserWarning, and the caller's array stays as it was."""
    masks = np.broadcast_to(np.array([[[0, 255], [255, 0]]], dtype=np.uint8), (3, 2, 2))
    assert not masks.flags.writeable
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = to_binary_masks(masks)
    assert out.dtype == torch.bool and out.tolist() == [[[False, True], [True, False]]] * 3
