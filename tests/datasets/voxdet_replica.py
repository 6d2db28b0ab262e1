"""A small VoxDet-SoIR benchmark written exactly as its builder writes ``anns.pt``.

Facts from ``pihash2k/VoxDet-SoIR`` (``create_dataset.py``, ``RLE.py``, README) and VoxDet's layout
(``Jaraxxus-Me/VoxDet`` README / ``configs/voxdet/VoxDet_test.py``):

* layout: ``OWID/P1/<id>/rgb/*`` queries (masks in ``mask/``), ``OWID/P2/images/*`` gallery,
  ``RoboTools/test_video/<name>_<id>/rgb/*`` queries, ``RoboTools/test/<scene>/rgb/*`` gallery;
  keys are ``str(voxdet_root / ...)``.
* query: ``{"bbox": get_bbox_from_mask(mask), "mask": encode_rle(mask), "is_query": True,
  "ins": id, "set": ...}``; ``get_bbox_from_mask`` gives ``(x_min, y_min, x_max, y_max)`` of
  ``np.where`` indices (numpy ints, inclusive ends) or ``(0, 0, W, H)`` for an empty mask;
  ``encode_rle`` gives row-major runs starting with the first pixel's value, ``size`` a tuple,
  ``transpose: False``.
* gallery: ``bbox`` a list of COCO ``[x, y, w, h]`` turned into ``(x, y, x + w, y + h)`` tuples,
  ``ins`` / ``num_ins`` / ``mask`` lists; OWID masks are the json's COCO ``segmentation``
  (polygons or RLE), RoboTools galleries have ``mask: []`` and ``num_ins: []``.

The encoder here is written independently of ``datasets.rle`` (``itertools.groupby``), so tests
compare two implementations. One query mask uses a dict **without** ``transpose`` (column-major
counts, ``size = (W, H)``), the order the builder's decoder transposes.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import torch
from PIL import Image

HEIGHT, WIDTH = 48, 64  # not square, so a transposition cannot go unnoticed


def builder_rle(mask: np.ndarray) -> dict:
    """RLE.py ``encode_rle``: runs of ``mask.flatten()``, first run of the first pixel's value."""
    counts = [len(list(run)) for _, run in itertools.groupby(mask.astype(np.uint8).flatten().tolist())]
    return {"counts": counts, "size": (mask.shape[0], mask.shape[1]), "transpose": False}


def column_major_rle_without_transpose(mask: np.ndarray) -> dict:
    """A dict the builder's decoder reads with ``reshape(size).T``: runs of the transposed mask,
    row-major (= the mask column-major), starting with a 0-run, ``size = (W, H)``, no ``transpose``."""
    flat = mask.T.astype(np.uint8).flatten().tolist()
    counts = [len(list(run)) for _, run in itertools.groupby(flat)]
    if flat[0] == 1:
        counts = [0] + counts
    return {"counts": counts, "size": (mask.shape[1], mask.shape[0])}


def builder_bbox(mask: np.ndarray) -> tuple:
    """create_dataset.py ``get_bbox_from_mask``: inclusive ends, numpy ints; (0, 0, W, H) if empty."""
    if not mask.any():
        return (0, 0, mask.shape[1], mask.shape[0])
    ys, xs = np.where(mask.any(axis=1))[0], np.where(mask.any(axis=0))[0]
    return (xs[0], ys[0], xs[-1], ys[-1])


