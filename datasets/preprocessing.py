"""Image and mask preprocessing: the whole image resized to the model's input size.

No centre crop: the processors of DINOv2 and CLIP crop the centre of a resized image, which cuts
small objects near the border away. We resize the whole image (aspect ratio not kept) and take
mean, std and the resampling filter from the model's own processor config (:class:`Preprocess`).

SigLIP2 NaFlex models (:class:`NaFlexPreprocess`) take each image at its own aspect ratio instead:
resized so that it holds at most ``max_num_patches`` patches, cut into a patch sequence and padded,
as ``Siglip2ImageProcessor`` does; its masks are resized to that image's own resized size.

Both have ``image`` (the model input of a PIL image), ``spatial_shape`` (its patch grid for NaFlex,
None for fixed-size models) and ``masks`` (the image's masks at the input's resolution).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2 as T
from transformers import AutoImageProcessor
from transformers.models.siglip2.image_processing_siglip2 import (
    convert_image_to_patches,
    get_image_size_for_max_num_patches,
    pad_along_first_dim,
)

# PIL resampling codes used in HF processor configs -> torchvision modes.
_RESAMPLE = {
    0: InterpolationMode.NEAREST,
    1: InterpolationMode.LANCZOS,
    2: InterpolationMode.BILINEAR,
    3: InterpolationMode.BICUBIC,
    4: InterpolationMode.BOX,
    5: InterpolationMode.HAMMING,
}


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
        if "max_num_patches" in cfg:
            raise ValueError(
                f"{model_name}: a NaFlex processor (max_num_patches={cfg['max_num_patches']}, no fixed "
                f"input size); use NaFlexPreprocess (the siglip2 extractors)"
            )
        # The model's input is the crop when the processor crops, else the resize target.
        size = cfg.get("crop_size") if cfg.get("do_center_crop") else cfg.get("size")
        if not size or "height" not in size:
            raise ValueError(
                f"{model_name}: cannot read a fixed input size from the processor config "
                f"(crop_size={cfg.get('crop_size')}, size={cfg.get('size')})"
            )
        mean, std, resample = _normalisation(model_name, cfg)
        return cls(size=(int(size["height"]), int(size["width"])), mean=mean, std=std, resample=resample)

    def image(self, image: Image.Image) -> torch.Tensor:
        """PIL RGB image -> normalised float tensor [3, H, W] at the model's input size.

        Other modes are refused: converting 16-bit or transparent images needs care
        (``datasets.images.to_rgb``), not PIL's plain ``convert``.
        """
        transform = T.Compose([T.PILToTensor(), T.ToDtype(torch.float32, scale=True), T.Normalize(self.mean, self.std)])
        return transform(self.resize(image))

    def resize(self, image: Image.Image) -> Image.Image:
        """PIL RGB image resized (whole, aspect ratio not kept) to the model's input size."""
        if image.mode != "RGB":
            raise ValueError(f"expected an RGB image, got mode {image.mode} (use datasets.images.to_rgb)")
        return T.Resize(self.size, interpolation=self.resample, antialias=True)(image)

    def spatial_shape(self, image: Image.Image) -> None:
        """None: every image has the model's one patch grid (see :class:`NaFlexPreprocess`)."""
        return None

    def masks(self, masks: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Masks [P, H, W] (bool, 0/1 or 0/255) -> float {0, 1} tensor [P, h, w] at the input size.

        Nearest neighbour keeps the masks binary; NEAREST_EXACT samples at pixel centres, which
        keeps masks aligned with the (centre-aligned) image resize. A mask smaller than one output
        pixel may vanish, which the caller sees as an empty mask.
        """
        return T.functional.resize(
            to_binary_masks(masks)[:, None], list(self.size), interpolation=InterpolationMode.NEAREST_EXACT
        )[:, 0].float()


@dataclass(frozen=True)
class NaFlexPreprocess:
    """SigLIP2 NaFlex input of a PIL image: a patch sequence at the image's own aspect ratio.

    The image is resized (whole, no crop) to the largest size whose sides are multiples of the patch
    size and that holds at most ``max_num_patches`` patches (transformers'
    ``get_image_size_for_max_num_patches``, the rule of ``Siglip2ImageProcessor``), normalised, cut
    into patches row by row and zero-padded to ``max_num_patches``.

    Attributes:
        patch_size: pixels per patch side.
        max_num_patches: length of every patch sequence (the image's patches, then padding).
        mean, std: per-channel normalisation applied to values in [0, 1].
        resample: interpolation for images (masks always use nearest neighbour).
    """

    patch_size: int
    max_num_patches: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resample: InterpolationMode = InterpolationMode.BILINEAR

    @classmethod
    def from_pretrained(cls, model_name: str, **hub_kwargs) -> "NaFlexPreprocess":
        """Read patch_size, max_num_patches, mean, std and resample from a Siglip2ImageProcessor config."""
        cfg = AutoImageProcessor.from_pretrained(model_name, **hub_kwargs).to_dict()
        if "max_num_patches" not in cfg or "patch_size" not in cfg:
            raise ValueError(
                f"{model_name}: not a NaFlex processor config (no max_num_patches / patch_size; "
                f"image_processor_type={cfg.get('image_processor_type')!r}); a fixed-size "
                f"checkpoint (e.g. a fixed-resolution SigLIP2, model_type 'siglip') uses the siglip "
                f"extractors"
            )
        mean, std, resample = _normalisation(model_name, cfg, default_resample=2)
        return cls(int(cfg["patch_size"]), int(cfg["max_num_patches"]), mean, std, resample)

    def resized_size(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) in pixels that an image of ``height`` x ``width`` pixels is resized to."""
        return get_image_size_for_max_num_patches(height, width, self.patch_size, self.max_num_patches)

    def spatial_shape(self, image: Image.Image) -> torch.Tensor:
        """[2] int64 patch rows and columns of ``image``'s input."""
        height, width = self.resized_size(image.height, image.width)
        return torch.tensor([height // self.patch_size, width // self.patch_size])

    def image(self, image: Image.Image) -> torch.Tensor:
        """PIL RGB image -> [max_num_patches, 3 * patch_size**2] patch sequence (rows of patches, then zeros)."""
        if image.mode != "RGB":
            raise ValueError(f"expected an RGB image, got mode {image.mode} (use datasets.images.to_rgb)")
        pixels = _resize_and_normalise(
            image, self.resized_size(image.height, image.width), self.resample, self.mean, self.std
        )
        return pad_along_first_dim(convert_image_to_patches(pixels, self.patch_size), self.max_num_patches)[0]

    def masks(self, masks: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Masks [P, H, W] at the image's size -> float {0, 1} [P, h, w] at its resized size (h, w the
        image's patch grid x patch size), nearest-neighbour like :meth:`Preprocess.masks`."""
        masks = to_binary_masks(masks)
        size = self.resized_size(*masks.shape[-2:])
        resized = T.functional.resize(masks[:, None], list(size), interpolation=InterpolationMode.NEAREST_EXACT)
        return resized[:, 0].float()


def _normalisation(model_name: str, cfg: dict, default_resample: int = 3):
    """(mean, std, resample) of an image processor config; rescaling must be the usual 1/255."""
    if cfg.get("do_rescale", True) and abs(cfg.get("rescale_factor", 1 / 255) - 1 / 255) > 1e-9:
        raise ValueError(f"{model_name}: rescale_factor {cfg['rescale_factor']} != 1/255 is not supported")
    mean, std = (cfg["image_mean"], cfg["image_std"]) if cfg.get("do_normalize", True) else ((0,) * 3, (1,) * 3)
    return tuple(mean), tuple(std), _RESAMPLE[int(cfg.get("resample", default_resample))]


def _resize_and_normalise(
    image: Image.Image,
    size: tuple[int, int],
    resample: InterpolationMode,
    mean: tuple[float, ...],
    std: tuple[float, ...],
) -> torch.Tensor:
    """PIL RGB image -> normalised float tensor [3, *size]."""
    transform = T.Compose(
        [
            T.Resize(size, interpolation=resample, antialias=True),
            T.PILToTensor(),
            T.ToDtype(torch.float32, scale=True),
            T.Normalize(mean, std),
        ]
    )
    return transform(image)


def to_binary_masks(masks: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Accept bool, {0, 1} or {0, 255} masks [P, H, W]; return a bool tensor. Other values are an error."""
    if not isinstance(masks, torch.Tensor):
        masks = np.asarray(masks)
        # torch.as_tensor shares memory and warns on a read-only array (np.broadcast_to, a memory map):
        # copy those, share the rest
        masks = torch.as_tensor(masks if masks.flags.writeable else masks.copy())
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


def pil_nearest_masks(masks: np.ndarray | torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Masks [P, H, W] (bool, 0/1 or 0/255) -> float {0, 1} tensor [P, *size] resized one by one as 0/255
    ``L`` images with PIL's NEAREST, the original code's mask resize (``pixel_geometry=original``;
    original ``extractors/dinov2_extractor.py:336``, ``siglip_mi_extractor.py:220``,
    ``clip_mi_extractor.py:215``). It picks other boundary pixels than :meth:`Preprocess.masks`'s
    NEAREST_EXACT (3-8 per mask at 224 px)."""
    height, width = size
    resized = [
        np.asarray(Image.fromarray(m.numpy().astype(np.uint8) * 255).resize((width, height), Image.Resampling.NEAREST))
        for m in to_binary_masks(masks)
    ]
    if not resized:
        return torch.zeros(0, height, width)
    return torch.from_numpy(np.stack(resized) > 127).float()
