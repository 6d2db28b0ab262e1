"""Global extractors: loading through from_pretrained, preprocessing, registry, LoRA checkpoints."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from peft import LoraConfig, get_peft_model
from PIL import Image
from transformers import Dinov2Model, Siglip2ImageProcessor, SiglipImageProcessor, SiglipVisionModel

from extractors import (
    CLIPExtractor,
    DINOv2Extractor,
    DINOv2RegExtractor,
    DINOv3Extractor,
    SigLIP2Extractor,
    SigLIPExtractor,
    build_extractor,
    extractor_from_config,
    list_extractors,
)
from utils.config import SoIRConfig
from utils.errors import SoIRError


@pytest.fixture(scope="module")
def image() -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (90, 120, 3), dtype=np.uint8))


def test_registry_lists_all_twelve_names():
    assert list_extractors() == sorted(
        f"{f}{mi}_features"
        for f in ("dinov2", "dinov2reg", "dinov3", "siglip", "siglip2", "clip")
        for mi in ("", "_mi")
    )
    with pytest.raises(ValueError, match="unknown extractor 'dino_features'.*siglip_mi_features"):
        build_extractor("dino_features")


@pytest.mark.parametrize(
    "cls,family,dim",
    [
        (DINOv2Extractor, "dinov2", 32),
        (DINOv2RegExtractor, "dinov2reg", 32),
        (DINOv3Extractor, "dinov3", 32),
        (SigLIPExtractor, "siglip", 32),
        (SigLIP2Extractor, "siglip2", 32),
        (CLIPExtractor, "clip", 24),
    ],
)
def test_extract_is_the_models_own_normalised_embedding(tiny_model_dirs, image, cls, family, dim):
    extractor = cls(str(tiny_model_dirs[family]), device="cpu")
    vector = extractor.extract(image)
    assert vector.shape == (dim,) and torch.isclose(vector.norm(), torch.tensor(1.0))
    pixels = extractor.preprocess.image(image)[None]
    if family == "siglip2":  # NaFlex: the 90 x 120 image as 3 x 4 patches of 16 padded to 16, masked
        shape = extractor.preprocess.spatial_shape(image)
        assert shape.tolist() == [3, 4] and pixels.shape == (1, 16, 3 * 16 * 16)
        out = extractor.model(
            pixel_values=pixels, spatial_shapes=shape[None], pixel_attention_mask=(torch.arange(16) < 12)[None]
        )
    else:
        out = extractor.model(pixel_values=pixels)
    expected = out.image_embeds if family == "clip" else out.pooler_output
    torch.testing.assert_close(vector, torch.nn.functional.normalize(expected[0], dim=-1))


def test_naflex_preprocessing_is_the_siglip2_processors(tiny_model_dirs):
    """Aspect ratio kept within max_num_patches, patches row by row, zero padding: as Siglip2ImageProcessor."""
    extractor = SigLIP2Extractor(str(tiny_model_dirs["siglip2"]), device="cpu")
    processor = Siglip2ImageProcessor.from_pretrained(tiny_model_dirs["siglip2"])
    rng = np.random.default_rng(1)
    for height, width in [(90, 120), (200, 40), (33, 33)]:
        image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
        theirs = processor(image, return_tensors="pt")
        shape = extractor.preprocess.spatial_shape(image)
        torch.testing.assert_close(shape, theirs["spatial_shapes"][0].long())
        assert int(theirs["pixel_attention_mask"][0].sum()) == int(shape.prod())
        torch.testing.assert_close(
            extractor.preprocess.image(image), theirs["pixel_values"][0], atol=2.01 / 255, rtol=0
        )
        masks = np.zeros((1, height, width), dtype=bool)
        masks[0, : height // 2] = True  # the top half
        resized = extractor.preprocess.masks(masks)
        assert resized.shape == (1, *(shape * 16).tolist())  # the image's own resized size
        rows = resized[0].any(1).nonzero().flatten()
        assert rows.min() == 0 and abs(int(rows.max()) + 1 - resized.shape[1] / 2) <= 1


def test_preprocessing_resizes_whole_image_like_the_hf_processor(tiny_model_dirs, image):
    """SigLIP's processor does not crop, so our whole-image resize must match it exactly."""
    extractor = SigLIPExtractor(str(tiny_model_dirs["siglip"]), device="cpu")
    ours = extractor.preprocess.image(image)
    theirs = SiglipImageProcessor.from_pretrained(tiny_model_dirs["siglip"])(image, return_tensors="pt")
    assert ours.shape == (3, 64, 64)
    # One 8-bit level (2/255 after std 0.5) of rounding difference between resize backends.
    torch.testing.assert_close(ours, theirs["pixel_values"][0], atol=2.01 / 255, rtol=0)


