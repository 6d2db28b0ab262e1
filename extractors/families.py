"""The three backbone families, plain and with Mask Inversion, and their registry entries."""
from __future__ import annotations

from extractors.base import Extractor
from extractors.mask_inversion import MIExtractor
from extractors.registry import register_extractor


class DINOv2Extractor(Extractor):
    family, default_model = "dinov2", "facebook/dinov2-base"


class SigLIPExtractor(Extractor):
    family, default_model = "siglip", "google/siglip-base-patch16-384"


class CLIPExtractor(Extractor):
    family, default_model = "clip", "openai/clip-vit-base-patch16"


class DINOv2MIExtractor(MIExtractor, DINOv2Extractor):
    pass


class SigLIPMIExtractor(MIExtractor, SigLIPExtractor):
    pass


class CLIPMIExtractor(MIExtractor, CLIPExtractor):
    pass


def _dinov2_model(model_name: str | None, B_model: bool) -> str:
    return model_name or ("facebook/dinov2-base" if B_model else "facebook/dinov2-large")


@register_extractor
def dinov2_features(model_name: str | None = None, B_model: bool = True, **kwargs) -> DINOv2Extractor:
    return DINOv2Extractor(_dinov2_model(model_name, B_model), **kwargs)


@register_extractor(uses_masks=True)
def dinov2_mi_features(model_name: str | None = None, B_model: bool = True, **kwargs) -> DINOv2MIExtractor:
    return DINOv2MIExtractor(_dinov2_model(model_name, B_model), **kwargs)


@register_extractor
def siglip_features(model_name: str | None = None, **kwargs) -> SigLIPExtractor:
    return SigLIPExtractor(model_name, **kwargs)


@register_extractor(uses_masks=True)
def siglip_mi_features(model_name: str | None = None, **kwargs) -> SigLIPMIExtractor:
    return SigLIPMIExtractor(model_name, **kwargs)


@register_extractor
def clip_features(model_name: str | None = None, **kwargs) -> CLIPExtractor:
    return CLIPExtractor(model_name, **kwargs)


@register_extractor(uses_masks=True)
def clip_mi_features(model_name: str | None = None, **kwargs) -> CLIPMIExtractor:
    return CLIPMIExtractor(model_name, **kwargs)
