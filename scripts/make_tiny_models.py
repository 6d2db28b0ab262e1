"""Tiny, randomly initialised models saved to disk, for tests and the offline demo.

    python scripts/make_tiny_models.py --out demo_data/tiny_models

One sub-folder per model (dinov2/, dinov2reg/, dinov3/, siglip/, siglip2/, clip/, owlv2/, sam/); what each
is and how it is built: utils/testing/tiny_models.py. Random weights: numbers made with them mean nothing.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from transformers.utils import logging as hf_logging

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: make the repository's packages importable
    sys.path.insert(0, str(ROOT))
from utils.errors import SoIRError
from utils.files import claim_folder
from utils.testing.tiny_models import TINY_BUILDERS, save_tiny_owlv2, save_tiny_sam


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder; one sub-folder per model")
    args = parser.parse_args(argv)
    hf_logging.disable_progress_bar()  # a "Writing model shards" bar per tiny model says nothing
    try:  # a user's folder (their own clip/model.safetensors ...) is never overwritten with random weights
        claim_folder(args.out, "tiny_models")
    except SoIRError as err:
        raise SystemExit(f"error: {err}") from None
    for name, build in TINY_BUILDERS.items():
        print(f"{name}: {build(args.out / name)}")
    print(f"owlv2: {save_tiny_owlv2(args.out / 'owlv2')}")
    checkpoint, config = save_tiny_sam(args.out / "sam")
    print(f"sam: {checkpoint} (--sam_config {config})")


if __name__ == "__main__":
    main()
