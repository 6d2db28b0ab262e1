"""VoxDet-SoIR ``anns.pt`` entries, read as the authors' builder writes them.

The builder (repository ``pihash2k/VoxDet-SoIR``, ``create_dataset.py``; images and annotations
from VoxDet, ``Jaraxxus-Me/VoxDet``) writes one entry per image, keyed by ``str(image path)``::

    query:   {"bbox": (x1, y1, x2, y2), "mask": RLE, "is_query": True, "ins": id, "set": name}
    gallery: {"bbox": [(x1, y1, x2, y2), ...], "mask": [segmentation, ...] or [],
              "ins": [id, ...], "num_ins": [n, ...] or [], "is_query": False, "set": name}

with ``set`` "OWID" (synthetic: queries ``OWID/P1/<id>/rgb/*``, gallery ``OWID/P2/images/*``) or
"RoboTools" (real: queries ``RoboTools/test_video/<name>_<id>/rgb/*``, gallery ``RoboTools/test/...``).
The first released version also wrote ``is_val`` (bool). Conventions, as the builder computes them:

* query ``bbox``: the tight box of the query mask with **inclusive** ends (``x2`` is the last
  column of the object, not one past it); for an empty mask the builder writes ``(0, 0, W, H)``.
  :func:`parse_voxdet_entry` converts it to SoIR's pixel-edge box ``(x1, y1, x2 + 1, y2 + 1)``
  (the empty-mask marker becomes the whole image ``(0, 0, W, H)``).
* query ``mask``: a VoxDet-SoIR ``RLE.py`` dict (see :mod:`datasets.rle`), decoded with the
  builder's own decoder; a mask whose top-left pixel is 1 is read inverted by that decoder and is
  recognised by its box (:func:`datasets.rle.voxdet_decode_with_box`).
* gallery ``bbox``: COCO ``[x, y, w, h]`` turned into ``(x, y, x + w, y + h)``: pixel edges already.
  One box per annotated object, parallel to ``ins``.
* gallery ``mask``: OWID: the COCO ``segmentation`` of each object from the OWID json (polygons
  ``[[x, y, ...], ...]`` or an RLE dict, counts list or str; ``[]`` when the json has none), decoded
  with pycocotools; RoboTools: ``[]`` (boxes only).
* ``num_ins`` (OWID json's per-object ``num_ins``) and ``is_val`` are checked and not used.

The parsed entry is an ordinary :class:`datasets.anns.Annotation`: queries keep their box as
``bbox``; every object's box goes to ``boxes`` and its mask (when there is one) to ``masks``.
"""

from __future__ import annotations

from dataclasses import dataclass
from numbers import Integral, Real
from typing import Any, Mapping

import numpy as np
import torch
from pycocotools import mask as mask_utils

from .fields import AnnotationError, parse_bbox, scalar
from .rle import voxdet_decode_with_box, voxdet_shape

VOXDET_KEYS = {"bbox", "mask", "is_query", "ins", "set", "num_ins", "is_val"}
_REQUIRED = ("bbox", "mask", "is_query", "ins")


@dataclass(frozen=True)
class AnnotatedMask:
    """One object's mask as the anns file stores it; decoded on demand by :func:`decode_annotated_mask`.

    ``encoding``: ``"voxdet_rle"`` (a VoxDet-SoIR ``RLE.py`` dict) or ``"coco"`` (a COCO
    ``segmentation``: polygon list or RLE dict). ``box``: the object's annotated box, pixel edges;
    None for the VoxDet builder's marker of an empty query mask (its bbox ``(0, 0, W, H)``).
    """

    encoding: str
    data: Any
    box: tuple[float, float, float, float] | None


def is_voxdet_entry(entry: Mapping) -> bool:
    """True for an entry written by VoxDet-SoIR's builder: it always writes a ``mask`` key."""
    return "mask" in entry or "num_ins" in entry


