"""Checks of single annotation fields, below both annotation readers so that neither imports the other:
the error the anns reader (anns.py) and the VoxDet-SoIR reader (voxdet.py, which anns.py calls) raise,
scalars as Python numbers, boxes (``parse_bbox``), and a mask's box (``bbox_from_mask``, for rle.py and
gt_masks.py)."""

from __future__ import annotations

import math
from numbers import Real
from typing import Any

import numpy as np
import torch

from utils.errors import SoIRError


class AnnotationError(SoIRError):
    """Malformed annotation; the message names the anns file (or image) and the problem."""


def scalar(value: Any) -> Any:
    """0-d torch tensor / numpy scalar -> Python scalar; anything else unchanged."""
    if isinstance(value, torch.Tensor):
        return value.item() if value.ndim == 0 else value
    if isinstance(value, np.generic):
        return value.item()
    return value


def parse_bbox(value: Any, where: str) -> tuple[float, float, float, float]:
    """Validate an annotation box: 4 finite numbers, non-negative, x2 > x1, y2 > y1.

    ``where`` prefixes the AnnotationError message.
    """
    if isinstance(value, (torch.Tensor, np.ndarray)):
        value = value.tolist()
    if not isinstance(value, (list, tuple)) or len(value) != 4:
        raise AnnotationError(f"{where} must be [x1, y1, x2, y2], got {value!r}")
    numbers = [scalar(v) for v in value]
    if not all(isinstance(v, Real) and not isinstance(v, bool) and math.isfinite(v) for v in numbers):
        raise AnnotationError(f"{where} must be 4 finite numbers, got {value!r}")
    x1, y1, x2, y2 = (float(v) for v in numbers)
    if min(x1, y1, x2, y2) < 0:
        raise AnnotationError(f"{where} has negative coordinates: {value!r}")
    if x2 <= x1 or y2 <= y1:
        raise AnnotationError(f"{where} is empty or inverted (need x2 > x1 and y2 > y1): {value!r}")
    return x1, y1, x2, y2


def bbox_from_mask(mask: np.ndarray) -> list[float]:
    """Tight pixel-edge box ``[x1, y1, x2, y2]`` of an [H, W] mask (x2, y2 exclusive).

    Raises ValueError for an empty mask (it has no box).
    """
    ys, xs = np.nonzero(np.asarray(mask))
    if len(xs) == 0:
        raise ValueError("empty mask has no bounding box")
    return [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]
