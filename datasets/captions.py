"""``captions.pt``: per-image object masks (from SAM, or ground truth for the demo set).

File format (a ``torch.save``'d dict of plain Python types, loadable with ``weights_only=True``)::

    {image_key: {"masks_rle": [{"counts": str | bytes | list[int], "size": [H, W]}, ...],
                 "bboxes":    [[x1, y1, x2, y2], ...],                          # pixels, see below
                 "scores":    [float, ...]}}

``image_key`` is the key of the same image in ``anns.pt`` (or its resolved absolute path).
The three lists are parallel, one entry per mask (``scores`` may also be empty: unknown); an image
with no detections has three empty lists. Boxes are in pixel-edge coordinates of the image the masks were computed on:
a mask covering columns 3..5 has ``x1 = 3, x2 = 6`` (see :func:`bbox_from_mask`), the same
convention as ``PIL.Image.crop``. Note SAM's own ``bbox`` output is XYWH and must be converted.

Two RLE conventions, told apart by the type of ``counts``:

* ``str`` / ``bytes``: pycocotools' compressed RLE (column-major, as ``mask_utils.encode``
  writes it). SoIR writes this.
* ``list[int]``: the convention of the original SoIR code's mask script and README: run lengths of
  the mask flattened **row by row** (``mask.flatten()``, C order), alternating 0-runs and 1-runs and
  starting with a 0-run (of length 0 when the first pixel is 1). Note this is NOT COCO's
  uncompressed ``iscrowd`` RLE, which is column-major.

Every RLE is validated when the file is loaded (:func:`rle_runs`): the runs must be non-negative
and sum to H*W, so a truncated string or an edited ``size`` is an error naming the file, the image
and the mask, never a mask decoded from leftover memory.

The original code's ``segmentation_results.pt`` loads as it is: its extra keys (``image_path``,
``image_size``, ``num_objects``) are ignored; an ``{"error": ...}`` entry is a failed image
(:attr:`ImageMasks.error`, handled like an image without masks); ``scores`` whose length differs
from the masks (it keeps the scores from before its NMS) are dropped; boxes outside the mask are
clipped. Each of these is counted in :attr:`CaptionsFile.notes` and logged once. Its masks were
computed on the image before EXIF rotation (:attr:`ImageMasks.exif_orientation` says how to turn
them, set by the pipeline from the image's header).
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from dataclasses import dataclass, field, replace
from numbers import Integral, Real
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from utils.errors import SoIRError
from utils.files import atomic_torch_save

from .anns import key_file

log = logging.getLogger("soir.datasets")

_ENTRY_KEYS = ("masks_rle", "bboxes", "scores")
# Keys the original code's mask script writes besides ours; they carry nothing SoIR needs.
_ORIGINAL_EXTRA_KEYS = {"image_path", "image_size", "num_objects"}


class CaptionsError(SoIRError):
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


def encode_mask_row_major(mask: np.ndarray) -> dict:
    """[H, W] mask -> the original code's list RLE (row-major runs, starting with a 0-run)."""
    flat = np.asarray(mask, dtype=bool).ravel()
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    runs = np.diff(np.concatenate(([0], change, [flat.size])))
    if flat.size and flat[0]:
        runs = np.concatenate(([0], runs))
    return {"counts": [int(r) for r in runs], "size": [int(s) for s in np.shape(mask)]}


def decode_mask(rle: Mapping[str, Any]) -> np.ndarray:
    """RLE dict -> [H, W] bool mask (either convention of the module docstring)."""
    height, width = (int(s) for s in rle["size"])
    counts = rle["counts"]
    if isinstance(counts, list):
        values = np.arange(len(counts)) % 2 == 1  # 0-run, 1-run, 0-run, ...
        return np.repeat(values, np.asarray(counts, dtype=np.int64)).reshape(height, width)
    raw = counts.encode("utf-8") if isinstance(counts, str) else bytes(counts)
    return mask_utils.decode({"counts": raw, "size": [height, width]}).astype(bool)


