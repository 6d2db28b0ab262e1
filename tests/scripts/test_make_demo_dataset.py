"""scripts/make_demo_dataset.py and example/create_annotations.py produce loadable, valid sets."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from datasets import (
    drop_queries_without_positives,
    load_anns,
    load_captions,
    load_rgb,
    relevance,
    split,
)
from example.create_annotations import build_annotations
from example.create_annotations import main as create_annotations_main
from scripts.make_demo_dataset import main as demo_main
from scripts.make_demo_dataset import make_demo_dataset

SMALL = dict(num_objects=4, gallery_per_object=3, distractors=3, image_size=160, seed=3)


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    return make_demo_dataset(tmp_path_factory.mktemp("demo") / "set", **SMALL)


def test_demo_loads_and_counts(demo):
    anns = load_anns(demo / "anns.pt")
    captions = load_captions(demo / "captions.pt")
    assert {a.key for a in anns} == set(captions)
    queries, gallery = split(anns)
    assert [q.key for q in queries] == [f"queries/q_{i:03d}.jpg" for i in range(4)]
    assert [q.ins for q in queries] == [(0,), (1,), (2,), (3,)]
    assert len(gallery) == 4 * 3 + 3
    assert sum(g.ins == () for g in gallery) == 3
    assert any(len(g.ins) == 2 for g in gallery)  # some scenes show two instances
    positives = relevance(queries, gallery).sum(axis=1)
    assert (positives >= 3).all()
    assert drop_queries_without_positives(queries, gallery) == queries


def test_demo_gallery_objects_are_small_and_masks_match_images(demo):
    anns = load_anns(demo / "anns.pt")
    captions = load_captions(demo / "captions.pt")
    for image in split(anns)[1]:
        masks = captions[image.key]
        width, height = load_rgb(image.file).size
        assert masks.size == (height, width)
        decoded = masks.masks()
        instance_masks = decoded[np.asarray(masks.scores) == 1.0]
        assert len(instance_masks) == len(image.ins)
        shares = instance_masks.mean(axis=(1, 2))
        assert ((shares >= 0.01) & (shares <= 0.05)).all(), (image.key, shares)
        clutter_scores = [s for s in masks.scores if s < 1.0]
        assert 3 <= len(clutter_scores) <= 6 and all(0.5 <= s <= 0.95 for s in clutter_scores)
        assert masks.scores == sorted(masks.scores, reverse=True)
        if len(instance_masks) == 2:
            assert not (instance_masks[0] & instance_masks[1]).any()
        for mask, box in zip(decoded, masks.bboxes):
            ys, xs = np.nonzero(mask)
            assert box == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]


def test_demo_queries_show_the_object_large_on_light_background(demo):
    captions = load_captions(demo / "captions.pt")
    for query in split(load_anns(demo / "anns.pt"))[0]:
        assert query.obj_name.startswith(f"object_{query.ins[0]:02d}_")
        pixels = np.asarray(load_rgb(query.file), dtype=np.float32)
        (mask,) = captions[query.key].masks()
        x1, y1, x2, y2 = query.bbox
        assert list(query.bbox) == captions[query.key].bboxes[0]
        assert 0.35 <= (x2 - x1) * (y2 - y1) / mask.size <= 0.75
        assert pixels[~mask].mean() > 200  # light background
        # the object differs from the background: the mask marks real object pixels
        assert np.abs(pixels[mask].mean(axis=0) - pixels[~mask].mean(axis=0)).max() > 40


def test_demo_is_deterministic(demo, tmp_path):
    again = make_demo_dataset(tmp_path / "again", **SMALL)
    other = make_demo_dataset(tmp_path / "other", **{**SMALL, "seed": 4})
    files = sorted(p.relative_to(demo) for p in demo.rglob("*.jpg"))
    assert files == sorted(p.relative_to(again) for p in again.rglob("*.jpg"))
    for name in files:
        assert (demo / name).read_bytes() == (again / name).read_bytes(), name
    assert torch.load(demo / "anns.pt", weights_only=True) == torch.load(again / "anns.pt", weights_only=True)
    assert load_captions(demo / "captions.pt") == load_captions(again / "captions.pt")
    assert (demo / files[0]).read_bytes() != (other / files[0]).read_bytes()


def test_demo_refuses_to_overwrite_unless_asked(tmp_path, capsys):
    out = tmp_path / "set"
    args = [
        "--out",
        str(out),
        "--num_objects",
        "2",
        "--gallery_per_object",
        "1",
        "--distractors",
        "1",
        "--image_size",
        "128",
    ]
    demo_main(args)
    assert "2 queries, 3 gallery images (with two instances: 2, distractors: 1)" in capsys.readouterr().out
    (out / "gallery" / "mine.jpg").write_bytes(b"a user's photo")
    with pytest.raises(SystemExit, match="already holds a demo dataset"):
        demo_main(args)
    demo_main(args + ["--overwrite"])
    # --overwrite replaced the script's own files only: a file it did not write stays.
    assert (out / "gallery" / "mine.jpg").read_bytes() == b"a user's photo"
    assert len(list((out / "gallery").glob("g_*.jpg"))) == 3
    with pytest.raises(ValueError, match="image_size"):
        make_demo_dataset(tmp_path / "tiny", image_size=64)


def _layout(root: Path) -> None:
    files = [
        "queries/mug/1.jpg",
        "queries/mug/2.png",
        "queries/cup/a.jpg",
        "gallery/mug/x.jpg",
        "gallery/cup/y.JPG",
        "gallery/cup/z.jpg",
        "gallery/zebra/z.jpg",
        "gallery/_distractors/d.jpg",
    ]
    for name in files:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (20, 10)).save(root / name, format="PNG" if name.endswith("png") else "JPEG")
    (root / "gallery" / "mug" / "notes.txt").write_text("not an image")


def test_create_annotations_from_folders(tmp_path, capsys):
    root = tmp_path / "data"
    _layout(root)
    (tmp_path / "boxes.json").write_text(json.dumps({"queries/mug/2.png": [1, 2, 15, 9]}))
    create_annotations_main(
        ["--root", str(root), "--out", str(root / "anns.pt"), "--bboxes", str(tmp_path / "boxes.json")]
    )
    assert "3 instances, 3 queries (1 with bbox), 5 gallery images (distractors: 1)" in capsys.readouterr().out
    anns = {a.key: a for a in load_anns(root / "anns.pt")}  # all files exist
    assert {k: (a.ins, a.is_query, a.obj_name) for k, a in anns.items()} == {
        "queries/cup/a.jpg": ((0,), True, "cup"),
        "queries/mug/1.jpg": ((1,), True, "mug"),
        "queries/mug/2.png": ((1,), True, "mug"),
        "gallery/cup/y.JPG": ((0,), False, "cup"),
        "gallery/cup/z.jpg": ((0,), False, "cup"),
        "gallery/mug/x.jpg": ((1,), False, "mug"),
        "gallery/zebra/z.jpg": ((2,), False, "zebra"),
        "gallery/_distractors/d.jpg": ((), False, None),
    }
    assert anns["queries/mug/2.png"].bbox == (1.0, 2.0, 15.0, 9.0) and anns["queries/mug/1.jpg"].bbox is None
    # ids are stable: a second build (and a fresh process would) gives the same dict
    assert build_annotations(root) == build_annotations(root)


@pytest.mark.parametrize(
    "setup, bboxes, message",
    [
        (lambda r: (r / "queries" / "loose.jpg").write_bytes(b""), None, "outside instance folders"),
        (lambda r: (r / "queries" / "_distractors").mkdir(), None, "distractors belong in the gallery"),
        (lambda r: (r / "gallery" / "empty").mkdir(), None, "contains no images"),
        (lambda r: None, {"gallery/mug/x.jpg": [0, 0, 1, 1]}, "not a query image"),
        (lambda r: None, {"queries/mug/1.jpg": [5, 0, 1, 1]}, "empty or inverted"),
    ],
)
def test_create_annotations_errors(tmp_path, setup, bboxes, message):
    _layout(tmp_path)
    setup(tmp_path)
    with pytest.raises(ValueError, match=message):
        build_annotations(tmp_path, bboxes)


def test_create_annotations_cli_errors(tmp_path):
    with pytest.raises(SystemExit, match="queries' does not exist"):
        create_annotations_main(["--root", str(tmp_path), "--out", str(tmp_path / "anns.pt")])
    _layout(tmp_path)
    (tmp_path / "boxes.json").write_text("[1, 2]")
    with pytest.raises(SystemExit, match="must hold a JSON object"):
        create_annotations_main(
            ["--root", str(tmp_path), "--out", str(tmp_path / "a.pt"), "--bboxes", str(tmp_path / "boxes.json")]
        )
    assert not (tmp_path / "a.pt").exists()
