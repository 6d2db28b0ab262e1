"""Mask Inversion engine (extractors/mi/engine.py) against the plain reference (extractors/mi/reference.py).

Tiny random models of every family (DINOv2, DINOv2-reg, DINOv3, SigLIP, SigLIP2 NaFlex, CLIP) and of
the variants the engine must handle too (gated MLPs, fixed-resolution SigLIP2) are loaded from disk
with eager attention. For the comparisons they are cast to float64 and their LayerNorm / layer-scale
parameters are perturbed (random init leaves them at 1 and 0, which would hide a forgotten gamma,
beta or layer scale). SigLIP2 batches hold two images of different aspect ratios (and padding).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model, inject_adapter_in_model
from transformers import (
    CLIPVisionModelWithProjection,
    Dinov2Model,
    Dinov2WithRegistersModel,
    DINOv3ViTModel,
    Siglip2VisionModel,
    SiglipVisionModel,
    ViTConfig,
    ViTModel,
)

from extractors.mi.engine import dice_loss, global_embedding, iou_loss, legrad_map, mask_inversion
from extractors.mi.legrad import LeGrad
from extractors.mi.reference import reference_legrad_map, reference_mao, reference_mask_inversion
from extractors.mi.vit_adapters import vit_parts
from utils.testing.tiny_models import TINY_BUILDERS, TINY_VARIANTS

CLASSES = {
    "dinov2": Dinov2Model,
    "dinov2reg": Dinov2WithRegistersModel,
    "dinov3": DINOv3ViTModel,
    "siglip": SiglipVisionModel,
    "siglip2": Siglip2VisionModel,
    "clip": CLIPVisionModelWithProjection,
    "dinov2_swiglu": Dinov2Model,
    "dinov2reg_gated": Dinov2WithRegistersModel,
    "dinov3_gated": DINOv3ViTModel,
    "siglip2_fixres": SiglipVisionModel,
}
FAMILIES = list(TINY_BUILDERS)  # one tiny model per family
MODELS = FAMILIES + list(TINY_VARIANTS)  # + gated MLPs and the fixed-resolution SigLIP2
NAFLEX_GRIDS = [(3, 5), (4, 2)]  # SigLIP2 test images: landscape and portrait patch grids


def _load(folder, family: str, double: bool = True, seed: int = 0):
    model = CLASSES[family].from_pretrained(folder, attn_implementation="eager")
    if double:
        model = model.double()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "lambda1" in name:
                p.add_(0.3 * torch.randn(p.shape, generator=generator, dtype=p.dtype))
    return model


def _inputs(model, B: int, P: int, seed: int = 0):
    """(pixel_values, masks [B, P, H, W] in {0, 1}, extra keyword arguments of the MI functions).

    SigLIP2 NaFlex: patch sequences of the NAFLEX_GRIDS grids in turn (padding tokens hold random
    values too), spatial_shapes in the extra arguments, masks on their canvas (0 outside each image).
    """
    dtype = next(model.parameters()).dtype
    generator = torch.Generator().manual_seed(seed)
    if vit_parts(model).naflex:
        p, N = model.config.patch_size, model.config.num_patches
        grids = torch.tensor([NAFLEX_GRIDS[b % len(NAFLEX_GRIDS)] for b in range(B)])
        pixels = torch.randn(B, N, 3 * p * p, generator=generator).to(dtype)
        masks = (torch.rand(B, P, *(grids.amax(0) * p).tolist(), generator=generator) > 0.6).float()
        return pixels, masks * _region(masks, grids * p), {"spatial_shapes": grids}
    size = model.config.image_size
    pixels = torch.randn(B, 3, size, size, generator=generator).to(dtype)
    masks = (torch.rand(B, P, size, size, generator=generator) > 0.6).float()
    return pixels, masks, {}


def _region(masks: torch.Tensor, regions: torch.Tensor) -> torch.Tensor:
    """[B, 1, H, W]: 1 on image b's top-left regions[b] pixels of the masks' canvas, 0 elsewhere."""
    inside = torch.zeros(len(masks), 1, *masks.shape[-2:])
    for b, (rows, cols) in enumerate(regions.tolist()):
        inside[b, :, :rows, :cols] = 1
    return inside


def _out_dim(model) -> int:
    return getattr(model.config, "projection_dim", None) or model.config.hidden_size


@pytest.fixture(scope="module")
def models(tiny_model_dirs, tiny_variant_dirs):
    folders = {**tiny_model_dirs, **tiny_variant_dirs}
    return {name: _load(folders[name], name) for name in MODELS}


@pytest.fixture(scope="module")
def lora_dinov2(tiny_model_dirs):
    model = get_peft_model(
        _load(tiny_model_dirs["dinov2"], "dinov2"), LoraConfig(r=4, target_modules=["q_proj", "k_proj", "v_proj"])
    )
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:  # peft initialises B = 0, i.e. no change at all
                p.copy_(0.5 * torch.randn(p.shape, generator=generator, dtype=p.dtype))
    return model


# ------------------------------------------------------------------ engine == reference
@pytest.mark.parametrize("family", MODELS)
@pytest.mark.parametrize("layer_index", [-1, -2])
@pytest.mark.parametrize("P", [1, 3])
def test_legrad_map_matches_reference(models, family, layer_index, P):
    model = models[family]
    pixels, masks, kw = _inputs(model, B=2, P=P)
    e = torch.randn(2, P, _out_dim(model), generator=torch.Generator().manual_seed(P), dtype=torch.float64)
    ours = legrad_map(model, pixels, e, layer_index, **kw)
    ref = reference_legrad_map(model, pixels, e, layer_index, **kw)
    assert ours.shape == masks.shape
    torch.testing.assert_close(ours, ref, atol=1e-9, rtol=0)
    inside = _region(masks, kw["spatial_shapes"] * model.config.patch_size) if kw else torch.ones(1)
    shown = ours.masked_fill(inside == 0, float("nan"))  # NaFlex: each image's own pixels
    assert shown.nan_to_num(2).amin(dim=(-2, -1)).abs().max() < 1e-12
    assert (shown.nan_to_num(-1).amax(dim=(-2, -1)) - 1).abs().max() < 1e-12
    assert (ours * (1 - inside)).abs().max() == 0  # and 0 outside them


@pytest.mark.parametrize("family", MODELS)
@pytest.mark.parametrize("P, layer_index, beta", [(1, -1, 0.0), (3, -2, 0.2)])
def test_mask_inversion_matches_reference(models, family, P, layer_index, beta):
    model = models[family]
    pixels, masks, kw = _inputs(model, B=2, P=P, seed=1)
    args = dict(alpha=0.03, iterations=10, lr=0.1, layer_index=layer_index, beta=beta)
    ours = mask_inversion(model, pixels, masks, **args, **kw)
    ref = reference_mask_inversion(model, pixels, masks, **args, **kw)
    assert ours.shape == (2, P, _out_dim(model))
    torch.testing.assert_close(ours.norm(dim=-1), torch.ones(2, P, dtype=ours.dtype))
    torch.testing.assert_close(ours, ref, atol=1e-9, rtol=0)
    # the optimisation did move: the result is not simply the global embedding
    g = global_embedding(model, pixels, **kw)[:, None]
    assert (ours * g).sum(-1).max() < 1 - 1e-4


def test_lora_dinov2_matches_reference(lora_dinov2, models):
    pixels, masks, _ = _inputs(lora_dinov2, B=1, P=2, seed=2)
    e = torch.randn(1, 2, 32, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    ours = legrad_map(lora_dinov2, pixels, e, layer_index=-2)
    torch.testing.assert_close(ours, reference_legrad_map(lora_dinov2, pixels, e, -2), atol=1e-9, rtol=0)
    # LoRA really changes the maps (so a hook that missed the adapter would fail above)
    assert (ours - legrad_map(models["dinov2"], pixels, e, layer_index=-2)).abs().max() > 1e-3
    ours = mask_inversion(lora_dinov2, pixels, masks, iterations=10)
    ref = reference_mask_inversion(lora_dinov2, pixels, masks, iterations=10)
    torch.testing.assert_close(ours, ref, atol=1e-9, rtol=0)


def test_lora_injected_without_peft_wrapper(tiny_model_dirs):
    model = inject_adapter_in_model(
        LoraConfig(r=4, target_modules=["q_proj", "k_proj", "v_proj"]), _load(tiny_model_dirs["dinov2"], "dinov2")
    )
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(2))
    pixels, _, _ = _inputs(model, B=1, P=1)
    e = torch.randn(1, 1, 32, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    ours = legrad_map(model, pixels, e)
    torch.testing.assert_close(ours, reference_legrad_map(model, pixels, e), atol=1e-9, rtol=0)
    plain = _load(tiny_model_dirs["dinov2"], "dinov2")
    assert (ours - legrad_map(plain, pixels, e)).abs().max() > 1e-3


@pytest.mark.parametrize("family", MODELS)
def test_blockwise_engine_matches_dense_engine(models, family):
    """impl="blockwise" (the CPU default: row blocks, patch-grid Dice) == impl="dense" (full-resolution)."""
    model = models[family]
    pixels, masks, kw = _inputs(model, B=2, P=3, seed=7)
    if kw:  # NaFlex: a larger canvas
        masks = F.pad(masks, (0, 9, 0, 5))
    else:  # masks at another resolution
        masks = F.interpolate(masks, size=(37, 45))
    args = dict(iterations=10, layer_index=-2, beta=0.1, return_history=True, **kw)
    dense, dense_history = mask_inversion(model, pixels, masks, impl="dense", **args)
    ours, history = mask_inversion(model, pixels, masks, impl="blockwise", **args)
    torch.testing.assert_close(ours, dense, atol=1e-12, rtol=0)
    for key in ("loss", "dice"):
        torch.testing.assert_close(history[key], dense_history[key], atol=1e-6, rtol=0)  # float32 copies


@pytest.mark.parametrize("family", FAMILIES)
def test_bf16_autocast_leaves_mask_inversion_in_fp32(tiny_model_dirs, family):
    """precision=bf16 wraps MI in autocast; MI amplifies rounding of its forward pass (before this was
    fixed, 100 iterations on the tiny SigLIP gave cosine 0.843 to fp32), so the forward runs in fp32."""
    model = _load(tiny_model_dirs[family], family, double=False)
    pixels, masks, kw = _inputs(model, B=2, P=2, seed=1)
    fp32 = mask_inversion(model, pixels, masks, iterations=20, **kw)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = mask_inversion(model, pixels, masks, iterations=20, **kw)
    assert bf16.dtype == torch.float32
    torch.testing.assert_close(bf16, fp32, atol=1e-6, rtol=0)


def test_cuda_only_options_are_refused_on_cpu(models):
    model = models["dinov2"]
    pixels, masks, _ = _inputs(model, B=1, P=1)
    with pytest.raises(ValueError, match="cuda_graph=True needs CUDA"):
        mask_inversion(model, pixels, masks, iterations=1, cuda_graph=True)
    with pytest.raises(ValueError, match="tf32"):
        mask_inversion(model, pixels, masks, iterations=1, precision="tf32")
    with pytest.raises(ValueError, match="impl must be"):
        mask_inversion(model, pixels, masks, iterations=1, impl="flash")


# ------------------------------------------------------------------ behaviour
def test_masks_are_independent_and_batched(models):
    """beta = 0: a mask's embedding does not depend on the other masks or images in the batch."""
    model = models["siglip"]
    pixels, masks, _ = _inputs(model, B=2, P=3, seed=4)
    together = mask_inversion(model, pixels, masks, iterations=5)
    alone = mask_inversion(model, pixels[1:], masks[1:, 2:], iterations=5)
    torch.testing.assert_close(together[1:, 2:], alone, atol=1e-10, rtol=0)