def test_no_centre_crop_keeps_border_objects(tiny_model_dirs):
    """DINOv2's processor crops the centre; ours must keep a red object in the image corner."""
    extractor = DINOv2Extractor(str(tiny_model_dirs["dinov2"]), device="cpu")
    array = np.zeros((100, 300, 3), dtype=np.uint8)
    array[:, :20, 0] = 255  # a red stripe at the left border
    pixels = extractor.preprocess.image(Image.fromarray(array))
    red = pixels[0] * 0.229 + 0.485  # undo normalisation of the red channel
    assert pixels.shape == (3, 56, 56) and red[:, :2].mean() > 0.9


def _cfg(**overrides):
    cfg = OmegaConf.structured(SoIRConfig)
    cfg.anns_file = "unused.pt"
    cfg.merge_with(overrides)
    return cfg


def test_vec_dim_is_checked_against_the_model(tiny_model_dirs):
    cfg = _cfg(extractor="clip_features", model_name=str(tiny_model_dirs["clip"]), vec_dim=512, device="cpu")
    with pytest.raises(ValueError, match="vec_dim=512 .* outputs 24-d.*vec_dim=24"):
        extractor_from_config(cfg)
    cfg.vec_dim = 24
    assert extractor_from_config(cfg).dim == 24


def test_explicit_cuda_without_cuda_is_an_error(tiny_model_dirs):
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    with pytest.raises(SoIRError, match="CUDA is not available"):
        SigLIPExtractor(str(tiny_model_dirs["siglip"]), device="cuda")


def test_missing_model_names_the_model(tmp_path):
    from utils.errors import SoIRError

    with pytest.raises(SoIRError, match=f"siglip model '{tmp_path / 'nowhere'}' is neither an existing folder nor"):
        SigLIPExtractor(str(tmp_path / "nowhere"), device="cpu")


def _lora_model(folder, rank=4):
    """A peft LoRA DINOv2 with non-zero adapters (so LoRA changes the output)."""
    torch.manual_seed(1)
    peft_model = get_peft_model(
        Dinov2Model.from_pretrained(folder),
        LoraConfig(r=rank, lora_alpha=rank, target_modules=["q_proj", "k_proj", "v_proj"]),
    )
    for name, param in peft_model.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0, 0.5)
    return peft_model.eval()


def _as_v4_lightning_checkpoint(peft_model) -> dict:
    """Keys as a transformers-4.x Lightning run saved them: model. prefix, attention.attention.query..."""
    renames = {
        "attention.q_proj": "attention.attention.query",
        "attention.k_proj": "attention.attention.key",
        "attention.v_proj": "attention.attention.value",
        "attention.o_proj": "attention.output.dense",
    }
    state = {}
    for key, value in peft_model.state_dict().items():
        if "lora_" not in key:
            continue
        key = key.replace("base_model.model.", "model.backbone.").replace(".default", "")
        for new, old in renames.items():
            key = key.replace(new, old)
        state[key] = value.clone()
    return {"state_dict": state, "epoch": 3}


def test_lora_checkpoint_with_v4_names_loads_and_changes_the_output(tiny_model_dirs, image, tmp_path):
    folder = tiny_model_dirs["dinov2"]
    peft_model = _lora_model(folder)
    ckpt = tmp_path / "lora.ckpt"
    torch.save(_as_v4_lightning_checkpoint(peft_model), ckpt)
    plain = DINOv2Extractor(str(folder), device="cpu")
    adapted = DINOv2Extractor(str(folder), device="cpu", lora_rank=4, lora_alpha=4, lora_adapt=True, weights=ckpt)
    pixels = plain.preprocess.image(image)[None]
    expected = torch.nn.functional.normalize(peft_model(pixel_values=pixels).pooler_output, dim=-1)[0]
    torch.testing.assert_close(adapted.extract(image), expected, atol=1e-5, rtol=1e-4)
    assert (plain.extract(image) - adapted.extract(image)).abs().max() > 1e-3


