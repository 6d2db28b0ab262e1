"""Per-object descriptors side by side: speed, and how close each comes to the 100-iteration MI vector.

Full-size ViT-B backbones with random weights (same FLOPs as trained ones; no download): DINOv2-B/14 at
224 and SigLIP-B/16 at 384, each image (640 x 480, random pixels) with ``--masks`` random rectangular
object masks (sides 6-20 % of the image's). For each descriptor, through the extractors create_index.py
uses (``extract_batch``: the whole batch of images at once):

    global        the plain global embedding (one vector per image, for all its objects)
    mask_pool     object_desc=mask_pool: one forward pass, one vector per mask
    crop          object_desc=crop: each mask's padded box embedded, the crops in one forward pass
    MI-N          object_desc=mi, ``--iterations`` (100) from the global embedding
    MI-n pool     mi_init=mask_pool, ``--short-iterations`` (20) from the pooled vector

it prints objects per second (global: images per second x masks, i.e. per object it "describes") and the
mean cosine of each object's vector to its MI-N vector: a convergence figure, NOT an accuracy claim (the
weights are random).

    python benchmarks/descriptor_speed.py                        # CPU, 2 threads, 1 image x 10 masks
    python benchmarks/descriptor_speed.py --families dinov2 --iterations 20 --short-iterations 5   # quick
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from transformers import (
    BitImageProcessor,
    Dinov2Config,
    Dinov2Model,
    SiglipImageProcessor,
    SiglipVisionConfig,
    SiglipVisionModel,
)

from extractors import DINOv2Extractor, DINOv2MIExtractor, SigLIPExtractor, SigLIPMIExtractor

# Full-size ViT-B configs of the default checkpoints (random weights), as benchmarks/extract_speed.py.
FAMILIES = {
    "dinov2": (
        "DINOv2-B/14-224",
        DINOv2Extractor,
        DINOv2MIExtractor,
        lambda: Dinov2Model(Dinov2Config(image_size=518, patch_size=14)),
        lambda: BitImageProcessor(size={"shortest_edge": 256}, crop_size={"height": 224, "width": 224}),
    ),
    "siglip": (
        "SigLIP-B/16-384",
        SigLIPExtractor,
        SigLIPMIExtractor,
        lambda: SiglipVisionModel(SiglipVisionConfig(image_size=384, patch_size=16)),
        lambda: SiglipImageProcessor(size={"height": 384, "width": 384}),
    ),
}


def scenes(num_images: int, num_masks: int, rng: np.random.Generator) -> tuple[list[Image.Image], list[np.ndarray]]:
    """Random 640 x 480 images, each with ``num_masks`` random rectangles [P, 480, 640] (bool)."""
    images, masks = [], []
    for _ in range(num_images):
        images.append(Image.fromarray(rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)))
        m = np.zeros((num_masks, 480, 640), dtype=bool)
        for p in range(num_masks):
            h, w = (int(rng.uniform(0.06, 0.2) * side) for side in (480, 640))
            y, x = int(rng.integers(0, 480 - h)), int(rng.integers(0, 640 - w))
            m[p, y : y + h, x : x + w] = True
        masks.append(m)
    return images, masks


def timed(fn) -> tuple[float, list[torch.Tensor]]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    parser.add_argument("--images", type=int, default=1)
    parser.add_argument("--masks", type=int, default=10)
    parser.add_argument("--iterations", type=int, default=100)
    parser.add_argument("--short-iterations", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    images, masks = scenes(args.images, args.masks, np.random.default_rng(0))
    objects = args.images * args.masks
    print(
        f"device={args.device} torch {torch.__version__} threads={args.threads} images={args.images} (640x480) "
        f"x {args.masks} masks = {objects} objects; random full-size weights"
    )
    print(f"| model | descriptor | objects / s | s / object | mean cos to MI-{args.iterations} |")
    print("|---|---|---|---|---|")
    for name in args.families:
        label, plain_cls, mi_cls, build_model, build_processor = FAMILIES[name]
        with tempfile.TemporaryDirectory() as folder:
            build_model().save_pretrained(folder)
            build_processor().save_pretrained(folder)
            common = dict(device=args.device, batch_size=args.images)
            runs = {
                "global": (plain_cls(folder, **common), False),
                "mask_pool": (mi_cls(folder, object_desc="mask_pool", **common), True),
                "crop": (mi_cls(folder, object_desc="crop", **common), True),
                f"MI-{args.iterations}": (mi_cls(folder, mi_iterations=args.iterations, **common), True),
                f"MI-{args.short_iterations} from mask_pool": (
                    mi_cls(folder, mi_iterations=args.short_iterations, mi_init="mask_pool", **common),
                    True,
                ),
            }
            results = {}
            for descriptor, (extractor, with_masks) in runs.items():
                extractor.extract_batch(images[:1])  # warm-up of this model copy (page faults, allocator, MKL)
                seconds, vectors = timed(
                    lambda: extractor.extract_batch(images, masks if with_masks else None)  # noqa: B023
                )
                results[descriptor] = (seconds, torch.cat([v.reshape(-1, v.shape[-1]) for v in vectors]))
            reference = results[f"MI-{args.iterations}"][1]
            for descriptor, (seconds, vectors) in results.items():
                if descriptor == "global":  # one vector per image stands for each of its objects
                    vectors = vectors.repeat_interleave(args.masks, dim=0)
                cosine = float((vectors * reference).sum(-1).mean())
                print(f"| {label} | {descriptor} | {objects / seconds:.2f} | {seconds / objects:.3f} | {cosine:.3f} |")


if __name__ == "__main__":
    main()
