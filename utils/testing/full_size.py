"""Full-size random models (same FLOPs as the trained checkpoints, random weights) and random inputs, for
the speed benchmarks (benchmarks/mi_speed.py, benchmarks/gpu_check.py): every timing runs on these, offline."""

from __future__ import annotations

import torch
from transformers import (
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
    Dinov2Config,
    Dinov2Model,
    Dinov2WithRegistersConfig,
    Dinov2WithRegistersModel,
    DINOv3ViTConfig,
    DINOv3ViTModel,
    Siglip2VisionConfig,
    Siglip2VisionModel,
    SiglipVisionConfig,
    SiglipVisionModel,
)

from datasets.preprocessing import NaFlexPreprocess
from extractors.mi.vit_adapters import vit_parts

# family: (label, model builder, image size: square side in pixels, or for NaFlex the (height, width) of a photo)
FAMILIES = {
    "siglip": ("SigLIP-B/16-384", lambda: SiglipVisionModel(SiglipVisionConfig(image_size=384, patch_size=16)), 384),
    "dinov2": ("DINOv2-B/14-224", lambda: Dinov2Model(Dinov2Config(image_size=224, patch_size=14)), 224),
    "clip": (
        "CLIP-B/16-224",
        lambda: CLIPVisionModelWithProjection(CLIPVisionConfig(image_size=224, patch_size=16)),
        224,
    ),
    "dinov2reg": (
        "DINOv2reg-B/14-224",
        lambda: Dinov2WithRegistersModel(
            Dinov2WithRegistersConfig(image_size=224, patch_size=14, num_register_tokens=4)
        ),
        224,
    ),
    "dinov3": (
        "DINOv3-B/16-224",
        lambda: DINOv3ViTModel(
            DINOv3ViTConfig(
                hidden_size=768,
                intermediate_size=3072,
                num_attention_heads=12,
                num_register_tokens=4,
                image_size=224,
                patch_size=16,
            )
        ),
        224,
    ),
    "siglip2": ("SigLIP2-B/16-NaFlex", lambda: Siglip2VisionModel(Siglip2VisionConfig(num_patches=256)), (480, 640)),
}


def build(family: str, device: torch.device):
    name, make, size = FAMILIES[family]
    torch.manual_seed(0)
    model = make().eval().to(device)
    model.set_attn_implementation("eager")
    return name, model, size


def inputs(model, size, images: int, masks: int, device: torch.device):
    """(pixel_values, masks, extra MI keyword arguments) of random images with random box masks.

    NaFlex models: patch sequences of a ``size`` = (height, width) photo resized as Siglip2ImageProcessor
    does (within the model's num_patches), with spatial_shapes; masks at the resized photo's size."""
    generator = torch.Generator().manual_seed(0)
    config = model.config
    if vit_parts(model).naflex:
        p = config.patch_size
        naflex = NaFlexPreprocess(p, config.num_patches, (0.5,) * 3, (0.5,) * 3)
        height, width = naflex.resized_size(*size)
        pixels = torch.randn(images, config.num_patches, 3 * p * p, generator=generator)
        kw = dict(spatial_shapes=torch.tensor([[height // p, width // p]] * images))
    else:
        height = width = size
        pixels = torch.randn(images, 3, size, size, generator=generator)
        kw = {}
    # random boxes covering 5-40 % of the image side each way
    m = torch.zeros(images, masks, height, width)
    for b in range(images):
        for p in range(masks):
            h = torch.randint(height // 20, height * 2 // 5, (1,), generator=generator).item()
            w = torch.randint(width // 20, width * 2 // 5, (1,), generator=generator).item()
            y, x = (
                torch.randint(0, height - h, (1,), generator=generator).item(),
                torch.randint(0, width - w, (1,), generator=generator).item(),
            )
            m[b, p, y : y + h, x : x + w] = 1
    return pixels.to(device), m.to(device), kw
