"""Where the pieces LeGrad needs live inside each supported Hugging Face vision transformer.

Mask Inversion needs, per transformer block, the attention's value projection and output projection,
the layer scales (DINO families), the second LayerNorm and the MLP; and per model, the "head" that turns a
block's output tokens X_l [B, T, D] into the LeGrad feature f_l = normalize(head(X_l)):

    DINOv2, DINOv2-reg, DINOv3  f = normalize(final_norm(mean_t X_t))     g = pooler_output (normed CLS)
    SigLIP, SigLIP2             f = normalize(mean_t post_layernorm(X_t))  g = pooler_output (MAP head)
    CLIP                        f = normalize(visual_projection(post_layernorm(mean_t X_t)))   g = image_embeds

All are written as ``f = normalize(pooled_head(mean_t token_norm(X_t)))`` with ``token_norm`` None for
the DINO families and CLIP and ``pooled_head`` the identity for the SigLIPs. The mean runs over every
token the block outputs (CLS and register tokens included), except NaFlex padding (below).

Which tokens the map covers: the map is the relevance of the PATCH tokens only. The prefix tokens in
front of them (CLS for DINOv2 / CLIP; CLS + ``num_register_tokens`` registers for DINOv2-reg and DINOv3;
none for the SigLIPs) are dropped from the map's columns (they still count as query rows).

DINOv3's RoPE rotates q and k only: it changes the attention probabilities A, not the values, so the
attention output is still A V with V the v_proj output, which is all the gradient decomposition uses
(G = dS/dA = u V^T). ``tests/extractors/mi/test_vit_adapters.py`` checks that identity on every family by
hooking A, V and the o_proj input of a real forward pass.

SigLIP2 NaFlex (``naflex=True``): pixel_values are patch sequences [B, N, C p p] with ``spatial_shapes``
[B, 2] (patch rows h_b and columns w_b of each image). Image b's first h_b w_b tokens are its patches in
row-major order and the rest is padding (the layout of ``Siglip2ImageProcessor``), masked out of the
attention's keys by ``pixel_attention_mask``, which :meth:`VitParts.model_inputs` derives from
``spatial_shapes``. Padding tokens are dropped from the map's rows and columns and from the feature's mean.

Gated MLPs (DINOv2 / DINOv2-reg ``use_swiglu_ffn``, DINOv3 ``use_gated_mlp``: ``down(act(gate(x)) * up(x))``)
are supported: :class:`BlockParts` names the gate and the engine folds it (see extractors/mi/legrad.py).

Modules are found by walking the real module tree, so LoRA layers injected by peft (into q/k/v or
anywhere else) are the modules the engine hooks and calls.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from extractors.backbones import vision_model_class
from utils.families import FAMILIES, MODEL_TYPES


@dataclass
class BlockParts:
    """The modules of one pre-norm transformer block that LeGrad's gradient passes through.

    block(x) = r + ls2 * fc2(h),   r = x + ls1 * o_proj(attention(norm1(x))),
    h = act(fc1(norm2(r)))                         (plain MLP, gate None)
    h = act(gate(norm2(r))) * fc1(norm2(r))        (gated MLP: fc1 = up_proj, fc2 = down_proj)
    """

    block: nn.Module
    v_proj: nn.Module  # output [B, T, heads * head_dim]
    o_proj: nn.Module
    layer_scale1: nn.Module | None
    norm2: nn.LayerNorm
    fc1: nn.Module
    activation: nn.Module  # element-wise
    fc2: nn.Module
    layer_scale2: nn.Module | None
    gate: nn.Module | None = None


@dataclass
class VitParts:
    """A supported model, unwrapped from peft, with the pieces Mask Inversion needs."""

    family: str  # a key of utils.families.FAMILIES
    model: nn.Module  # the transformers model (peft wrapper removed; LoRA layers stay inside)
    blocks: list[BlockParts]
    num_heads: int
    patch_size: int
    num_prefix_tokens: int  # CLS + register tokens in front of the patch tokens
    token_norm: nn.LayerNorm | None
    pooled_head: nn.Module  # [N, D] -> [N, D_out] (applied to the token mean)
    global_embedding: Callable[[object], torch.Tensor]  # model output -> raw g [B, D_out]
    naflex: bool = False  # pixel_values are patch sequences with spatial_shapes (SigLIP2 NaFlex)

    def model_inputs(
        self, pixel_values: torch.Tensor, spatial_shapes: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """The model's forward keyword arguments for a batch, after checking the shapes.

        Args:
            pixel_values: [B, 3, H, W] images; NaFlex: [B, N, C p p] patch sequences.
            spatial_shapes: NaFlex only: [B, 2] integer patch rows and columns, 1 <= h w <= N.

        Raises:
            ValueError: shapes that do not fit the family.
        """
        if not self.naflex:
            if spatial_shapes is not None:
                raise ValueError(
                    f"spatial_shapes is for NaFlex models (SigLIP2); a {self.family} model takes "
                    f"pixel_values [B, 3, H, W] only"
                )
            if pixel_values.ndim != 4:
                raise ValueError(f"pixel_values must be [B, 3, H, W], got shape {tuple(pixel_values.shape)}")
            return dict(pixel_values=pixel_values)
        if pixel_values.ndim != 3:
            raise ValueError(
                f"NaFlex pixel_values must be patch sequences [B, N, C*p*p], got shape {tuple(pixel_values.shape)}"
            )
        B, N = pixel_values.shape[:2]
        if spatial_shapes is None:
            raise ValueError("a NaFlex model needs spatial_shapes [B, 2] (patch rows, columns of each image)")
        if (
            spatial_shapes.shape != (B, 2)
            or spatial_shapes.is_floating_point()
            or (spatial_shapes < 1).any()
            or (spatial_shapes.prod(-1) > N).any()
        ):
            shown = spatial_shapes.tolist() if spatial_shapes.numel() < 20 else tuple(spatial_shapes.shape)
            raise ValueError(f"spatial_shapes must be [B={B}, 2] integers h, w >= 1 with h*w <= N={N}, got {shown}")
        spatial_shapes = spatial_shapes.to(pixel_values.device)
        return dict(
            pixel_values=pixel_values,
            spatial_shapes=spatial_shapes,
            pixel_attention_mask=patch_token_mask(spatial_shapes, N),
        )

    def patch_grids(self, pixel_values: torch.Tensor, spatial_shapes: torch.Tensor | None = None) -> torch.Tensor:
        """[B, 2] int64 patch rows and columns of each image (checked as :meth:`model_inputs`), on the CPU."""
        inputs = self.model_inputs(pixel_values, spatial_shapes)
        if self.naflex:
            return inputs["spatial_shapes"].long().cpu()
        p = self.patch_size
        return torch.tensor([[pixel_values.shape[-2] // p, pixel_values.shape[-1] // p]]).expand(len(pixel_values), 2)


def patch_token_mask(spatial_shapes: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """[B, N] bool: True for image b's first h_b * w_b tokens (its patches), False for padding."""
    counts = spatial_shapes.prod(-1)
    return torch.arange(num_tokens, device=spatial_shapes.device) < counts[:, None]


