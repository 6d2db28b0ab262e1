"""Mask Inversion extractors: one embedding per object mask (see utils/mask_inversion.py for the math)."""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from datasets.images import to_rgb
from extractors.base import Extractor, Rows
from extractors.views import NO_MASK, View, ViewMaker, padded_box, stack_masks, stack_views
from utils.mask_inversion import legrad_map, mask_inversion
from utils.preprocessing import to_binary_masks

log = logging.getLogger("soir.extractors")


@dataclass
class Explanation:
    """What :meth:`MIExtractor.explain` finds for one image (H x W pixels) and its masks.

    Attributes:
        vectors: [R, D] unit MI vectors, exactly as ``extract(image, masks)`` returns them (R = one per
            non-empty mask; 1 with ``mi_sum`` or ``avg_multiple_vecs``).
        mask_index: [R] int64, each row's source mask (``NO_MASK`` = -1 for a union or an average).
        maps: [R, H, W] float32 in [0, 1], the LeGrad map of each vector at the image's size. With
            ``smart_crop`` a row's map is computed on its crop, as MI saw it, and is 0 outside the crop.
        global_vector: [D] the model's global embedding of the whole image (MI's starting point).
        global_map: [H, W] float32 in [0, 1], the LeGrad map of ``global_vector``.
        history: {"loss", "dice"}: [iterations, M] float32, each inverted mask's total loss and Dice
            loss before every AdamW step (M = the masks MI optimised: one per non-empty mask, or 1
            with ``mi_sum``).
    """

    vectors: torch.Tensor
    mask_index: torch.Tensor
    maps: torch.Tensor
    global_vector: torch.Tensor
    global_map: torch.Tensor
    history: dict[str, torch.Tensor]


