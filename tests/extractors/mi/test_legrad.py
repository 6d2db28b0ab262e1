"""extractors/mi/legrad.py: the blockwise evaluation and the patch-grid Dice against the dense, full-resolution one.

impl="dense" is the engine that tests/extractors/mi/test_mask_inversion.py checks against the plain autograd
reference (extractors/mi/reference.py); here the other implementations must give the same values and
gradients in float64, to 1e-12.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import extractors.mi.legrad as legrad_module
from extractors.mi.engine import dice_loss
from extractors.mi.legrad import (
    LeGrad,
    MapDice,
    _BlockRelevance,
    _interpolation_matrix,
    _PositiveColumnMean,
    _run_ends,
    resolve_impl,
)
from extractors.mi.vit_adapters import vit_parts
from tests.extractors.mi.test_mask_inversion import FAMILIES, MODELS, _inputs, _load, _out_dim, _region


@pytest.fixture(scope="module")
def models(tiny_model_dirs, tiny_variant_dirs):
    folders = {**tiny_model_dirs, **tiny_variant_dirs}
    return {name: _load(folders[name], name) for name in MODELS}


def _embeddings(model, B: int, P: int, seed: int = 0) -> torch.Tensor:
    e = torch.randn(B, P, _out_dim(model), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return F.normalize(e, dim=-1).requires_grad_(True)


def _value_and_grad(fn, e: torch.Tensor):
    """fn(e) and the gradient of a fixed random linear functional of it (exercises every output)."""
    value = fn(e)
    weights = torch.randn(value.shape, generator=torch.Generator().manual_seed(9), dtype=value.dtype)
    (grad,) = torch.autograd.grad((value * weights).sum(), e)
    return value.detach(), grad


@pytest.mark.parametrize("family", MODELS)
@pytest.mark.parametrize("layer_index", [-1, -2])
def test_blockwise_relevance_matches_dense(models, family, layer_index):
    model = models[family]
    pixels, _, kw = _inputs(model, B=2, P=3)
    e = _embeddings(model, 2, 3)
    dense = LeGrad(vit_parts(model), pixels, layer_index, impl="dense", **kw)
    blockwise = LeGrad(vit_parts(model), pixels, layer_index, impl="blockwise", **kw)
    assert (dense.impl, blockwise.impl) == ("dense", "blockwise")
    ref, ref_grad = _value_and_grad(dense.relevance, e)
    ours, grad = _value_and_grad(blockwise.relevance, e)
    torch.testing.assert_close(ours, ref, atol=1e-12, rtol=0)
    torch.testing.assert_close(grad, ref_grad, atol=1e-12, rtol=0)
    assert ref_grad.abs().max() > 1e-3


@pytest.mark.parametrize("masks_per_chunk", [1, 2])
def test_mask_chunks_give_the_same_relevance(models, monkeypatch, masks_per_chunk):
    """The CPU processes masks in chunks (CHUNK_ELEMENTS); any chunking gives the same result."""
    model = models["siglip"]
    pixels, _, _ = _inputs(model, B=2, P=3)
    legrad = LeGrad(vit_parts(model), pixels, -2, impl="blockwise")
    e = _embeddings(model, 2, 3)
    whole, whole_grad = _value_and_grad(legrad.relevance, e)  # tiny model: one chunk per image
    k = legrad.blocks[0]
    monkeypatch.setattr(legrad_module, "CHUNK_ELEMENTS", masks_per_chunk * k.V.shape[2] * k.M.shape[0])
    chunked, chunked_grad = _value_and_grad(legrad.relevance, e)
    torch.testing.assert_close(chunked, whole, atol=1e-13, rtol=0)
    torch.testing.assert_close(chunked_grad, whole_grad, atol=1e-13, rtol=0)


@pytest.mark.parametrize("family", MODELS)
def test_block_relevance_backward_passes_gradcheck(models, family):
    """The written-out backward of u(w) against finite differences (independent of the dense path)."""
    model = models[family]
    pixels, _, kw = _inputs(model, B=1, P=2)
    legrad = LeGrad(vit_parts(model), pixels, impl="blockwise", **kw)
    k = legrad.blocks[0]
    w = (_embeddings(model, 1, 2) @ k.J).detach().requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda w: _BlockRelevance.apply(w, k, "blockwise", "fp32"), (w,), eps=1e-7, atol=1e-6
    )


def test_positive_column_mean_passes_gradcheck():
    """The dense path's hand-written backward (sign of G folded into V) against finite differences,
    on u with entries well away from G's kink at 0 (where the derivative jumps)."""
    generator = torch.Generator().manual_seed(0)
    u = torch.randn(2, 3, 5, 4, generator=generator, dtype=torch.float64, requires_grad=True)
    V = torch.randn(2, 3, 5, 4, generator=generator, dtype=torch.float64)
    G = u.detach() @ V.mT
    assert G.abs().min() > 1e-5 and (G > 0).any() and (G < 0).any()
    assert torch.autograd.gradcheck(lambda u: _PositiveColumnMean.apply(u, V), (u,), eps=1e-7, atol=1e-8)
    torch.testing.assert_close(_PositiveColumnMean.apply(u, V), (u @ V.mT).clamp_min(0).mean(dim=(-3, -2)))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mask_size", [None, (30, 40), (71, 90)])  # image size, smaller, larger
