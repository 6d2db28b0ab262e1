"""Mask Inversion extractors: one embedding per object mask (see utils/mask_inversion.py for the math)."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from datasets.images import to_rgb
from extractors.base import Extractor, Rows
from extractors.inputs import as_image, as_masks
from extractors.views import NO_MASK, View, ViewMaker, padded_box, stack_masks, stack_views, zero_outside
from utils.errors import SoIRError
from utils.families import FAMILIES
from utils.mask_inversion import legrad_map, mask_inversion
from utils.pooling import mask_pooled
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

    Args (beyond :class:`Extractor`'s; each is the config key of the same name):
        mi_alpha: weight of the pull towards the global embedding, ``alpha * (1 - cos(e, g))``.
        mi_beta: weight of the mean |cos| between different masks of one image.
        mi_lr, mi_iterations: AdamW learning rate and number of steps.
        mi_layer_index: hooked blocks L + mi_layer_index + 1 .. L (-1 = last block).
        mi_impl, mi_precision, mi_cuda_graph: how the engine evaluates (utils.mask_inversion).
        global_features: False = no MI at all: the plain global embedding (the original's meaning).
        mi_sum (or its original name full_mask): one vector per image, optimised against the union of
            its masks (``mi_sum_loss="mean_dice"``: SigLIP / CLIP fit the mean of the per-mask Dice).
        avg_multiple_vecs: one vector per image, the renormalised mean of its mask vectors.
        smart_crop, smart_crop_pad: MI inside each mask's padded box, cropped from the original image
            (``smart_crop_source="resized"``: from the model-input-sized copy, the original's way).
        single_from_sc: with mi_sum and smart_crop, one vector per mask on its smart crop (the
            original's example command; the same as smart_crop alone); False is refused.
        mask_input: :meth:`extract` sets the pixels outside the masks to zero before MI.
        missing_masks: "full_mask" keeps masks that vanish at the model's input size.
        legrad_norm: "joint" min-max normalises the maps of an image's masks together.
        mi_resample: "original" resizes for MI with the original's filter (LANCZOS / BILINEAR).
        debug: log the loss of every MI iteration.
        object_desc: the per-object descriptor: "mi" (Mask Inversion), "mask_pool" (the mask-weighted mean
            of the last layer's patch tokens, one forward pass per batch: utils.pooling.mask_pooled) or
            "crop" (each mask's padded box, ``smart_crop_pad``, cropped from the original image and
            embedded: the crops of a batch in one forward pass). One vector per mask either way.
        mi_init: "mask_pool" starts MI from each mask's pooled vector instead of the global one.
    """

    uses_masks = True
    attn_implementation = "eager"

    def __init__(
        self,
        model_name: str | None = None,
        *,
        mi_alpha: float = 0.03,
        mi_beta: float = 0.0,
        mi_lr: float = 0.1,
        mi_iterations: int = 100,
        mi_layer_index: int = -1,
        mi_impl: str = "auto",
        mi_precision: str = "fp32",
        mi_cuda_graph: bool = False,
        global_features: bool = True,
        mi_sum: bool = False,
        full_mask: bool = False,
        avg_multiple_vecs: bool = False,
        smart_crop: bool = False,
        smart_crop_pad: float = 0.1,
        single_from_sc: bool = True,
        mask_input: bool = False,
        missing_masks: str = "error",
        legrad_norm: str = "per_map",
        mi_sum_loss: str = "union",
        smart_crop_source: str = "original",
        mi_resample: str = "processor",
        debug: bool = False,
        object_desc: str = "mi",
        mi_init: str = "global",
        **kwargs,
    ):
        if object_desc not in ("mi", "mask_pool", "crop") or mi_init not in ("global", "mask_pool"):
            raise SoIRError(
                f"object_desc={object_desc} / mi_init={mi_init}: one of mi|mask_pool|crop / global|mask_pool"
            )
        if object_desc != "mi" and (mi_sum or full_mask or mi_init != "global"):
            raise SoIRError(
                f"object_desc={object_desc} gives one vector per mask without Mask Inversion; mi_sum and "
                "mi_init are Mask Inversion's settings (use object_desc=mi)"
            )
        self.object_desc, self.mi_init = str(object_desc), str(mi_init)
        super().__init__(model_name, **kwargs)
        if self.precision != "fp32":
            log.warning(
                "precision=%s applies to global embeddings only: Mask Inversion always runs the "
                "model's forward pass in fp32 (MI amplifies its rounding); reduced precision for MI "
                "is mi_precision",
                self.precision,
            )
        self.mi = dict(
            alpha=mi_alpha,
            beta=mi_beta,
            lr=mi_lr,
            iterations=mi_iterations,
            layer_index=mi_layer_index,
            impl=str(mi_impl),
            precision=str(mi_precision),
            cuda_graph=mi_cuda_graph,
            joint_norm=legrad_norm == "joint",
        )
        # object_desc=crop embeds each mask's smart crop, the views smart_crop makes for MI.
        smart_crop = smart_crop or self.object_desc == "crop"
        self.mode = self._mode(global_features, mi_sum or full_mask, smart_crop, single_from_sc, mi_sum_loss)
        if self.mi_init == "mask_pool" and self.mode == "mean_dice":
            raise SoIRError(
                "mi_init=mask_pool starts each mask's vector from its pooled one; mi_sum_loss=mean_dice "
                "fits one vector for all masks"
            )
        self.uses_masks = self.mode != "global"
        self.one_vector_per_image = self.mode in ("global", "union", "mean_dice") or avg_multiple_vecs
        self.avg_multiple_vecs, self.smart_crop_pad = avg_multiple_vecs, smart_crop_pad
        self.mask_input, self.keep_empty, self.debug = mask_input, missing_masks == "full_mask", debug
        self.crop_source = str(smart_crop_source)
        original = FAMILIES[self.family].original  # what the original code did for this family
        if (mi_resample != "processor" or self.crop_source != "original") and original is None:
            raise SoIRError(
                f"mi_resample / smart_crop_source (compat=original) reproduce the original code, which has "
                f"no {self.family} extractor: use compat=none with {self.family}"
            )
        # What MI sees; plain embeddings (global_view_maker) keep the processor's resampling.
        self.mi_preprocess = (
            self.preprocess
            if mi_resample == "processor"
            else dataclasses.replace(self.preprocess, resample=original.mi_resample)
        )

    def _mode(
        self, global_features: bool, mi_sum: bool, smart_crop: bool, single_from_sc: bool, mi_sum_loss: str
    ) -> str:
        """global | per_mask | union | mean_dice | smart_crop (see :class:`extractors.views.ViewMaker`)."""
        if not global_features:
            log.warning(
                "global_features=false: %s computes no Mask Inversion, only the plain global embedding "
                "(the original code's meaning of the key)",
                type(self).__name__,
            )
            return "global"
        if mi_sum and smart_crop:
            if not single_from_sc:
                raise SoIRError(
                    "mi_sum=true smart_crop=true single_from_sc=false is ill-defined (the original "
                    "applied the crops' masks to the full image); use smart_crop=true (one vector per "
                    "mask on its crop) or mi_sum=true (one vector per image)"
                )
            log.info(
                "mi_sum + smart_crop + single_from_sc: one MI vector per mask on its smart crop, as the "
                "original computes it (the same as smart_crop alone)"
            )
            return "smart_crop"
        if mi_sum and mi_sum_loss == "mean_dice":
            original = FAMILIES[self.family].original
            if original is not None and original.mi_sum_mean_dice:
                return "mean_dice"
            log.info(
                "mi_sum_loss=mean_dice applies to %s only; %s uses the union of the masks%s",
                "/".join(n for n, s in FAMILIES.items() if s.original and s.original.mi_sum_mean_dice),
                self.family,
                ", as the original did" if original else "",
            )
        return "union" if mi_sum else "smart_crop" if smart_crop else "per_mask"

    def identity(self) -> dict:
        return {
            **super().identity(),
            "mi": self.mi,
            "mode": self.mode,
            "smart_crop_pad": self.smart_crop_pad,
            "avg_multiple_vecs": self.avg_multiple_vecs,
            "keep_empty": self.keep_empty,
            "crop_source": self.crop_source,
            "mi_resample": self.mi_preprocess.resample.value,
            **({} if self.object_desc == "mi" else {"object_desc": self.object_desc}),
            **({} if self.mi_init == "global" else {"mi_init": self.mi_init}),
        }

    def view_maker(self) -> ViewMaker:
        if self.mode == "global":
            return self.global_view_maker()
        pad_pixels = FAMILIES[self.family].original.smart_crop_pad_pixels if self.crop_source == "resized" else None
        return ViewMaker(
            self.mi_preprocess,
            "per_mask" if self.mode == "mean_dice" else self.mode,
            self.smart_crop_pad,
            keep_empty=self.keep_empty,
            crop_source=self.crop_source,
            pad_pixels=pad_pixels,
        )

    def mask_group(self, view: View) -> object:
        # With beta = 0 and per-map normalisation every mask is optimised independently, so views
        # with different numbers of masks can share one batch, padded with empty masks whose vectors
        # are dropped; counts are bucketed by powers of two so padding at most doubles the work.
        # Otherwise (beta > 0, joint normalisation, one vector for all masks) the masks of an image
        # interact, so only equal counts are batched.
        if self.object_desc == "mask_pool":  # no optimisation: padding costs nothing, all views in one pass
            return "mask_pool"
        count = len(view.masks)
        independent = self.mi["beta"] == 0 and not self.mi["joint_norm"] and self.mode != "mean_dice"
        return 1 << (count - 1).bit_length() if independent else count

    def invert_views(self, views: list[View]) -> list[Rows]:
        pixels, spatial_shapes = stack_views(views)
        if self.object_desc == "crop":  # one single-mask crop per view: the crops' global embeddings
            vectors = self.embed(pixels, spatial_shapes)[:, None].cpu()
        elif self.object_desc == "mask_pool":
            with torch.inference_mode():
                masks = stack_masks(views).to(self.device)
                vectors = mask_pooled(self.model, pixels.to(self.device), masks, spatial_shapes).float().cpu()
        else:
            vectors = self.invert(pixels, stack_masks(views), spatial_shapes=spatial_shapes).cpu()
        if self.mode == "mean_dice":
            return [Rows(v, torch.tensor([NO_MASK])) for v in vectors]
        return [Rows(v[: len(view.masks)], view.mask_index) for v, view in zip(vectors, views)]

    def invert(
        self,
        pixel_values: torch.Tensor,
        masks: torch.Tensor,
        return_history: bool = False,
        spatial_shapes: torch.Tensor | None = None,
    ):
        """pixel_values [B, 3, H, W], masks [B, P, H, W] in {0, 1} -> unit vectors [B, P, D]
        ([B, 1, D] in the mean_dice mode), and ``mask_inversion``'s history dict when ``return_history``.
        NaFlex: patch sequences, masks on their canvas and spatial_shapes [B, 2] (see
        ``utils.mask_inversion.mask_inversion``)."""
        init = None
        if self.mi_init == "mask_pool":
            with torch.no_grad():
                init = mask_pooled(self.model, pixel_values.to(self.device), masks.to(self.device), spatial_shapes)
        with self.autocast():
            out = mask_inversion(
                self.model,
                pixel_values.to(self.device),
                masks.to(self.device),
                **self.mi,
                shared=self.mode == "mean_dice",
                return_history=return_history or self.debug,
                spatial_shapes=spatial_shapes,
                init=init,
            )
        if self.debug:
            for i, (loss, dice) in enumerate(zip(out[1]["loss"], out[1]["dice"])):
                log.info(
                    "MI iteration %d: loss %.5f, Dice loss %.5f (mean over %d masks)",
                    i,
                    float(loss.mean()),
                    float(dice.mean()),
                    loss.numel(),
                )
        if return_history:
            return out[0].float(), out[1]
        return (out[0] if self.debug else out).float()

    def explain(self, image: Image.Image, masks: np.ndarray | torch.Tensor) -> Explanation:
        """MI on one image with its masks [P, H, W] (at the image's size), and the LeGrad maps of the
        resulting vectors and of the global vector, at the image's size (see :class:`Explanation`).

        The vectors are those of :meth:`extract` (the same views in the same batch).
        """
        if self.object_desc != "mi":
            raise SoIRError(f"explain() shows Mask Inversion; object_desc={self.object_desc} computes no MI")
        image = to_rgb(ImageOps.exif_transpose(image))
        views = self.view_maker()(image, masks)
        if views.dropped_masks:
            raise ValueError(f"{views.dropped_masks} mask(s) are empty at the model's input size")
        # One image's views all hold the same number of masks (one view with all masks, the union, or
        # one single-mask view per smart crop), so they run as one batch, as describe() runs them.
        pixels, spatial_shapes = stack_views(views.views)
        vectors, history = self.invert(
            pixels, stack_masks(views.views), return_history=True, spatial_shapes=spatial_shapes
        )
        index = (
            torch.full((len(views.views),), NO_MASK)
            if self.mode == "mean_dice"
            else torch.cat([v.mask_index for v in views.views])
        )
        rows = self.finish(Rows(vectors.flatten(0, 1).cpu(), index))
        source = to_binary_masks(masks)
        boxes = [
            padded_box(source[i], self.smart_crop_pad) if self.mode == "smart_crop" and i >= 0 else None
            for i in rows.mask_index.tolist()
        ]
        global_vector = self.embed(*stack_views(ViewMaker(self.mi_preprocess, "global")(image).views))[0].cpu()
        return Explanation(
            vectors=rows.vectors,
            mask_index=rows.mask_index,
            maps=torch.stack([self.legrad(image, v[None], box)[0] for v, box in zip(rows.vectors, boxes)]),
            global_vector=global_vector,
            global_map=self.legrad(image, global_vector[None])[0],
            history={k: v.flatten(1) for k, v in history.items()},
        )

    def legrad(
        self,
        image: Image.Image,
        vectors: torch.Tensor,
        box: tuple[int, int, int, int] | None = None,
        size: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        """LeGrad maps of ``vectors`` [P, D] on an RGB ``image``: [P, H, W] float32 in [0, 1] (CPU).

        Args:
            box: (x1, y1, x2, y2) pixels: compute the maps on this crop of the image (as ``smart_crop``
                MI sees it); they are 0 outside it.
            size: (H, W) of the output; None = the image's (height, width). The maps are computed at
                the model's input size and resized bilinearly.
        """
        height, width = size or (image.height, image.width)
        view = image if box is None else image.crop(box)
        pixels, spatial_shapes = stack_views(ViewMaker(self.mi_preprocess, "global")(view).views)
        with self.autocast():
            maps = legrad_map(
                self.model,
                pixels.to(self.device),
                vectors[None].to(self.device),
                self.mi["layer_index"],
                spatial_shapes=spatial_shapes,
            )[0]
        if box is None:
            return F.interpolate(maps[None].float(), size=(height, width), mode="bilinear", align_corners=False)[
                0
            ].cpu()
        # The crop's place in the output: box corners scaled from image pixels to output pixels.
        x1, x2 = (round(x * width / image.width) for x in box[0::2])
        y1, y2 = (round(y * height / image.height) for y in box[1::2])
        out = torch.zeros(len(vectors), height, width)
        if x2 > x1 and y2 > y1:
            out[:, y1:y2, x1:x2] = F.interpolate(
                maps[None].float(), size=(y2 - y1, x2 - x1), mode="bilinear", align_corners=False
            )[0].cpu()
        return out

    def finish(self, rows: Rows) -> Rows:
        if self.avg_multiple_vecs and len(rows) > 1:
            return Rows(
                torch.nn.functional.normalize(rows.vectors.mean(0, keepdim=True), dim=-1), torch.tensor([NO_MASK])
            )
        return rows

    def _views(self, image, masks):
        """Notebook input -> views; with ``mask_input`` the pixels outside the masks become zero."""
        if self.mode == "global" and masks is not None:
            log.info("global_features=false: the masks are not used (plain global embedding)")
            masks = None
        if self.mask_input and masks is not None:
            pil, path = as_image(image)
            masks = as_masks(masks)
            image = {"image": zero_outside(pil, masks), "img_path": path}
        return super()._views(image, masks)
