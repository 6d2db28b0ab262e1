"""SoIR extractors behind one registry.

    from extractors import build_extractor, SigLIPMIExtractor
    extractor = build_extractor("siglip_mi_features")          # or SigLIPMIExtractor()
    vectors = extractor.extract(image, masks)                   # [P, D]; no masks -> [D]
"""
from __future__ import annotations

import logging
from typing import Any

from extractors.base import Extractor
from extractors.families import (CLIPExtractor, CLIPMIExtractor, DINOv2Extractor, DINOv2MIExtractor,
                                 DINOv2RegExtractor, DINOv2RegMIExtractor, DINOv3Extractor, DINOv3MIExtractor,
                                 SigLIP2Extractor, SigLIP2MIExtractor, SigLIPExtractor, SigLIPMIExtractor)
from extractors.mask_inversion import MIExtractor
from extractors.registry import build_extractor, capabilities, list_extractors, register_extractor
from utils.config import SoIRConfig
from utils.errors import SoIRError

log = logging.getLogger("soir.extractors")

__all__ = ["Extractor", "MIExtractor", "DINOv2Extractor", "SigLIPExtractor", "CLIPExtractor",
           "DINOv2MIExtractor", "SigLIPMIExtractor", "CLIPMIExtractor", "DINOv2RegExtractor",
           "DINOv2RegMIExtractor", "DINOv3Extractor", "DINOv3MIExtractor", "SigLIP2Extractor",
           "SigLIP2MIExtractor", "build_extractor",
           "list_extractors", "register_extractor", "capabilities", "extractor_from_config"]

_MI_KEYS = ("mi_alpha", "mi_beta", "mi_lr", "mi_iterations", "mi_layer_index", "mi_sum",
            "avg_multiple_vecs", "smart_crop", "smart_crop_pad")


def extractor_from_config(cfg: Any) -> Extractor:
    """Build the extractor a SoIR config asks for and check ``vec_dim`` against the model."""
    kwargs: dict[str, Any] = dict(model_name=cfg.model_name, device=cfg.device, precision=cfg.precision)
    if capabilities(cfg.extractor)["uses_masks"]:
        kwargs.update({key: cfg[key] for key in _MI_KEYS})
    elif cfg.smart_crop or cfg.mi_sum or cfg.avg_multiple_vecs or cfg.mask_input:
        raise SoIRError(f"smart_crop / mi_sum / avg_multiple_vecs / mask_input need an MI extractor, "
                         f"not {cfg.extractor}")
    else:
        unused = [k for k in _MI_KEYS if k.startswith("mi_") and cfg[k] != SoIRConfig.__dataclass_fields__[k].default]
        if unused:
            log.warning("%s ignores %s (Mask Inversion settings)", cfg.extractor, ", ".join(unused))
    if cfg.extractor.startswith("dinov2"):
        if cfg.model_name and not cfg.B_model:
            log.warning("B_model=false is ignored: model_name=%s is given", cfg.model_name)
        kwargs["B_model"] = cfg.B_model
    if cfg.lora_adapt:
        if cfg.weights is None:
            raise SoIRError("lora_adapt=true needs weights=/path/to/lora_weights.ckpt "
                            "(untrained LoRA adapters leave the model unchanged)")
        kwargs.update(lora_rank=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_weights=cfg.weights)
    extractor = build_extractor(cfg.extractor, **kwargs)
    if extractor.dim != cfg.vec_dim:
        raise SoIRError(f"vec_dim={cfg.vec_dim} but {extractor.model_name} outputs {extractor.dim}-d "
                         f"embeddings; set vec_dim={extractor.dim}")
    return extractor
