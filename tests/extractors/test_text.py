"""Text towers (extractors/text.py) of tiny random SigLIP / CLIP checkpoints saved with their tokenizers."""

from __future__ import annotations

import logging
import shutil

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoTokenizer, CLIPModel, SiglipModel

from extractors import TextEncoder, build_extractor, capabilities
from utils.errors import SoIRError

TEXTS = ["a photo of a red mug", "a toy", "a photo of the blue ball box"]


@pytest.mark.parametrize(
    "family,model_class,padding", [("siglip", SiglipModel, "max_length"), ("clip", CLIPModel, True)]
)
def test_text_embedding_is_the_checkpoints_get_text_features_normalised(tiny_model_dirs, family, model_class, padding):
    folder = tiny_model_dirs[family]
    encoder = TextEncoder(str(folder), family)
    # The reference: the whole checkpoint, loaded as its model card shows, padded as its card says.
    model = model_class.from_pretrained(folder).eval()
    tokens = AutoTokenizer.from_pretrained(folder)(TEXTS, padding=padding, return_tensors="pt")
    with torch.no_grad():
        expected = F.normalize(model.get_text_features(**tokens).pooler_output, dim=-1)
    got = encoder.embed(TEXTS)
    assert got.dtype == torch.float32 and got.shape == expected.shape
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    assert torch.allclose(got.norm(dim=-1), torch.ones(len(TEXTS)), atol=1e-6)
    assert not torch.allclose(got[0], got[1], atol=1e-3)  # different texts, different vectors
    # Same space as the vision extractor of that checkpoint: the same size, comparable by inner product.
    vision = build_extractor(f"{family}_features", model_name=str(folder), device="cpu")
    assert got.shape[1] == vision.dim
    # A text's vector does not depend on the batch it is embedded with (padding is the family's rule).
    torch.testing.assert_close(encoder.embed(TEXTS[1:2]), got[1:2], atol=1e-6, rtol=0)


def test_siglip_texts_are_padded_to_the_trained_length(tiny_model_dirs):
    """SigLIP pools the last token: the embedding of an unpadded text differs (the reason for "max_length")."""
    folder = tiny_model_dirs["siglip"]
    encoder = TextEncoder(str(folder), "siglip")
    model = SiglipModel.from_pretrained(folder).eval()
    unpadded = AutoTokenizer.from_pretrained(folder)(TEXTS[:1], return_tensors="pt")
    with torch.no_grad():
        plain = F.normalize(model.get_text_features(**unpadded).pooler_output, dim=-1)
    assert not torch.allclose(encoder.embed(TEXTS[:1]), plain, atol=1e-3)


def test_capability_and_families_without_a_text_tower(tiny_model_dirs):
    assert capabilities("siglip_mi_features")["has_text_tower"] and capabilities("clip_features")["has_text_tower"]
    assert not capabilities("dinov2_mi_features")["has_text_tower"]
    with pytest.raises(
        SoIRError, match="dinov2 checkpoints have no text tower SoIR can use .*: text queries need a SigLIP or CLIP"
    ):
        TextEncoder(str(tiny_model_dirs["dinov2"]), "dinov2")


def test_missing_tokenizer_is_one_clear_line(tiny_model_dirs, tmp_path):
    folder = tmp_path / "clip_without_tokenizer"
    shutil.copytree(tiny_model_dirs["clip"], folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).unlink()
    with pytest.raises(SoIRError, match="does not know the words of 'a photo of' .* without tokenizer files"):
        TextEncoder(str(folder), "clip")  # transformers would build an empty tokenizer and carry on


def test_long_and_empty_texts(tiny_model_dirs, caplog):
    encoder = TextEncoder(str(tiny_model_dirs["clip"]), "clip")
    long = " ".join(["mug"] * 200)
    with caplog.at_level(logging.WARNING, logger="soir.extractors"):
        vector = encoder.embed([long])
    assert "longer than 77 tokens are cut" in caplog.text and vector.shape == (1, 24)
    with pytest.raises(SoIRError, match="non-empty strings"):
        encoder.embed(["a mug", "  "])


def test_tokenizer_of_another_checkpoint_is_refused(tiny_model_dirs, tmp_path):
    from utils.testing.tiny_models import tiny_clip_tokenizer

    folder = tmp_path / "clip_with_a_byte_level_tokenizer"
    shutil.copytree(tiny_model_dirs["clip"], folder)
    tiny_clip_tokenizer(77).save_pretrained(folder)  # 518 ids; the tiny text model has 64
    with pytest.raises(SoIRError, match="has 518 tokens, its text model 64: they are not from one checkpoint"):
        TextEncoder(str(folder), "clip")
