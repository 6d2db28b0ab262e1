"""``anns.pt``: which image is a query, which instance each image shows, and query boxes.

File format (a ``torch.save``'d dict, loaded with ``weights_only=True``)::

    {path: {"ins": int | list[int],         # instance id(s) shown in the image
            "is_query": bool,
            "bbox": [x1, y1, x2, y2],       # optional; pixel-edge coords of the object (queries)
            "obj_name": str,                # optional; human-readable instance name
            "set": str}}                    # optional; the split the image belongs to (config key `set`)

A gallery image may show several instances (``ins`` a list); a gallery distractor shows
none (``ins: []``). A query shows exactly one instance. ``path`` is absolute or relative to
``queries_dir`` / ``galleries_dir`` (when given) or else to the folder of ``anns.pt``.
Boxes use pixel-edge coordinates as ``PIL.Image.crop``: columns 3..5 are ``x1 = 3, x2 = 6``.
Files written by VoxDet-SoIR's builder (per-object box lists, masks, ``num_ins``) are read as they
are by :mod:`datasets.voxdet`.
"""

from __future__ import annotations

import logging
import math
import os
import pickle
from dataclasses import dataclass, replace
from numbers import Integral, Real
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image

from utils.files import atomic_torch_save

from .fields import AnnotationError, parse_bbox, scalar
from .voxdet import is_voxdet_entry, parse_voxdet_entry

logger = logging.getLogger("soir.datasets")

_KNOWN_KEYS = {"ins", "is_query", "bbox", "obj_name", "set"}
_MAX_LISTED = 10

# numpy integer/bool scalars are pickled as numpy._core.multiarray.scalar(dtype, raw bytes).
# Allowing exactly these dtypes keeps weights_only safe (no object dtype) while accepting
# anns files written with np.int64 instance ids.
_NUMPY_SCALAR_GLOBALS = [np.dtype, np.dtypes.BoolDType] + [
    type(np.dtype(t)) for t in (np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64)
]
try:
    _NUMPY_SCALAR_GLOBALS.append(np._core.multiarray.scalar)  # numpy >= 2
except AttributeError:  # pragma: no cover - numpy 1.x
    _NUMPY_SCALAR_GLOBALS.append(np.core.multiarray.scalar)


@dataclass(frozen=True)
class Annotation:
    """One image of the benchmark. ``file`` is the resolved path, ``key`` the anns.pt key."""

    key: str
    file: Path
    ins: tuple[int, ...]
    is_query: bool
    bbox: tuple[float, float, float, float] | None = None
    obj_name: str | None = None
    set: str | None = None  # split name, e.g. VoxDet-SoIR "RoboTools"
    boxes: tuple[tuple[float, float, float, float], ...] = ()  # every annotated object's box (VoxDet-SoIR)
    masks: tuple = ()  # the objects' own masks, parallel to boxes or empty: datasets.voxdet.AnnotatedMask | None


def load_anns(
    anns_file: str | Path,
    galleries_dir: str | Path | None = None,
    queries_dir: str | Path | None = None,
    check_files: bool = True,
    duplicates: str = "error",
) -> list[Annotation]:
    """Read and validate ``anns.pt``; returns annotations sorted by key.

    Two keys of one split that name the same file (``./g/x.jpg`` and ``g/x.jpg``, a relative and an
    absolute path, a symlink and its target) would make one image count twice. They are an error
    (``duplicates="error"``) or, with ``duplicates="merge"``, kept once (the first key in sorted
    order) when their annotations agree (logged with the count); annotations that disagree are
    always an error.

    Raises:
        AnnotationError: unreadable file, malformed entry, duplicate files, or (``check_files``)
            image files that do not exist (the first 10 are listed, with the total count).
    """
    anns_file = Path(anns_file)
    raw = _torch_load(anns_file)
    if not isinstance(raw, dict):
        raise AnnotationError(f"anns file '{anns_file}': top level must be a dict, got {type(raw).__name__}")
    default_dir = anns_file.resolve().parent
    annotations = []
    for key in sorted(raw, key=str):
        where = f"anns file '{anns_file}', entry {key!r}"
        if not isinstance(key, str):
            raise AnnotationError(f"{where}: keys must be str paths, got {type(key).__name__}")
        ann = _parse_entry(key, raw[key], where)
        base = queries_dir if ann.is_query else galleries_dir
        ann = replace(ann, file=key_file(key, Path(base or default_dir)))
        annotations.append(ann)
    if check_files:
        missing = [a for a in annotations if not a.file.is_file()]
        if missing:
            listed = "\n  ".join(f"{a.key} -> {a.file}" for a in missing[:_MAX_LISTED])
            raise AnnotationError(
                f"anns file '{anns_file}': {len(missing)} of {len(annotations)} "
                f"image files do not exist, e.g.:\n  {listed}"
            )
    return _drop_duplicates(annotations, duplicates, anns_file)