def rle_runs(counts: str | bytes) -> np.ndarray:
    """The run lengths stored in a compressed COCO RLE string, int64 [K].

    The format (pycocotools' ``rleFrString``): each count is written in 5-bit groups, low bits
    first, as characters ``48 + group``, with 0x20 meaning "more groups follow" and, in the last
    group, 0x10 the sign bit; from the fourth count on, a count is stored as the difference to the
    count two places before. Raises ValueError for a string that is not such an encoding (bad
    characters, cut off inside a count, a negative or > 32-bit run).
    """
    raw = counts.encode("utf-8") if isinstance(counts, str) else bytes(counts)
    c = np.frombuffer(raw, dtype=np.uint8).astype(np.int64) - 48
    if len(c) == 0:
        return np.zeros(0, dtype=np.int64)
    if c.min() < 0 or c.max() > 63:
        raise ValueError("characters outside the RLE alphabet")
    ends = (c & 0x20) == 0
    if not ends[-1]:
        raise ValueError("the string ends inside a count (truncated?)")
    starts = np.flatnonzero(np.concatenate(([True], ends[:-1])))
    lengths = np.diff(np.concatenate((starts, [len(c)])))
    if lengths.max() > 7:
        raise ValueError("a count longer than 35 bits")
    k = np.arange(len(c)) - np.repeat(starts, lengths)  # group position inside its count
    x = np.add.reduceat((c & 0x1F) << (5 * k), starts)
    last = c[ends]
    x = np.where(last & 0x10, x - (1 << (5 * lengths)), x)  # sign-extend negative deltas
    runs = x.copy()
    if len(x) > 3:
        runs[3::2] = x[1] + np.cumsum(x[3::2])
    if len(x) > 4:
        runs[4::2] = x[2] + np.cumsum(x[4::2])
    if runs.min() < 0 or runs.max() >= 1 << 32:
        raise ValueError("a run length is negative or does not fit 32 bits")
    return runs


@dataclass
class ImageMasks:
    """The masks of one image; ``masks_rle[i]``, ``bboxes[i]`` and ``scores[i]`` describe mask i.

    ``scores`` may be empty when the source had none that line up with the masks.
    ``error``: the image failed in the mask script (no masks). ``made_before_exif``: the masks were
    made on the stored pixels, before EXIF rotation (the original code's format); the pipeline then
    sets ``exif_orientation`` from the image's header and :meth:`masks` turns them like
    ``ImageOps.exif_transpose`` turns the image (1 = as stored).
    """

    masks_rle: list[dict] = field(default_factory=list)
    bboxes: list[list[float]] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    error: str | None = None
    made_before_exif: bool = False
    exif_orientation: int = 1

    def __len__(self) -> int:
        return len(self.masks_rle)

    @property
    def size(self) -> tuple[int, int] | None:
        """(H, W) of the masks as stored, or None when the image has no masks."""
        if not self.masks_rle:
            return None
        height, width = self.masks_rle[0]["size"]
        return int(height), int(width)

    @property
    def upright_size(self) -> tuple[int, int] | None:
        """(H, W) of :meth:`masks`: the stored size, turned by ``exif_orientation``."""
        if self.size is None:
            return None
        return self.size[::-1] if self.exif_orientation in (5, 6, 7, 8) else self.size

    def masks(self) -> np.ndarray:
        """Decoded masks, [P, H, W] bool, upright. With no masks: shape (0, 0, 0)."""
        if not self.masks_rle:
            return np.zeros((0, 0, 0), dtype=bool)
        masks = np.stack([decode_mask(rle) for rle in self.masks_rle])
        if self.exif_orientation != 1:
            method = _EXIF_TRANSPOSE[self.exif_orientation]
            masks = np.stack([np.asarray(Image.fromarray(m).transpose(method)) for m in masks])
        return masks

    def upright(self) -> "ImageMasks":
        """These masks turned by ``exif_orientation`` (compressed RLE, boxes turned alike), as SoIR's
        own format stores them: at the image's size after EXIF rotation."""
        if self.exif_orientation == 1 or not self.masks_rle:
            return replace(self, made_before_exif=False)
        height, width = self.size
        return ImageMasks(
            [encode_mask(m) for m in self.masks()],
            [_turn_box(box, self.exif_orientation, width, height) for box in self.bboxes],
            list(self.scores),
        )

    def select(self, indices: list[int]) -> "ImageMasks":
        """The masks at ``indices`` (their boxes and scores too)."""
        return replace(
            self,
            masks_rle=[self.masks_rle[i] for i in indices],
            bboxes=[self.bboxes[i] for i in indices],
            scores=[self.scores[i] for i in indices] if self.scores else [],
        )

    def to_dict(self) -> dict:
        """Plain-types dict for ``torch.save`` (counts as ``str``, boxes and scores as floats)."""
        return {
            "masks_rle": [
                {"counts": _counts_to_plain(r["counts"]), "size": [int(s) for s in r["size"]]} for r in self.masks_rle
            ],
            "bboxes": [[float(v) for v in box] for box in self.bboxes],
            "scores": [float(s) for s in self.scores],
        }


