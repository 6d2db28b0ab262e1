"""Shared fixtures: tiny random backbones saved once per test session."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import pytest

# Tests never reach the hub: every model is built from a config and loaded from a folder.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# The file-facts cache (utils.files.FileFacts) goes to a temporary folder, not the user's ~/.cache.
os.environ.setdefault("SOIR_CACHE_DIR", tempfile.mkdtemp(prefix="soir-test-cache-"))
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from utils.config import register  # noqa: E402
from utils.testing.tiny_models import TINY_BUILDERS, TINY_VARIANTS  # noqa: E402

# configs/defaults.yaml's defaults list names the schema and the extractor group, which live in Hydra's
# ConfigStore (the CLIs register them at import): every test that composes it finds them, whichever
# test ran first.
register()

# Tiny models are dominated by per-op overhead; with 2 threads on a 2-core machine that is also
# running DataLoader workers or subprocesses, thread spinning makes them 10-100x slower.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory) -> dict[str, Path]:
    """{family (utils.testing.tiny_models.TINY_BUILDERS): folder with a saved tiny model and its processor config}."""
    root = tmp_path_factory.mktemp("tiny_models")
    return {name: build(root / name) for name, build in TINY_BUILDERS.items()}


@pytest.fixture(scope="session")
def tiny_variant_dirs(tmp_path_factory) -> dict[str, Path]:
    """{variant (TINY_VARIANTS: gated MLPs, fixed-resolution SigLIP2): folder with the saved tiny model}."""
    root = tmp_path_factory.mktemp("tiny_variants")
    return {name: build(root / name) for name, build in TINY_VARIANTS.items()}


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory) -> Path:
    """The demo set of scripts/make_demo_dataset.py (small objects in cluttered scenes, GT masks)."""
    from scripts.make_demo_dataset import make_demo_dataset

    return make_demo_dataset(
        tmp_path_factory.mktemp("demo") / "demo", num_objects=4, gallery_per_object=3, distractors=4, image_size=160
    )


@pytest.fixture(scope="session")
def clip_demo_features(tiny_model_dirs, demo_dir, tmp_path_factory) -> tuple[Path, Path]:
    """(cwd, features folder) of ``create_index.py`` with tiny CLIP global features on the demo set, 5
    images per shard; shared read-only by the search and streaming tests (their runs write under cwd)."""
    from tests.pipeline import features_dir_from, run_main

    cwd = tmp_path_factory.mktemp("clip_demo")
    proc = run_main(
        "create_index.py",
        "extractor=clip_features",
        f"model_name={tiny_model_dirs['clip']}",
        "vec_dim=24",
        f"anns_file={demo_dir / 'anns.pt'}",
        "num_workers=1",
        "shard_size=5",
        cwd=cwd,
    )
    return cwd, features_dir_from(proc, cwd)


@pytest.fixture
def hydra_compose():
    """``hydra_compose(*overrides, config_name="defaults", job_name="create_index", hydra=False)``: the
    config Hydra composes for that command line (tests.pipeline.compose_config; the schema and resolvers
    registered as the CLIs register them). ``hydra=True`` keeps the ``hydra`` node (run folder, logging)."""
    from tests.pipeline import compose_config

    return compose_config
