"""LoRA adapters (peft) for DINOv2 and CLIP, and loading of LoRA checkpoints across transformers versions.

A checkpoint is a state dict of LoRA tensors (base weights may be present too), as a ``torch.save``'d
file or ``.safetensors``, bare or under ``"model_state_dict"`` (the original code), ``"state_dict"``
(Lightning) or ``"model"``. The adapter scaling alpha / rank is not in the tensors, so it comes from,
in this order:

1. the checkpoint's own ``"lora"`` entry (written by ``scripts/train_mao.py``: rank, alpha, target
   modules, family);
2. a peft ``adapter_config.json`` next to the checkpoint (``r``, ``lora_alpha``, ``target_modules``);
3. the caller's ``alpha`` (config key ``lora_alpha``; its default, ``utils.config.LoRASettings``, is the
   original code's: scaling 32 / 256 = 0.125 at rank 256).

A stored alpha wins over the caller's and is logged; a stored rank or family that differs from the
requested one is an error.
"""

from __future__ import annotations

import json
import logging
import pickle
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, get_peft_model
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from utils.config import LoRASettings
from utils.errors import SoIRError
from utils.families import FAMILIES, lora_families

log = logging.getLogger("soir.extractors")

DEFAULT_ALPHA = float(LoRASettings.lora_alpha)  # the original code's lora_alpha default
STATE_KEYS = ("model_state_dict", "state_dict", "model")  # wrappers around the state dict
METADATA_KEY = "lora"

# transformers 5.x renamed DINOv2's attention projections; checkpoints saved with 4.x use the old names.
_V4_TO_V5 = [
    (r"attention\.attention\.query\.", "attention.q_proj."),
    (r"attention\.attention\.key\.", "attention.k_proj."),
    (r"attention\.attention\.value\.", "attention.v_proj."),
    (r"attention\.output\.dense\.", "attention.o_proj."),
]
_V4_TARGETS = {"query": "q_proj", "key": "k_proj", "value": "v_proj"}