def key_file(key: str, root: Path) -> Path:
    """The file an ``anns.pt`` / ``captions.pt`` key names: an absolute key is the path itself; a
    relative one is relative to ``root`` (the anns file's folder, ``galleries_dir`` / ``queries_dir``),
    not to the working directory, so a folder of inputs can be moved and run from anywhere."""
    return Path(key) if Path(key).is_absolute() else root / key


def _drop_duplicates(annotations: list[Annotation], policy: str, anns_file: Path) -> list[Annotation]:
    """See :func:`load_anns`: keys of one split resolving to the same real file."""
    if policy not in ("error", "merge"):
        raise ValueError(f"duplicates must be 'error' or 'merge', got {policy!r}")
    first: dict[tuple[bool, str], Annotation] = {}
    groups: dict[tuple[bool, str], list[Annotation]] = {}
    for ann in annotations:
        real = (ann.is_query, os.path.realpath(ann.file))
        first.setdefault(real, ann)
        groups.setdefault(real, []).append(ann)
    repeated = [group for group in groups.values() if len(group) > 1]
    if not repeated:
        return annotations
    listed = "; ".join(" = ".join(a.key for a in group) for group in repeated[:_MAX_LISTED])
    conflicting = [g for g in repeated if len({(a.ins, a.bbox, a.obj_name) for a in g}) > 1]
    if policy == "error" or conflicting:
        why = (
            f"with different annotations ({' = '.join(a.key for a in conflicting[0])})"
            if conflicting
            else "(set duplicates=merge to keep each file once)"
        )
        raise AnnotationError(
            f"anns file '{anns_file}': {len(repeated)} files are listed under several keys {why}: {listed}"
        )
    logger.warning(
        "duplicates=merge: %d files were listed under several keys with the same annotation; "
        "each is kept once under its first key: %s",
        len(repeated),
        listed,
    )
    kept = {id(ann) for ann in first.values()}
    return [ann for ann in annotations if id(ann) in kept]


def save_anns(anns: dict[str, dict], path: str | Path) -> Path:
    """Validate every entry (as :func:`load_anns` would, without file checks) and write
    ``anns.pt`` atomically."""
    path = Path(path)
    for key, entry in anns.items():
        if not isinstance(key, str):
            raise AnnotationError(f"saving '{path}': keys must be str paths, got {key!r}")
        _parse_entry(key, entry, f"saving '{path}', entry {key!r}")
    return atomic_torch_save(dict(anns), path)


def _torch_load(anns_file: Path) -> Any:
    if not anns_file.is_file():
        raise AnnotationError(f"anns file '{anns_file}' does not exist")
    try:
        with torch.serialization.safe_globals(_NUMPY_SCALAR_GLOBALS):
            return torch.load(anns_file, map_location="cpu", weights_only=True)
    except Exception as err:  # unpickling errors come in many types; all mean "not an anns file"
        raise AnnotationError(f"anns file '{anns_file}' could not be loaded: {type(err).__name__}: {err}") from err


