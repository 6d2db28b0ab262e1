"""LoRA adapters for DINOv2 (peft) and loading of LoRA checkpoints across transformers versions."""
from __future__ import annotations

import logging
import re
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from torch import nn

log = logging.getLogger("soir.extractors")

# transformers 5.x renamed DINOv2's attention projections; checkpoints saved with 4.x use the old names.
_V4_TO_V5 = [(r"attention\.attention\.query\.", "attention.q_proj."),
             (r"attention\.attention\.key\.", "attention.k_proj."),
             (r"attention\.attention\.value\.", "attention.v_proj."),
             (r"attention\.output\.dense\.", "attention.o_proj.")]
TARGET_MODULES = ["q_proj", "k_proj", "v_proj"]


def canonical_key(key: str) -> str:
    """Checkpoint or model key -> a name independent of wrappers, adapter names and 4.x/5.x naming."""
    for old, new in _V4_TO_V5:
        key = re.sub(old, new, key)
    root = re.search(r"(?:^|\.)((?:embeddings|encoder|layernorm)\..*)$", key)
    key = root.group(1) if root else key
    return key.replace(".default.", ".").replace(".base_layer.", ".")


def add_lora(model: nn.Module, rank: int, alpha: float | None, weights: str | Path) -> nn.Module:
    """Wrap a Dinov2Model with LoRA on q/k/v, load ``weights`` and merge them into the base weights.

    Merging gives a plain Dinov2Model with the same function (up to float rounding), so the
    Mask Inversion engine and fast attention paths need no peft-specific code.

    Raises:
        FileNotFoundError: ``weights`` does not exist.
        ValueError: the checkpoint does not fit (lists missing LoRA keys and unexpected keys).
    """
    weights = Path(weights)
    if not weights.is_file():
        raise FileNotFoundError(f"LoRA weights not found: {weights}")
    alpha = alpha or rank
    # The scaling alpha / rank must be the one the adapters were trained with; it is not stored in
    # a state dict, so say which one is used.
    log.info("LoRA rank %d, alpha %g (scaling %.3g) on %s", rank, alpha, alpha / rank, TARGET_MODULES)
    peft_model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=alpha,
                                                  target_modules=TARGET_MODULES, lora_dropout=0.0))
    load_lora_state(peft_model, weights)
    return peft_model.merge_and_unload()


def load_lora_state(peft_model: nn.Module, weights: Path) -> None:
    """Load a state-dict checkpoint (bare, or under "state_dict"/"model") into a peft-wrapped model."""
    ckpt = torch.load(weights, map_location="cpu", weights_only=True)
    if isinstance(ckpt, dict):
        for key in ("state_dict", "model"):
            if isinstance(ckpt.get(key), dict):
                ckpt = ckpt[key]
                break
    if not isinstance(ckpt, dict) or not all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        raise ValueError(f"{weights}: not a state-dict checkpoint (expected a dict of tensors)")
    model_keys = {canonical_key(k): k for k in peft_model.state_dict()}
    mapped, unexpected = {}, []
    for key, value in ckpt.items():
        name = canonical_key(key)
        (unexpected.append(key) if name not in model_keys else mapped.__setitem__(model_keys[name], value))
    missing = sorted(k for c, k in model_keys.items() if "lora_" in c and k not in mapped)
    if missing or unexpected:
        raise ValueError(f"{weights} does not match DINOv2 + LoRA(rank={_rank(peft_model)}, "
                         f"targets={TARGET_MODULES}): {len(missing)} missing LoRA keys {missing[:5]}, "
                         f"{len(unexpected)} unexpected keys {unexpected[:5]}")
    try:
        peft_model.load_state_dict(mapped, strict=False)
    except RuntimeError as err:  # shape mismatch, e.g. another lora_rank
        raise ValueError(f"{weights}: tensors do not fit the model (check lora_rank): {err}") from None
    n_lora = sum("lora_" in k for k in mapped)
    log.info("loaded %s: %d LoRA tensors, %d base tensors", weights, n_lora, len(mapped) - n_lora)


def _rank(peft_model: nn.Module) -> int:
    return next(iter(peft_model.peft_config.values())).r
