"""Pooled global descriptors over a backbone's patch tokens: the baselines of the paper's tables.

Every family is read through its adapter (extractors/mi/vit_adapters.py): the last block's output tokens X
[B, T, D] go through the same per-token head as the LeGrad feature, ``z_t = pooled_head(token_norm(X_t))``
(DINO families: the final LayerNorm; SigLIPs: post_layernorm; CLIP: post_layernorm then the visual
projection), and for the SigLIPs then through their attention-pooling head applied to each token ALONE
(:func:`token_head`: with one key the attention weight is 1, so it is out_proj(v_proj(z)) and the head's
residual MLP), so every pooled vector lives in the space of the model's own global embedding (and of its
text tower) rather than in the post-LayerNorm token space. Only the
patch tokens are pooled (CLS / register tokens and NaFlex padding are dropped). Pools (``pool=``):

    model  the model's own global embedding (DINO: normed CLS; SigLIP: attention-pooling head; CLIP:
           image_embeds). The default: SoIR's global features as they always were.
    cls    z of the CLS token (DINO families, CLIP; equal to ``model`` there); SigLIPs have none.
    mean   the mean of the patch tokens' z.
    gem    generalised mean, (mean_t max(z_t, eps)^p)^(1/p) per channel, p = ``gem_p`` (Radenovic et al.,
           cirtorch ``gem``: activations clamped at eps = 1e-6, so negative channels contribute eps).
    rmac   regional maximum activations (Tolias et al., cirtorch ``rmac`` with ``L = rmac_levels``): the
           max over the whole grid plus the max over each square region of levels 1..L, each
           L2-normalised, summed (no PCA-whitening of the regions).

All outputs are L2-normalised [B, D_out].
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from extractors.mi.vit_adapters import VitParts, vit_parts
from utils.config import DescriptorSettings

POOLS = ("model", "cls", "mean", "gem", "rmac")
EPS = 1e-6  # cirtorch's eps of gem / rmac


def token_descriptors(
    model: nn.Module, pixel_values: torch.Tensor, spatial_shapes: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, VitParts, object]:
    """One forward pass -> (z [B, T, D_out] every token's descriptor, grids [B, 2] patch rows and
    columns, the model's parts, the model's output). The patch tokens of image b are
    ``z[b, parts.num_prefix_tokens : parts.num_prefix_tokens + h_b * w_b]`` in row-major order."""
    parts = vit_parts(model)
    inputs = parts.model_inputs(pixel_values, spatial_shapes)
    with torch.no_grad():
        output = parts.model(**inputs, output_hidden_states=True)
        tokens = output.hidden_states[-1]  # the last block's output, before any final norm
        if parts.token_norm is not None:
            tokens = parts.token_norm(tokens)
        z = token_head(parts.model, parts.pooled_head(tokens))
    return z, parts.patch_grids(pixel_values, spatial_shapes), parts, output


def token_head(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """SigLIP / SigLIP2: their attention-pooling head (``model.head``: probe attention, then LayerNorm and a
    residual MLP) applied to every token [B, T, D] as if it were the only one -> [B, T, D]: with a single
    key the softmax is 1 and the attention output is ``out_proj(v_proj(z))``. ``model.head(z[:, t:t+1])``
    gives the same vector (tested). Models without such a head: ``tokens`` unchanged."""
    head = getattr(model, "head", None)
    attention = getattr(head, "attention", None)
    if not isinstance(attention, nn.MultiheadAttention):
        return tokens
    dim = tokens.shape[-1]
    value = F.linear(tokens, attention.in_proj_weight[2 * dim :], attention.in_proj_bias[2 * dim :])
    hidden = attention.out_proj(value)
    return hidden + head.mlp(head.layernorm(hidden))


def patch_grid(z: torch.Tensor, grid: torch.Tensor, num_prefix_tokens: int) -> torch.Tensor:
    """One image's patch descriptors z [T, D] -> [D, h, w] (the patch grid, channels first)."""
    h, w = (int(v) for v in grid)
    return z[num_prefix_tokens : num_prefix_tokens + h * w].T.reshape(-1, h, w)


def gem(x: torch.Tensor, p: float = DescriptorSettings.gem_p, eps: float = EPS) -> torch.Tensor:
    """cirtorch's GeM over the spatial grid: x [D, h, w] -> [D] (not normalised)."""
    return x.clamp(min=eps).pow(p).mean(dim=(-2, -1)).pow(1.0 / p)


