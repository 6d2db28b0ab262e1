"""Speed of scripts/create_masked_dataset.py with full-size random OWLv2-B/16 (960 px) and SAM ViT-B.

Models are built from configs with random weights (no download): ``Owlv2Config()`` defaults
(ViT-B/16) with ``image_size=960`` as in google/owlv2-base-patch16-ensemble (3600 boxes per image)
with the detection heads redrawn at
1/sqrt(fan_in) (``utils.testing.tiny_models.redraw_owlv2_heads``; OWLv2's own init
saturates every score to 0 or 1 and no box survives), and SAM ``vit_b``. Both are saved to a
temp folder and the script's real ``run()`` processes ``--images`` synthetic photos (smooth
random colour fields, ``--size`` W x H) in class-agnostic mode, ``--max_objects`` boxes each.

Reported: images/s and ms per object for the whole run (model loading excluded), and the
seconds and share of each stage: load (decode), owlv2_preprocess, owlv2 (forward + NMS),
sam_embed (SAM resize + image encoder), sam_decode (prompt encoder + mask decoder +
upsampling to full size), rle (pycocotools encoding), write (shards). With ``--num_workers 0``
(default here) all stages run one after another in one process, so the shares add up.

    python benchmarks/mask_creation_speed.py                       # CPU, 4 images 1024x768
    python benchmarks/mask_creation_speed.py --device cuda --images 32 --batch_size 8
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from transformers import Owlv2Config, Owlv2ForObjectDetection, Owlv2ImageProcessor

from utils.masks import creation as mask_creation
from utils.masks.models import SAM_ARCHITECTURES, build_sam
from utils.testing.tiny_models import redraw_owlv2_heads


def save_models(folder: Path) -> tuple[Path, Path]:
    """Random OWLv2-B/16 (+ 960 px image processor) and SAM ViT-B checkpoint in ``folder``."""
    torch.manual_seed(0)
    # Owlv2Config() is ViT-B/16 but at 768 px; google/owlv2-base-patch16-ensemble runs at 960.
    owlv2 = Owlv2ForObjectDetection(Owlv2Config(vision_config={"image_size": 960}))
    redraw_owlv2_heads(owlv2)
    owlv2.save_pretrained(folder / "owlv2")
    Owlv2ImageProcessor().save_pretrained(folder / "owlv2")
    del owlv2
    checkpoint = folder / "sam_vit_b_random.pth"  # the name tells load_sam the type
    torch.save(build_sam(SAM_ARCHITECTURES["vit_b"]).state_dict(), checkpoint)
    return folder / "owlv2", checkpoint


def save_images(folder: Path, count: int, width: int, height: int) -> None:
    """JPEGs of bicubically upsampled 12x16 random colours: photo-like smooth regions and edges."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        coarse = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8))
        coarse.resize((width, height), Image.BICUBIC).save(folder / f"photo_{i:03d}.jpg", quality=90)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--size", default="1024x768", help="W x H of the synthetic photos")
    parser.add_argument("--batch_size", type=int, default=2)
    parser.add_argument("--max_objects", type=int, default=20)
    parser.add_argument("--num_workers", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    width, height = (int(v) for v in args.size.lower().split("x"))

    with tempfile.TemporaryDirectory(prefix="mask_speed_") as tmp:
        tmp = Path(tmp)
        start = time.perf_counter()
        owlv2_dir, checkpoint = save_models(tmp)
        save_images(tmp / "images", args.images, width, height)
        print(f"built and saved random OWLv2-B/16 + SAM ViT-B in {time.perf_counter() - start:.1f} s")
        run_args = mask_creation.parse_args(
            [
                "--input_dir",
                str(tmp / "images"),
                "--output_dir",
                str(tmp / "out"),
                "--owlv2_model",
                str(owlv2_dir),
                "--sam_checkpoint",
                str(checkpoint),
                "--device",
                args.device,
                "--batch_size",
                str(args.batch_size),
                "--num_workers",
                str(args.num_workers),
                "--max_objects",
                str(args.max_objects),
            ]
        )
        summary = mask_creation.run(run_args)

    stages = {k: v for k, v in summary["stage_seconds_this_run"].items() if k != "load_models"}
    total = sum(stages.values())
    objects = summary["objects"]
    device = (
        torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU, {torch.get_num_threads()} threads"
    )
    print(
        f"\n{args.images} images {width}x{height}, batch {args.batch_size}, {device}: "
        f"{args.images / total:.3f} images/s, {objects} objects, "
        f"{1000 * total / max(objects, 1):.0f} ms per object, {1000 * total / args.images:.0f} ms per image"
    )
    print("\n| stage | s total | ms / image | share |\n|---|---:|---:|---:|")
    for name, seconds in stages.items():
        print(f"| {name} | {seconds:.2f} | {1000 * seconds / args.images:.0f} | {100 * seconds / total:.1f} % |")
    print(f"| model loading (once) | {summary['stage_seconds_this_run'].get('load_models', 0):.2f} | | |")


if __name__ == "__main__":
    main()
