"""Run-length encodings (RLE) of binary masks that SoIR reads, one function per convention.

Three conventions meet in SoIR's inputs. They differ in pixel order, in what the first run counts and
in the meaning of ``size``, so a mask decoded with the wrong one comes out inverted, transposed or
scrambled without any error. Each convention therefore has functions of its own, named after it:

========================  =========================================  =============  ==================
convention                where it occurs                            pixel order    first run
========================  =========================================  =============  ==================
COCO / pycocotools        ``captions.pt`` counts as ``str``/``bytes``  column-major   0s (may be empty)
                          (:func:`datasets.captions.encode_mask` /
                          ``decode_mask``); COCO ``segmentation``
SoIR original list RLE    ``captions.pt`` counts as a list of ints     row-major      0s (may be empty)
                          (``datasets.captions.decode_mask``)
VoxDet-SoIR ``RLE.py``    ``anns.pt`` ``mask`` of VoxDet-SoIR          see below      see below
                          queries (:func:`voxdet_encode`,
                          :func:`voxdet_decode`,
                          :func:`voxdet_decode_with_box`)
========================  =========================================  =============  ==================

VoxDet-SoIR (repository ``pihash2k/VoxDet-SoIR``, ``RLE.py``, used by ``create_dataset.py``) writes
``{"counts": [run lengths], "size": (H, W), "transpose": False}``:

* encoder: the runs of equal values of ``mask.flatten()`` (row-major), in order, **the first run
  being of the first pixel's value**: a mask whose top-left pixel is 1 starts with its 1-run (no
  0-length run is inserted). ``size`` is the mask's (H, W).
* decoder: run ``i`` is filled with ``i % 2``, i.e. the first run is always read as 0s. A mask whose
  top-left pixel is 1 is therefore read back **inverted** (its complement). The decoder reshapes to
  ``size`` row-major and, when the dict has a ``transpose`` key, transposes iff it is true; a dict
  **without** ``transpose`` is transposed: ``runs.reshape(size).T`` (shape ``(size[1], size[0])``).

:func:`voxdet_decode` reproduces that decoder exactly, inversion included. The inversion cannot be
seen in the counts (a mask and its complement have the same runs), so :func:`voxdet_decode_with_box`
tells them apart with the object's annotated box: it returns the complement when the complement's
tight box is the annotated box and the decoded mask's is not.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from .fields import bbox_from_mask


def voxdet_encode(mask: np.ndarray) -> dict:
    """[H, W] 0/1 or bool mask -> ``{"counts": list[int], "size": (H, W), "transpose": False}`` exactly
    as VoxDet-SoIR's ``RLE.py`` encoder writes it: row-major runs, the first run of the first pixel's value.
    """
    mask = np.asarray(mask)
    if mask.ndim != 2 or mask.size == 0:
        raise ValueError(f"voxdet_encode expects a non-empty [H, W] mask, got shape {mask.shape}")
    flat = mask.reshape(-1)
    starts = np.concatenate([[0], np.flatnonzero(flat[1:] != flat[:-1]) + 1, [flat.size]])
    return {"counts": np.diff(starts).tolist(), "size": (int(mask.shape[0]), int(mask.shape[1])), "transpose": False}


def voxdet_decode(rle: Mapping[str, Any]) -> np.ndarray:
    """VoxDet-SoIR RLE dict -> bool mask, exactly as its ``RLE.py`` decoder reads it.

    Run ``i`` holds ``i % 2`` (the first run is read as 0s, so a mask encoded from a top-left 1 comes
    back inverted); the runs fill ``size = (a, b)`` row-major; the result is that ``[a, b]`` array, or
    its transpose ``[b, a]`` when ``rle["transpose"]`` is true or the key is absent.

    Raises:
        ValueError: counts that are not non-negative ints summing to ``a * b``, or a bad ``size``.
    """
    rows, cols = _size(rle)
    counts = np.asarray(rle["counts"], dtype=np.int64)
    if counts.ndim != 1 or (counts < 0).any() or int(counts.sum()) != rows * cols:
        raise ValueError(
            f"VoxDet RLE counts must be non-negative and sum to {rows}*{cols} = {rows * cols}, "
            f"got {len(counts)} runs summing to {int(counts.sum()) if counts.ndim == 1 else '?'}"
        )
    values = np.arange(len(counts)) % 2 == 1
    mask = np.repeat(values, counts).reshape(rows, cols)
    return mask.T if rle.get("transpose", True) else mask


def voxdet_decode_with_box(rle: Mapping[str, Any], box: Sequence[float]) -> tuple[np.ndarray, bool]:
    """:func:`voxdet_decode`, with the top-left-1 inversion undone using the object's box.

    ``box`` is the object's tight box in pixel-edge coordinates ``[x1, y1, x2, y2]`` (x2, y2
    exclusive, as :func:`datasets.fields.bbox_from_mask`). Returns ``(mask, complemented)``: the
    decoded mask when its tight box is ``box``; else its complement (``complemented=True``) when the
    complement's tight box is ``box``.

    Raises:
        ValueError: neither the decoded mask nor its complement has ``box`` as tight box (the mask
            and the box describe different objects, or the mask is not in this convention).
    """
    decoded = voxdet_decode(rle)
    wanted = [float(v) for v in box]
    if _tight_box(decoded) == wanted:
        return decoded, False
    complement = ~decoded
    if _tight_box(complement) == wanted:
        return complement, True
    raise ValueError(
        f"neither the decoded mask (box {_tight_box(decoded)}) nor its complement "
        f"(box {_tight_box(complement)}) has the annotated box {wanted}"
    )


def voxdet_shape(rle: Mapping[str, Any]) -> tuple[int, int]:
    """(H, W) of the mask :func:`voxdet_decode` returns for ``rle`` (without decoding it)."""
    rows, cols = _size(rle)
    return (cols, rows) if rle.get("transpose", True) else (rows, cols)


def _size(rle: Mapping[str, Any]) -> tuple[int, int]:
    size = rle.get("size")
    if (
        not isinstance(size, (list, tuple))
        or len(size) != 2
        or not all(isinstance(s, (int, np.integer)) and not isinstance(s, bool) and s > 0 for s in size)
    ):
        raise ValueError(f"VoxDet RLE 'size' must be 2 positive ints, got {size!r}")
    return int(size[0]), int(size[1])


def _tight_box(mask: np.ndarray) -> list[float] | None:
    return bbox_from_mask(mask) if mask.any() else None
