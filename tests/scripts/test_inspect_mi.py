"""scripts/inspect_mi.py: the PNG grid of masks, LeGrad maps and loss curves, offline with --tiny."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from datasets import load_captions
from scripts.inspect_mi import LABEL_HEIGHT, main

CELL = 128


@pytest.fixture(scope="module")
def scene(demo_dir):
    """A demo gallery image with at least three masks, and its captions key."""
    captions = load_captions(demo_dir / "captions.pt")
    key = next(k for k, v in sorted(captions.items()) if k.startswith("gallery/") and len(v) >= 3)
    return demo_dir / key, key, captions[key]


def _cell(grid: np.ndarray, row: int, column: int) -> np.ndarray:
    top = row * (CELL + LABEL_HEIGHT) + LABEL_HEIGHT
    return grid[top : top + CELL, column * CELL : (column + 1) * CELL]


def test_grid_has_the_image_masks_maps_and_curves(demo_dir, scene, tmp_path):
    image, key, entry = scene
    out = main(
        [
            "--image",
            str(image),
            "--captions",
            str(demo_dir / "captions.pt"),
            "--tiny",
            "--mi_iterations",
            "4",
            "--masks",
            "2",
            "0",
            "--cell",
            str(CELL),
            "--out",
            str(tmp_path / "grid.png"),
        ]
    )
    grid = np.asarray(Image.open(out).convert("RGB")).astype(int)
    assert grid.shape == (3 * (CELL + LABEL_HEIGHT), 3 * CELL, 3)  # image + 2 masks wide, 3 rows
    # Row 2, column 1 is the MI map of entry mask 2 (the first asked for): its cyan outline hugs that mask's box.
    width, height = Image.open(image).size
    scale = CELL / max(width, height)
    offset_x, offset_y = (CELL - round(width * scale)) // 2, (CELL - round(height * scale)) // 2
    x1, y1, x2, y2 = entry.bboxes[2]
    cell = _cell(grid, 1, 1)
    ys, xs = np.nonzero((cell[..., 0] < 60) & (cell[..., 1] > 200) & (cell[..., 2] > 200))
    assert len(xs) > 5
    assert xs.min() >= offset_x + x1 * scale - 5 and xs.max() <= offset_x + x2 * scale + 5
    assert ys.min() >= offset_y + y1 * scale - 5 and ys.max() <= offset_y + y2 * scale + 5
    # The maps differ from the plain image (colormap blended) and from each other.
    assert np.abs(_cell(grid, 1, 0) - _cell(grid, 0, 0)).mean() > 10
    assert np.abs(_cell(grid, 1, 1) - _cell(grid, 1, 2)).mean() > 1
    # Row 3 holds the curves: coloured lines on white.
    curves = grid[2 * (CELL + LABEL_HEIGHT) :]
    assert (np.abs(curves - (31, 119, 180)).sum(-1) < 40).sum() > 20  # mask 2's line, first colour


def test_key_lookup_overwrite_and_bad_masks(demo_dir, scene, tmp_path, capsys):
    image, key, entry = scene
    args = [
        "--image",
        str(image),
        "--captions",
        str(demo_dir / "captions.pt"),
        "--tiny",
        "--mi_iterations",
        "1",
        "--cell",
        "64",
        "--max_masks",
        "1",
    ]
    out = tmp_path / "a.png"
    main(args + ["--out", str(out)])  # found by its path relative to the captions folder
    assert f"{key}: 1 masks" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="exists; pass --overwrite"):
        main(args + ["--out", str(out)])
    main(args + ["--out", str(out), "--overwrite", "--key", key])
    with pytest.raises(SystemExit, match="has no entry for .* pass --key"):
        main(args + ["--out", str(tmp_path / "b.png"), "--key", "gallery/nothing.jpg"])
    with pytest.raises(SystemExit, match=rf"--masks \[99\]: the entry has {len(entry)} masks"):
        main(args + ["--out", str(tmp_path / "c.png"), "--masks", "99"])


def test_offline_without_the_model_is_one_line_naming_the_scripts_own_flag(scene, tmp_path, capsys, monkeypatch):
    """Fails on main 4e786ae: a traceback ending in SoIRError whose fix named `model_name=` (a
    create_index.py key) although this script's flag is --model."""
    import huggingface_hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    path, _, _ = scene
    with pytest.raises(SystemExit) as exit_:
        main(
            ["--image", str(path), "--captions", str(path.parents[1] / "captions.pt"), "--out", str(tmp_path / "g.png")]
        )
    assert exit_.value.code == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: model 'google/siglip-base-patch16-384' is needed") and "\n" not in err
    assert "pass --model /path/to/a/local/folder" in err and "model_name" not in err
    assert not (tmp_path / "g.png").exists()
