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

import argparse
import os
import sys
from pathlib import Path
from typing import Sequence

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: make the packages importable
    sys.path.insert(0, str(ROOT))

from utils.errors import SoIRError
from utils.mask_creation import run
from utils.mask_models import SAM_ARCHITECTURES, DetectionOptions


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    io = parser.add_argument_group("input / output")
    io.add_argument("--input_dir", type=Path, help="gallery mode: folder of images (searched recursively)")
    io.add_argument("--output_dir", type=Path, required=True, help="captions.pt, shards/, previews, summary")
    io.add_argument(
        "--absolute_keys",
        action="store_true",
        help="key captions by resolved absolute path instead of the path relative to --input_dir",
    )
    io.add_argument("--anns_file", type=Path, help="queries mode: anns.pt whose query bboxes become SAM prompts")
    io.add_argument("--queries_only", action="store_true", help="required with --anns_file: mask its queries")
    io.add_argument("--galleries_dir", type=Path, help="with --anns_file: root of relative gallery paths")
    io.add_argument("--queries_dir", type=Path, help="with --anns_file: root of relative query paths")
    det = parser.add_argument_group("OWLv2 detection (gallery mode)")
    det.add_argument("--owlv2_model", default="google/owlv2-base-patch16-ensemble", help="hub id or local folder")
    det.add_argument(
        "--queries",
        nargs="+",
        metavar="TEXT",
        help='text queries ("a mug" "a toy"); default: class-agnostic objectness',
    )
    det.add_argument("--score_threshold", type=float, default=0.2, help="keep boxes scoring above this")
    det.add_argument(
        "--nms_iou", type=float, default=0.4, help="NMS IoU threshold (class-agnostic; the original's 0.4)"
    )
    det.add_argument(
        "--max_objects",
        type=int,
        default=None,
        help="at most this many boxes per image (default: no cap, as the original)",
    )
    det.add_argument(
        "--min_box_size",
        type=float,
        default=0.0,
        help="drop boxes narrower or lower (pixels; default 0, as the original)",
    )
    det.add_argument(
        "--fallback",
        choices=("automatic", "none"),
        default="automatic",
        help="an image where OWLv2 finds nothing: SAM's automatic mask generator (the original's fallback) or no masks",
    )
    det.add_argument(
        "--automatic_pred_iou_thresh",
        type=float,
        default=0.88,
        help="--fallback automatic: keep masks SAM predicts above this IoU (SAM's default)",
    )
    det.add_argument(
        "--automatic_stability_thresh",
        type=float,
        default=0.95,
        help="--fallback automatic: keep masks with a stability score above this (SAM's default)",
    )
    det.add_argument(
        "--exact_owlv2_resize",
        action="store_true",
        help="use the OWLv2 processor's Gaussian anti-aliasing on full-size images (30x slower "
        "on 12 MP photos) instead of a PIL pre-shrink to the model's input size",
    )
    seg = parser.add_argument_group("SAM segmentation")
    seg.add_argument("--sam_checkpoint", type=Path, required=True, help="e.g. sam_vit_h_4b8939.pth")
    seg.add_argument(
        "--sam_model_type", choices=sorted(SAM_ARCHITECTURES), help="default: inferred from the checkpoint file name"
    )
    seg.add_argument(
        "--sam_config",
        type=Path,
        help="JSON of SamArchitecture fields for a SAM that is not vit_h/l/b (overrides the type)",
    )
    run_group = parser.add_argument_group("run")
    run_group.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    run_group.add_argument("--batch_size", type=int, default=8, help="images per OWLv2 forward pass")
    run_group.add_argument(
        "--num_workers",
        type=int,
        default=min(4, os.cpu_count() or 1),
        help="DataLoader processes that decode and preprocess images (0: main process)",
    )
    run_group.add_argument("--shard_size", type=int, default=1000, help="images per resumable shard")
    run_group.add_argument("--max_shards", type=int, help="stop after this many new shards (e.g. job time limits)")
    run_group.add_argument(
        "--preview",
        type=int,
        default=0,
        metavar="N",
        help="write N PNGs with boxes and masks to OUTPUT_DIR/preview as soon as they are done",
    )
    run_group.add_argument("--overwrite", action="store_true", help="discard an earlier run in --output_dir")
    args = parser.parse_args(argv)
    if args.anns_file is not None and not args.queries_only:
        parser.error("--anns_file needs --queries_only (gallery images are masked from --input_dir with OWLv2)")
    if args.queries_only and args.anns_file is None:
        parser.error("--queries_only needs --anns_file")
    if (args.anns_file is None) == (args.input_dir is None):
        parser.error("give either --input_dir (gallery mode) or --anns_file --queries_only (queries mode)")
    for name in ("batch_size", "shard_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1")
    if args.num_workers < 0 or args.preview < 0 or (args.max_shards is not None and args.max_shards < 1):
        parser.error("--num_workers and --preview must be >= 0, --max_shards >= 1")
    try:
        DetectionOptions(args.score_threshold, args.nms_iou, args.max_objects, args.min_box_size)
    except ValueError as err:
        parser.error(str(err))
    return args


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
