"""A VoxDet-SoIR anns.pt as its builder writes it: loading, its masks (masks_from=anns), set selection,
and an end-to-end run of create_index.py + search_index.py on it."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from datasets import AnnotationError, annotation_masks, load_anns, select_set, split
from datasets.voxdet import AnnotatedMask
from tests.datasets.voxdet_replica import HEIGHT, WIDTH, builder_rle, rect, write_voxdet_soir
from tests.pipeline import features_dir_from, read_results, results_dir_from, run_main


@pytest.fixture(scope="module")
def voxdet(tmp_path_factory) -> tuple[Path, dict]:
    return write_voxdet_soir(tmp_path_factory.mktemp("voxdet") / "VoxDet")


def _by_key(anns):
    return {a.key: a for a in anns}


def test_the_builders_file_loads_as_it_is(voxdet):
    path, facts = voxdet
    anns = _by_key(load_anns(path))
    robo = str(path.parent / "RoboTools")
    drill = anns[f"{robo}/test_video/drill_1/rgb/000000.jpg"]
    # builder box (20, 10, 34, 29) has inclusive ends -> pixel edges
    assert drill.is_query and drill.ins == (1,) and drill.set == "RoboTools"
    assert drill.bbox == (20.0, 10.0, 35.0, 30.0) and drill.boxes == (drill.bbox,)
    assert drill.masks[0].encoding == "voxdet_rle" and drill.masks[0].box == drill.bbox
    scene = anns[f"{robo}/test/000001/rgb/000000.jpg"]
    assert not scene.is_query and scene.bbox is None and scene.ins == (1, 2)
    assert scene.boxes == ((2.0, 3.0, 10.0, 12.0), (40.0, 30.0, 60.0, 44.0)) and scene.masks == ()
    owid = anns[str(path.parent / "OWID/P2/images/00001.jpg")]
    assert owid.set == "OWID" and [m.encoding for m in owid.masks] == ["coco", "coco"]
    assert anns[str(path.parent / "OWID/P2/images/00002.jpg")].masks == (None,)  # segmentation []


def test_query_masks_decode_in_both_orders_and_the_leading_one_case(voxdet, caplog):
    path, facts = voxdet
    queries, _ = split(select_set(load_anns(path), "RoboTools"))
    with caplog.at_level(logging.INFO, logger="soir.datasets"):
        masks = annotation_masks(queries)
    for key, true_mask in facts["query_masks"].items():
        if "RoboTools" in key:
            decoded = masks[key].masks()
            assert decoded.shape == (1, HEIGHT, WIDTH)
            assert np.array_equal(decoded[0], true_mask), key
    assert "1 VoxDet masks start with a 1-pixel" in caplog.text
    assert "000001.jpg" in caplog.text.split("start with a 1-pixel")[1]


def test_gallery_masks_coco_polygons_rle_and_boxes(voxdet):
    path, facts = voxdet
    gallery = split(load_anns(path))[1]
    owid = select_set(gallery, "OWID")
    masks = annotation_masks(owid)
    key = str(path.parent / "OWID/P2/images/00001.jpg")
    polygon, rle = masks[key].masks()
    assert np.array_equal(rle, facts["gallery_masks"][key][1])  # COCO RLE, column-major
    true_polygon = facts["gallery_masks"][key][0]
    assert (polygon & true_polygon).sum() / (polygon | true_polygon).sum() > 0.85  # rasterised polygon
    assert str(path.parent / "OWID/P2/images/00002.jpg") not in masks  # its only object has no mask
    with_boxes = annotation_masks(owid, box_masks=True)
    assert np.array_equal(with_boxes[str(path.parent / "OWID/P2/images/00002.jpg")].masks()[0], rect(40, 20, 52, 40))
    robo = select_set(gallery, "RoboTools")
    assert annotation_masks(robo) == {}
    rectangles = annotation_masks(robo, box_masks=True)
    for key, boxes in facts["gallery_boxes"].items():
        if "RoboTools" in key:
            assert [list(b) for b in rectangles[key].bboxes] == [[float(v) for v in b] for b in boxes]
            assert np.array_equal(rectangles[key].masks()[0], rect(*boxes[0]))


def test_sets_that_share_instance_ids_are_evaluated_one_at_a_time(voxdet):
    path, _ = voxdet
    anns = load_anns(path)
    with pytest.raises(
        AnnotationError, match="sets 'OWID' and 'RoboTools' share instance ids .* set=OWID or set=RoboTools"
    ):
        select_set(anns, None)
    assert {a.set for a in select_set(anns, "RoboTools")} == {"RoboTools"}
    assert len(select_set(anns, "RoboTools")) == 6
    with pytest.raises(AnnotationError, match="set='robotools': no annotation has this set; .*'OWID', 'RoboTools'"):
        select_set(anns, "robotools")


def _entry_error(tmp_path, entry, match):
    (tmp_path / "a.jpg").write_bytes(b"")
    torch.save({"a.jpg": entry}, tmp_path / "anns.pt")
    with pytest.raises(AnnotationError, match=match):
        load_anns(tmp_path / "anns.pt")


def test_malformed_voxdet_entries_are_refused_with_the_key(tmp_path):
    mask = rect(2, 2, 6, 6)
    query = {"bbox": (2, 2, 5, 5), "mask": builder_rle(mask), "is_query": True, "ins": 3, "set": "OWID"}
    _entry_error(
        tmp_path, {**query, "colour": 1}, r"entry 'a.jpg': a VoxDet-SoIR entry has keys .* unknown \['colour'\]"
    )
    _entry_error(
        tmp_path,
        {**query, "mask": {"counts": [5], "size": (2, 3), "transpose": False}},
        "'a.jpg'.*counts sum to 5, size says 6",
    )
    gallery = {"bbox": [(0, 0, 4, 4), (1, 1, 3, 3)], "mask": [], "ins": [1], "num_ins": [], "is_query": False}
    _entry_error(tmp_path, gallery, "gallery 'ins' must be a list with one id per box \\(2\\)")
    _entry_error(tmp_path, {**gallery, "ins": [1, 2], "num_ins": [1]}, "'num_ins' must be \\[\\] or a list with one")
    _entry_error(
        tmp_path,
        {**gallery, "ins": [1, 2], "bbox": [(0, 0, 4, 4), (3, 3, 3, 5)]},
        "gallery 'bbox' 1 is empty or inverted",
    )
    _entry_error(
        tmp_path, {**gallery, "ins": [1, 2], "mask": [[[1, 2]], []]}, "gallery 'mask' 0: expected COCO polygons"
    )


def test_a_mask_that_fits_neither_its_box_nor_as_complement_names_the_image(tmp_path):
    from tests.datasets.voxdet_replica import _image

    _image(tmp_path / "q.jpg", [], 0)
    mask = rect(20, 10, 35, 30)
    torch.save(
        {"q.jpg": {"bbox": (0, 0, 5, 5), "mask": builder_rle(mask), "is_query": True, "ins": 1}}, tmp_path / "anns.pt"
    )
    with pytest.raises(AnnotationError, match="q.jpg.*neither the decoded mask"):
        annotation_masks(load_anns(tmp_path / "anns.pt"))


def test_builders_empty_query_mask_marker(tmp_path):
    from tests.datasets.voxdet_replica import _image

    _image(tmp_path / "q.jpg", [], 0)
    empty = np.zeros((HEIGHT, WIDTH), dtype=bool)
    torch.save(
        {"q.jpg": {"bbox": (0, 0, WIDTH, HEIGHT), "mask": builder_rle(empty), "is_query": True, "ins": 1}},
        tmp_path / "anns.pt",
    )
    [query] = load_anns(tmp_path / "anns.pt")
    assert query.bbox == (0.0, 0.0, float(WIDTH), float(HEIGHT))
    assert query.masks == (AnnotatedMask("voxdet_rle", builder_rle(empty), None),)
    assert annotation_masks([query]) == {}  # an empty mask is no mask


def _pipeline_args(tiny_model_dirs, path, *extra):
    return (
        "dataset=voxdet",
        "extractor=siglip_mi_features",
        f"model_name={tiny_model_dirs['siglip']}",
        "vec_dim=32",
        f"anns_file={path}",
        "set=RoboTools",
        "masks_from=anns",
        "num_workers=0",
        "batch_size=4",
        "mi_iterations=2",
        *extra,
    )


def test_end_to_end_roboTools_with_its_own_masks(tiny_model_dirs, voxdet, tmp_path):
    path, facts = voxdet
    proc = run_main("create_index.py", *_pipeline_args(tiny_model_dirs, path), cwd=tmp_path, check=False)
    assert proc.returncode != 0
    assert "3 of 3 gallery images have no masks in" in proc.stderr and "box_masks=true uses boxes" in proc.stderr
    proc = run_main(
        "create_index.py", *_pipeline_args(tiny_model_dirs, path, "box_masks=true", "mask_input=true"), cwd=tmp_path
    )
    assert "1 VoxDet masks start with a 1-pixel" in proc.stdout + proc.stderr
    features = features_dir_from(proc, tmp_path)
    summary = json.loads((features / "summary.json").read_text())
    boxes = sum(len(b) for k, b in facts["gallery_boxes"].items() if "RoboTools" in k)
    assert (summary["queries"], summary["gallery_images"], summary["gallery_rows"]) == (3, 3, boxes)
    queries = json.loads((features / "queries" / "images.json").read_text())
    assert [q["bbox"] for q in queries] == [[20.0, 10.0, 35.0, 30.0], [0.0, 0.0, 12.0, 9.0], [30.0, 5.0, 61.0, 20.0]]
    results_dir = results_dir_from(
        run_main("search_index.py", "dataset=voxdet", f"features_dir={features}", cwd=tmp_path)
    )
    results, _ = read_results(results_dir)
    assert results["num_queries"] == 3 and results["num_gallery_images"] == 3
    rows = [line.split(",") for line in (results_dir / "per_query.csv").read_text().splitlines()[1:]]
    assert [(Path(q).parts[-3], ins, positives) for q, ins, positives, *_ in rows] == [
        ("drill_1", "1", "2"),
        ("drill_1", "1", "2"),
        ("hammer_2", "2", "2"),
    ]
