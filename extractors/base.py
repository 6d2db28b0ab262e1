"""Extractors: a backbone plus the rule that turns an image (and its masks) into descriptor rows."""
from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from datasets.images import to_rgb

from extractors.backbones import embedding_dim, load_backbone
from extractors.lora import add_lora
from extractors.views import NO_MASK, View, ViewMaker, Views, stack_views
from utils.errors import SoIRError
from utils.files import sha256_file
from utils.hub import model_weights_identity
from utils.mask_inversion import global_embedding
from utils.preprocessing import NaFlexPreprocess, Preprocess

log = logging.getLogger("soir.extractors")


def resolve_device(device: str) -> torch.device:
    """"auto" -> cuda when available, else cpu (logged). An explicit cuda without CUDA is an error."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
        log.info("device=auto -> %s", device)
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device={device} but CUDA is not available (use device=cpu or auto)")
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


class Extractor:
    """Global image embeddings: the whole image resized to the model input, L2-normalised output.

    Args:
        model_name: HF hub id or local folder (``from_pretrained``); None = the family default.
        device: "auto", "cpu", "cuda" or "cuda:N".
        precision: "fp32", "fp16" or "bf16" (autocast; outputs are float32).
        lora_rank, lora_alpha, lora_weights: DINOv2 and CLIP; LoRA on q/k/v loaded from a checkpoint
            (``lora_alpha`` None = 32, or the alpha stored with the checkpoint; see extractors.lora).
    """

    family: str = ""
    default_model: str = ""
    uses_masks = False
    attn_implementation = "sdpa"      # MI extractors need "eager" to observe attention
    preprocess_class: type[Preprocess] | type[NaFlexPreprocess] = Preprocess   # NaFlexPreprocess: SigLIP2

    def __init__(self, model_name: str | None = None, device: str = "auto", precision: str = "fp32",
                 lora_rank: int | None = None, lora_alpha: float | None = None,
                 lora_weights: str | Path | None = None):
        self.model_name = model_name or self.default_model
        self.device = resolve_device(device)
        if precision not in _DTYPES:
            raise SoIRError(f"precision={precision!r}; one of {list(_DTYPES)}")
        self.precision = precision
        model = load_backbone(self.family, self.model_name, self.attn_implementation)
        if lora_weights is not None:
            model, lora = add_lora(model, self.family, lora_rank or 256, lora_alpha, lora_weights)
        self.model = model.to(self.device).eval().requires_grad_(False)
        self.dim = embedding_dim(self.model, self.family)
        self.preprocess = self.preprocess_class.from_pretrained(self.model_name)
        self.lora = None if lora_weights is None else {
            "weights_sha256": sha256_file(lora_weights), **dataclasses.asdict(lora)}

    def identity(self) -> dict:
        """What pins this extractor's output, for the features folder's identity: the weights
        actually loaded (file hashes of a local folder, or the hub commit), the preprocessing, the
        LoRA adapters' content, precision and device (CPU and CUDA kernels round differently)."""
        preprocess = {k: str(v) if not isinstance(v, (int, float, tuple)) else v
                      for k, v in dataclasses.asdict(self.preprocess).items()}
        return {"class": type(self).__name__, **model_weights_identity(self.model_name), "preprocess": preprocess,
                "lora": self.lora, "precision": self.precision, "device": str(self.device)}

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
            return global_embedding(self.model, pixel_values.to(self.device), spatial_shapes).float()

    def describe(self, batch: list[Views]) -> list[Rows]:
        """Descriptor rows of each image in ``batch``."""
        groups: dict[int | None, list[tuple[int, View]]] = defaultdict(list)
        for i, views in enumerate(batch):
            for view in views.views:
                groups[None if view.masks is None else self.mask_group(view)].append((i, view))
        vectors: list[list[torch.Tensor]] = [[] for _ in batch]
        index: list[list[torch.Tensor]] = [[] for _ in batch]
        for key, items in groups.items():  # each group runs as one batch
            views = [v for _, v in items]
            if key is None:
                out = list(self.embed(*stack_views(views))[:, None].cpu())
            else:
                out = self.invert_views(views)
            for (i, view), rows in zip(items, out):
                vectors[i].append(rows)
                index[i].append(torch.full((1,), NO_MASK) if view.mask_index is None else view.mask_index)
        return [self.finish(Rows(torch.cat(v) if v else torch.empty(0, self.dim),
                                 torch.cat(m).long() if m else torch.empty(0, dtype=torch.long)))
                for v, m in zip(vectors, index)]

    def mask_group(self, view: View) -> int:
        """Views with equal keys are inverted in one batch (MI extractors may pool more)."""
        return len(view.masks)

    def invert_views(self, views: list[View]) -> list[torch.Tensor]:
        """MI embeddings [P_i, D] (CPU) of each view's masks."""
        raise NotImplementedError(f"{type(self).__name__} computes global embeddings only")

    def finish(self, rows: Rows) -> Rows:
        """Hook for per-image post-processing of descriptor rows."""
        return rows

    def extract(self, image: Image.Image, masks: np.ndarray | torch.Tensor | None = None) -> torch.Tensor:
        """One PIL image -> [D] global embedding, or [P, D] with masks (MI extractors)."""
        if masks is not None and not self.uses_masks:
            raise ValueError(f"{type(self).__name__} takes no masks; use its MI variant")
        # Same orientation as the pipeline (datasets.images.load_rgb) and as captions.pt masks.
        views = self.view_maker()(to_rgb(ImageOps.exif_transpose(image)), masks)
        if masks is not None and views.dropped_masks:
            raise ValueError(f"{views.dropped_masks} mask(s) are empty at the model's input size")
        rows = self.describe([views])[0].vectors
        return rows[0] if masks is None and len(rows) == 1 else rows