def _parse_entry(key: str, entry: Any, where: str) -> Annotation:
    """Validated Annotation with ``file = Path(key)`` (resolved by the caller)."""
    if not isinstance(entry, dict):
        raise AnnotationError(f"{where}: expected a dict, got {type(entry).__name__}")
    entry, extra = parse_voxdet_entry(entry, where) if is_voxdet_entry(entry) else (entry, {})
    unknown = set(entry) - _KNOWN_KEYS
    if unknown:
        raise AnnotationError(f"{where}: unknown keys {sorted(map(str, unknown))}; allowed {sorted(_KNOWN_KEYS)}")
    if "is_query" not in entry:
        raise AnnotationError(f"{where}: missing 'is_query'")
    is_query = _as_bool(entry["is_query"], f"{where}: 'is_query'")
    if "ins" not in entry:
        raise AnnotationError(f"{where}: missing 'ins'")
    ins = _as_ins(entry["ins"], f"{where}: 'ins'")
    if is_query and len(ins) != 1:
        raise AnnotationError(f"{where}: a query must show exactly one instance, got ins={list(ins)}")
    bbox = entry.get("bbox")
    if bbox is not None:
        bbox = parse_bbox(bbox, f"{where}: 'bbox'")
    obj_name = entry.get("obj_name")
    if obj_name is not None and not isinstance(obj_name, str):
        raise AnnotationError(f"{where}: 'obj_name' must be str, got {type(obj_name).__name__}")
    set_name = entry.get("set")
    if set_name is not None and not isinstance(set_name, str):
        raise AnnotationError(f"{where}: 'set' must be str, got {type(set_name).__name__}")
    return Annotation(
        key=key, file=Path(key), ins=ins, is_query=is_query, bbox=bbox, obj_name=obj_name, set=set_name, **extra
    )


def _as_bool(value: Any, where: str) -> bool:
    """A bool, or the integers 0 / 1 that files written by other tools often use."""
    value = scalar(value)
    if isinstance(value, Integral) and not isinstance(value, bool) and value in (0, 1):
        return bool(value)
    if not isinstance(value, bool):
        raise AnnotationError(f"{where} must be a bool (or 0 / 1), got {value!r}")
    return value


def _as_int(value: Any, where: str) -> int:
    value = scalar(value)
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise AnnotationError(f"{where} must hold ints, got {value!r} ({type(value).__name__})")
    return int(value)


def _as_ins(value: Any, where: str) -> tuple[int, ...]:
    if isinstance(value, torch.Tensor) and value.ndim == 1:
        value = value.tolist()
    if isinstance(value, (list, tuple)):
        return tuple(_as_int(v, where) for v in value)
    return (_as_int(value, where),)


def split(anns: Sequence[Annotation]) -> tuple[list[Annotation], list[Annotation]]:
    """(queries, gallery), each keeping the input order."""
    return [a for a in anns if a.is_query], [a for a in anns if not a.is_query]


def relevance(queries: Sequence[Annotation], gallery: Sequence[Annotation]) -> np.ndarray:
    """[Q, G] bool: True iff query q's instance is among gallery image g's instances."""
    out = np.zeros((len(queries), len(gallery)), dtype=bool)
    rows_of_instance: dict[int, list[int]] = {}
    for q, query in enumerate(queries):
        rows_of_instance.setdefault(query.ins[0], []).append(q)
    for g, image in enumerate(gallery):
        for instance in set(image.ins):
            out[rows_of_instance.get(instance, []), g] = True
    return out


def drop_queries_without_positives(
    queries: Sequence[Annotation], gallery: Sequence[Annotation], policy: str = "error"
) -> list[Annotation]:
    """Queries that have at least one relevant gallery image.

    A query with no positive has undefined AP. ``policy="error"`` raises (naming up to 10 such
    queries); ``policy="skip"`` drops them and logs a WARNING with the count, so the metric
    is computed over fewer queries knowingly; ``policy="zero"`` keeps them (logged): they count as
    AP 0 and misses, as the original code counts them.
    """
    if policy not in ("error", "skip", "zero"):
        raise ValueError(f"policy must be 'error', 'skip' or 'zero', got {policy!r}")
    # relevance(queries, gallery).any(axis=1) without its [Q, G] matrix (10^10 booleans at 10^7 images)
    instances = {instance for image in gallery for instance in image.ins}
    has_positive = [query.ins[0] in instances for query in queries]
    orphans = [q for q, ok in zip(queries, has_positive) if not ok]
    if not orphans:
        return list(queries)
    names = ", ".join(f"{q.key} (ins {q.ins[0]})" for q in orphans[:_MAX_LISTED])
    if policy == "error":
        raise AnnotationError(
            f"{len(orphans)} of {len(queries)} queries have no positive gallery image: "
            f"{names}. Fix the annotations or use no_positive=skip (or zero)."
        )
    if policy == "zero":
        logger.warning(
            "no_positive=zero: %d of %d queries have no positive gallery image and count as AP 0: %s",
            len(orphans),
            len(queries),
            names,
        )
        return list(queries)
    logger.warning(
        "Skipping %d of %d queries that have no positive gallery image: %s", len(orphans), len(queries), names
    )
    return [q for q, ok in zip(queries, has_positive) if ok]