def parse_voxdet_entry(entry: Mapping, where: str) -> tuple[dict, dict]:
    """Split a VoxDet-SoIR entry into a plain anns entry and the extra :class:`Annotation` fields.

    Returns ``(plain, extra)``: ``plain`` has ``ins``, ``is_query``, ``set`` and, for a query, its
    ``bbox`` in pixel edges, for :func:`datasets.anns._parse_entry` to validate as any entry;
    ``extra`` = ``{"boxes": (...), "masks": (...)}``. ``where`` prefixes every error.

    Raises:
        AnnotationError: unknown or missing keys, or values that do not have the builder's shapes.
    """
    unknown = set(entry) - VOXDET_KEYS
    missing = [k for k in _REQUIRED if k not in entry]
    if unknown or missing:
        raise AnnotationError(
            f"{where}: a VoxDet-SoIR entry has keys {sorted(VOXDET_KEYS)}; unknown "
            f"{sorted(map(str, unknown))}, missing {missing}"
        )
    if "is_val" in entry and not isinstance(scalar(entry["is_val"]), (bool, np.bool_)):
        raise AnnotationError(f"{where}: 'is_val' must be a bool, got {entry['is_val']!r}")
    plain = {k: entry[k] for k in ("ins", "is_query", "set") if k in entry}
    is_query = scalar(entry["is_query"])
    if isinstance(is_query, str) or is_query not in (0, 1):
        raise AnnotationError(f"{where}: 'is_query' must be a bool, got {entry['is_query']!r}")
    try:
        if is_query:
            box, mask = _query(entry, where)
            plain["bbox"] = box
            return plain, {"boxes": (box,), "masks": (mask,)}
        boxes, masks = _gallery(entry, where)
    except (TypeError, ValueError) as err:
        if isinstance(err, AnnotationError):
            raise
        raise AnnotationError(f"{where}: {err}") from None
    return plain, {"boxes": boxes, "masks": masks}


def _query(entry: Mapping, where: str) -> tuple[tuple, AnnotatedMask]:
    rle = entry["mask"]
    if not isinstance(rle, Mapping) or not {"counts", "size"} <= set(rle) or set(rle) - {"counts", "size", "transpose"}:
        raise ValueError(f"query 'mask' must be a VoxDet RLE dict {{counts, size[, transpose]}}, got {rle!r:.80}")
    if "transpose" in rle and not isinstance(scalar(rle["transpose"]), (bool, np.bool_)):
        raise ValueError(f"'mask' 'transpose' must be a bool, got {rle['transpose']!r}")
    if not isinstance(rle["counts"], (list, tuple)) or not all(_is_int(c) and c >= 0 for c in rle["counts"]):
        raise ValueError("'mask' 'counts' must be a list of non-negative ints (run lengths)")
    height, width = voxdet_shape(rle)
    if sum(int(c) for c in rle["counts"]) != height * width:
        raise ValueError(f"'mask' counts sum to {sum(int(c) for c in rle['counts'])}, size says {height * width}")
    raw = _numbers(entry["bbox"], "query 'bbox'")
    if raw == [0.0, 0.0, float(width), float(height)]:  # the builder's box of an empty mask
        return (0.0, 0.0, float(width), float(height)), AnnotatedMask("voxdet_rle", dict(rle), None)
    box = parse_bbox([raw[0], raw[1], raw[2] + 1, raw[3] + 1], f"{where}: query 'bbox' {tuple(raw)} (inclusive ends)")
    return box, AnnotatedMask("voxdet_rle", dict(rle), box)


def _gallery(entry: Mapping, where: str) -> tuple[tuple, tuple]:
    raw_boxes, ins, segs = entry["bbox"], entry["ins"], entry["mask"]
    if not isinstance(raw_boxes, (list, tuple)) or not all(
        isinstance(b, (list, tuple, np.ndarray, torch.Tensor)) for b in raw_boxes
    ):
        raise ValueError(f"gallery 'bbox' must be a list of boxes (x1, y1, x2, y2), got {raw_boxes!r:.80}")
    boxes = tuple(parse_bbox(b, f"{where}: gallery 'bbox' {i}") for i, b in enumerate(raw_boxes))
    if not isinstance(ins, (list, tuple)) or len(ins) != len(boxes):
        raise ValueError(f"gallery 'ins' must be a list with one id per box ({len(boxes)}), got {ins!r:.80}")
    for name in ("mask", "num_ins"):
        value = entry.get(name, [])
        if not isinstance(value, (list, tuple)) or len(value) not in (0, len(boxes)):
            raise ValueError(
                f"gallery '{name}' must be [] or a list with one item per box ({len(boxes)}), "
                f"got {len(value) if isinstance(value, (list, tuple)) else type(value).__name__}"
            )
    if not all(_is_int(n) for n in entry.get("num_ins", [])):
        raise ValueError("gallery 'num_ins' must hold ints")
    masks = tuple(
        None if _is_empty_segmentation(seg) else AnnotatedMask("coco", _check_coco(seg, i), box)
        for i, (seg, box) in enumerate(zip(segs, boxes))
    )
    return boxes, masks


