"""``captions.pt``: per-image object masks (from SAM, or ground truth for the demo set).

File format (a ``torch.save``'d dict of plain Python types, loadable with ``weights_only=True``)::

    {image_key: {"masks_rle": [{"counts": str | bytes, "size": [H, W]}, ...],   # pycocotools RLE
                 "bboxes":    [[x1, y1, x2, y2], ...],                          # pixels, see below
                 "scores":    [float, ...]}}

``image_key`` is the key of the same image in ``anns.pt`` (or its resolved absolute path).
The three lists are parallel, one entry per mask; an image with no detections has three
empty lists. Boxes are in pixel-edge coordinates of the image the masks were computed on:
a mask covering columns 3..5 has ``x1 = 3, x2 = 6`` (see :func:`bbox_from_mask`), the same
convention as ``PIL.Image.crop``. Note SAM's own ``bbox`` output is XYWH and must be converted.
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from numbers import Integral, Real
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from pycocotools import mask as mask_utils

_ENTRY_KEYS = ("masks_rle", "bboxes", "scores")


class CaptionsError(ValueError):
    """A captions file or entry is malformed; the message names the file and the image key."""


def encode_mask(mask: np.ndarray) -> dict:
    """[H, W] bool / 0-1 mask -> compressed RLE ``{"counts": str, "size": [H, W]}``.

    ``counts`` is decoded to ``str`` so the dict holds only plain types.
    """
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"encode_mask expects an [H, W] mask, got shape {mask.shape}")
    rle = mask_utils.encode(np.asfortranarray(mask.astype(bool, copy=False).astype(np.uint8)))
    return {"counts": rle["counts"].decode("utf-8"), "size": [int(s) for s in rle["size"]]}


def decode_mask(rle: Mapping[str, Any]) -> np.ndarray:
    """RLE dict -> [H, W] bool mask.

    ``counts`` may be compressed (``str`` or ``bytes``) or uncompressed (a list of run lengths,
    COCO ``iscrowd`` style); the latter is compressed first with ``frPyObjects``.
    """
    height, width = (int(s) for s in rle["size"])
    counts = rle["counts"]
    if isinstance(counts, list):
        compressed = mask_utils.frPyObjects({"counts": counts, "size": [height, width]}, height, width)
    else:
        raw = counts.encode("utf-8") if isinstance(counts, str) else bytes(counts)
        compressed = {"counts": raw, "size": [height, width]}
    return mask_utils.decode(compressed).astype(bool)


def bbox_from_mask(mask: np.ndarray) -> list[float]:
    """Tight pixel-edge box ``[x1, y1, x2, y2]`` of an [H, W] mask (x2, y2 exclusive).

    Raises ValueError for an empty mask (it has no box).
    """
    ys, xs = np.nonzero(np.asarray(mask))
    if len(xs) == 0:
        raise ValueError("empty mask has no bounding box")
    return [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]


@dataclass
class ImageMasks:
    """The masks of one image; ``masks_rle[i]``, ``bboxes[i]`` and ``scores[i]`` describe mask i."""

    masks_rle: list[dict] = field(default_factory=list)
    bboxes: list[list[float]] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.masks_rle)

    @property
    def size(self) -> tuple[int, int] | None:
        """(H, W) of the masks, or None when the image has no masks."""
        if not self.masks_rle:
            return None
        height, width = self.masks_rle[0]["size"]
        return int(height), int(width)

    def masks(self) -> np.ndarray:
        """Decoded masks, [P, H, W] bool. With no masks: shape (0, 0, 0), H and W are unknown."""
        if not self.masks_rle:
            return np.zeros((0, 0, 0), dtype=bool)
        return np.stack([decode_mask(rle) for rle in self.masks_rle])

    def to_dict(self) -> dict:
        """Plain-types dict for ``torch.save`` (counts as ``str``, boxes and scores as floats)."""
        return {
            "masks_rle": [{"counts": _counts_to_plain(r["counts"]), "size": [int(s) for s in r["size"]]}
                          for r in self.masks_rle],
            "bboxes": [[float(v) for v in box] for box in self.bboxes],
            "scores": [float(s) for s in self.scores],
        }


def _counts_to_plain(counts: str | bytes | list) -> str | list[int]:
    if isinstance(counts, bytes):
        return counts.decode("utf-8")
    if isinstance(counts, list):
        return [int(c) for c in counts]
    return counts


def validate_entry(entry: Any, where: str) -> ImageMasks:
    """Check one ``captions.pt`` value and return it as :class:`ImageMasks`.

    ``where`` (e.g. ``"captions.pt, image 'gallery/a.jpg'"``) prefixes every error message.
    """
    if isinstance(entry, ImageMasks):
        entry = {"masks_rle": entry.masks_rle, "bboxes": entry.bboxes, "scores": entry.scores}
    if not isinstance(entry, Mapping):
        raise CaptionsError(f"{where}: expected a dict with keys {list(_ENTRY_KEYS)}, got {type(entry).__name__}")
    missing = [k for k in _ENTRY_KEYS if k not in entry]
    extra = [k for k in entry if k not in _ENTRY_KEYS]
    if missing or extra:
        raise CaptionsError(f"{where}: keys must be {list(_ENTRY_KEYS)}; missing {missing}, unexpected {extra}")
    rles, boxes, scores = entry["masks_rle"], entry["bboxes"], entry["scores"]
    for name, value in zip(_ENTRY_KEYS, (rles, boxes, scores)):
        if not isinstance(value, (list, tuple)):
            raise CaptionsError(f"{where}: '{name}' must be a list, got {type(value).__name__}")
    if not len(rles) == len(boxes) == len(scores):
        raise CaptionsError(f"{where}: list lengths differ: {len(rles)} masks_rle, "
                            f"{len(boxes)} bboxes, {len(scores)} scores")
    sizes = {tuple(_check_rle(rle, f"{where}, mask {i}")) for i, rle in enumerate(rles)}
    if len(sizes) > 1:
        raise CaptionsError(f"{where}: masks have different sizes {sorted(sizes)}")
    for i, box in enumerate(boxes):
        _check_box(box, f"{where}, bbox {i}")
    for i, score in enumerate(scores):
        if not _is_number(score):
            raise CaptionsError(f"{where}, score {i}: expected a number, got {score!r}")
    return ImageMasks(masks_rle=[dict(r) for r in rles], bboxes=[[float(v) for v in b] for b in boxes],
                      scores=[float(s) for s in scores])


def _is_number(value: Any) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool) and np.isfinite(float(value))


def _check_rle(rle: Any, where: str) -> tuple[int, int]:
    if not isinstance(rle, Mapping) or set(rle) != {"counts", "size"}:
        raise CaptionsError(f"{where}: RLE must be a dict with keys 'counts' and 'size', got {rle!r:.80}")
    size = rle["size"]
    if (not isinstance(size, (list, tuple)) or len(size) != 2
            or not all(isinstance(s, Integral) and not isinstance(s, bool) and s >= 0 for s in size)):
        raise CaptionsError(f"{where}: 'size' must be [H, W] non-negative ints, got {size!r}")
    counts = rle["counts"]
    if isinstance(counts, list):
        if not all(isinstance(c, Integral) and not isinstance(c, bool) and c >= 0 for c in counts):
            raise CaptionsError(f"{where}: uncompressed 'counts' must be non-negative ints")
        if sum(counts) != size[0] * size[1]:
            raise CaptionsError(f"{where}: uncompressed 'counts' sum to {sum(counts)}, "
                                f"expected H*W = {size[0] * size[1]}")
    elif not isinstance(counts, (str, bytes)):
        raise CaptionsError(f"{where}: 'counts' must be str, bytes or a list of ints, "
                            f"got {type(counts).__name__}")
    return int(size[0]), int(size[1])


def _check_box(box: Any, where: str) -> None:
    if not isinstance(box, (list, tuple)) or len(box) != 4 or not all(_is_number(v) for v in box):
        raise CaptionsError(f"{where}: expected [x1, y1, x2, y2] of 4 numbers, got {box!r}")
    x1, y1, x2, y2 = (float(v) for v in box)
    if x1 > x2 or y1 > y2:
        raise CaptionsError(f"{where}: need x1 <= x2 and y1 <= y2, got {box!r}")


def load_captions(path: str | Path) -> dict[str, ImageMasks]:
    """Read and validate ``captions.pt`` -> {image_key: ImageMasks}. Raises CaptionsError."""
    path = Path(path)
    if not path.is_file():
        raise CaptionsError(f"captions file '{path}' does not exist")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # unpickling errors come in many types; all mean "not a captions file"
        raise CaptionsError(f"captions file '{path}' could not be loaded: {type(err).__name__}: {err}") from err
    if not isinstance(raw, Mapping):
        raise CaptionsError(f"captions file '{path}': top level must be a dict, got {type(raw).__name__}")
    captions = {}
    for key, entry in raw.items():
        if not isinstance(key, str):
            raise CaptionsError(f"captions file '{path}': keys must be str, got {key!r}")
        captions[key] = validate_entry(entry, f"captions file '{path}', image '{key}'")
    return captions


def save_captions(captions: Mapping[str, ImageMasks | Mapping], path: str | Path) -> Path:
    """Validate and write ``captions`` atomically (temp file in the same folder, then os.replace).

    Only plain dicts/lists/str/float are saved, so :func:`load_captions` works with
    ``weights_only=True``. Bytes counts are stored as str.
    """
    path = Path(path)
    plain = {}
    for key, entry in captions.items():
        if not isinstance(key, str):
            raise CaptionsError(f"saving '{path}': keys must be str, got {key!r}")
        plain[key] = validate_entry(entry, f"saving '{path}', image '{key}'").to_dict()
    return atomic_torch_save(plain, path)


def atomic_torch_save(obj: Any, path: str | Path) -> Path:
    """``torch.save`` to a temp file in the target folder, then ``os.replace``: a crash or a
    full disk never leaves a half-written file under ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(obj, handle)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def find_masks(captions: Mapping[str, ImageMasks], key: str, file: str | Path) -> ImageMasks | None:
    """Masks of one image: by its ``anns.pt`` key first, then by its resolved absolute path."""
    if key in captions:
        return captions[key]
    return captions.get(str(Path(file).resolve()))