def crop_box(
    image: Image.Image, bbox: Sequence[float], source: str, square: bool = False, geometry: str = "soir"
) -> Image.Image:
    """Crop ``image`` to ``bbox`` = [x1, y1, x2, y2] (pixel-edge coords, see :func:`pixel_box`).

    ``square=True`` is the original code's query crop: a square of side max(w, h) centred on the
    box, filled with the image around the box and with zeros (black) only beyond the image border,
    so an elongated object is not stretched when the crop is resized to the model's square input.
    ``geometry="original"`` (``pixel_geometry=original``) rounds as the original: :func:`original_crop_box`.
    """
    if geometry == "original":
        clip_bbox(bbox, image.width, image.height, source)  # the same checks
        return image.crop(original_crop_box(bbox, image.width, image.height, square))
    left, top, right, bottom = pixel_box(bbox, image.width, image.height, source)
    if square:
        width, height = right - left, bottom - top
        side = max(width, height)
        left, top = left - (side - width) // 2, top - (side - height) // 2
        right, bottom = left + side, top + side
    return image.crop((left, top, right, bottom))  # PIL fills what lies outside the image with 0


def original_crop_box(bbox: Sequence[float], width: int, height: int, square: bool) -> tuple[int, int, int, int]:
    """The original code's query crop box of ``bbox`` in a width x height image, for ``PIL.Image.crop``
    (which fills beyond the border with 0, as its padding did).

    Its corners are truncated with int() (x2, y2 inwards) and clipped (original
    ``utils/image_preprocessor.py:138-139``); the square of side max(w, h) is centred on the box's
    centre and its corners truncated again, int(c -/+ side / 2) (``:160-167``): unlike
    :func:`crop_box`'s rule, the odd pixel is not always on the right / bottom.
    """
    x1, y1 = max(0, int(bbox[0])), max(0, int(bbox[1]))
    x2, y2 = min(width, int(bbox[2])), min(height, int(bbox[3]))
    if not square:
        return x1, y1, x2, y2
    side = max(x2 - x1, y2 - y1)
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    return int(cx - side / 2), int(cy - side / 2), int(cx + side / 2), int(cy + side / 2)


def pixel_box(bbox: Sequence[float], width: int, height: int, source: str) -> tuple[int, int, int, int]:
    """``bbox`` = [x1, y1, x2, y2] (pixel-edge coords) as integer pixels of a width x height image,
    rounded outward (after :func:`clip_bbox`); a box empty after clipping is an error naming ``source``.
    """
    x1, y1, x2, y2 = clip_bbox(bbox, width, height, source)
    left, top, right, bottom = math.floor(x1), math.floor(y1), math.ceil(x2), math.ceil(y2)
    if right <= left or bottom <= top:
        raise AnnotationError(f"{source}: bbox {list(bbox)} is empty after clipping to the {width}x{height} image")
    return left, top, right, bottom


def clip_bbox(bbox: Sequence[float], width: int, height: int, source: str) -> tuple[float, float, float, float]:
    """``bbox`` clipped to a width x height image: the one rule for boxes meeting images.

    Boxes computed on a slightly different resize may overshoot the border by a fraction of a
    pixel; up to 1 pixel is clipped silently. More than that means the box belongs to a different
    image (or size), and is an error naming ``source``.
    """
    x1, y1, x2, y2 = _as_bbox_loose(bbox, source)
    if x1 < -1 or y1 < -1 or x2 > width + 1 or y2 > height + 1:
        raise AnnotationError(
            f"{source}: bbox {list(bbox)} lies outside the {width}x{height} image by more than 1 pixel"
        )
    return max(0.0, x1), max(0.0, y1), min(float(width), x2), min(float(height), y2)


