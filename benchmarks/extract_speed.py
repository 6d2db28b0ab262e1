"""Global-feature extraction speed of full-size random ViT-B backbones (same FLOPs as trained ones).

Times the two halves of create_index.py's loop separately: preprocessing (image -> model input, done
by DataLoader workers) and the model (``Extractor.embed``, batched, inference mode).

    python benchmarks/extract_speed.py [--families siglip dinov2 clip] [--images 32] [--batch 16] [--threads 2]
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
    CLIPImageProcessor,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
    Dinov2Config,
    Dinov2Model,
    SiglipImageProcessor,
    SiglipVisionConfig,
    SiglipVisionModel,
)

from extractors import CLIPExtractor, DINOv2Extractor, SigLIPExtractor

# Full-size ViT-B configs of the default checkpoints (random weights).
FAMILIES = {
    "siglip": (
        "SigLIP-B/16-384",
        SigLIPExtractor,
        lambda: SiglipVisionModel(SiglipVisionConfig(image_size=384, patch_size=16)),
        lambda: SiglipImageProcessor(size={"height": 384, "width": 384}),
    ),
    "dinov2": (
        "DINOv2-B/14-224",
        DINOv2Extractor,
        lambda: Dinov2Model(Dinov2Config(image_size=518, patch_size=14)),
        lambda: BitImageProcessor(size={"shortest_edge": 256}, crop_size={"height": 224, "width": 224}),
    ),
    "clip": (
        "CLIP-B/16-224",
        CLIPExtractor,
        lambda: CLIPVisionModelWithProjection(CLIPVisionConfig(patch_size=16, projection_dim=512)),
        lambda: CLIPImageProcessor(),
    ),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "bf16"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (768, 1024, 3), dtype=np.uint8)) for _ in range(args.images)]

    print(
        f"device={args.device} precision={args.precision} torch threads={args.threads} "
        f"images={args.images} (1024x768) batch={args.batch}"
    )
    print(f"{'model':<18}{'preprocess img/s':>18}{'model img/s':>14}{'end-to-end img/s':>19}")
    for name in args.families:
        label, cls, build_model, build_processor = FAMILIES[name]
        with tempfile.TemporaryDirectory() as folder:
            build_model().save_pretrained(folder)
            build_processor().save_pretrained(folder)
            extractor = cls(folder, device=args.device, precision=args.precision)
            start = time.perf_counter()
            pixels = torch.stack([extractor.preprocess.image(im) for im in images])
            t_pre = time.perf_counter() - start
            extractor.embed(pixels[:2])  # warm-up
            start = time.perf_counter()
            for i in range(0, len(pixels), args.batch):
                extractor.embed(pixels[i : i + args.batch])
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            t_model = time.perf_counter() - start
        n = len(images)
        print(f"{label:<18}{n / t_pre:>18.1f}{n / t_model:>14.2f}{n / (t_pre + t_model):>19.2f}")


if __name__ == "__main__":
    main()