class MIExtractor(Extractor):
    """Extractor whose descriptors are Mask Inversion embeddings of object masks.

    Args (beyond :class:`Extractor`'s):
        mi_alpha: weight of the pull towards the global embedding, ``alpha * (1 - cos(e, g))``.
        mi_beta: weight of the mean |cos| between different masks of one image.
        mi_lr, mi_iterations: AdamW learning rate and number of steps.
        mi_layer_index: hooked blocks L + mi_layer_index + 1 .. L (-1 = last block).
        mi_sum: one vector per image, optimised against the union of its masks.
        avg_multiple_vecs: one vector per image, the renormalised mean of its mask vectors.
        smart_crop, smart_crop_pad: MI inside each mask's padded box, cropped from the original image.
    """

    uses_masks = True
    attn_implementation = "eager"

    def __init__(self, model_name: str | None = None, *, mi_alpha: float = 0.03, mi_beta: float = 0.0,
                 mi_lr: float = 0.1, mi_iterations: int = 100, mi_layer_index: int = -1,
                 mi_sum: bool = False, avg_multiple_vecs: bool = False, smart_crop: bool = False,
                 smart_crop_pad: float = 0.1, **kwargs):
        super().__init__(model_name, **kwargs)
        if self.precision != "fp32":
            log.warning("precision=%s: the model's forward pass runs in reduced precision, which moves "
                        "MI embeddings noticeably (bf16 on a GPU: cosine to fp32 as low as 0.81); "
                        "use precision=fp32 for numbers you report", self.precision)
        self.mi = dict(alpha=mi_alpha, beta=mi_beta, lr=mi_lr, iterations=mi_iterations,
                       layer_index=mi_layer_index)
        self.mode = "union" if mi_sum else "smart_crop" if smart_crop else "per_mask"
        self.avg_multiple_vecs, self.smart_crop_pad = avg_multiple_vecs, smart_crop_pad

    def identity(self) -> dict:
        return {**super().identity(), "mi": self.mi, "mode": self.mode, "smart_crop_pad": self.smart_crop_pad,
                "avg_multiple_vecs": self.avg_multiple_vecs}

    def view_maker(self) -> ViewMaker:
        return ViewMaker(self.preprocess, self.mode, self.smart_crop_pad)

    def mask_group(self, view: View) -> int:
        # With beta = 0 every mask is optimised independently, so views with different numbers of
        # masks can share one batch, padded with empty masks whose vectors are dropped; counts are
        # bucketed by powers of two so padding at most doubles the work. With beta > 0 the masks of
        # an image interact, so only equal counts are batched.
        count = len(view.masks)
        return 1 << (count - 1).bit_length() if self.mi["beta"] == 0 else count

    def invert_views(self, views: list[View]) -> list[torch.Tensor]:
        pixels, spatial_shapes = stack_views(views)
        vectors = self.invert(pixels, stack_masks(views), spatial_shapes=spatial_shapes).cpu()
        return [v[:len(view.masks)] for v, view in zip(vectors, views)]

    def invert(self, pixel_values: torch.Tensor, masks: torch.Tensor, return_history: bool = False,
               spatial_shapes: torch.Tensor | None = None):
        """pixel_values [B, 3, H, W], masks [B, P, H, W] in {0, 1} -> unit vectors [B, P, D]
        (and ``mask_inversion``'s history dict when ``return_history``). NaFlex: patch sequences,
        masks on their canvas and spatial_shapes [B, 2] (see ``utils.mask_inversion.mask_inversion``)."""
        with self.autocast():
            out = mask_inversion(self.model, pixel_values.to(self.device), masks.to(self.device),
                                 **self.mi, return_history=return_history, spatial_shapes=spatial_shapes)
        return (out[0].float(), out[1]) if return_history else out.float()

    def explain(self, image: Image.Image, masks: np.ndarray | torch.Tensor) -> Explanation:
        """MI on one image with its masks [P, H, W] (at the image's size), and the LeGrad maps of the
        resulting vectors and of the global vector, at the image's size (see :class:`Explanation`).

        The vectors are those of :meth:`extract` (the same views in the same batch).
        """
        image = to_rgb(ImageOps.exif_transpose(image))
        views = self.view_maker()(image, masks)
        if views.dropped_masks:
            raise ValueError(f"{views.dropped_masks} mask(s) are empty at the model's input size")
        # One image's views all hold the same number of masks (one view with all masks, the union, or
        # one single-mask view per smart crop), so they run as one batch, as describe() runs them.
        pixels, spatial_shapes = stack_views(views.views)
        vectors, history = self.invert(pixels, stack_masks(views.views), return_history=True,
                                       spatial_shapes=spatial_shapes)
        rows = self.finish(Rows(vectors.flatten(0, 1).cpu(), torch.cat([v.mask_index for v in views.views])))
        source = to_binary_masks(masks)
        boxes = [padded_box(source[i], self.smart_crop_pad) if self.mode == "smart_crop" and i >= 0 else None
                 for i in rows.mask_index.tolist()]
        global_vector = self.embed(*stack_views(self.global_view_maker()(image).views))[0].cpu()
        return Explanation(
            vectors=rows.vectors, mask_index=rows.mask_index,
            maps=torch.stack([self.legrad(image, v[None], box)[0] for v, box in zip(rows.vectors, boxes)]),
            global_vector=global_vector, global_map=self.legrad(image, global_vector[None])[0],
            history={k: v.flatten(1) for k, v in history.items()})

    def legrad(self, image: Image.Image, vectors: torch.Tensor, box: tuple[int, int, int, int] | None = None,
               size: tuple[int, int] | None = None) -> torch.Tensor:
        """LeGrad maps of ``vectors`` [P, D] on an RGB ``image``: [P, H, W] float32 in [0, 1] (CPU).

        Args:
            box: (x1, y1, x2, y2) pixels: compute the maps on this crop of the image (as ``smart_crop``
                MI sees it); they are 0 outside it.
            size: (H, W) of the output; None = the image's (height, width). The maps are computed at
                the model's input size and resized bilinearly.
        """
        height, width = size or (image.height, image.width)
        view = image if box is None else image.crop(box)
        pixels, spatial_shapes = stack_views(self.global_view_maker()(view).views)
        with self.autocast():
            maps = legrad_map(self.model, pixels.to(self.device), vectors[None].to(self.device), self.mi["layer_index"],
                              spatial_shapes=spatial_shapes)[0]
        if box is None:
            return F.interpolate(maps[None].float(), size=(height, width), mode="bilinear", align_corners=False)[0].cpu()
        # The crop's place in the output: box corners scaled from image pixels to output pixels.
        x1, x2 = (round(x * width / image.width) for x in box[0::2])
        y1, y2 = (round(y * height / image.height) for y in box[1::2])
        out = torch.zeros(len(vectors), height, width)
        if x2 > x1 and y2 > y1:
            out[:, y1:y2, x1:x2] = F.interpolate(maps[None].float(), size=(y2 - y1, x2 - x1), mode="bilinear", align_corners=False)[0].cpu()
        return out

    def finish(self, rows: Rows) -> Rows:
        if self.avg_multiple_vecs and len(rows) > 1:
            return Rows(torch.nn.functional.normalize(rows.vectors.mean(0, keepdim=True), dim=-1),
                        torch.tensor([NO_MASK]))
        return rows
