"""Where the pieces LeGrad needs live inside each supported Hugging Face vision transformer.

Mask Inversion needs, per transformer block, the attention's value projection and output projection,
the layer scales (DINOv2), the second LayerNorm and the MLP; and per model, the "head" that turns a
block's output tokens X_l [B, T, D] into the LeGrad feature f_l = normalize(head(X_l)):

    DINOv2  (Dinov2Model)                    f = normalize(layernorm(mean_t X_t))
    SigLIP  (SiglipVisionModel)              f = normalize(mean_t post_layernorm(X_t))
    CLIP    (CLIPVisionModelWithProjection)  f = normalize(visual_projection(post_layernorm(mean_t X_t)))

All three are written as ``f = normalize(pooled_head(mean_t token_norm(X_t)))`` with ``token_norm``
None for DINOv2 and CLIP and ``pooled_head`` the identity for SigLIP.

Modules are found by walking the real module tree, so LoRA layers injected by peft (into q/k/v or
anywhere else) are the modules the engine hooks and calls.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from transformers import CLIPVisionModelWithProjection, Dinov2Model, SiglipVisionModel

FAMILIES = {"dinov2": "dinov2", "siglip_vision_model": "siglip", "siglip": "siglip",
            "clip_vision_model": "clip", "clip": "clip"}


@dataclass
class BlockParts:
    """The modules of one pre-norm transformer block that LeGrad's gradient passes through.

    block(x) = r + ls2 * fc2(act(fc1(norm2(r)))),   r = x + ls1 * o_proj(attention(norm1(x)))
    """

    block: nn.Module
    v_proj: nn.Module             # output [B, T, heads * head_dim]
    o_proj: nn.Module
    layer_scale1: nn.Module | None
    norm2: nn.LayerNorm
    fc1: nn.Module
    activation: nn.Module         # element-wise
    fc2: nn.Module
    layer_scale2: nn.Module | None


@dataclass
class VitParts:
    """A supported model, unwrapped from peft, with the pieces Mask Inversion needs."""

    family: str                   # "dinov2" | "siglip" | "clip"
    model: nn.Module              # the transformers model (peft wrapper removed; LoRA layers stay inside)
    blocks: list[BlockParts]
    num_heads: int
    patch_size: int
    num_prefix_tokens: int        # CLS + register tokens in front of the patch tokens
    token_norm: nn.LayerNorm | None
    pooled_head: nn.Module        # [N, D] -> [N, D_out] (applied to the token mean)
    global_embedding: Callable[[object], torch.Tensor]             # model output -> raw g [B, D_out]

    def head(self, tokens: torch.Tensor) -> torch.Tensor:
        """Un-normalised LeGrad feature head(X) [B, D_out] of block output tokens X [B, T, D]."""
        if self.token_norm is not None:
            tokens = self.token_norm(tokens)
        return self.pooled_head(tokens.mean(dim=1))


def unwrap(model: nn.Module) -> nn.Module:
    """The transformers model inside a peft PeftModel (LoRA layers stay injected); else ``model``."""
    get_base_model = getattr(model, "get_base_model", None)
    return get_base_model() if callable(get_base_model) else model


def vit_parts(model: nn.Module) -> VitParts:
    """Locate the blocks, head and global embedding of a DINOv2, SigLIP or CLIP vision model.

    Raises:
        ValueError: unknown family (``model.config.model_type``) or a model class / block layout
            this engine does not implement.
    """
    base = unwrap(model)
    model_type = getattr(getattr(base, "config", None), "model_type", None)
    family = FAMILIES.get(model_type)
    if family is None:
        raise ValueError(f"Mask Inversion supports DINOv2, SigLIP and CLIP vision models; got "
                         f"{type(base).__name__} with config.model_type={model_type!r} "
                         f"(known: {sorted(FAMILIES)})")
    config = base.config
    if family == "dinov2":
        _require(base, Dinov2Model)
        if getattr(config, "use_swiglu_ffn", False):
            raise ValueError("DINOv2 with a SwiGLU MLP (use_swiglu_ffn=True) is not supported: the "
                             "engine's gradient decomposition assumes fc1 -> activation -> fc2")
        blocks = [_dinov2_block(b) for b in base.encoder.layer]
        return VitParts(family, base, blocks, config.num_attention_heads, config.patch_size,
                        1 + getattr(config, "num_register_tokens", 0), None, base.layernorm,
                        lambda out: out.pooler_output)
    if family == "siglip":
        _require(base, SiglipVisionModel)
        if not base.use_head:
            raise ValueError("SigLIP without its attention-pooling head (vision_use_head=False) has no "
                             "global embedding to start Mask Inversion from")
        return VitParts(family, base, _clip_like_blocks(base.encoder.layers), config.num_attention_heads,
                        config.patch_size, 0, base.post_layernorm, nn.Identity(),
                        lambda out: out.pooler_output)
    _require(base, CLIPVisionModelWithProjection)
    vision = base.vision_model
    return VitParts(family, base, _clip_like_blocks(vision.encoder.layers), config.num_attention_heads,
                    config.patch_size, 1, None, nn.Sequential(vision.post_layernorm, base.visual_projection),
                    lambda out: out.image_embeds)


def _dinov2_block(b: nn.Module) -> BlockParts:
    attention = b.attention
    if hasattr(attention, "v_proj"):          # e.g. transformers 5.24: q/k/v/o_proj
        v_proj, o_proj = attention.v_proj, attention.o_proj
    else:                                     # e.g. 5.17: attention.attention.value, .output.dense
        v_proj, o_proj = attention.attention.value, attention.output.dense
    activation = b.mlp.activation_fn if hasattr(b.mlp, "activation_fn") else b.mlp.activation
    return BlockParts(b, v_proj, o_proj, b.layer_scale1, b.norm2, b.mlp.fc1, activation, b.mlp.fc2,
                      b.layer_scale2)


def _clip_like_blocks(layers: nn.ModuleList) -> list[BlockParts]:
    return [BlockParts(b, b.self_attn.v_proj, b.self_attn.out_proj, None, b.layer_norm2,
                       b.mlp.fc1, b.mlp.activation_fn, b.mlp.fc2, None) for b in layers]


def _require(model: nn.Module, cls: type) -> None:
    if not isinstance(model, cls):
        raise ValueError(f"config.model_type={model.config.model_type!r} needs a {cls.__name__} "
                         f"(the vision tower with its head), got {type(model).__name__}")


def hooked_blocks(parts: VitParts, layer_index: int) -> list[BlockParts]:
    """Blocks L + layer_index + 1 .. L (1-based): layer_index -1 is the last block only."""
    n = len(parts.blocks)
    if not isinstance(layer_index, int) or not -n <= layer_index <= -1:
        raise ValueError(f"layer_index must be an int in [-{n}, -1] for this {n}-block model, "
                         f"got {layer_index!r}")
    return parts.blocks[n + layer_index:]