def _check_coco(seg: Any, i: int) -> Any:
    """A COCO segmentation: polygons [[x, y, x, y, ...], ...] or an RLE dict {counts, size}."""
    if isinstance(seg, Mapping):
        size, counts = seg.get("size"), seg.get("counts")
        if (
            not isinstance(size, (list, tuple))
            or len(size) != 2
            or not all(_is_int(s) and s > 0 for s in size)
            or not (isinstance(counts, (str, bytes)) or isinstance(counts, list) and all(_is_int(c) for c in counts))
        ):
            raise ValueError(f"gallery 'mask' {i}: a COCO RLE needs 'size' [H, W] and 'counts' (str or list)")
        return seg
    if isinstance(seg, (list, tuple)) and all(
        isinstance(p, (list, tuple)) and len(p) >= 6 and len(p) % 2 == 0 and all(_is_number(v) for v in p) for p in seg
    ):
        return seg
    raise ValueError(
        f"gallery 'mask' {i}: expected COCO polygons [[x, y, ...], ...] (at least 3 points "
        f"each) or an RLE dict, got {seg!r:.80}"
    )


def decode_annotated_mask(mask: AnnotatedMask, height: int, width: int) -> tuple[np.ndarray, bool]:
    """[height, width] bool mask of one annotated object; returns ``(mask, complemented)``.

    ``complemented`` is True when a VoxDet RLE had to be complemented to fit its box (the decoder's
    top-left-1 inversion, see :mod:`datasets.rle`). COCO polygons are drawn at (height, width).

    Raises:
        ValueError: the mask's size is not (height, width), or a VoxDet mask fits neither its box
            nor as complement.
    """
    if mask.encoding == "voxdet_rle":
        if voxdet_shape(mask.data) != (height, width):
            raise ValueError(f"mask is {voxdet_shape(mask.data)} (H, W), the image {(height, width)}")
        if mask.box is None:  # the builder's empty mask: counts [H * W]
            if len(mask.data["counts"]) != 1:
                raise ValueError("the bbox (0, 0, W, H) marks an empty mask, but the mask has several runs")
            return np.zeros((height, width), dtype=bool), False
        return voxdet_decode_with_box(mask.data, mask.box)
    if mask.encoding != "coco":
        raise ValueError(f"unknown mask encoding {mask.encoding!r}")
    seg = mask.data
    if isinstance(seg, Mapping):
        if tuple(int(s) for s in seg["size"]) != (height, width):
            raise ValueError(f"mask is {tuple(seg['size'])} (H, W), the image {(height, width)}")
        counts = seg["counts"]
        rle = (
            mask_utils.frPyObjects({"counts": list(counts), "size": [height, width]}, height, width)
            if isinstance(counts, list)
            else {"counts": counts.encode() if isinstance(counts, str) else counts, "size": [height, width]}
        )
    else:
        rle = mask_utils.merge(mask_utils.frPyObjects([list(map(float, p)) for p in seg], height, width))
    return mask_utils.decode(rle).astype(bool), False


def _is_empty_segmentation(seg: Any) -> bool:
    return isinstance(seg, (list, tuple)) and len(seg) == 0


def _is_int(value: Any) -> bool:
    value = scalar(value)
    return isinstance(value, Integral) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    value = scalar(value)
    return isinstance(value, Real) and not isinstance(value, bool) and np.isfinite(float(value))


def _numbers(value: Any, what: str) -> list[float]:
    if isinstance(value, (torch.Tensor, np.ndarray)):
        value = value.tolist()
    if not isinstance(value, (list, tuple)) or len(value) != 4 or not all(_is_number(v) for v in value):
        raise ValueError(f"{what} must be 4 numbers (x1, y1, x2, y2), got {value!r}")
    return [float(scalar(v)) for v in value]