def _as_bbox_loose(bbox: Sequence[float], source: str) -> tuple[float, float, float, float]:
    if isinstance(bbox, (torch.Tensor, np.ndarray)):
        bbox = bbox.tolist()
    values = [scalar(v) for v in bbox] if isinstance(bbox, (list, tuple)) else None
    if (
        values is None
        or len(values) != 4
        or not all(isinstance(v, Real) and not isinstance(v, bool) and math.isfinite(v) for v in values)
    ):
        raise AnnotationError(f"{source}: bbox must be 4 finite numbers [x1, y1, x2, y2], got {bbox!r}")
    return tuple(float(v) for v in values)  # type: ignore[return-value]


def select_indices(
    annotations: Sequence[Annotation], indices_file: str | Path | None = None, max_index: int | None = None
) -> list[Annotation]:
    """The annotations at the positions listed in ``indices_file`` and/or before ``max_index``, in
    the sorted-key order :func:`load_anns` returns (the original's ``ds_inds_file`` / ``max_ds_index``).

    ``indices_file``: ints in a text file (whitespace or comma separated), a ``.npy``, a ``.pt``
    (list or 1-d tensor) or a ``.json`` list. Logged with the counts kept.
    """
    keep = list(range(len(annotations)))
    if indices_file is not None:
        keep = _read_indices(Path(indices_file), len(annotations))
    if max_index is not None:
        keep = [i for i in keep if i < max_index]
    if len(keep) == len(annotations):
        return list(annotations)
    logger.info("ds_inds_file / max_ds_index: %d of %d images kept", len(keep), len(annotations))
    return [annotations[i] for i in sorted(set(keep))]


def _read_indices(path: Path, count: int) -> list[int]:
    where = f"ds_inds_file '{path}'"
    if not path.is_file():
        raise AnnotationError(f"{where} does not exist")
    try:
        if path.suffix == ".npy":
            values = np.load(path, allow_pickle=False).ravel().tolist()
        elif path.suffix == ".pt":
            values = torch.load(path, map_location="cpu", weights_only=True)
            values = values.ravel().tolist() if isinstance(values, torch.Tensor) else list(values)
        elif path.suffix == ".json":
            import json

            values = json.loads(path.read_text())
        else:
            values = path.read_text().replace(",", " ").split()
        indices = [int(v) for v in values]
    except (ValueError, TypeError, OSError, EOFError, RuntimeError, pickle.UnpicklingError) as err:
        # RuntimeError / UnpicklingError: a .pt that is not a torch zip, or holds objects weights_only refuses
        raise AnnotationError(f"{where}: expected a list of integer indices ({type(err).__name__}: {err})") from None
    bad = [i for i in indices if not 0 <= i < count]
    if bad:
        raise AnnotationError(
            f"{where}: indices {bad[:10]} are outside [0, {count}) (positions in the anns file's sorted keys)"
        )
    return indices


def select_set(annotations: Sequence[Annotation], name: str | None) -> list[Annotation]:
    """The annotations whose ``set`` is ``name`` (config key ``set``), or all of them for None.

    Instance ids only identify an object within one set (VoxDet-SoIR numbers its OWID and RoboTools
    instances independently), so evaluating several sets together is refused when they share ids.

    Raises:
        AnnotationError: no annotation has set ``name`` (the sets present are listed), or
            ``name`` is None and two sets share an instance id.
    """
    sets: dict[str | None, set[int]] = {}
    for ann in annotations:
        sets.setdefault(ann.set, set()).update(ann.ins)
    if name is None:
        names = sorted(sets, key=str)
        shared = [
            (a, b, sorted(sets[a] & sets[b])) for i, a in enumerate(names) for b in names[i + 1 :] if sets[a] & sets[b]
        ]
        if shared:
            a, b, ids = shared[0]
            raise AnnotationError(
                f"sets {a!r} and {b!r} share instance ids (e.g. {ids[:5]}), so their images "
                f"would count as positives of each other's queries; evaluate one with "
                f"set={a} or set={b}"
            )
        return list(annotations)
    if name not in sets:
        raise AnnotationError(f"set={name!r}: no annotation has this set; the file has sets {sorted(map(str, sets))}")
    return [ann for ann in annotations if ann.set == name]
