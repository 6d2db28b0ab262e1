"""example/run_example.sh --tiny: each setting indexed and searched once, then one comparison table
(scripts/compare_runs.py) of global vs MI (ground-truth masks) vs MI (OWLv2 + SAM masks)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from scripts.compare_runs import compare, main
from tests.pipeline import ROOT


def _results(folder: Path, mAP: float, r1: float, r5: float, report: bool) -> Path:
    folder.mkdir(parents=True)
    (folder / "results.json").write_text(json.dumps({"mAP": mAP, "recall": {"1": r1, "5": r5, "10": 1.0}}))
    if report:
        (folder / "report.html").write_text("<html></html>")
    return folder


def test_compare_runs_reads_each_results_json(tmp_path, capsys):
    a = _results(tmp_path / "a", 0.2393, 1 / 6, 0.5, report=True)
    b = _results(tmp_path / "b", 0.5, 0.25, 0.75, report=False)
    rows = compare([("global", a), ("mi_ground_truth_masks", b)])
    assert rows == [
        {"setting": "global", "mAP": "23.93", "R@1": "16.67", "R@5": "50.00", "report": str(a / "report.html")},
        {"setting": "mi_ground_truth_masks", "mAP": "50.00", "R@1": "25.00", "R@5": "75.00", "report": "(none)"},
    ]
    main([f"global={a}", f"mi={b}"])
    lines = capsys.readouterr().out.splitlines()
    assert [c.strip() for c in lines[0].split("|")] == ["setting", "mAP", "R@1", "R@5", "report"]
    assert [c.strip() for c in lines[2].split("|")][:2] == ["mi", "50.00"]


@pytest.mark.slow
def test_the_demo_searches_each_setting_once_and_ends_with_one_table(tmp_path):
    """Fails on main 4e786ae: search_index.py ran again after each create_index.py (6 tables, 6 run
    folders) and no table compared the settings. Run in a copy of the repository (the script writes
    demo_data/ and outputs/ next to itself), with 2 MI iterations to keep it short."""
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    for name in files:
        if (ROOT / name).is_file():
            (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / name).write_bytes((ROOT / name).read_bytes())
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.run(
        ["bash", "example/run_example.sh", "--tiny", "mi_iterations=2", "num_workers=0"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = sorted((tmp_path / "outputs" / "runs").glob("*/*"))
    assert len(runs) == 3 and all("-create_index-" in run.name for run in runs)  # no second search
    assert proc.stdout.count("    mAP |     R@1") == 3  # each setting's table, once
    table = proc.stdout.split("=== global embedding vs Mask Inversion")[1].splitlines()[1:]
    assert [c.strip() for c in table[0].split("|")] == ["setting", "mAP", "R@1", "R@5", "report"]
    rows = {cells[0]: cells for cells in ([c.strip() for c in line.split("|")] for line in table[1:4])}
    assert sorted(rows) == ["global", "mi_ground_truth_masks", "mi_owlv2_sam_masks"]
    for name, cells in rows.items():
        report = Path(cells[4])
        assert report.is_file() and f"-{name}-" in report.parent.name
        results = json.loads((report.parent / "results.json").read_text())
        assert cells[1:4] == [f"{100 * results['mAP']:.2f}", *(f"{100 * results['recall'][k]:.2f}" for k in "15")]
    terminal = proc.stdout + proc.stderr
    assert "Traceback" not in terminal and "Warning" not in terminal and "[INFO]" not in terminal