def test_map_dice_matches_full_resolution_dice(models, family, mask_size):
    model = models[family]
    pixels, masks, kw = _inputs(model, B=2, P=3, seed=2)
    if kw and mask_size is not None and mask_size < masks.shape[-2:]:
        pytest.skip("NaFlex maps are never resized: each image's masks live at its own resolution")
    if mask_size is not None:
        masks = (torch.rand(2, 3, *mask_size, generator=torch.Generator().manual_seed(3)) > 0.6).double()
    regions = kw["spatial_shapes"] * model.config.patch_size if kw else torch.tensor([masks.shape[-2:]] * 2)
    inside = _region(masks, regions)
    masks = masks * inside  # NaFlex: 0 outside each image
    masks[0, 0] = 0  # an empty mask
    masks[1, 2] = inside[1, 0]  # a full mask
    legrad = LeGrad(vit_parts(model), pixels, -2, impl="blockwise", **kw)
    e = _embeddings(model, 2, 3, seed=4)
    ref, ref_grad = _value_and_grad(lambda e: dice_loss(legrad.maps(e, size=masks.shape[-2:]), masks.double()), e)
    map_dice = MapDice(legrad, masks)
    ours, grad = _value_and_grad(lambda e: map_dice(legrad.patch_relevance(e)), e)
    torch.testing.assert_close(ours, ref, atol=1e-12, rtol=0)
    torch.testing.assert_close(grad, ref_grad, atol=1e-12, rtol=0)


@pytest.mark.parametrize("grid, patch", [(4, 14), (24, 16), (5, 3), (1, 16)])
def test_upsampled_map_extremes_lie_on_run_ends(grid, patch):
    """MapDice's lo / hi: the rows and columns it keeps hold the extremes of the bilinear upsampling."""
    generator = torch.Generator().manual_seed(grid)
    rel = torch.rand(6, grid, grid, generator=generator, dtype=torch.float64)
    rel[1] = 0  # constant map
    rel[2, : grid // 2] = 0  # ties at the minimum
    rel[3] = rel[3] ** 8  # one dominant patch
    full = F.interpolate(rel[None], scale_factor=patch, mode="bilinear", align_corners=False)[0]
    Up = _interpolation_matrix(grid, dict(scale_factor=patch), dtype=torch.float64, device=rel.device)
    torch.testing.assert_close(Up @ rel @ Up.T, full, atol=1e-14, rtol=0)  # separable, same weights
    rows = _run_ends(Up)
    assert len(rows) <= 2 * grid + 2
    kept = Up[rows] @ rel @ Up[rows].T
    torch.testing.assert_close(kept.amax(dim=(-2, -1)), full.amax(dim=(-2, -1)), atol=1e-15, rtol=0)
    torch.testing.assert_close(kept.amin(dim=(-2, -1)), full.amin(dim=(-2, -1)), atol=1e-15, rtol=0)


def test_unrunnable_settings_are_refused():
    cpu = torch.device("cpu")
    with pytest.raises(ValueError, match="impl must be one of"):
        resolve_impl("flash", "fp32", cpu)
    with pytest.raises(ValueError, match="precision must be one of"):
        resolve_impl("auto", "fp16", cpu)
    with pytest.raises(ValueError, match="tf32.*only on CUDA"):
        resolve_impl("auto", "tf32", cpu)
    with pytest.raises(ValueError, match="bf16.*fused"):
        resolve_impl("blockwise", "bf16", cpu)
    with pytest.raises(ValueError, match="dense.*reference"):
        resolve_impl("dense", "bf16", cpu)
    assert resolve_impl("auto", "fp32", cpu) == "blockwise"  # the fused kernel only on CUDA
