"""Small replicas of the INSTRE and BURST source layouts, for the benchmark builders' tests.

INSTRE facts (INSTRE home page; OS2D's os2d/data/dataset.py, which reads it): folders INSTRE-S1,
INSTRE-S2 (one class per folder, e.g. ``01a_canada_book``) and INSTRE-M (two objects per image,
folders ``01`` ... ``50``); every ``<NNN>.jpg`` has ``<NNN>.txt`` with one ``x y w h`` line (ints,
space-separated) per object; S1/S2 images may show an object more than once.
BURST facts (BURST-benchmark ANNOTATION_FORMAT.md / README): ``{"sequences": [{"width", "height", "id",
"seq_name", "dataset", "fps", "all_image_paths", "annotated_image_paths", "neg_category_ids",
"not_exhaustive_category_ids", "track_category_ids": {"<track>": cat}, "segmentations": [{"<track>":
{"rle": str, "is_gt", "score"}}, ...]}], "categories": [{"id", "name", ...}], "split": str}``, masks as
pycocotools compressed RLE strings, frames under ``<images_base_dir>/<split>/<dataset>/<seq_name>/``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils


def _instre_image(root: Path, name: str, boxes: list[tuple[int, int, int, int]], size=(100, 80)) -> None:
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (90, 120, 150)).save(path)
    path.with_suffix(".txt").write_text("".join(f"{x} {y} {w} {h}\n" for x, y, w, h in boxes))


def write_instre(root: Path) -> Path:
    """The INSTRE replica (images 100 x 80 = 8000 px); returns ``root``."""
    _instre_image(root, "INSTRE-S1/01a_canada_book/001.jpg", [(10, 10, 10, 10)])  # 1.25 %
    _instre_image(root, "INSTRE-S1/01a_canada_book/002.jpg", [(0, 0, 50, 40)])  # 25 %
    _instre_image(root, "INSTRE-S1/01a_canada_book/003.jpg", [(5, 5, 30, 30)])  # 11.25 %
    _instre_image(root, "INSTRE-S1/01a_canada_book/004.jpg", [(1, 1, 5, 5), (50, 50, 5, 5)])  # two boxes
    _instre_image(root, "INSTRE-S1/01a_canada_book/005.jpg", [(20, 20, 15, 15)])  # 2.8125 %
    (root / "INSTRE-S1/01a_canada_book/._006.jpg").write_bytes(b"\x00\x05")  # macOS metadata file
    _instre_image(root, "INSTRE-S1/01b_wierd_fish/001.jpg", [(90, 70, 30, 30)])  # clipped: 1.25 %
    _instre_image(root, "INSTRE-S1/01b_wierd_fish/002.jpg", [(10, 10, 35, 30)])  # 13.125 %
    _instre_image(root, "INSTRE-S2/amazon_box/001.jpg", [(1, 1, 5, 5)])  # its only candidate
    _instre_image(root, "INSTRE-M/01/001.jpg", [(1, 1, 5, 5), (60, 40, 5, 5)])  # never used
    return root


def _rle(mask: np.ndarray) -> str:
    return mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))["counts"].decode("utf-8")


def box_mask(height, width, x1, y1, x2, y2) -> np.ndarray:
    mask = np.zeros((height, width), dtype=bool)
    mask[y1:y2, x1:x2] = True
    return mask


def _video(
    root: Path,
    split: str,
    vid: int,
    dataset: str,
    name: str,
    height: int,
    width: int,
    tracks: dict[int, int],
    frames: list[dict[int, tuple]],
) -> dict:
    """BURST sequence dict; ``frames[t]`` maps track -> box (x1, y1, x2, y2) of its mask in frame t."""
    paths = [f"frame{t:04d}.jpg" for t in range(len(frames))]
    for path in paths:
        (root / split / dataset / name).mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (width, height), (10, 20, 30)).save(root / split / dataset / name / path)
    return {
        "width": width,
        "height": height,
        "id": vid,
        "seq_name": name,
        "dataset": dataset,
        "fps": 1,
        "all_image_paths": paths,
        "annotated_image_paths": paths,
        "neg_category_ids": [],
        "not_exhaustive_category_ids": [],
        "track_category_ids": {str(t): c for t, c in tracks.items()},
        "segmentations": [
            {
                str(t): {"rle": _rle(box_mask(height, width, *box)), "is_gt": True, "score": 1.0}
                for t, box in frame.items()
            }
            for frame in frames
        ],
    }


def write_burst(folder: Path) -> tuple[Path, Path]:
    """The BURST replica: (annotations file, images_base_dir)."""
    root = folder / "frames"
    # A: persons 1 and 2 share frames 0..29 (track 1 grows with t), dog 3 everywhere; frames 30..39 have
    # one person only and do not count. Track 1 and 2 tie (30 frames): the lower id wins.
    a_frames = [
        {1: (2, 5, 8 + t, 15), **({2: (40, 20, 50, 30)} if t < 30 else {}), 3: (30, 30, 34, 36)} for t in range(40)
    ]
    # B (portrait 40 x 60): dogs 5 and 6; track 5 is largest in frame 19 but above PDM's square crop.
    b_frames = [{5: (2, 20, 7 + t, 30), 6: (30, 40, 38, 50)} for t in range(19)] + [
        {5: (2, 0, 32, 11), 6: (30, 40, 38, 50)}
    ]
    sequences = [
        _video(root, "val", 7, "YFCC100M", "vA", 40, 60, {1: 10, 2: 10, 3: 20}, a_frames),
        _video(root, "val", 8, "Charades", "vB", 60, 40, {5: 20, 6: 20}, b_frames),
        _video(root, "val", 9, "HACS", "vC", 40, 60, {1: 10, 2: 10}, [{1: (0, 0, 5, 5), 2: (9, 9, 20, 20)}] * 40),
        _video(root, "val", 10, "BDD", "vD", 40, 60, {1: 10, 2: 20}, [{1: (0, 0, 5, 5), 2: (9, 9, 20, 20)}] * 40),
        _video(root, "val", 11, "BDD", "vE", 40, 60, {1: 10, 2: 10}, [{1: (0, 0, 5, 5), 2: (9, 9, 20, 20)}] * 10),
        _video(
            root, "val", 12, "BDD", "vF", 40, 60, {1: 10, 2: 10}, [{1: (20, 20, 22, 22), 2: (9, 9, 20, 20)}] * 40
        ),  # 4 px: < 0.5% of the crop
    ]
    categories = [
        {"id": 10, "name": "person", "synset": "person.n.01", "def": "", "synonyms": []},
        {"id": 20, "name": "dog", "synset": "dog.n.01", "def": "", "synonyms": []},
    ]
    annotations = root.parent / "annotations" / "val" / "all_classes.json"
    annotations.parent.mkdir(parents=True)
    annotations.write_text(json.dumps({"sequences": sequences, "categories": categories, "split": "val"}))
    return annotations, root
