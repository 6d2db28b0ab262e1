"""scripts/prepare_benchmark.py: the CLI on each source replica writes loadable files and prints the statistics."""

from __future__ import annotations

import json

import numpy as np
import pytest

from datasets import load_anns, load_captions
from scripts.prepare_benchmark import main
from tests.datasets.benchmark_replicas import write_burst, write_instre
from tests.datasets.voxdet_replica import write_voxdet_soir


def test_instre_xs_cli(tmp_path, capsys):
    root = write_instre(tmp_path / "INSTRE")
    main(["instre_xs", "--root", str(root), "--out", str(tmp_path / "bench")])
    printed = capsys.readouterr().out
    assert "INSTRE-XS from" in printed
    assert [line.split() for line in printed.splitlines() if line.startswith(("queries", "gallery images"))] == [
        ["queries", "3", "2428"],
        ["gallery", "images", "2", "2065"],
    ]
    assert "left out: 1 images with more or fewer than one box" in printed
    info = json.loads((tmp_path / "bench" / "benchmark.json").read_text())
    assert info["index_args"] == [
        f"anns_file={tmp_path / 'bench' / 'anns.pt'}",
        f"galleries_dir={root}",
        f"queries_dir={root}",
    ]
    assert info["gt_mask_args"] == ["masks_from=anns", "box_masks=true"] and info["captions_file"] is None
    anns = load_anns(tmp_path / "bench" / "anns.pt", galleries_dir=root, queries_dir=root)
    assert len(anns) == 5 and info["stats"]["queries"] == 3
    # A second run does not replace the files silently; --overwrite replaces what this script wrote.
    with pytest.raises(SystemExit, match="already holds anns.pt, benchmark.json; use another --out or --overwrite"):
        main(["instre_xs", "--root", str(root), "--out", str(tmp_path / "bench")])
    main(["instre_xxs", "--root", str(root), "--out", str(tmp_path / "bench"), "--overwrite"])
    assert json.loads((tmp_path / "bench" / "benchmark.json").read_text())["benchmark"] == "instre_xxs"


def test_overwrite_refuses_files_it_did_not_write(tmp_path):
    root = write_instre(tmp_path / "INSTRE")
    (tmp_path / "bench").mkdir()
    (tmp_path / "bench" / "anns.pt").write_bytes(b"someone else's")
    with pytest.raises(SystemExit, match="not made by SoIR"):
        main(["instre_xs", "--root", str(root), "--out", str(tmp_path / "bench"), "--overwrite"])
    assert (tmp_path / "bench" / "anns.pt").read_bytes() == b"someone else's"


def test_permir_cli_writes_ground_truth_captions(tmp_path, capsys):
    annotations, frames = write_burst(tmp_path)
    main(["permir", "--root", str(frames), "--burst_annotations", str(annotations), "--out", str(tmp_path / "bench")])
    printed = capsys.readouterr().out
    assert [line.split()[:3] for line in printed.splitlines() if line.startswith("categories")] == [
        ["categories", "2", "16"]
    ]
    info = json.loads((tmp_path / "bench" / "benchmark.json").read_text())
    assert info["gt_mask_args"] == [f"captions_file={tmp_path / 'bench' / 'captions.pt'}"]
    captions = load_captions(tmp_path / "bench" / "captions.pt")
    anns = load_anns(tmp_path / "bench" / "anns.pt", galleries_dir=frames, queries_dir=frames)
    assert {a.key for a in anns} == set(captions) and len(anns) == 6
    with pytest.raises(SystemExit, match="permir needs --burst_annotations"):
        main(["permir", "--root", str(frames), "--out", str(tmp_path / "other")])


def test_voxdet_cli_validates_and_measures_roboTools(tmp_path, capsys):
    path, facts = write_voxdet_soir(tmp_path / "VoxDet")
    main(["voxdet", "--root", str(path.parent), "--out", str(tmp_path / "bench")])
    printed = capsys.readouterr().out
    rows = {
        line.split()[0]: line.split()[-2:]
        for line in printed.splitlines()
        if line.startswith(("instances", "scenes", "annotated", "mean"))
    }
    boxes = [b for k, bs in facts["gallery_boxes"].items() if "RoboTools" in k for b in bs]
    area = 100 * np.mean([(x2 - x1) * (y2 - y1) / (48 * 64) for x1, y1, x2, y2 in boxes])
    assert rows == {
        "instances": ["2", "20"],
        "scenes": ["2", "24"],
        "annotated": ["1.33", "5.80"],
        "mean": [f"{area:.2f}", "1.10"],
    }
    info = json.loads((tmp_path / "bench" / "benchmark.json").read_text())
    assert info["index_args"] == [f"anns_file={path}", "set=RoboTools"]
    assert not (tmp_path / "bench" / "anns.pt").exists()  # the authors' file is used where it is
    with pytest.raises(SystemExit, match="share instance ids"):
        main(["voxdet", "--root", str(path.parent), "--out", str(tmp_path / "all"), "--set", "all"])
