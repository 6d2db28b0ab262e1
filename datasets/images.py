"""Load any image file as an 8-bit RGB ``PIL.Image``, the single entry point for pixels.

Every backbone, SAM and the crop code expect 3-channel 8-bit RGB in the orientation a
person sees. Files in the wild are not like that, so :func:`load_rgb` normalises:

* EXIF orientation: phone photos store pixels sideways plus an orientation tag; without
  ``exif_transpose`` a query bbox drawn on the displayed image would point at the wrong pixels.
* Transparency (RGBA, LA, La, RGBa, PA, P/L/RGB with a ``transparency`` entry): composited
  over **white**. The colour under a fully transparent pixel is undefined (often black or
  leftover garbage) and dropping alpha would reveal it; product shots and cut-out objects
  are authored to be seen on a white page, so white is what the object was meant to look like.
* 16-bit / 32-bit integer and float greyscale (``I;16*``, ``I``, ``F``): ``convert("RGB")``
  clips these at 255, so anything brighter than 255/65535 turns white. We linearly map the
  image's actual ``[min, max]`` to ``[0, 255]``; many 16-bit files (12-bit sensors, depth
  maps) use only a small part of the nominal range, so scaling by 65535 would make them black.
* 1-bit, L, P, CMYK, YCbCr, LAB, HSV: Pillow's own conversion to RGB.

Unreadable, missing or truncated files raise :class:`ImageLoadError` naming the file.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import ExifTags, Image, ImageOps

from utils.errors import SoIRError
from utils.files import FileFacts

# File name extensions SoIR takes for images when it lists a folder (mask creation, annotation builders).
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"})

# Pillow modes whose samples do not fit in 8 bits.
_HIGH_BIT_DEPTH_MODES = {"I", "F", "I;16", "I;16L", "I;16B", "I;16N"}
_ALPHA_MODES = {"RGBA", "LA", "La", "RGBa", "PA"}
_WHITE = (255, 255, 255)


class ImageLoadError(SoIRError):
    """An image file could not be read; ``path`` and ``reason`` say which and why."""

    def __init__(self, path: str | Path, reason: str) -> None:
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"cannot load image '{path}': {reason}")


def load_rgb(path: str | Path, min_side: int | None = None) -> Image.Image:
    """Read ``path`` and return it upright, in mode ``"RGB"`` (H x W x 3, uint8).

    Args:
        min_side: for thumbnails only: a JPEG may be decoded at 1/2, 1/4 or 1/8 of its size (libjpeg's
            DCT scaling, Pillow's ``draft``), the smallest scale whose sides are both >= ``min_side``;
            several times faster. The result is then smaller than the file's image. None: full size.

    Raises:
        ImageLoadError: the file is missing, not an image, truncated or otherwise undecodable.
    """
    path = Path(path)
    try:
        with Image.open(path) as opened:
            if min_side:
                opened.draft(opened.mode, (min_side, min_side))  # a no-op for other formats
            # Image.open is lazy; load() decodes now so truncation errors surface here.
            opened.load()
            ImageOps.exif_transpose(opened, in_place=True)  # no copy of the decoded pixels
            image = opened
    except FileNotFoundError:
        raise ImageLoadError(path, "file does not exist") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        # OSError covers UnidentifiedImageError and "image file is truncated".
        raise ImageLoadError(path, f"{type(err).__name__}: {err}") from err
    return to_rgb(image)


@dataclass(frozen=True)
class ImageFacts:
    """What the pipeline checks about an image file before any model runs (see :func:`image_facts`).

    ``width`` / ``height`` are the size a person sees, after EXIF rotation (0 when unreadable);
    ``exif_orientation`` the file's EXIF orientation tag (1 = as stored); ``error`` why the header
    could not be read (None when it could).
    """

    sha256: str
    width: int
    height: int
    exif_orientation: int = 1
    error: str | None = None


def _read_facts(path: Path) -> dict:
    data = path.read_bytes()
    facts = {"sha256": hashlib.sha256(data).hexdigest(), "width": 0, "height": 0, "exif_orientation": 1, "error": None}
    try:
        with Image.open(io.BytesIO(data)) as image:  # reads the header only, no pixel decoding
            height, width, orientation = upright_header(image)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        facts["error"] = f"{type(err).__name__}: {err}"
        return facts
    facts.update(width=width, height=height, exif_orientation=orientation)
    return facts


def upright_header(image: Image.Image) -> tuple[int, int, int]:
    """(height, width, EXIF orientation 1-8) of an opened image as :func:`load_rgb` returns it (EXIF
    orientation applied), from its header only."""
    width, height = image.size
    orientation = int(image.getexif().get(ExifTags.Base.Orientation, 1))
    if orientation in (5, 6, 7, 8):  # a quarter turn: exif_transpose swaps the sides
        width, height = height, width
    return height, width, orientation if 1 <= orientation <= 8 else 1


def upright_size(path: str | Path) -> tuple[int, int]:
    """(height, width) of an image file as :func:`load_rgb` returns it, from its header only; an
    unreadable file raises :class:`ImageLoadError` naming it."""
    try:
        with Image.open(path) as image:
            height, width, _ = upright_header(image)
    except FileNotFoundError:
        raise ImageLoadError(path, "file does not exist") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise ImageLoadError(path, f"{type(err).__name__}: {err}") from err
    return height, width


def image_facts(paths: Sequence[str | Path]) -> list[ImageFacts]:
    """sha256 and upright size of each image file, from its bytes and header (no pixel decoding).

    Cached by path, size, mtime and inode (:class:`utils.files.FileFacts`), so a rerun over a
    million images reads only the files that changed. A file whose header cannot be read has
    ``error`` set; a truncated file with a good header is only found when it is decoded.
    """
    return [ImageFacts(**facts) for facts in FileFacts("image_facts", _read_facts)([Path(p) for p in paths])]


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert an already decoded image of any Pillow mode to 8-bit RGB (see module doc)."""
    if image.mode == "RGB":
        return image
    if image.mode in _HIGH_BIT_DEPTH_MODES:
        return _stretch_to_8bit(image).convert("RGB")
    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        return _composite_over_white(image)
    return image.convert("RGB")


def _composite_over_white(image: Image.Image) -> Image.Image:
    """Alpha-blend onto a white background. P/L/RGB with a ``transparency`` entry go via RGBA."""
    rgba = image.convert("RGBA")  # also un-premultiplies La/RGBa and applies palette alpha
    background = Image.new("RGBA", rgba.size, _WHITE + (255,))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _stretch_to_8bit(image: Image.Image) -> Image.Image:
    """Map the image's own value range [min, max] linearly onto [0, 255] (mode ``"L"``).

    A constant image has no range to stretch; it becomes black (0), the image carries no
    content either way. NaNs in float images map to 0.
    """
    values = np.asarray(image, dtype=np.float64)
    finite = np.isfinite(values)
    if not finite.any():
        return Image.new("L", image.size, 0)
    lo, hi = float(values[finite].min()), float(values[finite].max())
    if hi == lo:
        return Image.new("L", image.size, 0)
    scaled = np.where(finite, (values - lo) * (255.0 / (hi - lo)), 0.0)
    return Image.fromarray(np.rint(scaled).astype(np.uint8))  # 2-D uint8 -> mode "L"
