"""The extractors of each backbone family, plain and with Mask Inversion, and their registry entries.

What a family is (model class, model types, default checkpoints, vec_dim, LoRA) is data in
utils/families.py; a class here only names its family (and SigLIP2 its NaFlex preprocessing). The
fixed-resolution SigLIP2 checkpoints (e.g. google/siglip2-base-patch16-224) are SigLIP models
(model_type "siglip"): use the siglip extractors.
"""

from __future__ import annotations

from datasets.preprocessing import NaFlexPreprocess
from extractors.base import Extractor
from extractors.mask_inversion import MIExtractor
from extractors.registry import register_extractor


class DINOv2Extractor(Extractor):
    family = "dinov2"


class DINOv2RegExtractor(Extractor):
    family = "dinov2reg"


class DINOv3Extractor(Extractor):
    family = "dinov3"


class SigLIPExtractor(Extractor):
    family = "siglip"


class SigLIP2Extractor(Extractor):
    """SigLIP2 NaFlex: each image at its own aspect ratio, as a patch sequence (NaFlexPreprocess)."""

    family = "siglip2"
    preprocess_class = NaFlexPreprocess


class CLIPExtractor(Extractor):
    family = "clip"


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
