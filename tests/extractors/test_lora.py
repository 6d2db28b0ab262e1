"""LoRA checkpoints: the original's format and alpha, peft adapter folders, SoIR's own metadata, CLIP, bad files."""

from __future__ import annotations

import logging
import zipfile

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from peft import LoraConfig, get_peft_model
from PIL import Image
from transformers import CLIPVisionModelWithProjection, Dinov2Model

from extractors import CLIPExtractor, CLIPMIExtractor, DINOv2Extractor, extractor_from_config
from extractors.lora import LoraSettings, lora_checkpoint, wrap_with_lora
from extractors.mi.engine import mask_inversion
from utils.config import SoIRConfig

RANK = 8  # the original uses 256; a small rank keeps the test fast, alpha follows the original's rule


@pytest.fixture(scope="module")
def image() -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (90, 120, 3), dtype=np.uint8))


def _randomise(peft_model, seed: int = 1):
    """peft initialises lora_B = 0 (no change at all); random adapters make the scaling visible."""
    torch.manual_seed(seed)
    for name, param in peft_model.named_parameters():
        if "lora_" in name:
            param.data.normal_(0, 0.3)
    return peft_model.eval()


def _original_dinov2_checkpoint(folder, alpha: float = 32) -> tuple[torch.nn.Module, dict]:
    """A peft LoRA DINOv2 built as the original code builds it (alpha 32, dropout 0.1, q/k/v), and its
    state dict as transformers 4.x + peft saved it: attention.attention.query/key/value, under
    "model_state_dict"."""
    peft_model = _randomise(
        get_peft_model(
            Dinov2Model.from_pretrained(folder),
            LoraConfig(r=RANK, lora_alpha=alpha, lora_dropout=0.1, target_modules=["q_proj", "k_proj", "v_proj"]),
        )
    )
    renames = {
        "attention.q_proj": "attention.attention.query",
        "attention.k_proj": "attention.attention.key",
        "attention.v_proj": "attention.attention.value",
        "attention.o_proj": "attention.output.dense",
    }
    state = {}
    for key, value in peft_model.state_dict().items():
        for new, old in renames.items():
            key = key.replace(new, old)
        state[key] = value.clone()
    assert any("attention.attention.query.lora_A.default.weight" in k for k in state)
    return peft_model, {"model_state_dict": state, "epoch": 0}


def _reference(peft_model, extractor, image) -> torch.Tensor:
    pixels = extractor.preprocess.image(image)[None]
    with torch.no_grad():
        out = peft_model(pixel_values=pixels)
    embedding = out.image_embeds if hasattr(out, "image_embeds") else out.pooler_output
    return torch.nn.functional.normalize(embedding, dim=-1)[0]


def test_checkpoint_made_the_originals_way_gives_the_originals_features(tiny_model_dirs, image, tmp_path):
    folder = tiny_model_dirs["dinov2"]
    peft_model, ckpt = _original_dinov2_checkpoint(folder)
    torch.save(ckpt, tmp_path / "lora_weights.ckpt")
    # As the original command: lora_adapt=true lora_rank=R weights=..., no alpha given.
    cfg = OmegaConf.structured(
        SoIRConfig(
            extractor="dinov2_features",
            model_name=str(folder),
            vec_dim=32,
            device="cpu",
            lora_adapt=True,
            lora_rank=RANK,
            weights=str(tmp_path / "lora_weights.ckpt"),
        )
    )
    adapted = extractor_from_config(cfg)
    expected = _reference(peft_model, adapted, image)
    torch.testing.assert_close(adapted.extract(image), expected, atol=1e-5, rtol=1e-4)
    # The scaling matters: alpha = rank (scaling 1, SoIR's old default) gives other features.
    scale_one = DINOv2Extractor(
        str(folder),
        device="cpu",
        lora_rank=RANK,
        lora_alpha=RANK,
        lora_adapt=True,
        weights=tmp_path / "lora_weights.ckpt",
    )
    assert (scale_one.extract(image) - expected).abs().max() > 1e-2


def test_peft_adapter_folder_alpha_wins_and_is_logged(tiny_model_dirs, image, tmp_path, caplog):
    folder = tiny_model_dirs["dinov2"]
    peft_model = _randomise(
        get_peft_model(
            Dinov2Model.from_pretrained(folder),
            LoraConfig(r=RANK, lora_alpha=4, target_modules=["q_proj", "k_proj", "v_proj"]),
        )
    )
    peft_model.save_pretrained(tmp_path / "adapter")  # adapter_model.safetensors + adapter_config.json
    with caplog.at_level(logging.INFO, logger="soir.extractors"):
        adapted = DINOv2Extractor(
            str(folder),
            device="cpu",
            lora_rank=RANK,  # lora_alpha: default 32
            lora_adapt=True,
            weights=tmp_path / "adapter" / "adapter_model.safetensors",
        )
    assert "LoRA alpha 4 stored in adapter_config.json is used (lora_alpha=32 ignored)" in caplog.text
    torch.testing.assert_close(adapted.extract(image), _reference(peft_model, adapted, image), atol=1e-5, rtol=1e-4)