def unwrap(model: nn.Module) -> nn.Module:
    """The transformers model inside a peft PeftModel (LoRA layers stay injected); else ``model``."""
    get_base_model = getattr(model, "get_base_model", None)
    return get_base_model() if callable(get_base_model) else model


def vit_parts(model: nn.Module) -> VitParts:
    """Locate the blocks, head and global embedding of a supported vision model (utils/families.py).

    Raises:
        ValueError: unknown family (``model.config.model_type``) or a model class / block layout
            this engine does not implement.
    """
    base = unwrap(model)
    model_type = getattr(getattr(base, "config", None), "model_type", None)
    family = MODEL_TYPES.get(model_type)
    if family is None:
        raise ValueError(
            f"Mask Inversion supports the families {', '.join(FAMILIES)}; got {type(base).__name__} "
            f"with config.model_type={model_type!r} (known: {sorted(MODEL_TYPES)})"
        )
    cls = vision_model_class(family)
    if not isinstance(base, cls):
        raise ValueError(
            f"config.model_type={model_type!r} needs a {cls.__name__} (the vision tower with its "
            f"head), got {type(base).__name__}"
        )
    return ADAPTERS[family](base)


# ---------------------------------------------------------------------- one adapter per family
def dinov2_parts(base: nn.Module) -> VitParts:
    return _dino_like("dinov2", base, base.encoder.layer, base.layernorm)


def dinov2reg_parts(base: nn.Module) -> VitParts:
    return _dino_like("dinov2reg", base, base.encoder.layer, base.layernorm)


def dinov3_parts(base: nn.Module) -> VitParts:
    return _dino_like("dinov3", base, base.model.layer, base.norm)


def siglip_parts(base: nn.Module) -> VitParts:
    return _siglip_like("siglip", base)