@dataclass(frozen=True)
class LoraSettings:
    """What builds the adapters: rank r, alpha (scaling alpha / r), target modules, dropout (training
    only), and the backbone family they were made for (None: unknown, e.g. a bare state dict)."""

    rank: int
    alpha: float = DEFAULT_ALPHA
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj")  # a family's: FamilySpec.lora_targets
    dropout: float = 0.0
    family: str | None = None

    def peft_config(self) -> LoraConfig:
        return LoraConfig(
            r=self.rank, lora_alpha=self.alpha, target_modules=list(self.target_modules), lora_dropout=self.dropout
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain types, for the checkpoint's ``"lora"`` entry (loadable with ``weights_only=True``)."""
        return {**asdict(self), "target_modules": list(self.target_modules)}


def canonical_key(key: str) -> str:
    """Checkpoint or model key -> a name independent of wrappers, adapter names and 4.x/5.x naming."""
    for old, new in _V4_TO_V5:
        key = re.sub(old, new, key)
    root = re.search(r"(?:^|\.)((?:embeddings|encoder|layernorm|vision_model|visual_projection)\..*)$", key)
    key = root.group(1) if root else key
    return key.replace(".default.", ".").replace(".base_layer.", ".")


def wrap_with_lora(model: nn.Module, settings: LoraSettings) -> nn.Module:
    """peft LoRA on ``settings.target_modules`` of ``model`` (a DINOv2 or CLIP vision model)."""
    if settings.family is not None:
        _check_family(settings.family, "adapters")
    return get_peft_model(model, settings.peft_config())


def lora_checkpoint(peft_model: nn.Module, settings: LoraSettings, **extra: Any) -> dict[str, Any]:
    """The checkpoint ``add_lora`` reads back: ``{"state_dict": LoRA tensors (CPU copies), "lora":
    settings, **extra}``. ``settings.family`` must be set, so a load into another family is refused."""
    if settings.family is None:
        raise SoIRError("a LoRA checkpoint must record the backbone family")
    state = {k: v.detach().cpu().clone() for k, v in peft_model.state_dict().items() if "lora_" in k}
    return {"state_dict": state, METADATA_KEY: settings.to_dict(), **extra}


def add_lora(
    model: nn.Module, family: str, rank: int, alpha: float | None, weights: str | Path
) -> tuple[nn.Module, LoraSettings]:
    """Wrap a DINOv2 / CLIP vision model with LoRA, load ``weights`` and merge them into the base weights.

    Merging gives a plain transformers model with the same function (up to float rounding), so the
    Mask Inversion engine and fast attention paths need no peft-specific code. ``alpha`` None = the
    ``lora_alpha`` default.
    Returns the merged model and the settings actually used (an alpha stored with the checkpoint wins).

    Raises:
        SoIRError: ``weights`` does not exist or is not a checkpoint; stored rank / family differ from
            the requested ones; the tensors do not fit (lists missing LoRA keys and unexpected keys).
    """
    _check_family(family, "weights")
    weights = Path(weights)
    state, stored, source = read_lora_checkpoint(weights)
    settings = resolve_settings(weights, family, rank, alpha, stored, source)
    peft_model = wrap_with_lora(model, settings)
    load_lora_state(peft_model, state, weights, settings)
    return peft_model.merge_and_unload(), settings


def _check_family(family: str, what: str) -> None:
    if family not in lora_families():
        raise SoIRError(f"LoRA {what} are supported for {', '.join(lora_families())}, not {family}")


def read_lora_checkpoint(weights: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], str | None]:
    """(state dict, stored settings, where they were stored) of a checkpoint file.

    Stored settings: the checkpoint's ``"lora"`` entry, else a peft ``adapter_config.json`` beside it,
    else ``{}``. Every failure is a one-line error naming the file.
    """
    if not weights.is_file():
        raise SoIRError(f"LoRA weights not found: {weights} (weights= must be the checkpoint file)")
    ckpt = _load_file(weights)
    stored, source = {}, None
    if isinstance(ckpt, dict) and isinstance(ckpt.get(METADATA_KEY), dict):
        stored, source = ckpt[METADATA_KEY], "the checkpoint"
    elif (weights.parent / "adapter_config.json").is_file():
        stored, source = _peft_adapter_config(weights.parent / "adapter_config.json"), "adapter_config.json"
    if isinstance(ckpt, dict):
        for key in STATE_KEYS:
            if isinstance(ckpt.get(key), dict):
                ckpt = ckpt[key]
                break
    if not isinstance(ckpt, dict) or not ckpt or not all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        raise SoIRError(
            f"{weights}: not a LoRA state-dict checkpoint (expected a dict of tensors, bare "
            f"or under one of {list(STATE_KEYS)})"
        )
    return ckpt, stored, source


def _load_file(weights: Path) -> Any:
    """torch.load (weights_only) or safetensors, with one clear line instead of a library traceback."""
    if weights.suffix == ".safetensors":
        try:
            return load_file(weights)
        except (SafetensorError, OSError, ValueError) as err:
            raise SoIRError(f"{weights}: not a readable .safetensors file ({_first_line(err)})") from None
    try:
        return torch.load(weights, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        # weights_only refuses pickled classes ("Unsupported global: GLOBAL argparse.Namespace ...").
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
        if found:
            raise SoIRError(
                f"{weights}: the checkpoint holds Python objects ({found.group(1)}), not only "
                f"tensors and plain containers; SoIR loads only those (save the state dict "
                f"alone: torch.save(model.state_dict(), path))"
            ) from None
        raise SoIRError(
            f"{weights}: not a PyTorch checkpoint (cannot unpickle it); expected a file "
            f"written by torch.save or a .safetensors file"
        ) from None
    except Exception as err:  # unpickling errors come in many types (KeyError for a text file, ...)
        raise SoIRError(
            f"{weights}: not a PyTorch checkpoint ({_first_line(err)}); expected a file "
            f"written by torch.save or a .safetensors file"
        ) from None


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:160] if text else ''}"


