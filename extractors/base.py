"""Extractors: a backbone plus the rule that turns an image (and its masks) into descriptor rows."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from PIL import Image

from datasets.preprocessing import NaFlexPreprocess, Preprocess
from datasets.views import NO_MASK, View, ViewMaker, Views, stack_views
from extractors.backbones import embedding_dim, load_backbone
from extractors.inputs import CaptionsLookup, ImageLike, as_image, as_masks
from extractors.lora import add_lora
from extractors.mi.engine import global_embedding
from extractors.pooling import POOLS, pooled_embedding
from utils.config import ComputeSettings, DataSettings, DescriptorSettings, LoRASettings, ModelSettings, check_device
from utils.errors import SoIRError
from utils.families import FAMILIES
from utils.files import sha256_file
from utils.hub import model_weights_identity

log = logging.getLogger("soir.extractors")


def resolve_device(device: str) -> torch.device:
    """ "auto" -> cuda when available, else cpu (logged). An explicit cuda without CUDA, or a name
    torch does not know, is an error."""
    check_device(device)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
        log.info("device=auto -> %s", device)
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SoIRError(f"device={device} but CUDA is not available (use device=cpu or auto)")
    return torch.device(device)


@dataclass
class Rows:
    """Descriptor rows of one image: ``vectors`` [R, D] float32 (CPU, unit norm) and ``mask_index``
    [R] int64, the source mask of each row (its position in the image's captions entry), or
    ``NO_MASK`` (-1) for a row of no single mask (global embedding, union, average)."""

    vectors: torch.Tensor
    mask_index: torch.Tensor

    def __len__(self) -> int:
        return len(self.vectors)


_DTYPES = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}


def check_pool(family: str, pool: str, gem_p: float, rmac_levels: int) -> str:
    """``pool`` if ``family`` can compute it with these parameters, else SoIRError (before any model loads)."""
    if pool not in POOLS:
        raise SoIRError(f"pool={pool!r}; one of {', '.join(POOLS)}")
    if pool == "cls" and not FAMILIES[family].cls_token:
        raise SoIRError(
            f"pool=cls: {family} has no CLS token; use pool=model (its attention-pooling head), mean, gem or rmac"
        )
    if not gem_p > 0:
        raise SoIRError(f"gem_p={gem_p} must be positive (1: mean, large: max)")
    if rmac_levels < 1:
        raise SoIRError(f"rmac_levels={rmac_levels} must be >= 1")
    return pool


class Extractor:
    """Global image embeddings: the whole image resized to the model input, L2-normalised output.

    The constructor speaks the config's vocabulary: every config key that concerns an extractor is
    an argument of the same name and meaning (``create_index.py`` passes the config through
    :func:`extractors.extractor_from_config`), so a notebook and a command line build the same
    extractor from the same words.

    Args:
        model_name: HF hub id or local folder (``from_pretrained``); None = the family's default
            (base, or large with ``B_model=False``).
        B_model: the default model's size: base (True) or large (False; where the family has one).
        device: "auto", "cpu", "cuda" or "cuda:N".
        precision: "fp32", "fp16" or "bf16" (autocast of the global embedding; outputs are float32).
        lora_adapt, lora_rank, lora_alpha, weights: LoRA on q/k/v (DINOv2, CLIP) loaded from the
            checkpoint ``weights`` (``lora_alpha``: the schema's default, or the alpha stored with the checkpoint).
        batch_size: images per forward pass in :meth:`extract_batch`.
        captions_file: a ``captions.pt``; :meth:`extract` then finds an image's masks by its path
            (a path, or the original code's dict input ``{"image": ..., "img_path": ...}``) as
            ``create_index.py`` finds them: the captions key itself, or the same file, with relative
            keys naming files in the captions file's folder (``./``, absolute paths and symlinks are
            compared by their real path). What an MI extractor does with an image that has no masks
            is its ``missing_masks``.
        pool, gem_p, rmac_levels: the global descriptor (extractors/pooling.py): ``model`` (the model's own
            global embedding), ``cls``, ``mean``, ``gem`` (exponent ``gem_p``) or ``rmac`` (``rmac_levels``
            levels of regions) over the last layer's patch tokens.
    """

    family: str = ""  # a key of utils.families.FAMILIES (its spec: classes, default models)
    uses_masks = False
    attn_implementation = "sdpa"  # MI extractors need "eager" to observe attention
    preprocess_class: type[Preprocess] | type[NaFlexPreprocess] = Preprocess  # NaFlexPreprocess: SigLIP2

    def __init__(
        self,
        model_name: str | None = None,
        *,
        B_model: bool = ModelSettings.B_model,
        device: str = ComputeSettings.device,
        precision: str = ComputeSettings.precision.value,
        lora_adapt: bool = LoRASettings.lora_adapt,
        lora_rank: int = LoRASettings.lora_rank,
        lora_alpha: float | None = LoRASettings.lora_alpha,
        weights: str | Path | None = LoRASettings.weights,
        batch_size: int = ComputeSettings.batch_size,
        captions_file: str | Path | None = DataSettings.captions_file,
        pool: str = DescriptorSettings.pool.value,
        gem_p: float = DescriptorSettings.gem_p,
        rmac_levels: int = DescriptorSettings.rmac_levels,
    ):
        self.model_name = model_name or self.default_model(B_model)
        self.pool = check_pool(self.family, str(pool), gem_p, rmac_levels)
        self.gem_p, self.rmac_levels = float(gem_p), int(rmac_levels)
        if model_name and not B_model:
            log.warning("B_model=false is ignored: model_name=%s is given", model_name)
        self.device = resolve_device(device)
        if precision not in _DTYPES:
            raise SoIRError(f"precision={precision!r}; one of {list(_DTYPES)}")
        self.precision, self.batch_size = str(precision), batch_size
        if weights is not None and not lora_adapt:
            raise SoIRError("weights= is a LoRA checkpoint and needs lora_adapt=true")
        if lora_adapt and weights is None:
            raise SoIRError(
                "lora_adapt=true needs weights=/path/to/lora_weights.ckpt (untrained LoRA adapters "
                "leave the model unchanged)"
            )
        model = load_backbone(self.family, self.model_name, self.attn_implementation)
        self.lora = None
        if lora_adapt:
            model, lora = add_lora(model, self.family, lora_rank, lora_alpha, weights)
            self.lora = {"weights_sha256": sha256_file(weights), **dataclasses.asdict(lora)}
        self.model = model.to(self.device).eval().requires_grad_(False)
        self.dim = embedding_dim(self.model, self.family)
        self.preprocess = self.preprocess_class.from_pretrained(self.model_name)
        self.captions = CaptionsLookup(captions_file) if captions_file else None

    @classmethod
    def default_model(cls, B_model: bool = ModelSettings.B_model) -> str:
        """The family's default hub id: base, or large when ``B_model`` is False (where it has one)."""
        models = FAMILIES[cls.family].default_models
        if not B_model and "large" not in models:
            log.warning("B_model=false: %s has no large default model; using %s", cls.family, models["base"])
        return models["base" if B_model or "large" not in models else "large"]

    def identity(self) -> dict:
        """What pins this extractor's output, for the features folder's identity: the weights
        actually loaded (file hashes of a local folder, or the hub commit), the preprocessing, the
        LoRA adapters' content, precision and device (CPU and CUDA kernels round differently)."""
        preprocess = {
            k: str(v) if not isinstance(v, (int, float, tuple)) else v
            for k, v in dataclasses.asdict(self.preprocess).items()
        }
        return {
            "class": type(self).__name__,
            **model_weights_identity(self.model_name),
            "preprocess": preprocess,
            "lora": self.lora,
            "precision": self.precision,
            "device": str(self.device),
            **(
                {}
                if self.pool == "model"
                else {"pool": self.pool, "gem_p": self.gem_p, "rmac_levels": self.rmac_levels}
            ),
        }

    # -- the part that runs in DataLoader workers ---------------------------------------------------
    def view_maker(self) -> ViewMaker:
        """Views for images with masks (MI extractors override this)."""
        return ViewMaker(self.preprocess, "global")

    def global_view_maker(self) -> ViewMaker:
        """Views for the global embedding of the whole image."""
        return ViewMaker(self.preprocess, "global")

    # -- the part that runs the model ----------------------------------------------------------------
    def autocast(self):
        dtype = _DTYPES[self.precision]
        return torch.autocast(self.device.type, dtype=dtype) if dtype else contextlib.nullcontext()

    def embed(self, pixel_values: torch.Tensor, spatial_shapes: torch.Tensor | None = None) -> torch.Tensor:
        """Global embeddings [B, D] (float32, unit norm) of pixel_values [B, 3, H, W] (NaFlex: patch
        sequences [B, N, 3 p p] with spatial_shapes [B, 2])."""
        with torch.inference_mode(), self.autocast():
            if self.pool == "model":
                return global_embedding(self.model, pixel_values.to(self.device), spatial_shapes).float()
            return pooled_embedding(
                self.model, pixel_values.to(self.device), spatial_shapes, self.pool, self.gem_p, self.rmac_levels
            ).float()

    def describe(self, batch: list[Views]) -> list[Rows]:
        """Descriptor rows of each image in ``batch``; views that fit one batch run together."""
        groups: dict[object, list[tuple[int, View]]] = defaultdict(list)
        for i, views in enumerate(batch):
            for view in views.views:
                key = None if view.masks is None else self.mask_group(view)
                if key is not None and self.crops_share_norm:
                    key = (i, key)  # the views of one image are normalised together: a batch of their own
                groups[key].append((i, view))
        parts: list[list[Rows]] = [[] for _ in batch]
        for key, items in groups.items():
            views = [v for _, v in items]
            if key is None:
                out = [Rows(v[None], torch.tensor([NO_MASK])) for v in self.embed(*stack_views(views)).cpu()]
            else:
                out = self.invert_views(views)
            for (i, _), rows in zip(items, out):
                parts[i].append(rows)
        return [
            self.finish(
                Rows(
                    torch.cat([r.vectors for r in rows]) if rows else torch.empty(0, self.dim),
                    torch.cat([r.mask_index for r in rows]) if rows else torch.empty(0, dtype=torch.long),
                )
            )
            for rows in parts
        ]

    def mask_group(self, view: View) -> object:
        """Views with equal keys are inverted in one batch (MI extractors may pool more)."""
        return len(view.masks)

    def invert_views(self, views: list[View]) -> list[Rows]:
        """MI rows of each view."""
        raise NotImplementedError(f"{type(self).__name__} computes global embeddings only")

    def finish(self, rows: Rows) -> Rows:
        """Hook for per-image post-processing of descriptor rows."""
        return rows

    # -- notebooks ---------------------------------------------------------------------------------
    def extract(self, image: ImageLike, masks: Any = None) -> torch.Tensor:
        """One image -> [D] global embedding, or [P, D] with masks (MI extractors; [D] for the
        one-vector modes ``mi_sum`` / ``avg_multiple_vecs``).

        ``image``: a PIL image, a numpy array, a path or ``{"image": ..., "img_path": ...}``;
        ``masks``: see :mod:`extractors.inputs` (with ``captions_file`` given to the constructor,
        an image's masks are found by its path when ``masks`` is None).
        """
        return self.extract_batch([image], None if masks is None else [masks])[0]

    def extract_batch(self, images: Sequence[ImageLike], masks: Sequence[Any] | None = None) -> list[torch.Tensor]:
        """:meth:`extract` for many images, ``batch_size`` images per forward pass (and the batched
        Mask Inversion path: all masks of a batch in one optimisation)."""
        if masks is not None and len(masks) != len(images):
            raise SoIRError(f"{len(images)} images but {len(masks)} mask entries")
        out = []
        for start in range(0, len(images), self.batch_size):
            chunk = list(images[start : start + self.batch_size])
            chunk_masks = list(masks[start : start + self.batch_size]) if masks is not None else [None] * len(chunk)
            views = [self._views(image, m) for image, m in zip(chunk, chunk_masks)]
            out += [
                self._shape(rows.vectors, has_masks)
                for rows, (_, has_masks) in zip(self.describe([v for v, _ in views]), views)
            ]
        return out

    def masks_of(self, image: Image.Image, path: Path | None, masks: Any) -> Any:
        """The masks to use for ``image`` (read from ``path``): ``masks`` as given, else its captions
        entry, else None (the global embedding). MI extractors add ``missing_masks``."""
        if masks is not None or self.captions is None:
            return masks
        return self.captions.masks(path)

    def _views(self, image: ImageLike, masks: Any) -> tuple[Views, bool]:
        pil, path = as_image(image)
        return self.views_of(pil, self.masks_of(pil, path, masks))

    def views_of(self, pil: Image.Image, masks: Any) -> tuple[Views, bool]:
        """(views of ``pil`` with ``masks``, or its global view when ``masks`` is None; has masks)."""
        if masks is not None and not self.uses_masks:
            raise SoIRError(f"{type(self).__name__} takes no masks; use its MI variant")
        if masks is None:
            return self.global_view_maker()(pil), False
        views = self.view_maker()(pil, as_masks(masks))
        if views.dropped_masks:
            raise SoIRError(f"{views.dropped_masks} mask(s) are empty at the model's input size")
        return views, True

    def _shape(self, rows: torch.Tensor, has_masks: bool) -> torch.Tensor:
        return rows[0] if len(rows) == 1 and (not has_masks or self.one_vector_per_image) else rows

    one_vector_per_image = True  # plain extractors: one global embedding
    crops_share_norm = False  # MI: one image's views share the LeGrad min-max (compat smart crops)
