"""Image and mask preprocessing: the whole image resized to the model's input size.

No centre crop: the processors of DINOv2 and CLIP crop the centre of a resized image, which cuts
small objects near the border away. We resize the whole image (aspect ratio not kept) and take
mean, std and the resampling filter from the model's own processor config.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2 as T
from transformers import AutoImageProcessor

# PIL resampling codes used in HF processor configs -> torchvision modes.
_RESAMPLE = {0: InterpolationMode.NEAREST, 1: InterpolationMode.LANCZOS, 2: InterpolationMode.BILINEAR,
             3: InterpolationMode.BICUBIC, 4: InterpolationMode.BOX, 5: InterpolationMode.HAMMING}


@dataclass(frozen=True)
class Preprocess:
    """Turns a PIL image (and optional masks) into model input.

    Attributes:
        size: (height, width) of the model input in pixels.
        mean, std: per-channel normalisation applied to values in [0, 1].
        resample: interpolation for images (masks always use nearest neighbour).
    """

    size: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resample: InterpolationMode = InterpolationMode.BICUBIC

    @classmethod
    def from_pretrained(cls, model_name: str, **hub_kwargs) -> "Preprocess":
        """Read size, mean, std and resample from the processor config of ``model_name``."""
        cfg = AutoImageProcessor.from_pretrained(model_name, **hub_kwargs).to_dict()
        # The model's input is the crop when the processor crops, else the resize target.
        size = cfg.get("crop_size") if cfg.get("do_center_crop") else cfg.get("size")
        if not size or "height" not in size:
            raise ValueError(f"{model_name}: cannot read a fixed input size from the processor config "
                             f"(crop_size={cfg.get('crop_size')}, size={cfg.get('size')})")
        if cfg.get("do_rescale", True) and abs(cfg.get("rescale_factor", 1 / 255) - 1 / 255) > 1e-9:
            raise ValueError(f"{model_name}: rescale_factor {cfg['rescale_factor']} != 1/255 is not supported")
        mean, std = (cfg["image_mean"], cfg["image_std"]) if cfg.get("do_normalize", True) else ((0,) * 3, (1,) * 3)
        return cls(size=(int(size["height"]), int(size["width"])), mean=tuple(mean), std=tuple(std),
                   resample=_RESAMPLE[int(cfg.get("resample", 3))])

    def image(self, image: Image.Image) -> torch.Tensor:
        """PIL RGB image -> normalised float tensor [3, H, W] at the model's input size.

        Other modes are refused: converting 16-bit or transparent images needs care
        (``datasets.images.to_rgb``), not PIL's plain ``convert``.
        """
        transform = T.Compose([T.PILToTensor(), T.ToDtype(torch.float32, scale=True),
                               T.Normalize(self.mean, self.std)])
        return transform(self.resize(image))

    def resize(self, image: Image.Image) -> Image.Image:
        """PIL RGB image resized (whole, aspect ratio not kept) to the model's input size."""
        if image.mode != "RGB":
            raise ValueError(f"expected an RGB image, got mode {image.mode} (use datasets.images.to_rgb)")
        return T.Resize(self.size, interpolation=self.resample, antialias=True)(image)

    def masks(self, masks: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Masks [P, H, W] (bool, 0/1 or 0/255) -> float {0, 1} tensor [P, h, w] at the input size.

        Nearest neighbour keeps the masks binary; NEAREST_EXACT samples at pixel centres, which
        keeps masks aligned with the (centre-aligned) image resize. A mask smaller than one output
        pixel may vanish, which the caller sees as an empty mask.
        """
        return T.functional.resize(to_binary_masks(masks)[:, None], list(self.size),
                                   interpolation=InterpolationMode.NEAREST_EXACT)[:, 0].float()


def to_binary_masks(masks: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Accept bool, {0, 1} or {0, 255} masks [P, H, W]; return a bool tensor. Other values are an error."""
    masks = torch.as_tensor(np.asarray(masks) if not isinstance(masks, torch.Tensor) else masks)
    if masks.ndim != 3:
        raise ValueError(f"masks must have shape [P, H, W], got {tuple(masks.shape)}")
    if masks.dtype == torch.bool:
        return masks
    values = torch.unique(masks)
    if bool(torch.isin(values, torch.tensor([0, 1], dtype=values.dtype)).all()):
        return masks == 1
    if bool(torch.isin(values, torch.tensor([0, 255], dtype=values.dtype)).all()):
        return masks == 255
    raise ValueError(f"masks must be bool, 0/1 or 0/255; found values {values[:8].tolist()}")
