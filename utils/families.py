"""What a backbone family is, as data: one :class:`FamilySpec` row per family.

Everything that differs between families and can be written down as data lives in :data:`FAMILIES`:
the Hugging Face class to load, the ``config.model_type`` values it accepts, the default checkpoints
and their embedding sizes, where the embedding size is read, LoRA's target modules, and what the
original research code did for it. Code reads this table; nothing parses extractor names.

The one piece of code per family is its adapter in ``extractors/mi/vit_adapters.py`` (where q/k/v/o, the
LayerNorms, the MLP and the head are), registered in ``vit_adapters.ADAPTERS`` under the same name.
The extractor classes (``extractors/families.py``), the Hydra ``extractor`` group (its nodes
``<name>_features`` / ``<name>_mi_features`` are generated from this table by
``utils/config.py:register_extractor_group``) and the tiny test models (``scripts/make_tiny_models.py``) are
keyed by the same name; ``tests/utils/test_families.py`` checks they all agree with this table.
See docs/architecture.md, "Adding a backbone".

This module imports nothing from SoIR and nothing heavy: classes and resampling filters are named by
strings and resolved only when a model is built (``extractors/backbones.py``: :func:`vision_model_class`,
:func:`original_mi_resample`), so the config layer (the CLIs' ``--help``, the Hydra ``extractor`` group
generated from this table) reads it without importing torch, torchvision or transformers.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class OriginalCode:
    """What the original research code did for a family (``compat=original`` reproduces it).

    mi_resample: the resampling of the image on its MI path (``mi_resample=original``), as the value of a
        ``torchvision.transforms.InterpolationMode`` ("lanczos", "bilinear").
    smart_crop_pad_pixels: its smart-crop padding in input pixels; None: int(0.1 x the box's longer side)
        (``smart_crop_source=resized``).
    mi_sum_mean_dice: its ``mi_sum`` fitted one vector to the mean of the per-mask Dice terms
        (``mi_sum_loss=mean_dice``) instead of inverting the union of the masks.
    min_max_eps: added to the range of its LeGrad min-max (``legrad_norm=joint``): CLIP 1e-6
        (original ``extractors/mi/engine.py:18-24``, used at ``:1394``), DINOv2 / SigLIP 0.
    map_patch_size: the factor its LeGrad maps were upsampled by (``pixel_geometry=original``): SigLIP
        16 whatever the checkpoint's patch (original ``extractors/mi/engine.py:850``); None: the model's.
    reads_alpha_sum: its extractor passes ``alpha_sum`` / ``alpha_sum_full`` to its ``mi_sum``
        (DINOv2 only; the others hard-code 0).
    """

    mi_resample: str
    smart_crop_pad_pixels: int | None
    mi_sum_mean_dice: bool
    min_max_eps: float = 0.0
    map_patch_size: int | None = None
    reads_alpha_sum: bool = False


@dataclass(frozen=True)
class FamilySpec:
    """One backbone family.

    name: the family's name; extractors ``<name>_features`` and ``<name>_mi_features``.
    model_class_name: the name, in ``transformers``, of the class loaded for the vision tower
        (``from_pretrained``); ``extractors.backbones.vision_model_class`` resolves it.
    model_types: the ``config.model_type`` values of checkpoints of this family (a whole SigLIP / CLIP
        checkpoint and its vision tower have different ones).
    default_models: hub ids, ``{"base": ..., "large": ...}`` (``B_model=false`` picks "large").
    vec_dims: embedding size (``vec_dim``) of each default model, same keys.
    dim_key: the config attribute that holds the embedding size of any checkpoint.
    lora_targets: module names LoRA adapts (q/k/v); empty: LoRA is refused for this family.
    original: what the original code did for it; None: the original code had no such family.
    naflex: images enter as patch sequences at their own aspect ratio (SigLIP2 NaFlex).
    cls_token: the vision tower has a CLS token (``pool=cls``); the SigLIPs pool with an attention head.
    """

    name: str
    model_class_name: str
    model_types: tuple[str, ...]
    default_models: dict[str, str]
    vec_dims: dict[str, int]
    dim_key: str = "hidden_size"
    lora_targets: tuple[str, ...] = ()
    original: OriginalCode | None = None
    naflex: bool = False
    cls_token: bool = True

    @property
    def supports_lora(self) -> bool:
        return bool(self.lora_targets)

    @property
    def extractors(self) -> tuple[str, str]:
        """Its two extractors' names: the plain embedding and Mask Inversion (``extractor=``)."""
        return f"{self.name}_features", f"{self.name}_mi_features"


_QKV = ("q_proj", "k_proj", "v_proj")  # DINOv2 and CLIP attention in transformers 5.x

FAMILIES: dict[str, FamilySpec] = {
    spec.name: spec
    for spec in (
        FamilySpec(
            "dinov2",
            "Dinov2Model",
            ("dinov2",),
            {"base": "facebook/dinov2-base", "large": "facebook/dinov2-large"},
            {"base": 768, "large": 1024},
            lora_targets=_QKV,
            original=OriginalCode("lanczos", None, False, reads_alpha_sum=True),
        ),
        FamilySpec(
            "dinov2reg",
            "Dinov2WithRegistersModel",
            ("dinov2_with_registers",),
            {"base": "facebook/dinov2-with-registers-base", "large": "facebook/dinov2-with-registers-large"},
            {"base": 768, "large": 1024},
        ),
        FamilySpec(
            "dinov3",
            "DINOv3ViTModel",
            ("dinov3_vit",),
            {"base": "facebook/dinov3-vitb16-pretrain-lvd1689m", "large": "facebook/dinov3-vitl16-pretrain-lvd1689m"},
            {"base": 768, "large": 1024},
        ),
        FamilySpec(
            "siglip",
            "SiglipVisionModel",
            ("siglip", "siglip_vision_model"),
            {"base": "google/siglip-base-patch16-384", "large": "google/siglip-so400m-patch14-384"},
            {"base": 768, "large": 1152},
            original=OriginalCode("bilinear", 5, True, map_patch_size=16),
            cls_token=False,
        ),
        FamilySpec(
            "siglip2",
            "Siglip2VisionModel",
            ("siglip2", "siglip2_vision_model"),
            {"base": "google/siglip2-base-patch16-naflex", "large": "google/siglip2-so400m-patch16-naflex"},
            {"base": 768, "large": 1152},
            naflex=True,
            cls_token=False,
        ),
        FamilySpec(
            "clip",
            "CLIPVisionModelWithProjection",
            ("clip", "clip_vision_model"),
            {"base": "openai/clip-vit-base-patch16"},
            {"base": 512},
            dim_key="projection_dim",
            lora_targets=_QKV,
            original=OriginalCode("bilinear", 5, True, min_max_eps=1e-6),
        ),
    )
}

# config.model_type -> family name
MODEL_TYPES: dict[str, str] = {model_type: spec.name for spec in FAMILIES.values() for model_type in spec.model_types}


def family_spec(name: str) -> FamilySpec:
    """The spec of family ``name``; ValueError naming the known families otherwise."""
    if name not in FAMILIES:
        raise ValueError(f"unknown backbone family {name!r}; known: {', '.join(FAMILIES)}")
    return FAMILIES[name]


def lora_families() -> list[str]:
    """Families whose extractors load LoRA adapters (``lora_adapt=true``)."""
    return [name for name, spec in FAMILIES.items() if spec.supports_lora]
