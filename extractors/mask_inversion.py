"""Mask Inversion extractors: one embedding per object mask (see utils/mask_inversion.py for the math)."""
from __future__ import annotations

import logging

import torch

from extractors.base import Extractor, Rows
from extractors.views import NO_MASK, View, ViewMaker
from utils.mask_inversion import mask_inversion

log = logging.getLogger("soir.extractors")


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
        counts = [len(v.masks) for v in views]
        masks = torch.zeros(len(views), max(counts), *views[0].masks.shape[1:])
        for i, view in enumerate(views):
            masks[i, :counts[i]] = view.masks
        vectors = self.invert(torch.stack([v.pixel_values for v in views]), masks).cpu()
        return [v[:n] for v, n in zip(vectors, counts)]

    def invert(self, pixel_values: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """pixel_values [B, 3, H, W], masks [B, P, H, W] in {0, 1} -> unit vectors [B, P, D]."""
        with self.autocast():
            return mask_inversion(self.model, pixel_values.to(self.device), masks.to(self.device),
                                  **self.mi).float()

    def finish(self, rows: Rows) -> Rows:
        if self.avg_multiple_vecs and len(rows) > 1:
            return Rows(torch.nn.functional.normalize(rows.vectors.mean(0, keepdim=True), dim=-1),
                        torch.tensor([NO_MASK]))
        return rows
