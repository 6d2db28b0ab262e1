#!/usr/bin/env python
"""Convert the original code's ``segmentation_results.pt`` into SoIR's ``captions.pt``.

    python scripts/convert_captions.py segmentation_results.pt --out captions.pt [--images_root DIR]

``create_index.py captions_file=`` reads the original file as it is; this writes a clean file for
users who want one: compressed RLE, masks turned to the image's EXIF orientation (the original
ignored EXIF: its masks are on the stored pixels), failed images (``{"error": ...}``) left out and
listed, scores that do not line up with the masks dropped, boxes clipped to the image (each counted).
Images are found by their key (an absolute path, or relative to ``--images_root``).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: make `datasets` and `utils` importable
    sys.path.insert(0, str(ROOT))

from datasets import ImageMasks, encode_mask, load_captions, save_captions
from datasets.images import image_facts
from utils.errors import SoIRError
from utils.files import new_file


def convert(source: Path, out: Path, images_root: Path | None) -> dict[str, int]:
    """Write ``out`` from ``source``; returns counts (images, failed, turned)."""
    captions = load_captions(source)
    failed = {k: m.error for k, m in captions.items() if m.error is not None}
    kept = {k: m for k, m in captions.items() if m.error is None}
    files = {k: Path(k) if Path(k).is_absolute() else (images_root or source.parent) / k for k in kept}
    missing = [str(f) for f in files.values() if not f.is_file()]
    if missing:
        raise SoIRError(
            f"{len(missing)} images of {source} were not found (e.g. {missing[:3]}); their EXIF "
            "orientation is needed to turn the masks: pass --images_root, the folder the keys are "
            "relative to"
        )
    turned = 0
    for (key, masks), facts in zip(kept.items(), image_facts(list(files.values()))):
        if facts.error is not None:
            raise SoIRError(f"{files[key]}: unreadable image ({facts.error})")
        if len(masks) and masks.made_before_exif and facts.exif_orientation != 1:
            masks, turned = replace(masks, exif_orientation=facts.exif_orientation), turned + 1
        # Checked from the RLE header, before any mask is decoded: a file create_index.py would refuse
        # (masks of another size) is not written, and a bogus size never allocates its pixels.
        if len(masks) and masks.upright_size != (facts.height, facts.width):
            raise SoIRError(
                f"{source}: the masks of {key} are {masks.upright_size[0]}x{masks.upright_size[1]} (H x W) but "
                f"the image {files[key]} is {facts.height}x{facts.width} (after EXIF rotation); these masks were "
                "not made on this image: fix the file or --images_root"
            )
        upright = masks.upright()
        kept[key] = ImageMasks([encode_mask(m) for m in upright.masks()], upright.bboxes, upright.scores)
    save_captions(kept, out)
    for key, reason in failed.items():
        print(f"failed in the original run, left out: {key}: {reason}")
    return {"images": len(kept), "failed": len(failed), "turned": turned}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", type=Path, help="the original code's segmentation_results.pt")
    parser.add_argument("--out", type=Path, required=True, help="captions.pt to write (a new file)")
    parser.add_argument("--images_root", type=Path, help="folder the keys are relative to (default: the source's)")
    args = parser.parse_args(argv)
    try:
        new_file(args.out, "captions.pt")
        args.out.parent.mkdir(parents=True, exist_ok=True)
        counts = convert(args.source, args.out, args.images_root)
    except SoIRError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(
        f"wrote {args.out}: {counts['images']} images ({counts['turned']} masks turned to their EXIF "
        f"orientation), {counts['failed']} failed images left out"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
