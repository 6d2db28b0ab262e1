"""Pictures of masks and explainability maps with Pillow: colormaps, mask outlines, overlays.

    from utils.results.visualize import overlay
    picture = overlay(image, legrad_map_of_one_vector, mask)      # PIL RGB, the image's size

No matplotlib: the colormap is a small lookup table interpolated with numpy.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image

HALO_COLOR = (0, 0, 0)  # the dark half of a two-tone outline
OUTLINE_COLOR = (0, 255, 255)  # cyan: apart from the colormap's black-red-yellow and the report's green/red
# Anchors of matplotlib's "inferno" (0, 1/4, 1/2, 3/4, 1): dark = low relevance, light yellow = high.
_INFERNO = np.array([[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]], dtype=np.float64)


def colormap(values: np.ndarray | torch.Tensor) -> np.ndarray:
    """Values [H, W] in [0, 1] (clipped) -> RGB [H, W, 3] uint8, inferno-like (0 black-purple, 1 light yellow)."""
    values = np.clip(np.asarray(values, dtype=np.float64), 0, 1)
    anchors = np.linspace(0, 1, len(_INFERNO))
    rgb = [np.interp(values, anchors, _INFERNO[:, c]) for c in range(3)]
    return np.rint(np.stack(rgb, axis=-1)).astype(np.uint8)


def resize_mask(mask: np.ndarray | torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """Bool mask [H, W] -> bool [height, width] for ``size`` = (width, height), PIL order.

    A pixel of the result is set when any part of it is covered (box filter > 0), so a mask of a few
    pixels in a large image still shows on a small thumbnail. Only the mask's bounding box is
    resampled (PIL's ``box``), which gives the same pixels as resampling the whole mask, much faster
    for the small objects of a large image.
    """
    mask = np.asarray(mask, dtype=bool)
    (height, width), (out_w, out_h) = mask.shape, size
    if (width, height) == (out_w, out_h):
        return mask
    out = np.zeros((out_h, out_w), dtype=bool)
    cols, rows = np.flatnonzero(mask.any(0)), np.flatnonzero(mask.any(1))
    if len(cols) == 0:
        return out
    sx, sy = out_w / width, out_h / height
    # Output pixels touched by the box, and the source pixels those output pixels cover.
    tx1, tx2 = math.floor(cols[0] * sx), min(out_w, math.ceil((cols[-1] + 1) * sx))
    ty1, ty2 = math.floor(rows[0] * sy), min(out_h, math.ceil((rows[-1] + 1) * sy))
    x1, x2 = math.floor(tx1 / sx), min(width, math.ceil(tx2 / sx))
    y1, y2 = math.floor(ty1 / sy), min(height, math.ceil(ty2 / sy))
    region = Image.fromarray(mask[y1:y2, x1:x2].astype(np.uint8) * 255)
    coverage = region.resize(
        (tx2 - tx1, ty2 - ty1), Image.Resampling.BOX, box=(tx1 / sx - x1, ty1 / sy - y1, tx2 / sx - x1, ty2 / sy - y1)
    )
    out[ty1:ty2, tx1:tx2] = np.asarray(coverage) > 0
    return out


def dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    """Binary dilation of bool [H, W] by a (2 radius + 1)^2 square (separable: rows, then columns)."""
    grown = mask.copy()
    for axis in (0, 1):
        source = grown.copy()
        for shift in range(1, radius + 1):
            ahead, behind = [slice(None)] * 2, [slice(None)] * 2
            ahead[axis], behind[axis] = slice(shift, None), slice(None, -shift)
            grown[tuple(ahead)] |= source[tuple(behind)]
            grown[tuple(behind)] |= source[tuple(ahead)]
    return grown


def mask_outline(mask: np.ndarray | torch.Tensor, size: tuple[int, int] | None = None, width: int = 2) -> np.ndarray:
    """The ring of pixels just outside ``mask``, ``width`` px thick, as bool [height, width].

    Args:
        mask: [H, W] bool (or 0/1).
        size: (width, height) of the picture the outline is drawn on (PIL order); None = the mask's.
        width: ring thickness in output pixels.

    The ring lies outside the mask so the object itself stays visible. An empty mask has no outline.
    """
    inside = resize_mask(mask, size or (np.shape(mask)[1], np.shape(mask)[0]))
    return dilate(inside, width) & ~inside


def draw_outline(
    picture: Image.Image,
    mask: np.ndarray | torch.Tensor,
    color: tuple[int, int, int] = OUTLINE_COLOR,
    width: int = 2,
    halo: int = 0,
) -> Image.Image:
    """A copy of RGB ``picture`` with the outline of ``mask`` (any size; scaled to the picture) drawn on it.

    ``halo`` > 0: a dark ring that many px thick just outside the coloured one (two-tone), so the outline
    stays visible on any colour: the light ring on dark scenes, the dark one on light or cyan objects.
    """
    inside = resize_mask(mask, picture.size)
    ring = dilate(inside, width) & ~inside
    out = picture.copy()
    if halo:
        outer = dilate(inside, width + halo) & ~dilate(inside, width)
        out.paste(HALO_COLOR, mask=Image.fromarray(outer.astype(np.uint8) * 255))
    out.paste(color, mask=Image.fromarray(ring.astype(np.uint8) * 255))
    return out


def overlay(
    image: Image.Image,
    map: np.ndarray | torch.Tensor,
    mask: np.ndarray | torch.Tensor | None = None,
    alpha: float = 0.55,
    outline_width: int | None = None,
) -> Image.Image:
    """An explainability map blended over its image, with the outline of ``mask``.

    Args:
        image: PIL image (converted to RGB).
        map: [h, w] values in [0, 1] (e.g. one LeGrad map); resized bilinearly to the image when
            its size differs (a model-resolution map works).
        mask: optional [H', W'] bool mask, scaled to the image, drawn as a cyan outline.
        alpha: weight of the colormap (0 = the image only, 1 = the colormap only).
        outline_width: ring thickness in pixels; None = about 1/150 of the image's longer side (>= 2).

    Returns:
        RGB PIL image of the image's size.
    """
    image = image.convert("RGB")
    values = np.asarray(map.detach().cpu().float() if isinstance(map, torch.Tensor) else map, dtype=np.float32)
    if values.ndim != 2:
        raise ValueError(f"map must be [H, W], got shape {values.shape}")
    if (values.shape[1], values.shape[0]) != image.size:
        values = np.asarray(Image.fromarray(values).resize(image.size, Image.Resampling.BILINEAR))
    picture = Image.blend(image, Image.fromarray(colormap(values)), alpha)
    if mask is None:
        return picture
    return draw_outline(picture, mask, width=outline_width or max(2, round(max(image.size) / 150)))
