"""What an image is turned into before the model sees it: one or more *views*.

A view is the model-size input tensor plus, for Mask Inversion, the masks to invert on it.
Building views is pure preprocessing, so it runs in DataLoader workers (no model here).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from datasets.preprocessing import NaFlexPreprocess, Preprocess, pil_nearest_masks, to_binary_masks
from utils.config import MISettings
from utils.errors import SoIRError

MODES = ("global", "per_mask", "union", "smart_crop", "mao")


# ``mask_index`` of a row that belongs to no single source mask (global embedding, union of masks).
NO_MASK = -1


@dataclass
class View:
    """pixel_values [3, H, W] normalised; masks [P, H, W] float in {0, 1}, or None for the global
    embedding. ``mask_index`` [P] int64: which of the image's source masks each mask row is (its
    position in the captions entry), ``NO_MASK`` for a union; None for the global embedding.

    SigLIP2 NaFlex: pixel_values [N, 3 p p] is a padded patch sequence, ``spatial_shape`` [2] its patch
    rows and columns (h, w), and masks are [P, h p, w p] (the image's own resized size); None otherwise.
    """

    pixel_values: torch.Tensor
    masks: torch.Tensor | None = None
    mask_index: torch.Tensor | None = None
    spatial_shape: torch.Tensor | None = None


@dataclass
class Views:
    """All views of one image, and how many of its masks vanished at the model's input size."""

    views: list[View]
    dropped_masks: int = 0
    global_fallback: int = 0  # 1 when the image fell back to its global embedding
    error: str | None = None  # the image's pixels could not be decoded (no views)


@dataclass(frozen=True)
class ViewMaker:
    """Image (+ masks) -> views, for one descriptor mode.

    Modes:
        global:     the whole image, no mask (plain embedding).
        per_mask:   the whole image with all its masks (one MI vector per mask, or one for all of them
                    with ``mi_sum_loss=mean_dice``).
        union:      the whole image with the union of its masks (``mi_sum``: one vector per image).
        smart_crop: for each mask, its box padded by ``pad`` x the box's longer side, cropped from
                    the original image (not a downscaled copy), with the mask cropped alike.
        mao:        MaO's object crops (``descriptor=mao``), one view per mask, cut as Stage A cuts
                    its training crops (:func:`utils.training.data.crop_box`): the mask's box padded by
                    ``pad`` x its longer side, then each side grown around its centre to at least
                    ``min_crop`` pixels (the model's input side; inside the image), with the mask
                    cropped alike. The extractor fits one vector to all views of an image.

    The original code's variants (``compat=original``):
        keep_empty: a mask that vanishes at the model's input size is kept (MI with an empty target)
            instead of dropped.
        crop_source="resized": smart crops are cut from the model-input-sized copy of the image and
            resized back to the input size (``preprocess.resample``), padded by ``pad_pixels``
            (input pixels) when given, else by int(``pad`` x the box's longer side).
        geometry="original" (``pixel_geometry=original``): the original's pixel rounding: masks resized
            with PIL's NEAREST (:func:`datasets.preprocessing.pil_nearest_masks`), its smart-crop box
            (:func:`original_smart_crop_box`), and ``zero_background`` applied to the input-sized image
            and masks (it resized, then zeroed).
    """

    preprocess: Preprocess | NaFlexPreprocess
    mode: str = "global"
    pad: float = MISettings.smart_crop_pad
    keep_empty: bool = False
    crop_source: str = "original"
    pad_pixels: int | None = None
    geometry: str = "soir"
    min_crop: int = 0

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"unknown view mode {self.mode!r}; one of {MODES}")
        if self.crop_source not in ("original", "resized"):
            raise ValueError(f"crop_source={self.crop_source!r}; one of original, resized")
        if self.geometry not in ("soir", "original"):
            raise ValueError(f"geometry={self.geometry!r}; one of soir, original")
        if (self.crop_source == "resized" or self.geometry == "original") and isinstance(
            self.preprocess, NaFlexPreprocess
        ):
            # The original's crops are cut from its fixed-size input; a NaFlex input has no fixed size.
            raise SoIRError(
                "the original code's smart crops (compat=original) need a fixed-size model input; "
                "SigLIP2 NaFlex has none: use compat=none"
            )

    def __call__(
        self, image: Image.Image, masks: np.ndarray | torch.Tensor | None = None, zero_background: bool = False
    ) -> Views:
        """Views of ``image`` with ``masks`` [P, H, W] at its size; ``zero_background`` (``mask_input``):
        the pixels outside the union of the masks are set to zero first (``geometry="original"``: on
        the input-sized image with the input-sized masks, as the original did)."""
        if masks is not None:
            masks = to_binary_masks(masks)
            if tuple(masks.shape[1:]) != (image.height, image.width):
                raise ValueError(
                    f"masks of size {tuple(masks.shape[1:])} do not match the image ({image.height}, {image.width})"
                )
        resized_first = zero_background and masks is not None and self.geometry == "original"
        if resized_first:
            # Original extractors/dinov2_mi_extractor.py:127,136-139 (SigLIP / CLIP :117,128): the image
            # and masks are resized to the input size, then the image is multiplied by the masks.
            image = zero_outside(self.preprocess.resize(image), self._masks(masks).numpy())
            if self.mode == "smart_crop" and self.crop_source == "original":
                raise SoIRError(
                    "mask_input with pixel_geometry=original zeroes the input-sized image (the original's "
                    "order); its smart crops are cut from that image: use smart_crop_source=resized"
                )
        elif zero_background and masks is not None:
            image = zero_outside(image, masks.numpy())
        if self.mode == "global" or masks is None:
            return Views([self._view(image)])
        nonempty = masks.flatten(1).any(1)  # an empty source mask describes nothing
        empty, masks, index = int((~nonempty).sum()), masks[nonempty], torch.nonzero(nonempty).flatten()
        if self.mode == "union" and len(masks):
            masks, index = masks.any(0, keepdim=True), torch.tensor([NO_MASK])
        if self.mode == "mao":
            views = self._crops(image, masks, index)
        elif self.mode != "smart_crop":
            views = self._keep_nonempty(self._view(image), self._masks(masks), index)
        elif self.crop_source == "resized":
            views = self._crops_of_resized(image, masks, index)
        else:
            views = self._crops(image, masks, index)
        views.dropped_masks += empty
        return views

    def _crops_of_resized(self, image: Image.Image, masks: torch.Tensor, index: torch.Tensor) -> Views:
        """The original code's smart crops: cut from the input-sized image and mask, resized back."""
        small_image, small_masks = self.preprocess.resize(image), self._masks(masks) > 0
        views, dropped = [], 0
        for mask, i in zip(small_masks, index):
            if not mask.any():
                dropped += 1
                continue
            if self.geometry == "original":
                x1, y1, x2, y2 = original_smart_crop_box(mask, self.pad, self.pad_pixels)
            else:
                x1, y1, x2, y2 = padded_box(mask, 0.0, 0)
                margin = self.pad_pixels if self.pad_pixels is not None else int(self.pad * max(x2 - x1, y2 - y1))
                x1, y1, x2, y2 = padded_box(mask, 0.0, margin)
            views.append(self._view(small_image.crop((x1, y1, x2, y2)), self._masks(mask[None, y1:y2, x1:x2]), i[None]))
        return Views(views, dropped)

    def _crops(self, image: Image.Image, masks: torch.Tensor, index: torch.Tensor) -> Views:
        """One view per mask: its padded box cut from ``image``, each side grown to at least ``min_crop``
        pixels (MaO's object crops; with ``min_crop`` 0 this is :func:`padded_box`, the smart crop)."""
        views, dropped = [], 0
        for mask, i in zip(masks, index):
            x1, y1, x2, y2 = mao_box(mask, self.pad, self.min_crop)
            crop = self._masks(mask[None, y1:y2, x1:x2])
            if crop.any():
                views.append(self._view(image.crop((x1, y1, x2, y2)), crop, i[None]))
            else:
                dropped += 1
        return Views(views, dropped)

    def _masks(self, masks: torch.Tensor) -> torch.Tensor:
        """Masks [P, H, W] at the model's input resolution, float {0, 1} [P, h, w]."""
        if self.geometry == "original":
            return pil_nearest_masks(masks, self.preprocess.size)
        return self.preprocess.masks(masks)

    def _view(
        self, image: Image.Image, masks: torch.Tensor | None = None, mask_index: torch.Tensor | None = None
    ) -> View:
        """The model input of ``image`` (and its NaFlex patch grid) with masks already at its resolution."""
        return View(self.preprocess.image(image), masks, mask_index, self.preprocess.spatial_shape(image))

    def _keep_nonempty(self, view: View, masks: torch.Tensor, index: torch.Tensor) -> Views:
        # Nearest-neighbour resizing can erase a mask thinner than one input pixel; such a mask
        # would give a meaningless vector, so it is dropped and counted (kept with keep_empty).
        keep = masks.flatten(1).any(1) if len(masks) else torch.zeros(0, dtype=torch.bool)
        if self.keep_empty:
            keep = torch.ones_like(keep)
        if keep.any():
            view.masks, view.mask_index = masks[keep], index[keep]
        return Views([view] if keep.any() else [], int((~keep).sum()))


