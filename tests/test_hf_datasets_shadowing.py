"""Our top-level ``datasets`` package shadows HuggingFace ``datasets`` when the repo root is
sys.path[0] (``python create_index.py`` from the root). transformers must still import,
build and load a model, and ``import datasets`` must give our package."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

_SCRIPT = textwrap.dedent("""
    import sys, tempfile
    from pathlib import Path
    root = Path.cwd().resolve()
    assert sys.path[0] in ("", str(root)), sys.path[0]  # same as `python script.py` from the root

    import torch
    import transformers
    from transformers import AutoImageProcessor, SiglipVisionModel
    from transformers.utils import is_datasets_available
    from utils.testing.tiny_models import save_tiny_siglip

    with tempfile.TemporaryDirectory() as tmp:
        folder = save_tiny_siglip(tmp)
        model = SiglipVisionModel.from_pretrained(folder).eval()
        processor = AutoImageProcessor.from_pretrained(folder)
        pixels = processor(images=[torch.zeros(3, 80, 80, dtype=torch.uint8)], return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            pooled = model(pixel_values=pixels).pooler_output
    assert tuple(pooled.shape) == (1, 32), pooled.shape
    assert torch.isfinite(pooled).all()

    import datasets
    assert Path(datasets.__file__).resolve() == root / "datasets" / "__init__.py", datasets.__file__
    assert callable(datasets.load_rgb) and callable(datasets.load_anns)
    print("OK", is_datasets_available())
""")


@pytest.mark.slow  # a fresh interpreter: its import path is the subject
def test_transformers_works_and_datasets_is_ours():
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env.pop("PYTHONPATH", None)
    result = subprocess.run(
        [sys.executable, "-c", _SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.strip().startswith("OK"), result.stdout


@pytest.mark.slow  # a fresh interpreter outside the repository
def test_the_docs_notebook_cell_imports_soir_from_outside_the_repository(tmp_path):
    """docs/getting-started.md, "Notebooks outside the repository": its cell, run from another folder with
    SOIR_ROOT set and nothing of SoIR installed, imports the extractors and our ``datasets`` (not HuggingFace's).
    Fails on main 4e786ae (no such cell; ``from extractors import ...`` outside the root is a
    ModuleNotFoundError)."""
    page = (ROOT / "docs" / "getting-started.md").read_text()
    cell = page.split("<!-- notebook-outside-the-repository -->\n```python\n", 1)[1].split("```", 1)[0]
    check = "import datasets\nassert datasets.__file__.startswith(os.environ['SOIR_ROOT']), datasets.__file__\n"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"SOIR_ROOT": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-c", cell + check + "print(SigLIPMIExtractor.__name__)"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "SigLIPMIExtractor", proc.stderr[-2000:]
    outside = subprocess.run(
        [sys.executable, "-c", "import extractors"], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert "ModuleNotFoundError" in outside.stderr  # nothing is installed: the cell is what makes it work
