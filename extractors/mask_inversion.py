"""Mask Inversion extractors: one embedding per object mask (see extractors/mi/engine.py for the math)."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from datasets.captions import ImageMasks
from datasets.images import to_rgb
from datasets.preprocessing import to_binary_masks
from datasets.views import (
    NO_MASK,
    View,
    ViewMaker,
    Views,
    input_side,
    mao_box,
    padded_box,
    stack_masks,
    stack_views,
)
from extractors.backbones import original_mi_resample
from extractors.base import Extractor, Rows
from extractors.inputs import as_image, as_masks
from extractors.mi.engine import OVERLAPS, Inversion, legrad_map, mask_inversion
from extractors.pooling import mask_pooled
from utils.config import (
    CompatSettings,
    DescriptorSettings,
    MISettings,
    QuerySettings,
    RunSettings,
    sums_masks,
)
from utils.config import mi_iterations as mi_iterations_for
from utils.errors import SoIRError
from utils.families import FAMILIES

log = logging.getLogger("soir.extractors")

DESCRIPTORS = ("mi", "mao")  # the published code's MI descriptors | MaO's Stage B (the paper's)


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
        mi_lr, mi_iterations: AdamW learning rate and number of steps (None: 100, or 80, the
            paper's, with ``descriptor="mao"``).
        mi_layer_index: hooked blocks L + mi_layer_index + 1 .. L (-1 = last block).
        mi_impl, mi_precision, mi_cuda_graph: how the engine evaluates (extractors.mi.engine).
        global_features: False = no MI at all: the plain global embedding (the original's meaning).
        mi_sum (or its original name full_mask): one vector per image, optimised against the union of
            its masks (``mi_sum_loss="mean_dice"``: SigLIP / CLIP fit the mean of the per-mask Dice).
        avg_multiple_vecs: one vector per image, the renormalised mean of its mask vectors.
        smart_crop, smart_crop_pad: MI inside each mask's padded box, cropped from the original image
            (``smart_crop_source="resized"``: from the model-input-sized copy, the original's way).
        single_from_sc: with mi_sum and smart_crop, one vector per mask on its smart crop (the
            original's example command; the same as smart_crop alone); False is refused.
        mask_input: :meth:`extract` sets the pixels outside the masks to zero before MI.
        missing_masks: an image without masks (none given, none in ``captions_file``): "error" (the
            default) names it and the nearest captions keys; "global" gives its global embedding
            (logged); "full_mask" MI with one full-image mask. "full_mask" also keeps masks that
            vanish at the model's input size.
        legrad_norm: "joint" min-max normalises the maps of an image's masks together.
        mi_resample: "original" resizes for MI with the original's filter (LANCZOS / BILINEAR).
        pixel_geometry: "original" rounds pixels as the original did (:class:`datasets.views.ViewMaker`).
        mi_beta_used: False ignores ``mi_beta`` (logged), as the original never passed it to MI.
        descriptor: "mi" (the published code's descriptors: the modes above) or "mao": MaO's Stage
            B as the paper describes it, ONE vector per image: its masks' object crops (cut as Stage
            A cuts them, :class:`datasets.views.ViewMaker` mode "mao"), one embedding v shared by
            all of them, minimising sum_i (1 - softIoU(LeGrad map of v on crop i, m_i)) + alpha *
            (1 - cos(v, sum_i v_i)), started at the renormalised mean of the crops' embeddings v_i
            (``extractors.mi.engine.mask_inversion``, ``groups``). Each crop's map is min-max
            normalised on its own (the crops are separate model inputs).
        mao_overlap: "iou" (the paper's soft IoU) or "dice": the map-to-mask loss of ``descriptor=mao``.
        alpha_sum_full: the original DINOv2 code's ``alpha_sum_full`` (its ``compute_maskinversion_sum``),
            with ``mi_sum``: first one MI vector per mask on the whole image (the settings above), then the
            union's vector started at the SUM of their raw (un-normalised) parameters and pulled towards
            them, ``+ alpha_sum_full * mean_p (1 - cos(e, e_p))``. 0: plain ``mi_sum``.
        alpha_sum: the original's smart-crop variant (``mi_sum smart_crop single_from_sc=false``); not
            reproduced: values other than 0 are refused.
        debug: log the loss of every MI iteration.
        object_desc: the per-object descriptor: "mi" (Mask Inversion), "mask_pool" (the mask-weighted mean
            of the last layer's patch tokens, one forward pass per batch: extractors.pooling.mask_pooled) or
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
        mi_alpha: float = MISettings.mi_alpha,
        mi_beta: float = MISettings.mi_beta,
        mi_lr: float = MISettings.mi_lr,
        mi_iterations: int | None = MISettings.mi_iterations,
        mi_layer_index: int = MISettings.mi_layer_index,
        mi_impl: str = MISettings.mi_impl.value,
        mi_precision: str = MISettings.mi_precision.value,
        mi_cuda_graph: bool = MISettings.mi_cuda_graph,
        global_features: bool = DescriptorSettings.global_features,
        mi_sum: bool = MISettings.mi_sum,
        full_mask: bool = MISettings.full_mask,
        avg_multiple_vecs: bool = MISettings.avg_multiple_vecs,
        smart_crop: bool = MISettings.smart_crop,
        smart_crop_pad: float = MISettings.smart_crop_pad,
        single_from_sc: bool = MISettings.single_from_sc,
        mask_input: bool = QuerySettings.mask_input,
        missing_masks: str = MISettings.missing_masks.value,
        legrad_norm: str = CompatSettings.legrad_norm.value,
        mi_sum_loss: str = CompatSettings.mi_sum_loss.value,
        smart_crop_source: str = CompatSettings.smart_crop_source.value,
        mi_resample: str = CompatSettings.mi_resample.value,
        pixel_geometry: str = CompatSettings.pixel_geometry.value,
        mi_beta_used: bool = CompatSettings.mi_beta_used,
        descriptor: str = DescriptorSettings.descriptor.value,
        mao_overlap: str = DescriptorSettings.mao_overlap.value,
        alpha_sum: float = CompatSettings.alpha_sum,
        alpha_sum_full: float = CompatSettings.alpha_sum_full,
        debug: bool = RunSettings.debug,
        object_desc: str = DescriptorSettings.object_desc.value,
        mi_init: str = MISettings.mi_init.value,
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
        if (object_desc != "mi" or mi_init != "global") and (str(descriptor) == "mao" or alpha_sum_full):
            raise SoIRError(
                f"object_desc={object_desc} / mi_init={mi_init} are per-mask descriptors of the published "
                "code's modes; descriptor=mao and alpha_sum_full optimise their own vectors: drop one"
            )
        super().__init__(model_name, **kwargs)
        if not mi_beta_used and mi_beta:
            # Original extractors/dinov2_mi_extractor.py:59, siglip_mi_extractor.py:49,
            # clip_mi_extractor.py:49 build MaskInversion without it.
            log.warning(
                "mi_beta=%s is ignored (mi_beta_used=false, compat=original): the original code never "
                "passed mi_beta to Mask Inversion",
                mi_beta,
            )
            mi_beta = 0.0
        if self.precision != "fp32":
            log.warning(
                "precision=%s applies to global embeddings only: Mask Inversion always runs the "
                "model's forward pass in fp32 (MI amplifies its rounding); reduced precision for MI "
                "is mi_precision",
                self.precision,
            )
        descriptor, mao = str(descriptor), str(descriptor) == "mao"
        if descriptor not in DESCRIPTORS:
            raise SoIRError(f"descriptor={descriptor!r}; one of {', '.join(DESCRIPTORS)}")
        self.mi = Inversion(
            alpha=mi_alpha,
            beta=mi_beta,
            lr=mi_lr,
            iterations=mi_iterations_for(mi_iterations, descriptor),
            layer_index=mi_layer_index,
            impl=str(mi_impl),
            precision=str(mi_precision),
            cuda_graph=mi_cuda_graph,
            joint_norm=legrad_norm == "joint",
        )
        # object_desc=crop embeds each mask's smart crop, the views smart_crop makes for MI.
        smart_crop = smart_crop or self.object_desc == "crop"
        if mao:
            self._check_mao(
                global_features=global_features,
                mi_sum=mi_sum or full_mask,
                smart_crop=smart_crop,
                avg_multiple_vecs=avg_multiple_vecs,
                mi_beta=mi_beta,
                legrad_norm=legrad_norm,
                smart_crop_source=smart_crop_source,
                mao_overlap=mao_overlap,
            )
            self.mode = "mao"
            # Only MaO's identity names its overlap, so the published code's folders keep theirs.
            self.mi = dataclasses.replace(self.mi, overlap=str(mao_overlap))
        else:
            if mao_overlap != "iou":
                raise SoIRError(
                    f"mao_overlap={mao_overlap} is the loss of descriptor=mao; set descriptor=mao or drop it"
                )
            self.mode = self._mode(global_features, mi_sum or full_mask, smart_crop, single_from_sc, mi_sum_loss)
        self.sum_pull = self._check_alpha_sum(alpha_sum, alpha_sum_full)
        if self.mi_init == "mask_pool" and self.mode == "mean_dice":
            raise SoIRError(
                "mi_init=mask_pool starts each mask's vector from its pooled one; mi_sum_loss=mean_dice "
                "fits one vector for all masks"
            )
        self.uses_masks = self.mode != "global"
        self.one_vector_per_image = self.mode in ("global", "union", "mean_dice", "mao") or avg_multiple_vecs
        self.avg_multiple_vecs, self.smart_crop_pad = avg_multiple_vecs, smart_crop_pad
        self.mask_input, self.keep_empty, self.debug = mask_input, missing_masks == "full_mask", debug
        if missing_masks not in ("error", "global", "full_mask"):
            raise SoIRError(f"missing_masks={missing_masks!r}; one of error, global, full_mask")
        self.missing_masks = str(missing_masks)
        self.crop_source, self.geometry = str(smart_crop_source), str(pixel_geometry)
        original = FAMILIES[self.family].original  # what the original code did for this family
        if (mi_resample != "processor" or self.crop_source != "original" or self.geometry != "soir") and (
            original is None
        ):
            raise SoIRError(
                f"mi_resample / smart_crop_source / pixel_geometry (compat=original) reproduce the original "
                f"code, which has no {self.family} extractor: use compat=none with {self.family}"
            )
        if mask_input and self.mode == "smart_crop" and self.geometry == "original" and self.crop_source == "original":
            raise SoIRError(
                "mask_input with pixel_geometry=original zeroes the input-sized image (the original's order); "
                "smart crops are then cut from that image: add smart_crop_source=resized (compat=original sets it)"
            )
        if legrad_norm == "joint" and original is not None:
            # The original's CLIP min-max added 1e-6 to the range; DINOv2 / SigLIP divided exactly.
            self.mi = dataclasses.replace(self.mi, norm_eps=original.min_max_eps)
        if self.geometry == "original" and original.map_patch_size is not None:
            # SigLIP: 16 whatever the checkpoint
            self.mi = dataclasses.replace(self.mi, map_patch_size=original.map_patch_size)
        # Its smart crops of one image shared a batch, so "joint" spanned all of them (D2, issue 21).
        self.crops_share_norm = legrad_norm == "joint" and self.mode == "smart_crop"
        # What MI sees; plain embeddings (global_view_maker) keep the processor's resampling.
        self.mi_preprocess = (
            self.preprocess
            if mi_resample == "processor"
            else dataclasses.replace(self.preprocess, resample=original_mi_resample(self.family))
        )

    def _check_alpha_sum(self, alpha_sum: float, alpha_sum_full: float) -> float:
        """The original's ``alpha_sum`` / ``alpha_sum_full``: the weight of the pull of ``mi_sum``'s vector
        towards the per-mask vectors (0: none), refused where the original code never read them."""
        if alpha_sum:
            raise SoIRError(
                f"alpha_sum={alpha_sum}: the original's smart-crop variant of its DINOv2 mi_sum (mi_sum=true "
                "smart_crop=true single_from_sc=false) is not reproduced by SoIR; alpha_sum_full (the per-mask "
                "vectors on the whole image) is"
            )
        if not alpha_sum_full:
            return 0.0
        original = FAMILIES[self.family].original
        if original is None or not original.reads_alpha_sum:
            raise SoIRError(
                f"alpha_sum_full={alpha_sum_full}: the original code reads it in its DINOv2 extractor only "
                f"(its other extractors pass 0), not for {self.family}"
            )
        if self.mode != "union":
            raise SoIRError(
                f"alpha_sum_full={alpha_sum_full} acts on mi_sum=true (one vector for the union of an image's "
                f"masks) without smart_crop, as in the original; here the descriptor is {self.mode!r}"
            )
        if alpha_sum_full < 0:
            raise SoIRError(f"alpha_sum_full={alpha_sum_full} must be >= 0")
        return float(alpha_sum_full)

    @staticmethod
    def _check_mao(**settings) -> None:
        """descriptor=mao is one vector per image over its object crops: refuse the published code's
        mode switches, which would say something else."""
        if settings.pop("mao_overlap") not in OVERLAPS:
            raise SoIRError(f"mao_overlap must be one of {', '.join(OVERLAPS)}")
        defaults = dict(
            global_features=True,
            mi_sum=False,
            smart_crop=False,
            avg_multiple_vecs=False,
            mi_beta=0.0,
            legrad_norm="per_map",
            smart_crop_source="original",
        )
        clash = [f"{k}={settings[k]}" for k, v in defaults.items() if settings[k] != v]
        if clash:
            raise SoIRError(
                f"descriptor=mao (one vector per image over its object crops, the paper's Stage B) "
                f"does not combine with {', '.join(clash)} (the published code's descriptor modes); "
                f"drop them or use descriptor=mi"
            )

    def _mode(
        self, global_features: bool, mi_sum: bool, smart_crop: bool, single_from_sc: bool, mi_sum_loss: str
    ) -> str:
        """global | per_mask | union | mean_dice | smart_crop (see :class:`datasets.views.ViewMaker`)."""
        if not global_features:
            log.warning(
                "global_features=false: %s computes no Mask Inversion, only the plain global embedding "
                "(the original code's meaning of the key)",
                type(self).__name__,
            )
            return "global"
        mi_sum = sums_masks(mi_sum, smart_crop, single_from_sc)
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
            "mi": self.mi.kwargs(),
            "mode": self.mode,
            "smart_crop_pad": self.smart_crop_pad,
            "avg_multiple_vecs": self.avg_multiple_vecs,
            "keep_empty": self.keep_empty,
            "crop_source": self.crop_source,
            "mi_resample": self.mi_preprocess.resample.value,
            "pixel_geometry": self.geometry,
            "crops_share_norm": self.crops_share_norm,
            # only when set, so the folders made without it keep their identity
            **({"alpha_sum_full": self.sum_pull} if self.sum_pull else {}),
            **({} if self.object_desc == "mi" else {"object_desc": self.object_desc}),
            **({} if self.mi_init == "global" else {"mi_init": self.mi_init}),
        }

    def view_maker(self) -> ViewMaker:
        if self.mode == "global":
            return self.global_view_maker()
        pad_pixels = FAMILIES[self.family].original.smart_crop_pad_pixels if self.crop_source == "resized" else None
        return ViewMaker(
            self.mi_preprocess,
            "per_mask" if self.mode == "mean_dice" or self.sum_pull else self.mode,
            self.smart_crop_pad,
            keep_empty=self.keep_empty,
            crop_source=self.crop_source,
            pad_pixels=pad_pixels,
            geometry=self.geometry,
            min_crop=input_side(self.mi_preprocess) if self.mode == "mao" else 0,
        )

    def describe(self, batch: list[Views]) -> list[Rows]:
        """descriptor=mao: the object crops of all images of ``batch`` in ONE optimisation, one vector
        per image (its crops share it; images are independent: the loss is a sum and AdamW acts per
        element). An image without a usable mask has its global view, embedded as usual."""
        if self.mode != "mao":
            return super().describe(batch)
        crops = [(i, view) for i, views in enumerate(batch) for view in views.views if view.masks is not None]
        plain = [(i, view) for i, views in enumerate(batch) for view in views.views if view.masks is None]
        out = [Rows(torch.empty(0, self.dim), torch.empty(0, dtype=torch.long)) for _ in batch]
        if plain:
            for (i, _), vector in zip(plain, self.embed(*stack_views([v for _, v in plain])).cpu()):
                out[i] = Rows(vector[None], torch.tensor([NO_MASK]))
        if crops:
            images = sorted({i for i, _ in crops})
            groups = torch.tensor([images.index(i) for i, _ in crops])
            views = [v for _, v in crops]
            pixels, spatial_shapes = stack_views(views)
            vectors = self.invert(pixels, stack_masks(views), spatial_shapes=spatial_shapes, groups=groups).cpu()
            for i, vector in zip(images, vectors):
                out[i] = Rows(vector, torch.tensor([NO_MASK]))
        return out

    def mask_group(self, view: View) -> object:
        # With beta = 0 and per-map normalisation every mask is optimised independently, so views
        # with different numbers of masks can share one batch, padded with empty masks whose vectors
        # are dropped; counts are bucketed by powers of two so padding at most doubles the work.
        # Otherwise (beta > 0, joint normalisation, one vector for all masks) the masks of an image
        # interact, so only equal counts are batched.
        if self.object_desc == "mask_pool":  # no optimisation: padding costs nothing, all views in one pass
            return "mask_pool"
        count = len(view.masks)
        independent = self.mi.beta == 0 and not self.mi.joint_norm and self.mode != "mean_dice" and not self.sum_pull
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
        if self.mode == "mean_dice" or self.sum_pull:
            return [Rows(v, torch.tensor([NO_MASK])) for v in vectors]
        return [Rows(v[: len(view.masks)], view.mask_index) for v, view in zip(vectors, views)]

    def invert(
        self,
        pixel_values: torch.Tensor,
        masks: torch.Tensor,
        return_history: bool = False,
        spatial_shapes: torch.Tensor | None = None,
        groups: torch.Tensor | None = None,
    ):
        """pixel_values [B, 3, H, W], masks [B, P, H, W] in {0, 1} -> unit vectors [B, P, D]
        ([B, 1, D] in the mean_dice mode; [G, 1, D] with MaO's ``groups`` [B], the image of each
        crop), and ``mask_inversion``'s history dict when ``return_history``.
        NaFlex: patch sequences, masks on their canvas and spatial_shapes [B, 2] (see
        ``extractors.mi.engine.mask_inversion``)."""
        extra = {}
        if self.sum_pull:  # the original's alpha_sum_full: per-mask MI first, then the union's from their sum
            with self.autocast():
                raw = mask_inversion(
                    self.model,
                    pixel_values.to(self.device),
                    masks.to(self.device),
                    **self.mi.kwargs(),
                    return_raw=True,
                    spatial_shapes=spatial_shapes,
                )
            masks = masks.amax(dim=1, keepdim=True)
            extra = dict(init=raw.sum(dim=1, keepdim=True), anchors=raw, anchor_weight=self.sum_pull)
        init = None
        if self.mi_init == "mask_pool":
            with torch.no_grad():
                init = mask_pooled(self.model, pixel_values.to(self.device), masks.to(self.device), spatial_shapes)
        with self.autocast():
            out = mask_inversion(
                self.model,
                pixel_values.to(self.device),
                masks.to(self.device),
                **(dataclasses.replace(self.mi, joint_norm="batch") if self.crops_share_norm else self.mi).kwargs(),
                **extra,
                shared=self.mode == "mean_dice",
                return_history=return_history or self.debug,
                spatial_shapes=spatial_shapes,
                groups=groups,
                init_direction=init,
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
        if self.mode == "mao":
            return self._explain_mao(image, masks, views)
        # One image's views all hold the same number of masks (one view with all masks, the union, or
        # one single-mask view per smart crop), so they run as one batch, as describe() runs them.
        pixels, spatial_shapes = stack_views(views.views)
        vectors, history = self.invert(
            pixels, stack_masks(views.views), return_history=True, spatial_shapes=spatial_shapes
        )
        index = (
            torch.full((len(views.views),), NO_MASK)
            if self.mode == "mean_dice" or self.sum_pull
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

    def _explain_mao(self, image: Image.Image, masks: np.ndarray | torch.Tensor, views: Views) -> Explanation:
        """:meth:`explain` for descriptor=mao: the image's one vector; its map is, at every pixel, the
        largest of its maps on the object crops that cover the pixel (each as MaO saw it)."""
        pixels, spatial_shapes = stack_views(views.views)
        groups = torch.zeros(len(views.views), dtype=torch.long)
        vectors, history = self.invert(
            pixels, stack_masks(views.views), return_history=True, spatial_shapes=spatial_shapes, groups=groups
        )
        vector = vectors[0].cpu()  # [1, D]
        source = to_binary_masks(masks)
        side = input_side(self.mi_preprocess)
        boxes = [mao_box(source[i], self.smart_crop_pad, side) for i in torch.cat([v.mask_index for v in views.views])]
        global_vector = self.embed(*stack_views(ViewMaker(self.mi_preprocess, "global")(image).views))[0].cpu()
        return Explanation(
            vectors=vector,
            mask_index=torch.tensor([NO_MASK]),
            maps=torch.stack([self.legrad(image, vector, box) for box in boxes]).amax(0),
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
                self.mi.layer_index,
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

    def masks_of(self, image: Image.Image, path, masks):
        """Masks as given or from ``captions_file``. An image that has none there gets what
        ``missing_masks`` says (never a quiet global vector: "error" by default). Without masks and
        without a ``captions_file`` nothing is missing: ``extract(image)`` is the global embedding,
        as documented (and as the original README's ``extract(image)``, shape (768,))."""
        if self.mode == "global":
            if masks is not None:
                log.info("global_features=false: the masks are not used (plain global embedding)")
            return None
        if masks is None and self.captions is None:
            return None
        masks = super().masks_of(image, path, masks)
        if masks is not None and not (isinstance(masks, ImageMasks) and len(masks) == 0):
            return masks
        why = self.captions.no_masks_message(path) if self.captions is not None else "the masks given are empty"
        if self.missing_masks == "error":
            raise SoIRError(f"{why}; or set missing_masks='global' (its global embedding) or 'full_mask'")
        log.warning("missing_masks=%s: %s; using %s", self.missing_masks, why, self.missing_masks)
        return None if self.missing_masks == "global" else np.ones((1, image.height, image.width), dtype=bool)

    def _views(self, image, masks):
        """Notebook input -> views; with ``mask_input`` the pixels outside the masks become zero."""
        pil, path = as_image(image)
        masks = self.masks_of(pil, path, masks)
        if self.mask_input and masks is not None:
            views = self.view_maker()(pil, as_masks(masks), zero_background=True)
            if views.dropped_masks:
                raise SoIRError(f"{views.dropped_masks} mask(s) are empty at the model's input size")
            return views, True
        return self.views_of(pil, masks)