def _turn_box(box: list[float], orientation: int, width: int, height: int) -> list[float]:
    """A pixel-edge box of a width x height image, turned like the image by EXIF ``orientation``."""
    x1, y1, x2, y2 = box
    return {
        2: [width - x2, y1, width - x1, y2],
        3: [width - x2, height - y2, width - x1, height - y1],
        4: [x1, height - y2, x2, height - y1],
        5: [y1, x1, y2, x2],
        6: [height - y2, x1, height - y1, x2],
        7: [height - y2, width - x2, height - y1, width - x1],
        8: [y1, width - x2, y2, width - x1],
    }[orientation]


# EXIF orientation -> the transpose ImageOps.exif_transpose applies (Pillow's own table).
_EXIF_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def _counts_to_plain(counts: str | bytes | list) -> str | list[int]:
    if isinstance(counts, bytes):
        return counts.decode("utf-8")
    if isinstance(counts, list):
        return [int(c) for c in counts]
    return counts


def validate_entry(entry: Any, where: str, notes: Counter | None = None) -> ImageMasks:
    """Check one ``captions.pt`` value and return it as :class:`ImageMasks`.

    ``where`` (e.g. ``"captions.pt, image 'gallery/a.jpg'"``) prefixes every error message.
    Entries of the original code's format (see the module docstring) are accepted; what was
    adapted is counted in ``notes``.
    """
    notes = Counter() if notes is None else notes
    if isinstance(entry, ImageMasks):
        if entry.error is not None:
            return entry
        return replace(
            validate_entry(entry.to_dict(), where, notes),
            made_before_exif=entry.made_before_exif,
            exif_orientation=entry.exif_orientation,
        )
    if not isinstance(entry, Mapping):
        raise CaptionsError(f"{where}: expected a dict with keys {list(_ENTRY_KEYS)}, got {type(entry).__name__}")
    if set(entry) == {"error"}:
        notes["failed_images"] += 1
        return ImageMasks(error=str(entry["error"]))
    original = bool(_ORIGINAL_EXTRA_KEYS & set(entry))
    missing = [k for k in _ENTRY_KEYS if k not in entry]
    extra = [k for k in entry if k not in _ENTRY_KEYS and k not in _ORIGINAL_EXTRA_KEYS]
    if missing or extra:
        raise CaptionsError(f"{where}: keys must be {list(_ENTRY_KEYS)}; missing {missing}, unexpected {extra}")
    rles, boxes, scores = entry["masks_rle"], entry["bboxes"], entry["scores"]
    for name, value in zip(_ENTRY_KEYS, (rles, boxes, scores)):
        if not isinstance(value, (list, tuple)):
            raise CaptionsError(f"{where}: '{name}' must be a list, got {type(value).__name__}")
    if original and len(scores) != len(rles):
        notes["scores_dropped"] += 1  # the original kept its pre-NMS scores
        scores = []
    if len(rles) != len(boxes) or len(scores) not in (0, len(rles)):
        raise CaptionsError(
            f"{where}: list lengths differ: {len(rles)} masks_rle, {len(boxes)} bboxes, {len(scores)} scores"
        )
    sizes = {_check_rle(rle, f"{where}, mask {i}") for i, rle in enumerate(rles)}
    if len(sizes) > 1:
        raise CaptionsError(f"{where}: masks have different sizes {sorted(sizes)}")
    boxes = [_check_box(box, f"{where}, bbox {i}") for i, box in enumerate(boxes)]
    if original and sizes:
        height, width = next(iter(sizes))
        clipped = [
            [min(max(x1, 0.0), width), min(max(y1, 0.0), height), min(max(x2, 0.0), width), min(max(y2, 0.0), height)]
            for x1, y1, x2, y2 in boxes
        ]
        notes["boxes_clipped"] += sum(a != b for a, b in zip(clipped, boxes))
        boxes = clipped
    for i, score in enumerate(scores):
        if not _is_number(score):
            raise CaptionsError(f"{where}, score {i}: expected a number, got {score!r}")
    notes["original_format_entries"] += original
    return ImageMasks(
        masks_rle=[{"counts": r["counts"], "size": [int(s) for s in r["size"]]} for r in rles],
        bboxes=boxes,
        scores=[float(s) for s in scores],
        made_before_exif=original,
    )


