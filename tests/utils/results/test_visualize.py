"""Colormap, mask outlines and map overlays (Pillow only)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from utils.results.visualize import OUTLINE_COLOR, colormap, dilate, draw_outline, mask_outline, overlay, resize_mask


def test_colormap_runs_from_dark_to_light_and_clips():
    rgb = colormap(np.array([[-1.0, 0.0, 0.5, 1.0, 2.0]]))
    assert rgb.dtype == np.uint8 and rgb.shape == (1, 5, 3)
    assert rgb[0, 0].tolist() == rgb[0, 1].tolist() == [0, 0, 4]
    assert rgb[0, 3].tolist() == rgb[0, 4].tolist() == [252, 255, 164]
    brightness = colormap(np.linspace(0, 1, 50)[None]).astype(int).sum(-1)[0]
    assert (np.diff(brightness) >= 0).all()


def test_outline_is_a_ring_just_outside_the_mask():
    mask = np.zeros((20, 30), dtype=bool)
    mask[5:10, 8:20] = True
    ring = mask_outline(mask, width=2)
    assert not (ring & mask).any()
    grown = np.zeros_like(mask)
    grown[3:12, 6:22] = True  # the mask grown by 2 px in every direction (square filter)
    assert (ring == (grown & ~mask)).all()
    assert not mask_outline(np.zeros((20, 30), dtype=bool)).any()


def test_a_tiny_mask_survives_a_small_thumbnail():
    mask = np.zeros((1000, 1600), dtype=bool)
    mask[500:503, 800:803] = True  # 9 pixels of a 1.6 MP image
    ring = mask_outline(mask, size=(160, 100), width=2)
    assert ring.shape == (100, 160) and ring.sum() == 5 * 5 - 1


def test_draw_outline_paints_only_the_ring():
    picture = Image.new("RGB", (40, 30), (10, 20, 30))
    mask = np.zeros((60, 80), dtype=bool)  # twice the picture's size: scaled down
    mask[20:40, 20:40] = True
    drawn = np.asarray(draw_outline(picture, mask, width=1))
    painted = (drawn == OUTLINE_COLOR).all(-1)
    assert (painted == mask_outline(mask, (40, 30), width=1)).all()
    assert (drawn[~painted] == (10, 20, 30)).all()


def test_overlay_blends_the_colormap_and_resizes_the_map():
    image = Image.new("RGB", (64, 48), (100, 100, 100))
    low_res = torch.zeros(12, 16)
    low_res[:, 8:] = 1.0  # right half relevant
    picture = overlay(image, low_res, alpha=1.0)
    assert picture.size == (64, 48) and picture.mode == "RGB"
    pixels = np.asarray(picture)
    assert pixels[24, 2].tolist() == [0, 0, 4] and pixels[24, 60].tolist() == [252, 255, 164]
    half = np.asarray(overlay(image, np.full((48, 64), 1.0), alpha=0.5))
    assert half[0, 0].tolist() == pytest.approx([176, 178, 132], abs=1)
    mask = np.zeros((48, 64), dtype=bool)
    mask[10:20, 10:20] = True
    outlined = np.asarray(overlay(image, low_res, mask, alpha=1.0))
    assert ((outlined == OUTLINE_COLOR).all(-1) == mask_outline(mask, width=2)).all()
    with pytest.raises(ValueError, match=r"\[H, W\]"):
        overlay(image, np.zeros((1, 12, 16)))


def test_resizing_the_mask_box_equals_resizing_the_whole_mask():
    rng = np.random.default_rng(0)
    for size in [(160, 120), (97, 61), (300, 225), (17, 200), (640, 481)]:
        mask = np.zeros((480, 640), dtype=bool)
        y, x, h, w = rng.integers(0, 400), rng.integers(0, 560), rng.integers(1, 80), rng.integers(1, 80)
        mask[y : y + h, x : x + w] = rng.random((h, w)) < 0.7  # a speckled object
        whole = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize(size, Image.Resampling.BOX)) > 0
        assert (resize_mask(mask, size) == whole).all(), size


def test_dilate_is_a_square_dilation():
    mask = np.zeros((9, 9), dtype=bool)
    mask[4, 4] = mask[0, 8] = True
    grown = dilate(mask, 2)
    expected = np.zeros_like(mask)
    expected[2:7, 2:7] = expected[0:3, 6:9] = True
    assert (grown == expected).all()


def test_a_two_tone_outline_shows_on_any_colour():
    """halo=1: a dark ring outside the cyan one, so the outline shows on cyan objects and on dark scenes
    alike (the cyan outline alone vanished on cyan). Fails on main 4e786ae (no halo)."""
    mask = np.zeros((20, 20), dtype=bool)
    mask[5:10, 5:10] = True
    ring = mask_outline(mask, None, 1)
    halo = dilate(mask, 2) & ~dilate(mask, 1)
    for background in ((0, 255, 255), (0, 0, 0), (255, 255, 255)):
        picture = Image.new("RGB", (20, 20), background)
        drawn = np.asarray(draw_outline(picture, mask, width=1, halo=1)).astype(int)
        changed = np.abs(drawn - np.asarray(picture)).sum(-1) > 0
        assert changed[ring].all() or changed[halo].all()  # one of the two tones differs from the colour
        assert (drawn[ring] == OUTLINE_COLOR).all() and (drawn[halo] == 0).all()
        assert not changed[~(ring | halo)].any()  # nothing else is painted
    plain = np.asarray(draw_outline(Image.new("RGB", (20, 20), (0, 255, 255)), mask, width=1))
    assert (plain == (0, 255, 255)).all()  # why: a cyan outline alone is invisible on cyan
