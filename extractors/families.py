"""The backbone families, plain and with Mask Inversion, and their registry entries."""
from __future__ import annotations

from extractors.base import Extractor
from extractors.mask_inversion import MIExtractor
from extractors.registry import register_extractor


class DINOv2Extractor(Extractor):
    family = "dinov2"
    default_models = {"base": "facebook/dinov2-base", "large": "facebook/dinov2-large"}


class SigLIPExtractor(Extractor):
    family = "siglip"
    default_models = {"base": "google/siglip-base-patch16-384", "large": "google/siglip-so400m-patch14-384"}


class CLIPExtractor(Extractor):
    family = "clip"
    default_models = {"base": "openai/clip-vit-base-patch16"}


class DINOv2MIExtractor(MIExtractor, DINOv2Extractor):
    pass


class SigLIPMIExtractor(MIExtractor, SigLIPExtractor):
    pass


class CLIPMIExtractor(MIExtractor, CLIPExtractor):
    pass


register_extractor("dinov2_features", DINOv2Extractor)
register_extractor("dinov2_mi_features", DINOv2MIExtractor)
register_extractor("siglip_features", SigLIPExtractor)
register_extractor("siglip_mi_features", SigLIPMIExtractor)
register_extractor("clip_features", CLIPExtractor)
register_extractor("clip_mi_features", CLIPMIExtractor)