def test_dice_falls_and_map_fits_mask_better(tiny_model_dirs):
    model = _load(tiny_model_dirs["dinov2"], "dinov2", double=False)
    pixels = torch.randn(1, 3, 56, 56, generator=torch.Generator().manual_seed(5))
    mask = torch.zeros(1, 1, 56, 56)
    mask[..., :28, :28] = 1  # top-left 2 x 2 patches
    e, history = mask_inversion(model, pixels, mask, iterations=40, return_history=True)
    assert history["dice"].shape == history["loss"].shape == (40, 1, 1)
    assert history["dice"][-5:].mean() < history["dice"][:5].mean() - 0.05
    before = dice_loss(legrad_map(model, pixels, global_embedding(model, pixels)[:, None]), mask)
    after = dice_loss(legrad_map(model, pixels, e), mask)
    assert after.item() < before.item() - 0.05


def test_mask_dtypes_give_the_same_result(models):
    model = models["clip"]
    pixels, masks, _ = _inputs(model, B=1, P=2, seed=6)
    as_float = mask_inversion(model, pixels, masks, iterations=3)
    torch.testing.assert_close(mask_inversion(model, pixels, masks.bool(), iterations=3), as_float)
    torch.testing.assert_close(mask_inversion(model, pixels, masks.to(torch.uint8), iterations=3), as_float)