def without_original_masks(captions: dict[str, ImageMasks], source: str) -> dict[str, ImageMasks]:
    """``masks_rle=ignore`` (compat=original): ``captions`` with the masks of every entry in the original
    code's format (its ``segmentation_results.pt``) removed, as its extractors never read them: they look
    for ``masks``, ``mask``, ``rle`` or ``bbox`` (original ``extractors/dinov2_extractor.py:261-311``,
    ``siglip_extractor.py:205``, ``extractors/mi/engine.py:811``) and fall back to one full-image mask.
    Logged as a warning with the count: Mask Inversion then ignores every object mask of those images."""
    dropped = [key for key, masks in captions.items() if masks.made_before_exif and len(masks)]
    if dropped:
        log.warning(
            "masks_rle=ignore (compat=original): the masks of %d images in %s (the original mask script's "
            "format) are NOT used, as the original's extractors never read masks_rle: every one of these "
            "images gets one full-image mask, so Mask Inversion ignores every object mask. Use "
            "masks_rle=read for per-object vectors",
            len(dropped),
            source,
        )
    return {key: ImageMasks() if key in dropped else masks for key, masks in captions.items()}


def _is_number(value: Any) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool) and np.isfinite(float(value))


def _check_rle(rle: Any, where: str) -> tuple[int, int]:
    """(H, W) of a valid RLE; raises CaptionsError unless its runs are non-negative and sum to H*W."""
    if not isinstance(rle, Mapping) or set(rle) != {"counts", "size"}:
        raise CaptionsError(f"{where}: RLE must be a dict with keys 'counts' and 'size', got {rle!r:.80}")
    size = rle["size"]
    if (
        not isinstance(size, (list, tuple))
        or len(size) != 2
        or not all(isinstance(s, Integral) and not isinstance(s, bool) and s >= 0 for s in size)
    ):
        raise CaptionsError(f"{where}: 'size' must be [H, W] non-negative ints, got {size!r}")
    counts = rle["counts"]
    if isinstance(counts, list):
        if not all(isinstance(c, Integral) and not isinstance(c, bool) and c >= 0 for c in counts):
            raise CaptionsError(f"{where}: list 'counts' must be non-negative ints")
        total = sum(counts)
    elif isinstance(counts, (str, bytes)):
        try:
            total = int(rle_runs(counts).sum())
        except ValueError as err:
            raise CaptionsError(f"{where}: 'counts' is not a valid compressed RLE ({err})") from None
    else:
        raise CaptionsError(f"{where}: 'counts' must be str, bytes or a list of ints, got {type(counts).__name__}")
    if total != size[0] * size[1]:
        raise CaptionsError(
            f"{where}: 'counts' sum to {total}, expected H*W = {size[0] * size[1]} for size "
            f"{list(size)} (truncated counts or an edited size?)"
        )
    return int(size[0]), int(size[1])