def test_lora_checkpoint_that_does_not_fit_lists_the_keys(tiny_model_dirs, tmp_path):
    folder = tiny_model_dirs["dinov2"]
    state = _as_v4_lightning_checkpoint(_lora_model(folder))["state_dict"]
    state = {k: v for k, v in state.items() if "value" not in k}  # drop the v_proj adapters
    state["model.backbone.encoder.layer.0.mlp.fc9.weight"] = torch.zeros(2)
    torch.save(state, tmp_path / "bad.ckpt")
    with pytest.raises(
        ValueError,
        match=r"bad.ckpt does not match.*missing LoRA keys.*v_proj.*"
        r"1 unexpected keys.*fc9",
    ):
        DINOv2Extractor(str(folder), device="cpu", lora_rank=4, lora_adapt=True, weights=tmp_path / "bad.ckpt")
    torch.save(_as_v4_lightning_checkpoint(_lora_model(folder, rank=4)), tmp_path / "r4.ckpt")
    with pytest.raises(ValueError, match="check lora_rank"):
        DINOv2Extractor(str(folder), device="cpu", lora_rank=8, lora_adapt=True, weights=tmp_path / "r4.ckpt")


def test_checkpoint_of_another_family_is_refused(tiny_model_dirs):
    """transformers would only warn and initialise the missing weights at random."""
    with pytest.raises(ValueError, match="is not a dinov2 checkpoint: .* weights missing"):
        DINOv2Extractor(str(tiny_model_dirs["siglip"]), device="cpu")


@pytest.mark.parametrize(
    "cls, folder, message",
    [
        # a registers checkpoint loads into Dinov2Model with every weight used but the registers: silently wrong
        (DINOv2Extractor, "dinov2reg", "is a dinov2reg checkpoint .*'dinov2_with_registers'.*dinov2reg_features"),
        (DINOv3Extractor, "dinov2", "is a dinov2 checkpoint"),
        (
            SigLIP2Extractor,
            "siglip",
            r"is a siglip checkpoint \(config.model_type='siglip'\), not siglip2.*siglip_features",
        ),
        (SigLIPExtractor, "siglip2", "is a siglip2 checkpoint.*siglip2_mi_features"),
    ],
)
def test_checkpoint_of_a_related_family_is_refused(tiny_model_dirs, cls, folder, message):
    with pytest.raises(SoIRError, match=message):
        cls(str(tiny_model_dirs[folder]), device="cpu")


def test_fixed_resolution_siglip2_works_through_the_siglip_family(tiny_variant_dirs, image):
    """google/siglip2-base-patch16-224 & co. are SiglipModel checkpoints (model_type "siglip")."""
    folder = str(tiny_variant_dirs["siglip2_fixres"])
    extractor = SigLIPExtractor(folder, device="cpu")
    assert extractor.preprocess.size == (64, 64) and extractor.preprocess.resample.value == "bilinear"
    out = SiglipVisionModel.from_pretrained(folder)(pixel_values=extractor.preprocess.image(image)[None])
    torch.testing.assert_close(extractor.extract(image), torch.nn.functional.normalize(out.pooler_output[0], dim=-1))
    with pytest.raises(ValueError, match="not a NaFlex processor config.*siglip extractors"):
        SigLIP2Extractor.preprocess_class.from_pretrained(folder)


@pytest.mark.parametrize(
    "cls, family", [(DINOv2RegExtractor, "dinov2reg"), (DINOv3Extractor, "dinov3"), (SigLIP2Extractor, "siglip2")]
)
def test_lora_is_refused_for_the_new_families(tiny_model_dirs, tmp_path, cls, family):
    """extractors.lora knows DINOv2's and CLIP's module names only; the others say so, naming the family."""
    torch.save({}, tmp_path / "lora.ckpt")
    with pytest.raises(SoIRError, match=f"LoRA weights are supported for dinov2, clip, not {family}"):
        cls(str(tiny_model_dirs[family]), device="cpu", lora_adapt=True, lora_rank=4, weights=tmp_path / "lora.ckpt")