def stack_views(views: list[View]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """pixel_values [B, ...] of views and their spatial_shapes [B, 2] (NaFlex), or None (fixed size)."""
    pixel_values = torch.stack([v.pixel_values for v in views])
    if views[0].spatial_shape is None:
        return pixel_values, None
    return pixel_values, torch.stack([v.spatial_shape for v in views])


def stack_masks(views: list[View]) -> torch.Tensor:
    """[B, P, H, W] masks of views with P_i masks each: zero-padded to the most masks and (NaFlex, where
    each image has its own resolution) to the largest canvas, each view's masks in the top-left corner."""
    count = max(len(v.masks) for v in views)
    height, width = (max(v.masks.shape[axis] for v in views) for axis in (1, 2))
    masks = torch.zeros(len(views), count, height, width)
    for i, view in enumerate(views):
        masks[i, : len(view.masks), : view.masks.shape[1], : view.masks.shape[2]] = view.masks
    return masks


def padded_box(mask: torch.Tensor, pad: float, pad_pixels: int | None = None) -> tuple[int, int, int, int]:
    """Tight box of a non-empty [H, W] mask, padded by ``pad`` x its longer side (rounded; or by
    ``pad_pixels`` when given), clipped to the image.

    Returns (x1, y1, x2, y2) in pixels, x2/y2 exclusive.
    """
    ys, xs = torch.nonzero(mask, as_tuple=True)
    x1, x2, y1, y2 = int(xs.min()), int(xs.max()) + 1, int(ys.min()), int(ys.max()) + 1
    margin = pad_pixels if pad_pixels is not None else int(round(pad * max(x2 - x1, y2 - y1)))
    height, width = mask.shape
    return max(0, x1 - margin), max(0, y1 - margin), min(width, x2 + margin), min(height, y2 + margin)


def original_smart_crop_box(mask: torch.Tensor, pad: float, pad_pixels: int | None = None) -> tuple[int, int, int, int]:
    """The original code's smart-crop box of a non-empty [H, W] mask (``pixel_geometry=original``).

    Its last row / column are inclusive indices, padded and then used as exclusive ends, so its crop is
    1 px short at the right and bottom; its padding is ``pad_pixels`` (SigLIP / CLIP: 5) or
    int(``pad`` x the longer inclusive extent, i.e. side - 1) (DINOv2). Original
    ``extractors/dinov2_extractor.py:370-378``, ``siglip_mi_extractor.py:255-264``,
    ``clip_mi_extractor.py:250-259``.

    Returns (x1, y1, x2, y2) in pixels for ``PIL.Image.crop`` / slicing (x2, y2 exclusive).
    """
    ys, xs = torch.nonzero(mask, as_tuple=True)
    x1, x2, y1, y2 = int(xs.min()), int(xs.max()), int(ys.min()), int(ys.max())  # inclusive
    margin = pad_pixels if pad_pixels is not None else int(max(y2 - y1, x2 - x1) * pad)
    height, width = mask.shape
    return max(0, x1 - margin), max(0, y1 - margin), min(width, x2 + margin), min(height, y2 + margin)


def mao_box(mask: torch.Tensor, pad: float, min_size: int) -> tuple[int, int, int, int]:
    """MaO's object crop of a non-empty [H, W] mask: :func:`padded_box`, each side then grown to at
    least ``min_size`` pixels (:func:`grow_span`). Returns (x1, y1, x2, y2), x2/y2 exclusive."""
    x1, y1, x2, y2 = padded_box(mask, pad)
    height, width = mask.shape
    x1, x2 = grow_span(x1, x2, min_size, width)
    y1, y2 = grow_span(y1, y2, min_size, height)
    return x1, y1, x2, y2


def input_side(preprocess: Preprocess | NaFlexPreprocess) -> int:
    """The model input's side in pixels, MaO's smallest crop: the longer side of a fixed-size input;
    NaFlex: the side of the largest square grid of ``max_num_patches`` patches."""
    if isinstance(preprocess, NaFlexPreprocess):
        return preprocess.patch_size * math.isqrt(preprocess.max_num_patches)
    return max(preprocess.size)


def grow_span(start: int, end: int, min_size: int, limit: int) -> tuple[int, int]:
    """The pixel span [start, end) grown around its centre to ``min(max(end - start, min_size), limit)``
    pixels, shifted to stay inside [0, limit): one axis of MaO's object crops."""
    size = min(max(end - start, min_size), limit)
    start = min(max(0, (start + end - size) // 2), limit - size)
    return start, start + size


def zero_outside(image: Image.Image, masks: np.ndarray) -> Image.Image:
    """``image`` with every pixel outside the union of ``masks`` [P, H, W] set to zero (black)."""
    keep = np.asarray(masks, dtype=bool).any(axis=0)[..., None]
    return Image.fromarray(np.where(keep, np.asarray(image), 0).astype(np.uint8))
