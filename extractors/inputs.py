"""What a notebook may hand to ``Extractor.extract``: images and masks in the forms people have.

* images: a PIL image, a numpy array (H x W x 3 uint8, or H x W grey), a path, or the original
  code's dict ``{"image": ..., "img_path": ...}``; all become an upright 8-bit RGB PIL image
  (EXIF rotation applied, as ``datasets.load_rgb`` does for the pipeline).
* masks: a list of H x W arrays, an array / tensor [P, H, W] (bool, 0/1 or 0/255: the original
  passed uint8 0/255), RLE dicts (``{"counts", "size"}``), a captions entry (``ImageMasks`` or its
  dict ``{"masks_rle", ...}``); all become a bool array [P, H, W].
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps

from datasets.captions import ImageMasks, caption_files, decode_mask, load_captions, validate_entry
from datasets.images import load_rgb, to_rgb
from datasets.preprocessing import to_binary_masks
from utils.errors import SoIRError

ImageLike = Image.Image | np.ndarray | str | Path | Mapping[str, Any]


def as_image(image: ImageLike) -> tuple[Image.Image, Path | None]:
    """(upright RGB PIL image, its file when it came from one)."""
    if isinstance(image, Mapping):
        if "image" in image and image["image"] is not None:
            return as_image(image["image"])[0], Path(image["img_path"]) if image.get("img_path") else None
        if image.get("img_path"):
            return as_image(image["img_path"])
        raise SoIRError(f"an image dict needs 'image' or 'img_path', got keys {sorted(image)}")
    if isinstance(image, (str, Path)):
        return load_rgb(image), Path(image)
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (3, 4)):
            raise SoIRError(
                f"an image array must be uint8 H x W (grey) or H x W x 3/4, got {image.dtype} {image.shape}"
            )
        image = Image.fromarray(image)
    if not isinstance(image, Image.Image):
        raise SoIRError(f"expected a PIL image, a numpy array, a path or a dict, got {type(image).__name__}")
    return to_rgb(ImageOps.exif_transpose(image)), None


def as_masks(masks: Any, where: str = "masks") -> np.ndarray:
    """[P, H, W] bool from any accepted mask form (see the module docstring)."""
    if isinstance(masks, (ImageMasks, Mapping)) and not _is_rle(masks):
        entry = masks if isinstance(masks, ImageMasks) else validate_entry(masks, where)
        return entry.masks()
    if isinstance(masks, torch.Tensor):
        masks = masks.cpu().numpy()
    if isinstance(masks, Sequence) and not isinstance(masks, np.ndarray):
        if not masks:
            raise SoIRError(f"{where}: an empty list of masks")
        masks = np.stack([decode_mask(m) if _is_rle(m) else _array(m) for m in masks])
    elif _is_rle(masks):
        masks = decode_mask(masks)[None]
    masks = np.asarray(masks)
    if masks.ndim == 2:
        masks = masks[None]
    try:
        return to_binary_masks(masks).numpy()
    except ValueError as err:
        raise SoIRError(f"{where}: {err}") from None


def _is_rle(value: Any) -> bool:
    return isinstance(value, Mapping) and set(value) == {"counts", "size"}


def _array(mask: Any) -> np.ndarray:
    return mask.cpu().numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)


class CaptionsLookup:
    """The masks of an image named by its path, from a ``captions.pt`` (``Extractor(captions_file=...)``):
    the captions key itself, or the same file, with relative keys naming files in the captions file's
    folder (``./``, absolute paths and symlinks are found as create_index.py finds them)."""

    def __init__(self, captions_file: str | Path):
        self.file = Path(captions_file)
        self.entries = load_captions(captions_file)
        self._by_real_path: dict[str, str] | None = None  # {real path: captions key}, built on first use

    def masks(self, path: Path | None) -> ImageMasks | None:
        """The captions entry of the image at ``path``, or None."""
        if path is None:
            return None
        if str(path) in self.entries:
            return self.entries[str(path)]
        if self._by_real_path is None:
            self._by_real_path = caption_files(self.entries, self.file.resolve().parent)
        key = self._by_real_path.get(os.path.realpath(path))
        return None if key is None else self.entries[key]

    def no_masks_message(self, path: Path | None) -> str:
        """Why an image has no masks, for an error: names the image and the captions keys nearest to it."""
        if path is None:
            return f"an image without a path has no entry in {self.file} (pass masks= or the image's path)"
        root = self.file.resolve().parent
        nearest = difflib.get_close_matches(os.path.relpath(os.path.realpath(path), root), list(self.entries), 3, 0)
        return (
            f"{path}: no masks in {self.file} (its relative keys name files in {root}); "
            f"nearest keys: {', '.join(nearest) or 'none'}"
        )
