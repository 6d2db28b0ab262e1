"""The backbone families, plain and with Mask Inversion, and their registry entries.

Default checkpoints (vec_dim), ``B_model=true`` / ``false``: DINOv2 facebook/dinov2-base (768) /
-large (1024); DINOv2 with registers facebook/dinov2-with-registers-base (768) / -large (1024);
DINOv3 facebook/dinov3-vitb16-pretrain-lvd1689m (768) / vitl16 (1024); SigLIP
google/siglip-base-patch16-384 (768) / google/siglip-so400m-patch14-384 (1152); SigLIP2 NaFlex
google/siglip2-base-patch16-naflex (768) / so400m-patch16-naflex (1152); CLIP
openai/clip-vit-base-patch16 (512). The fixed-resolution SigLIP2 checkpoints (e.g.
google/siglip2-base-patch16-224) are SigLIP models (model_type "siglip"): use the siglip extractors.
"""
from __future__ import annotations

from extractors.base import Extractor
from extractors.mask_inversion import MIExtractor
from extractors.registry import register_extractor
from utils.preprocessing import NaFlexPreprocess


class DINOv2Extractor(Extractor):
    family = "dinov2"
    default_models = {"base": "facebook/dinov2-base", "large": "facebook/dinov2-large"}


class DINOv2RegExtractor(Extractor):
    family = "dinov2reg"
    default_models = {"base": "facebook/dinov2-with-registers-base", "large": "facebook/dinov2-with-registers-large"}


class DINOv3Extractor(Extractor):
    family = "dinov3"
    default_models = {"base": "facebook/dinov3-vitb16-pretrain-lvd1689m",
                      "large": "facebook/dinov3-vitl16-pretrain-lvd1689m"}


class SigLIPExtractor(Extractor):
    family = "siglip"
    default_models = {"base": "google/siglip-base-patch16-384", "large": "google/siglip-so400m-patch14-384"}


class SigLIP2Extractor(Extractor):
    """SigLIP2 NaFlex: each image at its own aspect ratio, as a patch sequence (NaFlexPreprocess)."""

    family = "siglip2"
    default_models = {"base": "google/siglip2-base-patch16-naflex", "large": "google/siglip2-so400m-patch16-naflex"}
    preprocess_class = NaFlexPreprocess


class CLIPExtractor(Extractor):
    family = "clip"
    default_models = {"base": "openai/clip-vit-base-patch16"}


class DINOv2MIExtractor(MIExtractor, DINOv2Extractor):
    pass


class DINOv2RegMIExtractor(MIExtractor, DINOv2RegExtractor):
    pass


class DINOv3MIExtractor(MIExtractor, DINOv3Extractor):
    pass


class SigLIPMIExtractor(MIExtractor, SigLIPExtractor):
    pass


class SigLIP2MIExtractor(MIExtractor, SigLIP2Extractor):
    pass


class CLIPMIExtractor(MIExtractor, CLIPExtractor):
    pass


register_extractor("dinov2_features", DINOv2Extractor)
register_extractor("dinov2_mi_features", DINOv2MIExtractor)
register_extractor("dinov2reg_features", DINOv2RegExtractor)
register_extractor("dinov2reg_mi_features", DINOv2RegMIExtractor)
register_extractor("dinov3_features", DINOv3Extractor)
register_extractor("dinov3_mi_features", DINOv3MIExtractor)
register_extractor("siglip_features", SigLIPExtractor)
register_extractor("siglip_mi_features", SigLIPMIExtractor)
register_extractor("siglip2_features", SigLIP2Extractor)
register_extractor("siglip2_mi_features", SigLIP2MIExtractor)
register_extractor("clip_features", CLIPExtractor)
register_extractor("clip_mi_features", CLIPMIExtractor)
