"""The backbone families, plain and with Mask Inversion, and their registry entries.

Default checkpoints (vec_dim): DINOv2 facebook/dinov2-base (768; B_model=false: -large, 1024),
DINOv2 with registers facebook/dinov2-with-registers-base (768; -large, 1024), DINOv3
facebook/dinov3-vitb16-pretrain-lvd1689m (768), SigLIP google/siglip-base-patch16-384 (768), SigLIP2
NaFlex google/siglip2-base-patch16-naflex (768), CLIP openai/clip-vit-base-patch16 (512). The
fixed-resolution SigLIP2 checkpoints (e.g. google/siglip2-base-patch16-224) are SigLIP models
(model_type "siglip"): use them with the siglip extractors.
"""
from __future__ import annotations

from extractors.base import Extractor
from extractors.mask_inversion import MIExtractor
from extractors.registry import register_extractor
from utils.preprocessing import NaFlexPreprocess


class DINOv2Extractor(Extractor):
    family, default_model = "dinov2", "facebook/dinov2-base"


class DINOv2RegExtractor(Extractor):
    family, default_model = "dinov2reg", "facebook/dinov2-with-registers-base"


class DINOv3Extractor(Extractor):
    family, default_model = "dinov3", "facebook/dinov3-vitb16-pretrain-lvd1689m"


class SigLIPExtractor(Extractor):
    family, default_model = "siglip", "google/siglip-base-patch16-384"


class SigLIP2Extractor(Extractor):
    """SigLIP2 NaFlex: each image at its own aspect ratio, as a patch sequence (NaFlexPreprocess)."""

    family, default_model = "siglip2", "google/siglip2-base-patch16-naflex"
    preprocess_class = NaFlexPreprocess


class CLIPExtractor(Extractor):
    family, default_model = "clip", "openai/clip-vit-base-patch16"


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


def _dinov2_model(model_name: str | None, B_model: bool) -> str:
    return model_name or ("facebook/dinov2-base" if B_model else "facebook/dinov2-large")


@register_extractor
def dinov2_features(model_name: str | None = None, B_model: bool = True, **kwargs) -> DINOv2Extractor:
    return DINOv2Extractor(_dinov2_model(model_name, B_model), **kwargs)


@register_extractor(uses_masks=True)
def dinov2_mi_features(model_name: str | None = None, B_model: bool = True, **kwargs) -> DINOv2MIExtractor:
    return DINOv2MIExtractor(_dinov2_model(model_name, B_model), **kwargs)


def _dinov2reg_model(model_name: str | None, B_model: bool) -> str:
    return model_name or ("facebook/dinov2-with-registers-base" if B_model else "facebook/dinov2-with-registers-large")


@register_extractor
def dinov2reg_features(model_name: str | None = None, B_model: bool = True, **kwargs) -> DINOv2RegExtractor:
    return DINOv2RegExtractor(_dinov2reg_model(model_name, B_model), **kwargs)


@register_extractor(uses_masks=True)
def dinov2reg_mi_features(model_name: str | None = None, B_model: bool = True, **kwargs) -> DINOv2RegMIExtractor:
    return DINOv2RegMIExtractor(_dinov2reg_model(model_name, B_model), **kwargs)


@register_extractor
def dinov3_features(model_name: str | None = None, **kwargs) -> DINOv3Extractor:
    return DINOv3Extractor(model_name, **kwargs)


@register_extractor(uses_masks=True)
def dinov3_mi_features(model_name: str | None = None, **kwargs) -> DINOv3MIExtractor:
    return DINOv3MIExtractor(model_name, **kwargs)


@register_extractor
def siglip_features(model_name: str | None = None, **kwargs) -> SigLIPExtractor:
    return SigLIPExtractor(model_name, **kwargs)


@register_extractor(uses_masks=True)
def siglip_mi_features(model_name: str | None = None, **kwargs) -> SigLIPMIExtractor:
    return SigLIPMIExtractor(model_name, **kwargs)


@register_extractor
def siglip2_features(model_name: str | None = None, **kwargs) -> SigLIP2Extractor:
    return SigLIP2Extractor(model_name, **kwargs)


@register_extractor(uses_masks=True)
def siglip2_mi_features(model_name: str | None = None, **kwargs) -> SigLIP2MIExtractor:
    return SigLIP2MIExtractor(model_name, **kwargs)


@register_extractor
def clip_features(model_name: str | None = None, **kwargs) -> CLIPExtractor:
    return CLIPExtractor(model_name, **kwargs)


@register_extractor(uses_masks=True)
def clip_mi_features(model_name: str | None = None, **kwargs) -> CLIPMIExtractor:
    return CLIPMIExtractor(model_name, **kwargs)