def test_stored_rank_and_family_are_checked(tiny_model_dirs, tmp_path):
    folder = tiny_model_dirs["dinov2"]
    settings = LoraSettings(rank=RANK, alpha=16, family="dinov2")
    torch.save(
        lora_checkpoint(wrap_with_lora(Dinov2Model.from_pretrained(folder), settings), settings), tmp_path / "mine.ckpt"
    )
    with pytest.raises(ValueError, match=rf"mine.ckpt was trained with LoRA rank {RANK} .*set lora_rank={RANK}"):
        DINOv2Extractor(str(folder), device="cpu", lora_rank=4, lora_adapt=True, weights=tmp_path / "mine.ckpt")
    with pytest.raises(ValueError, match="mine.ckpt holds LoRA adapters for dinov2, not clip"):
        CLIPExtractor(
            str(tiny_model_dirs["clip"]), device="cpu", lora_rank=RANK, lora_adapt=True, weights=tmp_path / "mine.ckpt"
        )


def test_clip_lora_loads_for_plain_and_mask_inversion_extractors(tiny_model_dirs, image, tmp_path):
    folder = tiny_model_dirs["clip"]
    settings = LoraSettings(rank=4, alpha=8, dropout=0.1, family="clip")
    model = CLIPVisionModelWithProjection.from_pretrained(folder, attn_implementation="eager")
    peft_model = _randomise(wrap_with_lora(model, settings))
    torch.save(lora_checkpoint(peft_model, settings), tmp_path / "clip_lora.ckpt")
    cfg = OmegaConf.structured(
        SoIRConfig(
            extractor="clip_features",
            model_name=str(folder),
            vec_dim=24,
            device="cpu",
            lora_adapt=True,
            lora_rank=4,
            weights=str(tmp_path / "clip_lora.ckpt"),
        )
    )
    plain = extractor_from_config(cfg)
    torch.testing.assert_close(plain.extract(image), _reference(peft_model, plain, image), atol=1e-5, rtol=1e-4)
    # MI on the merged model = MI on the peft model (the engine walks peft's LoRA layers).
    mi = CLIPMIExtractor(
        str(folder), device="cpu", mi_iterations=5, lora_rank=4, lora_adapt=True, weights=tmp_path / "clip_lora.ckpt"
    )
    masks = np.zeros((2, image.height, image.width), dtype=bool)
    masks[0, 10:40, 20:70], masks[1, 50:85, 60:110] = True, True
    pixels, small = mi.preprocess.image(image)[None], mi.preprocess.masks(masks)[None]
    expected = mask_inversion(peft_model, pixels, small, alpha=0.03, iterations=5)[0]
    torch.testing.assert_close(mi.extract(image, masks), expected, atol=1e-4, rtol=1e-4)
    unadapted = CLIPMIExtractor(str(folder), device="cpu", mi_iterations=5).extract(image, masks)
    assert (unadapted - expected).abs().max() > 1e-2


def _zip(path):
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("notes.txt", "not a checkpoint")
    return path


@pytest.mark.parametrize(
    "make,problem",
    [
        (lambda p: p.write_text("lora weights: see the paper\n") and p, "not a PyTorch checkpoint"),
        (_zip, "not a PyTorch checkpoint"),
        (
            lambda p: torch.save({"model_state_dict": {"a": torch.ones(1)}, "args": zipfile.ZipInfo("x")}, p) or p,
            "holds Python objects (zipfile.ZipInfo)",
        ),
        (lambda p: torch.save({"epoch": 3}, p) or p, "not a LoRA state-dict checkpoint"),
    ],
)
def test_a_file_that_is_not_a_checkpoint_gives_one_line_naming_it(tiny_model_dirs, tmp_path, make, problem):
    path = make(tmp_path / "weights.ckpt")
    with pytest.raises(ValueError) as err:
        DINOv2Extractor(str(tiny_model_dirs["dinov2"]), device="cpu", lora_rank=RANK, lora_adapt=True, weights=path)
    message = str(err.value)
    assert message.startswith(f"{path}: ") and problem in message
    assert "\n" not in message and "weights_only=False" not in message
