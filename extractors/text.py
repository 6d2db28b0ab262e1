"""Text towers: a sentence -> a unit vector in the image embedding space of the same checkpoint.

SigLIP and CLIP checkpoints hold a text tower next to the vision tower the extractors load; text
queries (``search_index.py query_text=...`` and ``T2I=true``) load it from the same ``model_name``.
DINOv2 has none.

Everything that differs between families is in :data:`TEXT_TOWERS` (the one place to edit when a
family is added or restructured): the text model class, how texts are padded, and which output holds
the embedding. The embedding is exactly the checkpoint's ``get_text_features`` (``SiglipModel`` /
``CLIPModel``), L2-normalised, like the image side (``extractors.mi.engine.global_embedding``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import AutoTokenizer, CLIPTextModelWithProjection, SiglipTextModel

from extractors.backbones import load_backbone
from utils.errors import SoIRError
from utils.hub import model_weights_identity

log = logging.getLogger("soir.extractors")


@dataclass(frozen=True)
class TextTower:
    """What a family's text side needs: the model class (loads the text tower only from a whole
    checkpoint), the tokenizer's ``padding`` and the output attribute holding the embedding."""

    model_class: type
    padding: str
    output: str


TEXT_TOWERS = {
    # SigLIP was trained on texts padded to 64 tokens and pools the last token: padding changes the
    # embedding, so "max_length" as in the model card. Embedding: pooler_output (its head's output).
    "siglip": TextTower(SiglipTextModel, "max_length", "pooler_output"),
    # CLIP pools at the end-of-text token under a causal mask: padding does not change it.
    # Embedding: text_embeds (the projection, as CLIPModel.get_text_features).
    "clip": TextTower(CLIPTextModelWithProjection, "longest", "text_embeds"),
}


def has_text_tower(family: str) -> bool:
    return family in TEXT_TOWERS


class TextEncoder:
    """The text tower of checkpoint ``model_name`` (family ``family``) and its tokenizer.

    ``encoder.embed(["a photo of a mug"])`` -> [1, D] float32 unit vectors (CPU), comparable with the
    image embeddings (and Mask Inversion vectors) of the same checkpoint by inner product.
    Runs in fp32 whatever the extractor's ``precision`` (texts are few).
    """

    def __init__(self, model_name: str, family: str, device: str | torch.device = "cpu"):
        if family not in TEXT_TOWERS:
            raise SoIRError(
                f"{family} checkpoints have no text tower SoIR can use (DINOv2 / DINOv3 have none; "
                "SigLIP2's is not wired yet): text queries need a SigLIP or CLIP extractor (siglip_*, clip_*)"
            )
        self.model_name, self.family, self.tower = model_name, family, TEXT_TOWERS[family]
        self.device = torch.device(device)
        self.model = load_backbone(family, model_name, "sdpa", self.tower.model_class).to(self.device)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(model_name)
        except (OSError, ValueError, ImportError) as err:
            hint = " (SigLIP's tokenizer needs `pip install sentencepiece protobuf`)" if family == "siglip" else ""
            raise SoIRError(
                f"cannot load the tokenizer of {model_name!r}{hint}: {str(err).strip().splitlines()[0]}"
            ) from None
        self.max_length = min(int(self.tokenizer.model_max_length), int(self.model.config.max_position_embeddings))
        self._check_tokenizer()

    def _check_tokenizer(self) -> None:
        """transformers builds an EMPTY tokenizer, without a word, when a folder has no tokenizer files
        (every text becomes unknown tokens); and a tokenizer of another checkpoint indexes past the
        embedding table. Both are refused."""
        vocab_size = int(self.model.config.vocab_size)
        ids = self.tokenizer("a photo of", add_special_tokens=False)["input_ids"]
        if self.tokenizer.unk_token_id in ids:
            raise SoIRError(
                f"the tokenizer of {self.model_name!r} does not know the words of 'a photo of' (a folder "
                "without tokenizer files gets an empty one): save the checkpoint's tokenizer there"
            )
        if len(self.tokenizer) > vocab_size:
            raise SoIRError(
                f"the tokenizer of {self.model_name!r} has {len(self.tokenizer)} tokens, its text model "
                f"{vocab_size}: they are not from one checkpoint"
            )

    def identity(self) -> dict:
        """The weights behind the text tower (and so the tokenizer files of a local folder)."""
        return {"class": self.tower.model_class.__name__, **model_weights_identity(self.model_name)}

    def embed(self, texts: list[str]) -> torch.Tensor:
        """[N, D] float32 unit vectors of ``texts``; a text longer than the tower's context
        (SigLIP 64, CLIP 77 tokens) is cut to it (logged)."""
        if not texts or any(not isinstance(t, str) or not t.strip() for t in texts):
            raise SoIRError(f"text queries must be non-empty strings, got {texts[:5]!r}")
        full = self.tokenizer(texts)["input_ids"]
        long = [t for t, ids in zip(texts, full) if len(ids) > self.max_length]
        if long:
            log.warning(
                "%d text(s) longer than %d tokens are cut to it (the text tower's context): %s",
                len(long),
                self.max_length,
                long[:3],
            )
        tokens = self.tokenizer(
            texts, padding=self.tower.padding, truncation=True, max_length=self.max_length, return_tensors="pt"
        ).to(self.device)
        with torch.inference_mode():
            output = self.model(**tokens)
        return F.normalize(getattr(output, self.tower.output).float(), dim=-1).cpu()
