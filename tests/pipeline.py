"""Helpers to run create_index.py / search_index.py as users do: a subprocess from another folder."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_script(script: str, *overrides: str, cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    """Run ``python <repo>/<script> overrides...`` in ``cwd`` with the hub offline."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / script), *overrides], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def features_dir_from(proc: subprocess.CompletedProcess, cwd: Path) -> Path:
    line = next(s for s in proc.stdout.splitlines() if s.startswith(("features and index: ", "features: ")))
    return cwd / line.split(": ", 1)[1]


def results_dir_from(proc: subprocess.CompletedProcess) -> Path:
    line = next(s for s in proc.stdout.splitlines() if s.startswith("results: "))
    return Path(line.split(": ", 1)[1])


def read_results(folder: Path) -> tuple[dict, list[dict]]:
    results = json.loads((folder / "results.json").read_text())
    rankings = [json.loads(line) for line in (folder / "rankings.jsonl").read_text().splitlines()]
    return results, rankings