def rmac_regions(height: int, width: int, levels: int = DescriptorSettings.rmac_levels) -> list[tuple[int, int, int]]:
    """cirtorch's R-MAC regions of an ``height`` x ``width`` grid: (top, left, side) squares of levels
    1..L, the long side holding ``Wd`` / ``Hd`` more regions so that neighbours overlap by about 40 %."""
    steps = torch.tensor([2.0, 3, 4, 5, 6, 7])  # candidate region counts along the long side
    w = min(width, height)
    b = (max(height, width) - w) / (steps - 1)
    idx = int(torch.argmin(torch.abs(((w**2 - w * b) / w**2) - 0.4)))  # 0.4: the overlap aimed for
    extra_w = idx + 1 if height < width else 0
    extra_h = idx + 1 if height > width else 0
    regions = []
    for level in range(1, levels + 1):
        side = math.floor(2 * w / (level + 1))
        if side == 0:
            continue
        half = math.floor(side / 2 - 1)
        step_w = 0 if level + extra_w == 1 else (width - side) / (level + extra_w - 1)
        step_h = 0 if level + extra_h == 1 else (height - side) / (level + extra_h - 1)
        lefts = [math.floor(half + i * step_w) - half for i in range(level + extra_w)]
        tops = [math.floor(half + i * step_h) - half for i in range(level + extra_h)]
        regions += [(top, left, side) for top in tops for left in lefts]
    return regions


def rmac(x: torch.Tensor, levels: int = DescriptorSettings.rmac_levels, eps: float = EPS) -> torch.Tensor:
    """cirtorch's R-MAC: x [D, h, w] -> [D] (not normalised): the L2-normalised max over the grid plus
    the L2-normalised max over every region of :func:`rmac_regions`."""

    def normalised_max(region: torch.Tensor) -> torch.Tensor:
        v = region.amax(dim=(-2, -1))
        return v / (v.norm() + eps)

    out = normalised_max(x)
    for top, left, side in rmac_regions(x.shape[-2], x.shape[-1], levels):
        out = out + normalised_max(x[:, top : top + side, left : left + side])
    return out


def pooled_embedding(
    model: nn.Module,
    pixel_values: torch.Tensor,
    spatial_shapes: torch.Tensor | None = None,
    pool: str = DescriptorSettings.pool.value,
    gem_p: float = DescriptorSettings.gem_p,
    rmac_levels: int = DescriptorSettings.rmac_levels,
) -> torch.Tensor:
    """The global descriptor of ``pool`` (module doc), [B, D_out] unit norm, from one forward pass."""
    if pool not in POOLS:
        raise ValueError(f"pool={pool!r}; one of {POOLS}")
    z, grids, parts, output = token_descriptors(model, pixel_values, spatial_shapes)
    if pool == "model":
        return F.normalize(parts.global_embedding(output), dim=-1)
    if pool == "cls":
        if parts.num_prefix_tokens == 0:
            raise ValueError(f"pool=cls: {parts.family} has no CLS token (use pool=model, mean, gem or rmac)")
        return F.normalize(z[:, 0], dim=-1)
    out = []
    for zb, grid in zip(z, grids):
        x = patch_grid(zb, grid, parts.num_prefix_tokens)
        out.append(x.mean(dim=(-2, -1)) if pool == "mean" else gem(x, gem_p) if pool == "gem" else rmac(x, rmac_levels))
    return F.normalize(torch.stack(out), dim=-1)


def mask_pooled(
    model: nn.Module, pixel_values: torch.Tensor, masks: torch.Tensor, spatial_shapes: torch.Tensor | None = None
) -> torch.Tensor:
    """``object_desc=mask_pool``: one vector per mask from ONE forward pass per batch, [B, P, D_out] unit norm.

    A mask's vector is the mean of the patch tokens' z (module doc), each weighted by the share of its
    patch's pixels the mask covers: ``sum_t a_pt z_t / sum_t a_pt`` with a_pt = the mean of mask p over
    patch t's p x p pixels. masks: [B, P, H, W] in {0, 1} at the model's input size (NaFlex: each image's
    masks top-left on the canvas, as :func:`extractors.mi.engine.mask_inversion` takes them). A mask
    covering no patch (a padding mask) gives the zero vector.
    """
    z, grids, parts, _ = token_descriptors(model, pixel_values, spatial_shapes)
    share = F.avg_pool2d(masks.to(z), parts.patch_size)  # [B, P, H / p, W / p]: area share per patch
    out = []
    for zb, shares, (h, w) in zip(z, share, grids.tolist()):
        a = shares[:, :h, :w].flatten(1)  # [P, h w], row-major like the tokens
        tokens = zb[parts.num_prefix_tokens : parts.num_prefix_tokens + h * w]
        out.append(a @ tokens / a.sum(1, keepdim=True).clamp_min(torch.finfo(a.dtype).tiny))
    return F.normalize(torch.stack(out), dim=-1)