def _peft_adapter_config(path: Path) -> dict[str, Any]:
    """rank, alpha and targets of a peft ``adapter_config.json`` (4.x target names mapped to 5.x)."""
    try:
        cfg = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise SoIRError(f"{path}: not a readable JSON file ({_first_line(err)})") from None
    if cfg.get("peft_type", "LORA") != "LORA" or "r" not in cfg or "lora_alpha" not in cfg:
        raise SoIRError(f"{path}: not a peft LoRA adapter config (needs peft_type LORA, r and lora_alpha)")
    if cfg.get("use_dora") or cfg.get("use_rslora"):
        raise SoIRError(f"{path}: DoRA / rsLoRA adapters are not supported (plain LoRA only)")
    stored = {"rank": int(cfg["r"]), "alpha": float(cfg["lora_alpha"])}
    if isinstance(cfg.get("target_modules"), list):
        stored["target_modules"] = sorted({_V4_TARGETS.get(t, t) for t in cfg["target_modules"]})
    return stored


def resolve_settings(
    weights: Path, family: str, rank: int, alpha: float | None, stored: dict[str, Any], source: str | None
) -> LoraSettings:
    """The settings to build the adapters with: stored ones win for alpha and targets (logged); a
    stored rank or family that contradicts the request is an error naming the file."""
    if stored.get("family") not in (None, family):
        raise SoIRError(
            f"{weights} holds LoRA adapters for {stored['family']}, not {family}; use a {stored['family']} extractor"
        )
    if stored.get("rank") not in (None, rank):
        raise SoIRError(
            f"{weights} was trained with LoRA rank {stored['rank']} (stored in {source}), "
            f"but lora_rank={rank}; set lora_rank={stored['rank']}"
        )
    requested = DEFAULT_ALPHA if alpha is None else float(alpha)
    if stored.get("alpha") is not None and float(stored["alpha"]) != requested:
        log.warning("LoRA alpha %g stored in %s is used (lora_alpha=%g ignored)", stored["alpha"], source, requested)
    settings = LoraSettings(
        rank=rank,
        alpha=float(stored.get("alpha", requested)),
        target_modules=tuple(stored.get("target_modules", FAMILIES[family].lora_targets)),
        family=family,
    )
    # The scaling alpha / rank must be the one the adapters were trained with: say which one is used.
    log.info(
        "LoRA rank %d, alpha %g (scaling %.4g, %s) on %s",
        settings.rank,
        settings.alpha,
        settings.alpha / settings.rank,
        f"from {source}" if "alpha" in stored else "lora_alpha",
        list(settings.target_modules),
    )
    return settings


def load_lora_state(
    peft_model: nn.Module, state: dict[str, torch.Tensor], weights: Path, settings: LoraSettings
) -> None:
    """Load a checkpoint's tensors into a peft-wrapped model, matching keys by :func:`canonical_key`."""
    model_keys = {canonical_key(k): k for k in peft_model.state_dict()}
    mapped, unexpected = {}, []
    for key, value in state.items():
        name = canonical_key(key)
        (unexpected.append(key) if name not in model_keys else mapped.__setitem__(model_keys[name], value))
    missing = sorted(k for c, k in model_keys.items() if "lora_" in c and k not in mapped)
    if missing or unexpected:
        raise SoIRError(
            f"{weights} does not match {settings.family} + LoRA(rank={settings.rank}, "
            f"targets={list(settings.target_modules)}): {len(missing)} missing LoRA keys "
            f"{missing[:5]}, {len(unexpected)} unexpected keys {unexpected[:5]}"
        )
    try:
        peft_model.load_state_dict(mapped, strict=False)
    except RuntimeError as err:  # shape mismatch, e.g. another lora_rank
        lines = [line.strip() for line in str(err).splitlines() if "size mismatch" in line] or [_first_line(err)]
        raise SoIRError(f"{weights}: tensors do not fit the model (check lora_rank): {lines[0][:300]}") from None
    n_lora = sum("lora_" in k for k in mapped)
    log.info("loaded %s: %d LoRA tensors, %d base tensors", weights, n_lora, len(mapped) - n_lora)
