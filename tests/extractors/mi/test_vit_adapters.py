"""extractors/mi/vit_adapters.py: where each family's pieces are, checked against the models' own forward pass."""

from __future__ import annotations

import pytest
import torch

from extractors.mi.vit_adapters import hooked_blocks, patch_token_mask, vit_parts
from tests.extractors.mi.test_mask_inversion import MODELS, _inputs, _load


@pytest.fixture(scope="module")
def models(tiny_model_dirs, tiny_variant_dirs):
    folders = {**tiny_model_dirs, **tiny_variant_dirs}
    return {name: _load(folders[name], name) for name in MODELS}


@pytest.mark.parametrize("name", MODELS)
def test_attention_output_is_probabilities_times_v_proj_output(models, name):
    """The decomposition's premise, G = dS/dA = u V^T: every block's attention output (o_proj's input)
    is A V with A the probabilities the model reports and V the v_proj output, per head. DINOv3's
    RoPE rotates q and k only; if it (or anything else) touched V this would fail."""
    model = models[name]
    parts = vit_parts(model)
    pixels, _, kw = _inputs(model, B=2, P=1)
    seen = {"v": [], "a": []}
    handles = []
    for block in parts.blocks:
        handles.append(block.v_proj.register_forward_hook(lambda m, args, out: seen["v"].append(out)))
        handles.append(block.o_proj.register_forward_pre_hook(lambda m, args: seen["a"].append(args[0])))
    try:
        with torch.no_grad():
            out = model(**parts.model_inputs(pixels, kw.get("spatial_shapes")), output_attentions=True)
    finally:
        for handle in handles:
            handle.remove()
    assert len(out.attentions) == len(parts.blocks) == len(seen["v"]) == len(seen["a"])
    for A, V, a in zip(out.attentions, seen["v"], seen["a"]):
        B, H, T, _ = A.shape
        V_heads = V.reshape(B, T, H, -1).transpose(1, 2)
        torch.testing.assert_close(a, (A @ V_heads).transpose(1, 2).reshape(B, T, -1), atol=1e-12, rtol=0)


@pytest.mark.parametrize(
    "name, family, prefix, gated",
    [
        ("dinov2", "dinov2", 1, False),
        ("dinov2reg", "dinov2reg", 3, False),
        ("dinov3", "dinov3", 3, False),
        ("siglip", "siglip", 0, False),
        ("siglip2", "siglip2", 0, False),
        ("clip", "clip", 1, False),
        ("dinov2_swiglu", "dinov2", 1, True),
        ("dinov2reg_gated", "dinov2reg", 3, True),
        ("dinov3_gated", "dinov3", 3, True),
        ("siglip2_fixres", "siglip", 0, False),
    ],
)
def test_family_prefix_tokens_and_mlp(models, name, family, prefix, gated):
    """CLS + the tiny models' 2 registers are the tokens in front of the patches (dropped from the map)."""
    parts = vit_parts(models[name])
    assert (parts.family, parts.num_prefix_tokens, parts.naflex) == (family, prefix, family == "siglip2")
    assert all((block.gate is not None) == gated for block in parts.blocks)
    pixels, _, kw = _inputs(models[name], B=1, P=1)
    with torch.no_grad():
        tokens = models[name](**parts.model_inputs(pixels, kw.get("spatial_shapes"))).last_hidden_state.shape[1]
    patches = pixels.shape[1] if parts.naflex else (pixels.shape[-1] // parts.patch_size) ** 2
    assert tokens == prefix + patches


def test_naflex_inputs_are_checked_and_the_mask_derived(models):
    parts = vit_parts(models["siglip2"])
    pixels, _, kw = _inputs(models["siglip2"], B=2, P=1)
    inputs = parts.model_inputs(pixels, kw["spatial_shapes"])
    assert inputs["pixel_attention_mask"].sum(1).tolist() == [15, 8]  # 3 x 5 and 4 x 2 of 16 tokens
    assert patch_token_mask(torch.tensor([[1, 2]]), 4).tolist() == [[True, True, False, False]]
    assert parts.patch_grids(pixels, kw["spatial_shapes"]).tolist() == [[3, 5], [4, 2]]
    with pytest.raises(ValueError, match="needs spatial_shapes"):
        parts.model_inputs(pixels)
    with pytest.raises(ValueError, match=r"h\*w <= N=16"):
        parts.model_inputs(pixels, torch.tensor([[3, 5], [4, 5]]))
    with pytest.raises(ValueError, match="patch sequences"):
        parts.model_inputs(torch.zeros(2, 3, 64, 64), kw["spatial_shapes"])
    fixed = vit_parts(models["dinov3"])
    with pytest.raises(ValueError, match="spatial_shapes is for NaFlex"):
        fixed.model_inputs(torch.zeros(2, 3, 64, 64), kw["spatial_shapes"])


def test_siglip2_without_its_head_is_refused(tiny_model_dirs):
    from transformers import Siglip2VisionModel

    model = Siglip2VisionModel.from_pretrained(tiny_model_dirs["siglip2"], vision_use_head=False)
    with pytest.raises(ValueError, match="siglip2 without its attention-pooling head"):
        vit_parts(model)


def test_layer_index_range(models):
    parts = vit_parts(models["dinov3"])
    assert hooked_blocks(parts, -2) == parts.blocks[1:]
    with pytest.raises(ValueError, match=r"\[-3, -1\]"):
        hooked_blocks(parts, -4)