def test_mask_resolution_differs_from_image(models):
    model = models["dinov2"]
    pixels, _, _ = _inputs(model, B=1, P=1)
    masks = torch.zeros(1, 1, 30, 40)
    masks[..., 5:20, 10:30] = 1
    e = mask_inversion(model, pixels, masks, iterations=3)
    # the maps are compared with the masks at the masks' 30 x 40: the plain reference resizes each map
    # there (bilinear); a wrong resize in the engine would give other vectors
    ref = reference_mask_inversion(model, pixels, masks, iterations=3)
    torch.testing.assert_close(e, ref, atol=1e-9, rtol=0)
    at_image_size = torch.nn.functional.interpolate(masks, size=pixels.shape[-2:], mode="nearest")
    assert (e - mask_inversion(model, pixels, at_image_size, iterations=3)).abs().max() > 1e-6


def test_bad_masks_are_refused(models):
    model = models["dinov2"]
    pixels, masks, _ = _inputs(model, B=2, P=1)
    with pytest.raises(ValueError, match=r"\{0, 1\}"):
        mask_inversion(model, pixels, masks * 255, iterations=1)
    with pytest.raises(ValueError, match=r"\{0, 1\}"):
        mask_inversion(model, pixels, masks * 0.5, iterations=1)
    with pytest.raises(ValueError, match="masks hold 1 images but pixel_values hold 2"):
        mask_inversion(model, pixels, masks[:1], iterations=1)
    with pytest.raises(ValueError, match=r"\[B, P, H, W\]"):
        mask_inversion(model, pixels, masks[:, 0], iterations=1)
    with pytest.raises(ValueError, match="layer_index"):
        mask_inversion(model, pixels, masks, iterations=1, layer_index=-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_empty_full_and_sub_patch_masks_are_finite(models, family):
    model = models[family]
    pixels, masks, kw = _inputs(model, B=1, P=3)
    masks = torch.zeros_like(masks)
    masks[0, 1] = _region(masks, kw["spatial_shapes"] * model.config.patch_size)[0, 0] if kw else 1  # full
    masks[0, 2, 3:6, 4:7] = 1  # 3 x 3 pixels, well inside one patch
    e, history = mask_inversion(model, pixels, masks, iterations=8, return_history=True, **kw)
    assert torch.isfinite(e).all() and torch.isfinite(history["loss"]).all()
    torch.testing.assert_close(e.norm(dim=-1), torch.ones(1, 3, dtype=e.dtype))
    # empty mask: Dice = 1 - 1e-6 / (sum(E) + 1e-6), i.e. ~1 whatever the map
    assert (history["dice"][:, 0, 0] > 1 - 1e-6).all()
    # full mask: Dice < 1 and finite; the sub-patch mask is optimised like any other
    assert (history["dice"][:, 0, 1] < 1).all()


def test_naflex_padding_changes_nothing(models):
    """SigLIP2: two images of different aspect ratios in one padded batch give each image's relevance,
    map and MI vectors without any padding (alone, N = h*w tokens), whatever the padding holds.

    Padded and alone agree to float32 rounding only: SigLIP2's eager attention takes its softmax in
    float32, whose sums round differently over 16 and 15 keys (relative ~2e-7 in float64 models)."""
    model = models["siglip2"]
    p = model.config.patch_size
    pixels, masks, kw = _inputs(model, B=2, P=2, seed=3)
    e = F.normalize(
        torch.randn(2, 2, _out_dim(model), generator=torch.Generator().manual_seed(4), dtype=torch.float64), dim=-1
    )
    batch_maps = legrad_map(model, pixels, e, -2, **kw)
    batch_mi = mask_inversion(model, pixels, masks, iterations=5, layer_index=-2, **kw)
    garbage = pixels.clone()
    garbage[vit_parts(model).model_inputs(pixels, **kw)["pixel_attention_mask"] == 0] = 1e3
    torch.testing.assert_close(
        mask_inversion(model, garbage, masks, iterations=5, layer_index=-2, **kw), batch_mi, atol=1e-12, rtol=0
    )
    for b, (h, w) in enumerate(kw["spatial_shapes"].tolist()):
        alone = dict(pixel_values=pixels[b : b + 1, : h * w], spatial_shapes=kw["spatial_shapes"][b : b + 1])
        legrad_batch = LeGrad(vit_parts(model), pixels, -2, **kw)
        legrad_alone = LeGrad(vit_parts(model), alone["pixel_values"], -2, spatial_shapes=alone["spatial_shapes"])
        torch.testing.assert_close(
            legrad_batch.relevance(e)[b : b + 1, :, : h * w], legrad_alone.relevance(e[b : b + 1]), atol=0, rtol=1e-6
        )
        torch.testing.assert_close(
            batch_maps[b : b + 1, :, : h * p, : w * p],
            legrad_map(model, **alone, embeddings=e[b : b + 1], layer_index=-2),
            atol=1e-6,
            rtol=0,
        )
        torch.testing.assert_close(
            batch_mi[b : b + 1],
            mask_inversion(model, masks=masks[b : b + 1, :, : h * p, : w * p], iterations=5, layer_index=-2, **alone),
            atol=1e-6,
            rtol=0,
        )


def test_naflex_masks_must_sit_in_their_image(models):
    model = models["siglip2"]
    pixels, masks, kw = _inputs(model, B=2, P=1)
    outside = masks.clone()
    outside[1, 0, -1, -1] = 1  # image 1 is 4 x 2 patches: 64 x 32 pixels of an 64 x 80 canvas
    with pytest.raises(ValueError, match="image 1's masks are non-zero outside its 64 x 32 region"):
        mask_inversion(model, pixels, outside, iterations=1, **kw)
    with pytest.raises(ValueError, match="cannot hold image 0's 48 x 80"):
        mask_inversion(model, pixels, masks[..., :40], iterations=1, **kw)
    with pytest.raises(ValueError, match="needs spatial_shapes"):
        mask_inversion(model, pixels, masks, iterations=1)


def test_zero_iterations_return_the_global_embedding(models):
    model = models["siglip"]
    pixels, masks, _ = _inputs(model, B=2, P=2)
    e = mask_inversion(model, pixels, masks, iterations=0)
    torch.testing.assert_close(e, global_embedding(model, pixels)[:, None].expand(2, 2, -1))


def test_model_is_left_untouched(tiny_model_dirs):
    model = _load(tiny_model_dirs["clip"], "clip", double=False)
    model.vision_model.encoder.layers[0].requires_grad_(False)  # a mix of frozen and trainable
    model.vision_model.encoder.layers[1].train()  # and of train / eval flags
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    modes = {n: m.training for n, m in model.named_modules()}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    pixels, masks, _ = _inputs(model, B=1, P=2)
    mask_inversion(model, pixels, masks, iterations=3)
    legrad_map(model, pixels, torch.randn(1, 2, _out_dim(model)))
    assert all(p.grad is None for p in model.parameters())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert {n: m.training for n, m in model.named_modules()} == modes
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_unknown_family_is_refused():
    vit = ViTModel(
        ViTConfig(
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=64,
            image_size=32,
            patch_size=16,
        )
    )
    with pytest.raises(ValueError, match="model_type='vit'"):
        mask_inversion(vit, torch.randn(1, 3, 32, 32), torch.ones(1, 1, 32, 32), iterations=1)


def test_dice_loss_values():
    m = torch.zeros(1, 4, 4)
    m[0, :2] = 1
    assert dice_loss(m, m).abs().item() < 1e-6
    assert dice_loss(1 - m, m).item() == pytest.approx(1, abs=1e-6)
    assert dice_loss(torch.zeros(1, 4, 4), torch.zeros(1, 4, 4)).item() == pytest.approx(0, abs=1e-9)
    E = torch.full((4, 4), 0.5)
    expected = 1 - (2 * 4 + 1e-6) / (8 + 8 + 1e-6)
    assert dice_loss(E, m[0]).item() == pytest.approx(expected)


def test_embeddings_are_normalised_inside_legrad_map(models):
    model = models["dinov2"]
    pixels, _, _ = _inputs(model, B=1, P=1)
    e = torch.randn(1, 1, 32, dtype=torch.float64)
    torch.testing.assert_close(legrad_map(model, pixels, 7 * e), legrad_map(model, pixels, e))
    torch.testing.assert_close(legrad_map(model, pixels, F.normalize(e, dim=-1)), legrad_map(model, pixels, e))


# ------------------------------------------------------------------ compat=original variants
@pytest.mark.parametrize("family", FAMILIES)
def test_joint_normalisation_matches_the_originals_rule(models, family, impl="blockwise"):
    """legrad_norm=joint: the original normalised all masks of an image with one min and max.

    MI is checked with the default CPU evaluation (blockwise). With joint normalisation the minimum
    of an image's maps is often 0, reached on several patches whose relevance is exactly 0; the
    dense evaluation (kept for benchmarks) may then follow another valid subgradient at that kink,
    depending on float summation order (thread count), so it is compared on the maps only.
    """
    model = models[family]
    pixels, masks, kw = _inputs(model, B=2, P=3, seed=4)
    e = torch.randn(2, 3, _out_dim(model), generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    joint = reference_legrad_map(model, pixels, e, joint=True, **kw)
    per_map = reference_legrad_map(model, pixels, e, **kw)
    assert (joint - per_map).abs().max() > 1e-3  # the rule matters on these inputs
    torch.testing.assert_close(legrad_map(model, pixels, e, joint=True, **kw), joint, atol=1e-9, rtol=0)
    assert joint.amax(dim=(1, 2, 3)).sub(1).abs().max() < 1e-12  # one map per image reaches 1
    args = dict(iterations=8, layer_index=-1, **kw)
    ours = mask_inversion(model, pixels, masks, impl=impl, joint_norm=True, **args)
    ref = reference_mask_inversion(model, pixels, masks, joint=True, **args)
    torch.testing.assert_close(ours, ref, atol=1e-9, rtol=0)
    assert (ours * mask_inversion(model, pixels, masks, impl=impl, **args)).sum(-1).min() < 1 - 1e-6


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("impl", ["dense", "blockwise"])
def test_shared_vector_fits_the_mean_of_the_masks_dice_terms(models, family, impl):
    """mi_sum_loss=mean_dice: one vector per image fitted to the mean of its masks' Dice terms."""
    model = models[family]
    pixels, masks, kw = _inputs(model, B=2, P=3, seed=6)
    args = dict(iterations=8, layer_index=-1, alpha=0.03, **kw)
    ours = mask_inversion(model, pixels, masks, impl=impl, shared=True, **args)
    ref = reference_mask_inversion(model, pixels, masks, shared=True, **args)
    assert ours.shape == (2, 1, _out_dim(model))
    torch.testing.assert_close(ours, ref, atol=1e-9, rtol=0)
    union = mask_inversion(model, pixels, masks.amax(dim=1, keepdim=True), impl=impl, **args)
    assert (ours * union).sum(-1).min() < 1 - 1e-6  # not the union's vector


@pytest.mark.parametrize("impl", ["dense", "blockwise"])
def test_the_original_normalisation_of_a_batch_of_crops(models, impl):
    """compat=original (issue 21): one min-max over every map of the batch (the original's smart crops
    of one image shared it, D2) with 1e-6 added to the range (its CLIP, D3) == the autograd reference;
    and maps upsampled by 16 on a patch-14 model (its SigLIP's hard-coded patch, D7): dense == blockwise."""
    model = models["clip"]
    pixels, masks, _ = _inputs(model, B=3, P=1, seed=4)
    args = dict(iterations=8, layer_index=-1, alpha=0.03)
    ours = mask_inversion(model, pixels, masks, impl=impl, joint_norm="batch", norm_eps=1e-6, **args)
    ref = reference_mask_inversion(model, pixels, masks, joint="batch", eps=1e-6, **args)
    torch.testing.assert_close(ours, ref, atol=1e-9, rtol=0)
    alone = mask_inversion(model, pixels, masks, impl=impl, joint_norm=True, **args)  # each crop alone
    assert (ours * alone).sum(-1).min() < 1 - 1e-6
    patch14 = models["dinov2"]
    pixels, masks, _ = _inputs(patch14, B=2, P=2, seed=5)
    by16 = mask_inversion(patch14, pixels, masks, impl=impl, map_patch_size=16, **args)
    dense = mask_inversion(patch14, pixels, masks, impl="dense", map_patch_size=16, **args)
    torch.testing.assert_close(by16, dense, atol=1e-12, rtol=0)
    assert (by16 * mask_inversion(patch14, pixels, masks, impl=impl, **args)).sum(-1).min() < 1 - 1e-6


# ------------------------------------------------------------------ MaO Stage B (descriptor=mao)
@pytest.mark.parametrize("family", MODELS)
@pytest.mark.parametrize("overlap", ["iou", "dice"])
def test_mao_stage_b_matches_reference(models, family, overlap):
    """One vector per image shared by its crops (groups), the paper's objective, equals the plain
    autograd reference to 1e-9 (float64), for every family; blockwise and dense evaluations alike."""
    model = models[family]
    pixels, masks, kw = _inputs(model, B=5, P=1, seed=7)
    groups = torch.tensor([0, 1, 0, 2, 1])  # image 0: crops 0, 2; image 1: 1, 4; image 2: 3
    args = dict(alpha=0.03, iterations=8, lr=0.1, layer_index=-1, overlap=overlap, **kw)
    ref = reference_mao(model, pixels, masks, groups, **args)
    for impl in ("blockwise", "dense"):
        ours = mask_inversion(model, pixels, masks, groups=groups, impl=impl, **args)
        assert ours.shape == (3, 1, _out_dim(model))
        torch.testing.assert_close(ours, ref, atol=1e-9, rtol=0)
    # it moved away from its start, the renormalised mean of the crops' embeddings
    g = global_embedding(model, pixels, **kw)
    start = F.normalize(torch.stack([g[groups == c].mean(0) for c in range(3)]), dim=-1)[:, None]
    assert (ours * start).sum(-1).max() < 1 - 1e-4
    # zero iterations: exactly that start (the Stage-A scene vector)
    zero = mask_inversion(model, pixels, masks, groups=groups, iterations=0, **kw)
    torch.testing.assert_close(zero, start, atol=1e-12, rtol=0)


def test_mao_groups_are_independent(models):
    """An image's vector does not depend on the other images of the batch (sum of losses, Adam per element)."""
    model = models["dinov2"]
    pixels, masks, _ = _inputs(model, B=4, P=1, seed=8)
    args = dict(iterations=6, overlap="iou")
    together = mask_inversion(model, pixels, masks, groups=torch.tensor([0, 0, 1, 1]), **args)
    alone = mask_inversion(model, pixels[2:], masks[2:], groups=torch.tensor([0, 0]), **args)
    torch.testing.assert_close(together[1:], alone, atol=1e-12, rtol=0)


def test_mao_bad_groups_are_refused(models):
    model = models["dinov2"]
    pixels, masks, _ = _inputs(model, B=3, P=1)
    with pytest.raises(ValueError, match="0 .. G-1"):
        mask_inversion(model, pixels, masks, groups=torch.tensor([0, 2, 2]), iterations=1)
    pixels, masks, _ = _inputs(model, B=3, P=2)
    with pytest.raises(ValueError, match="one mask per crop"):
        mask_inversion(model, pixels, masks, groups=torch.tensor([0, 0, 1]), iterations=1)
    with pytest.raises(ValueError, match="overlap"):
        mask_inversion(model, pixels, masks, overlap="jaccard", iterations=1)


def test_iou_loss_values():
    E = torch.tensor([[1.0, 0.5], [0.0, 0.0]], dtype=torch.float64)
    m = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    # inter 1, union 1.5 + 2 - 1 = 2.5
    assert abs(float(iou_loss(E, m)) - (1 - (1 + 1e-6) / (2.5 + 1e-6))) < 1e-12


# ------------------------------------------------------------------ the original's alpha_sum_full
@pytest.mark.parametrize("family", MODELS)
def test_start_and_pull_towards_given_vectors_match_reference(models, family):
    """init / anchors / return_raw (the original DINOv2 code's alpha_sum_full: per-mask MI, then the union's
    vector started at the sum of their raw parameters and pulled towards them) equal the reference."""
    model = models[family]
    pixels, masks, kw = _inputs(model, B=2, P=3, seed=9)
    args = dict(alpha=0.03, iterations=6, lr=0.1, **kw)
    raw = mask_inversion(model, pixels, masks, return_raw=True, **args)
    ref_raw = reference_mask_inversion(model, pixels, masks, return_raw=True, **args)
    torch.testing.assert_close(raw, ref_raw, atol=1e-9, rtol=1e-9)
    assert (raw.norm(dim=-1) - 1).abs().min() > 1e-3  # raw: not normalised
    union = masks.amax(dim=1, keepdim=True)
    pull = dict(init=raw.sum(1, keepdim=True), anchors=raw, anchor_weight=0.7)
    ours = mask_inversion(model, pixels, union, **pull, **args)
    ref = reference_mask_inversion(model, pixels, union, **pull, **args)
    torch.testing.assert_close(ours, ref, atol=1e-9, rtol=0)
    plain = mask_inversion(model, pixels, union, **args)
    assert (ours * plain).sum(-1).max() < 1 - 1e-6  # the start and the pull change the vector
    torch.testing.assert_close(
        mask_inversion(model, pixels, union, iterations=0, init=pull["init"], **kw),
        F.normalize(pull["init"], dim=-1),
        atol=1e-12,
        rtol=0,
    )
