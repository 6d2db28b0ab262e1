"""datasets/benchmarks.py: each builder on a small replica of its source layout
(tests/datasets/benchmark_replicas.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from datasets import load_anns, load_captions, save_anns, save_captions
from datasets.benchmarks import build_instre, build_permir, pdm_crop_share, read_instre_boxes, voxdet_report
from tests.datasets.benchmark_replicas import box_mask, write_burst, write_instre
from tests.datasets.voxdet_replica import write_voxdet_soir


# ------------------------------------------------------------------------------------------- INSTRE
@pytest.fixture(scope="module")
def instre(tmp_path_factory) -> Path:
    return write_instre(tmp_path_factory.mktemp("instre") / "INSTRE")


def test_instre_xs_rule_and_statistics(instre):
    anns, report = build_instre(instre, "instre_xs")
    assert anns == {
        "INSTRE-S1/01a_canada_book/001.jpg": {
            "ins": 0,
            "is_query": True,
            "bbox": [10.0, 10.0, 20.0, 20.0],
            "obj_name": "01a_canada_book",
        },
        "INSTRE-S1/01a_canada_book/003.jpg": {
            "ins": [0],
            "is_query": False,
            "bbox": [5.0, 5.0, 35.0, 35.0],
            "obj_name": "01a_canada_book",
        },
        "INSTRE-S1/01a_canada_book/005.jpg": {
            "ins": 0,
            "is_query": True,
            "bbox": [20.0, 20.0, 35.0, 35.0],
            "obj_name": "01a_canada_book",
        },
        "INSTRE-S1/01b_wierd_fish/001.jpg": {
            "ins": 1,
            "is_query": True,
            "bbox": [90.0, 70.0, 100.0, 80.0],
            "obj_name": "01b_wierd_fish",
        },
        "INSTRE-S1/01b_wierd_fish/002.jpg": {
            "ins": [1],
            "is_query": False,
            "bbox": [10.0, 10.0, 45.0, 40.0],
            "obj_name": "01b_wierd_fish",
        },
    }
    assert report.stats == {
        "queries": 3,
        "gallery_images": 2,
        "instances": 2,
        "objects_per_image": 1.0,
        "mean_area_pct": pytest.approx((11.25 + 13.125) / 2, abs=1e-3),
    }
    assert report.excluded == {
        "images with more or fewer than one box": 1,
        "objects covering >= 15% of the image": 1,
        "instances with fewer than 2 small-object images": 1,
    }
    assert "covers less than 15% of the image" in report.rule
    assert "2428" in report.table() and "12.19" in report.table()


def test_instre_xxs(instre, tmp_path):
    anns, report = build_instre(instre, "instre_xxs")
    assert sorted(anns) == ["INSTRE-S1/01a_canada_book/001.jpg", "INSTRE-S1/01a_canada_book/005.jpg"]
    assert anns["INSTRE-S1/01a_canada_book/005.jpg"]["is_query"] is False
    assert (report.stats["queries"], report.stats["gallery_images"], report.stats["mean_area_pct"]) == (1, 1, 2.812)
    assert report.excluded["objects covering >= 5% of the image"] == 3
    save_anns(anns, tmp_path / "anns.pt")
    loaded = load_anns(tmp_path / "anns.pt", galleries_dir=instre, queries_dir=instre)
    assert all(a.file.is_file() for a in loaded)


def test_instre_errors_name_the_file(tmp_path):
    with pytest.raises(ValueError, match="INSTRE-S1 does not exist: --root must be the INSTRE folder"):
        build_instre(tmp_path, "instre_xs")
    (tmp_path / "b.txt").write_text("1 2 3\n")
    with pytest.raises(ValueError, match="b.txt, line 1: expected 'x y w h'"):
        read_instre_boxes(tmp_path / "b.txt")


# ------------------------------------------------------------------------------------------- PerMiR
@pytest.fixture(scope="module")
def burst(tmp_path_factory) -> tuple[Path, Path]:
    return write_burst(tmp_path_factory.mktemp("burst"))


def test_permir_follows_pdm(burst, tmp_path):
    annotations, root = burst
    anns, captions, report = build_permir(annotations, root)
    assert anns == {
        "val/YFCC100M/vA/frame0029.jpg": {
            "ins": 7,
            "is_query": True,
            "obj_name": "person",
            "bbox": [2.0, 5.0, 37.0, 15.0],
        },
        "val/YFCC100M/vA/frame0013.jpg": {"ins": [7], "is_query": False, "obj_name": "person"},
        "val/YFCC100M/vA/frame0012.jpg": {"ins": [7], "is_query": False, "obj_name": "person"},
        # B: bbox order 19, 3, 2; the square crop (rows 10..50) keeps 1 row of frame 19's object.
        "val/Charades/vB/frame0003.jpg": {
            "ins": 8,
            "is_query": True,
            "obj_name": "dog",
            "bbox": [2.0, 20.0, 10.0, 30.0],
        },
        "val/Charades/vB/frame0019.jpg": {"ins": [8], "is_query": False, "obj_name": "dog"},
        "val/Charades/vB/frame0002.jpg": {"ins": [8], "is_query": False, "obj_name": "dog"},
    }
    assert report.excluded == {
        "videos of HACS/AVA/LaSOT": 1,
        "videos without two tracks of one category": 1,
        "videos without 3 frames > 15 annotated frames apart": 1,
        "videos whose object covers < 0.5% of a frame's square crop": 1,
    }
    gallery_boxes = [
        [(2, 5, 21, 15), (40, 20, 50, 30), (30, 30, 34, 36)],
        [(2, 5, 20, 15), (40, 20, 50, 30), (30, 30, 34, 36)],
        [(2, 0, 32, 11), (30, 40, 38, 50)],
        [(2, 20, 9, 30), (30, 40, 38, 50)],
    ]
    areas = [[(x2 - x1) * (y2 - y1) / 2400 for x1, y1, x2, y2 in image] for image in gallery_boxes]
    assert report.stats == {
        "queries": 2,
        "gallery_images": 4,
        "instances": 2,
        "categories": 2,
        "objects_per_image": 2.5,
        "mean_area_pct": pytest.approx(100 * np.mean(sum(areas, [])), abs=1e-3),
    }
    save_captions(captions, tmp_path / "captions.pt")
    loaded = load_captions(tmp_path / "captions.pt")
    assert set(loaded) == set(anns)
    frame = loaded["val/YFCC100M/vA/frame0013.jpg"]
    assert frame.bboxes == [[2.0, 5.0, 21.0, 15.0], [40.0, 20.0, 50.0, 30.0], [30.0, 30.0, 34.0, 36.0]]
    assert np.array_equal(frame.masks()[0], box_mask(40, 60, 2, 5, 21, 15))


def test_pdm_crop_share():
    landscape = box_mask(40, 60, 2, 5, 8, 15)  # object left of the centred square -> shifted
    assert pdm_crop_share(landscape) == 60 / 1600
    portrait = box_mask(60, 40, 2, 0, 32, 11)  # square rows 10..50 keep row 10 only
    assert pdm_crop_share(portrait) == 30 / 1600


def test_permir_refuses_missing_frames_and_other_files(burst, tmp_path):
    annotations, _ = burst
    with pytest.raises(ValueError, match="6 of 6 selected frames are not under .* <split>/<dataset>/<seq_name>"):
        build_permir(annotations, tmp_path)
    (tmp_path / "x.json").write_text(json.dumps({"images": []}))
    with pytest.raises(ValueError, match="not a BURST annotation file"):
        build_permir(tmp_path / "x.json", tmp_path)


# ------------------------------------------------------------------------------------------- VoxDet
def test_voxdet_report_measures_one_set(tmp_path):
    path, facts = write_voxdet_soir(tmp_path / "VoxDet")
    report = voxdet_report(path, "RoboTools")
    boxes = [b for k, bs in facts["gallery_boxes"].items() if "RoboTools" in k for b in bs]
    area = np.mean([(x2 - x1) * (y2 - y1) / (48 * 64) for x1, y1, x2, y2 in boxes])
    assert report.stats == {
        "queries": 3,
        "gallery_images": 3,
        "instances": 2,
        "objects_per_image": 1.333,
        "mean_area_pct": pytest.approx(100 * area, abs=1e-3),
        "scenes": 2,
    }
    assert voxdet_report(path, "OWID").stats["objects_per_image"] == 1.5
