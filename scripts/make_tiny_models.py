"""Tiny, randomly initialised backbones saved to disk, for tests and the offline demo.

    python scripts/make_tiny_models.py --out demo_data/tiny_models

Each builder creates a model from its config (no download), saves it together with an
image-processor config to ``folder`` and returns the folder, so it is loaded through the same
``from_pretrained`` path as real hub ids. Random weights: retrieval numbers made with them mean nothing.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
from transformers import (
    BitImageProcessor,
    CLIPConfig,
    CLIPImageProcessor,
    CLIPModel,
    Dinov2Config,
    Dinov2Model,
    SiglipConfig,
    SiglipImageProcessor,
    SiglipModel,
)

# Small but not degenerate: 3 blocks (so layer_index -1 and -2 both make sense), 2 heads,
# a 4x4 patch grid.
_COMMON = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64)


def save_tiny_dinov2(folder: str | Path, seed: int = 0) -> Path:
    """Dinov2Model, patch 14, 56x56 input (4x4 patches + CLS), BitImageProcessor crop 56."""
    torch.manual_seed(seed)
    model = Dinov2Model(Dinov2Config(**_COMMON, image_size=56, patch_size=14))
    processor = BitImageProcessor(size={"shortest_edge": 64}, crop_size={"height": 56, "width": 56},
                                  image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])
    return _save(model, processor, folder)


def save_tiny_siglip(folder: str | Path, seed: int = 0) -> Path:
    """A whole SiglipModel (text tower too, as hub checkpoints are) whose vision tower is patch 16,
    64x64 input (4x4 patches, no CLS), with the attention-pooling head."""
    torch.manual_seed(seed)
    model = SiglipModel(SiglipConfig(text_config=dict(**_COMMON, vocab_size=64),
                                     vision_config=dict(**_COMMON, image_size=64, patch_size=16)))
    processor = SiglipImageProcessor(size={"height": 64, "width": 64})
    return _save(model, processor, folder)


def save_tiny_clip(folder: str | Path, seed: int = 0) -> Path:
    """A whole CLIPModel (text tower too, as hub checkpoints are) whose vision tower is patch 16,
    64x64 input (4x4 patches + CLS), projection 24."""
    torch.manual_seed(seed)
    model = CLIPModel(CLIPConfig(text_config=dict(**_COMMON, vocab_size=64, projection_dim=24),
                                 vision_config=dict(**_COMMON, image_size=64, patch_size=16, projection_dim=24),
                                 projection_dim=24))
    processor = CLIPImageProcessor(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64})
    return _save(model, processor, folder)


def _save(model: torch.nn.Module, processor, folder: str | Path) -> Path:
    folder = Path(folder)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


TINY_BUILDERS = {"dinov2": save_tiny_dinov2, "siglip": save_tiny_siglip, "clip": save_tiny_clip}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder; one sub-folder per family")
    args = parser.parse_args()
    for name, build in TINY_BUILDERS.items():
        print(f"{name}: {build(args.out / name)}")


if __name__ == "__main__":
    main()
