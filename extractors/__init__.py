"""SoIR extractors behind one registry.

from extractors import build_extractor, SigLIPMIExtractor
extractor = build_extractor("siglip_mi_features")          # or SigLIPMIExtractor()
vectors = extractor.extract(image, masks)                   # [P, D]; no masks -> [D]
"""

from __future__ import annotations

import logging
from typing import Any

from extractors.base import Extractor
from extractors.families import (
    CLIPExtractor,
    CLIPMIExtractor,
    DINOv2Extractor,
    DINOv2MIExtractor,
    DINOv2RegExtractor,
    DINOv2RegMIExtractor,
    DINOv3Extractor,
    DINOv3MIExtractor,
    SigLIP2Extractor,
    SigLIP2MIExtractor,
    SigLIPExtractor,
    SigLIPMIExtractor,
)
from extractors.mask_inversion import MIExtractor
from extractors.registry import build_extractor, capabilities, list_extractors, register_extractor
from extractors.text import TextEncoder, has_text_tower
from utils.config import MI_ONLY_KEYS, NEEDS_MI_KEYS, SoIRConfig
from utils.errors import SoIRError

log = logging.getLogger("soir.extractors")

__all__ = [
    "Extractor",
    "MIExtractor",
    "DINOv2Extractor",
    "SigLIPExtractor",
    "CLIPExtractor",
    "DINOv2MIExtractor",
    "SigLIPMIExtractor",
    "CLIPMIExtractor",
    "DINOv2RegExtractor",
    "DINOv2RegMIExtractor",
    "DINOv3Extractor",
    "DINOv3MIExtractor",
    "SigLIP2Extractor",
    "SigLIP2MIExtractor",
    "build_extractor",
    "list_extractors",
    "register_extractor",
    "capabilities",
    "extractor_from_config",
    "TextEncoder",
    "has_text_tower",
]


def extractor_from_config(cfg: Any, name: str | None = None, overrides: dict | None = None) -> Extractor:
    """Build the extractor a SoIR config asks for (``name`` = ``cfg.extractor``) and check ``vec_dim``.

    Every config key that is an argument of the extractor's constructor is passed through (the
    constructor speaks the config's vocabulary); ``overrides`` (``query_extractor_args``) win. A
    setting changed from its default that this extractor does not take is logged, or refused when
    it needs Mask Inversion.
    """
    name = name or cfg.extractor
    keys = capabilities(name)["keys"]
    # The pipeline hands each image its masks itself; captions_file is for notebooks' dict inputs.
    kwargs = {key: cfg[key] for key in keys - {"captions_file"} if key in cfg}
    unknown = sorted(set(overrides or {}) - keys)
    if unknown:
        raise SoIRError(f"query_extractor_args {unknown} are not settings of {name} (it takes {sorted(keys)})")
    kwargs.update(overrides or {})
    defaults = SoIRConfig()
    ignored = [k for k in MI_ONLY_KEYS - keys if cfg.get(k) != getattr(defaults, k)]
    needs_mi = [k for k in ignored if k in NEEDS_MI_KEYS]
    if needs_mi:
        raise SoIRError(f"{', '.join(needs_mi)} need a Mask Inversion extractor, not {name}")
    if ignored:
        log.warning("%s ignores %s (Mask Inversion settings)", name, ", ".join(ignored))
    extractor = build_extractor(name, **kwargs)
    if extractor.dim != cfg.vec_dim:
        raise SoIRError(
            f"vec_dim={cfg.vec_dim} but {extractor.model_name} outputs {extractor.dim}-d "
            f"embeddings; set vec_dim={extractor.dim}"
        )
    return extractor