def siglip2_parts(base: nn.Module) -> VitParts:
    return _siglip_like("siglip2", base)


def clip_parts(base: nn.Module) -> VitParts:
    vision = base.vision_model
    return VitParts(
        "clip",
        base,
        _clip_like_blocks(vision.encoder.layers),
        base.config.num_attention_heads,
        base.config.patch_size,
        1,
        None,
        nn.Sequential(vision.post_layernorm, base.visual_projection),
        lambda out: out.image_embeds,
    )


ADAPTERS: dict[str, Callable[[nn.Module], VitParts]] = {
    "dinov2": dinov2_parts,
    "dinov2reg": dinov2reg_parts,
    "dinov3": dinov3_parts,
    "siglip": siglip_parts,
    "siglip2": siglip2_parts,
    "clip": clip_parts,
}


def _dino_like(family: str, base: nn.Module, layers: nn.ModuleList, final_norm: nn.LayerNorm) -> VitParts:
    """CLS + registers + patches, layer-scaled blocks, f = normalize(final_norm(mean X)), g = normed CLS."""
    config = base.config
    return VitParts(
        family,
        base,
        [_dino_block(b) for b in layers],
        config.num_attention_heads,
        config.patch_size,
        1 + getattr(config, "num_register_tokens", 0),
        None,
        final_norm,
        lambda out: out.pooler_output,
    )


def _siglip_like(family: str, base: nn.Module) -> VitParts:
    if not base.use_head:
        raise ValueError(
            f"{family} without its attention-pooling head (vision_use_head=False) has no "
            f"global embedding to start Mask Inversion from"
        )
    return VitParts(
        family,
        base,
        _clip_like_blocks(base.encoder.layers),
        base.config.num_attention_heads,
        base.config.patch_size,
        0,
        base.post_layernorm,
        nn.Identity(),
        lambda out: out.pooler_output,
        naflex=FAMILIES[family].naflex,  # patch sequences with per-image grids (SigLIP2)
    )


def _dino_block(b: nn.Module) -> BlockParts:
    """A DINOv2 / DINOv2-reg / DINOv3 layer: attention, layer scales, plain or gated MLP."""
    attention = b.attention
    if hasattr(attention, "v_proj"):  # transformers 5.24: q/k/v/o_proj (all three families)
        v_proj, o_proj = attention.v_proj, attention.o_proj
    else:  # e.g. 5.17 DINOv2: attention.attention.value, .output.dense
        v_proj, o_proj = attention.attention.value, attention.output.dense
    mlp = b.mlp
    if hasattr(mlp, "gate_proj"):  # SwiGLU / gated: down_proj(act_fn(gate_proj(x)) * up_proj(x))
        return BlockParts(
            b,
            v_proj,
            o_proj,
            b.layer_scale1,
            b.norm2,
            mlp.up_proj,
            mlp.act_fn,
            mlp.down_proj,
            b.layer_scale2,
            gate=mlp.gate_proj,
        )
    if not hasattr(mlp, "fc1") and not hasattr(mlp, "up_proj"):
        raise ValueError(
            f"{type(mlp).__name__} is neither fc1 -> activation -> fc2 nor a gate/up/down gated MLP "
            f"(e.g. transformers < 5 DINOv2 SwiGLU with one fused weights_in); not supported"
        )
    fc1, fc2 = (mlp.fc1, mlp.fc2) if hasattr(mlp, "fc1") else (mlp.up_proj, mlp.down_proj)
    activation = next(getattr(mlp, name) for name in ("activation_fn", "activation", "act_fn") if hasattr(mlp, name))
    return BlockParts(b, v_proj, o_proj, b.layer_scale1, b.norm2, fc1, activation, fc2, b.layer_scale2)


def _clip_like_blocks(layers: nn.ModuleList) -> list[BlockParts]:
    return [
        BlockParts(
            b,
            b.self_attn.v_proj,
            b.self_attn.out_proj,
            None,
            b.layer_norm2,
            b.mlp.fc1,
            b.mlp.activation_fn,
            b.mlp.fc2,
            None,
        )
        for b in layers
    ]


def hooked_blocks(parts: VitParts, layer_index: int) -> list[BlockParts]:
    """Blocks L + layer_index + 1 .. L (1-based): layer_index -1 is the last block only."""
    n = len(parts.blocks)
    if not isinstance(layer_index, int) or not -n <= layer_index <= -1:
        raise ValueError(f"layer_index must be an int in [-{n}, -1] for this {n}-block model, got {layer_index!r}")
    return parts.blocks[n + layer_index :]