def _check_box(box: Any, where: str) -> list[float]:
    if not isinstance(box, (list, tuple)) or len(box) != 4 or not all(_is_number(v) for v in box):
        raise CaptionsError(f"{where}: expected [x1, y1, x2, y2] of 4 numbers, got {box!r}")
    x1, y1, x2, y2 = (float(v) for v in box)
    if x1 > x2 or y1 > y2:
        raise CaptionsError(f"{where}: need x1 <= x2 and y1 <= y2, got {box!r}")
    return [x1, y1, x2, y2]


def load_captions(path: str | Path) -> dict[str, ImageMasks]:
    """Read and validate ``captions.pt`` (or the original code's ``segmentation_results.pt``)
    -> {image_key: ImageMasks}. Raises CaptionsError; logs what was adapted from the original format."""
    path = Path(path)
    if not path.is_file():
        raise CaptionsError(f"captions file '{path}' does not exist")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # unpickling errors come in many types; all mean "not a captions file"
        raise CaptionsError(f"captions file '{path}' could not be loaded: {type(err).__name__}: {err}") from err
    if not isinstance(raw, Mapping):
        raise CaptionsError(f"captions file '{path}': top level must be a dict, got {type(raw).__name__}")
    captions, notes = {}, Counter()
    for key, entry in raw.items():
        if not isinstance(key, str):
            raise CaptionsError(f"captions file '{path}': keys must be str, got {key!r}")
        captions[key] = validate_entry(entry, f"captions file '{path}', image '{key}'", notes)
    if notes["original_format_entries"] or notes["failed_images"]:
        log.warning(
            "%s is in the original code's format: %d entries; %d failed images ({'error': ...}, "
            "treated as images without masks); %d score lists dropped (their length differs from "
            "the masks); %d boxes clipped to the mask",
            path,
            notes["original_format_entries"],
            notes["failed_images"],
            notes["scores_dropped"],
            notes["boxes_clipped"],
        )
    return captions


def save_captions(captions: Mapping[str, ImageMasks | Mapping], path: str | Path) -> Path:
    """Validate and write ``captions`` atomically (temp file in the same folder, then os.replace).

    Only plain dicts/lists/str/float are saved, so :func:`load_captions` works with
    ``weights_only=True``. Bytes counts are stored as str; failed images are not saved.
    """
    path = Path(path)
    plain = {}
    for key, entry in captions.items():
        if not isinstance(key, str):
            raise CaptionsError(f"saving '{path}': keys must be str, got {key!r}")
        masks = validate_entry(entry, f"saving '{path}', image '{key}'")
        if masks.error is None:
            plain[key] = masks.to_dict()
    return atomic_torch_save(plain, path)


def find_masks(captions: Mapping[str, ImageMasks], key: str, file: str | Path) -> ImageMasks | None:
    """Masks of one image: by its ``anns.pt`` key first, then by its resolved absolute path."""
    if key in captions:
        return captions[key]
    return captions.get(str(Path(file).resolve()))


def caption_files(captions: Mapping[str, ImageMasks], root: str | Path) -> dict[str, str]:
    """{real path of the file each key names: key}, relative keys resolved against ``root`` as
    ``load_anns`` resolves anns keys (:func:`datasets.anns.key_file`). Looked up with the real path
    of an image, so ``./g/x.jpg``, its absolute path and a symlink to it all find the entry of
    ``g/x.jpg`` (notebooks: ``Extractor(captions_file=...)``, whose ``root`` is that file's folder)."""
    return {os.path.realpath(key_file(key, Path(root))): key for key in captions}
