#!/usr/bin/env python
"""Object masks for Mask Inversion: OWLv2 finds the objects, SAM turns each box into a mask.

    python scripts/create_masked_dataset.py --input_dir /path/to/images --output_dir /path/to/output \\
        --sam_checkpoint /path/to/sam_vit_h_4b8939.pth --owlv2_model google/owlv2-base-patch16-ensemble

Two modes:

* gallery (``--input_dir``): every image under the folder (recursively) gets OWLv2 boxes,
  class-agnostic objectness by default or ``--queries "a mug" "a toy"``; keys are paths relative
  to ``--input_dir`` (``--absolute_keys`` for resolved absolute paths).
* queries (``--anns_file anns.pt --queries_only``): every query of ``anns.pt`` gets one SAM mask
  from its annotated bbox; keys are the ``anns.pt`` keys. OWLv2 is not used.

Everything goes to ``--output_dir``::

    captions.pt        {key: {"masks_rle": [...], "bboxes": [...], "scores": [...]}} (datasets.captions)
    shards/            shard_000000.pt, ... : --shard_size images each, written atomically
    run_config.json    the settings that determine the result; a rerun must match it to resume
    failed_images.txt  "key<TAB>reason" for every image that could not be used
    summary.json       the final summary (also printed)
    preview/           --preview N PNGs with boxes and mask overlays

A killed run is resumed by running the same command again: finished shards are kept, the
rest is computed, and ``captions.pt`` is written once every shard exists.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Sequence

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: make the packages importable
    sys.path.insert(0, str(ROOT))

from utils.errors import SoIRError
from utils.masks.creation import parse_args, run


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        run(args)
    except SoIRError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