def coco_uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO ``iscrowd`` RLE as in a COCO json: column-major runs starting with 0s, size [H, W]."""
    flat = mask.astype(np.uint8).flatten(order="F").tolist()
    counts = [len(list(run)) for _, run in itertools.groupby(flat)]
    if flat[0] == 1:
        counts = [0] + counts
    return {"counts": counts, "size": [mask.shape[0], mask.shape[1]]}


def rect(x1: int, y1: int, x2: int, y2: int) -> np.ndarray:
    """[HEIGHT, WIDTH] mask with columns x1..x2-1, rows y1..y2-1 set."""
    mask = np.zeros((HEIGHT, WIDTH), dtype=bool)
    mask[y1:y2, x1:x2] = True
    return mask


def _image(path: Path, masks: list[np.ndarray], seed: int) -> None:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8)
    for i, mask in enumerate(masks):
        pixels[mask] = (60 * (i + 1), 255 - 50 * i, 40)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


def write_voxdet_soir(root: Path) -> tuple[Path, dict]:
    """Images + ``root/anns.pt`` as the builder writes them. Returns (anns path, facts) where
    facts holds the true masks: ``{"query_masks": {key: mask}, "gallery_masks": {key: [mask|None]},
    "gallery_boxes": {key: [(x1, y1, x2, y2)]}}``."""
    anns, facts = {}, {"query_masks": {}, "gallery_masks": {}, "gallery_boxes": {}}

    def query(path: Path, mask: np.ndarray, rle: dict, ins: int, set_name: str, seed: int) -> None:
        _image(path, [mask], seed)
        anns[str(path)] = {"bbox": builder_bbox(mask), "mask": rle, "is_query": True, "ins": ins, "set": set_name}
        facts["query_masks"][str(path)] = mask

    def gallery(
        path: Path, objects: list[tuple[int, np.ndarray, object]], set_name: str, seed: int, num_ins: list | None = None
    ) -> None:
        _image(path, [m for _, m, _ in objects], seed)
        boxes = []
        for _, mask, _ in objects:  # COCO bbox [x, y, w, h] -> (x, y, x + w, y + h)
            x, y = np.where(mask.any(axis=0))[0], np.where(mask.any(axis=1))[0]
            coco = [int(x[0]), int(y[0]), int(x[-1] - x[0] + 1), int(y[-1] - y[0] + 1)]
            boxes.append((coco[0], coco[1], coco[0] + coco[2], coco[1] + coco[3]))
        anns[str(path)] = {
            "bbox": boxes,
            "num_ins": num_ins or [],
            "is_query": False,
            "mask": [seg for _, _, seg in objects] if set_name == "OWID" else [],
            "ins": [ins for ins, _, _ in objects],
            "set": set_name,
        }
        facts["gallery_boxes"][str(path)] = boxes
        facts["gallery_masks"][str(path)] = [m if set_name == "OWID" and seg != [] else None for _, m, seg in objects]

    robo = root / "RoboTools"
    drill, corner, hammer = rect(20, 10, 35, 30), rect(0, 0, 12, 9), rect(30, 5, 61, 20)
    query(robo / "test_video/drill_1/rgb/000000.jpg", drill, builder_rle(drill), 1, "RoboTools", 1)
    query(robo / "test_video/drill_1/rgb/000001.jpg", corner, builder_rle(corner), 1, "RoboTools", 2)  # leading 1
    query(
        robo / "test_video/hammer_2/rgb/000000.jpg",
        hammer,
        column_major_rle_without_transpose(hammer),
        2,
        "RoboTools",
        3,
    )
    gallery(
        robo / "test/000001/rgb/000000.jpg",
        [(1, rect(2, 3, 10, 12), None), (2, rect(40, 30, 60, 44), None)],
        "RoboTools",
        4,
    )
    gallery(robo / "test/000001/rgb/000001.jpg", [(1, rect(30, 20, 38, 29), None)], "RoboTools", 5)
    gallery(robo / "test/000002/rgb/000000.jpg", [(2, rect(5, 25, 25, 40), None)], "RoboTools", 6)

    owid = root / "OWID"
    cup = rect(10, 10, 30, 20)
    query(owid / "P1/1/rgb/000.png", cup, builder_rle(cup), 1, "OWID", 7)
    ball = rect(40, 12, 56, 40)
    query(owid / "P1/2/rgb/000.png", ball, builder_rle(ball), 2, "OWID", 8)
    polygon_mask = rect(4, 6, 20, 30)
    polygon = [[4.0, 6.0, 20.0, 6.0, 20.0, 30.0, 4.0, 30.0]]
    rle_mask = rect(30, 2, 50, 18)
    gallery(
        owid / "P2/images/00001.jpg",
        [(1, polygon_mask, polygon), (2, rle_mask, coco_uncompressed_rle(rle_mask))],
        "OWID",
        9,
        num_ins=[1, 2],
    )
    gallery(owid / "P2/images/00002.jpg", [(1, rect(40, 20, 52, 40), [])], "OWID", 10, num_ins=[1])

    path = root / "anns.pt"
    torch.save(anns, path)
    return path, facts
