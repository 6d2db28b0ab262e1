"""Loading HF vision backbones (the family's class and checks from utils/families.py)."""

from __future__ import annotations

import logging

import torch
import transformers
from torch import nn
from torchvision.transforms import InterpolationMode
from transformers import AutoConfig
from transformers.utils import logging as hf_logging

from utils.errors import SoIRError
from utils.families import MODEL_TYPES, family_spec
from utils.hub import check_model_available, hf_offline

log = logging.getLogger("soir.extractors")


# utils/families.py names classes and filters by strings (the config layer reads that table without
# torch); these two functions are where the strings become objects, when a model is built.
def vision_model_class(family: str) -> type[transformers.PreTrainedModel]:
    """The transformers class of ``family``'s vision tower (``FamilySpec.model_class_name``)."""
    return getattr(transformers, family_spec(family).model_class_name)


def original_mi_resample(family: str) -> InterpolationMode:
    """The resampling filter of the original code's MI path for ``family`` (``mi_resample=original``);
    ValueError for a family the original code did not have."""
    original = family_spec(family).original
    if original is None:
        raise ValueError(f"the original code had no {family} family, so no mi_resample of its own")
    return InterpolationMode(original.mi_resample)


def load_backbone(
    family: str, model_name: str, attn_implementation: str = "sdpa", model_class: type | None = None
) -> nn.Module:
    """``from_pretrained`` on a hub id or local folder; returns the frozen model in eval mode.

    ``attn_implementation="eager"`` is needed when attention probabilities must be observed
    (Mask Inversion); "sdpa" is faster for plain embeddings. ``model_class``: another tower of the
    family's checkpoint (the text tower, extractors/text.py); None = the family's vision model.
    """
    check_model_available(model_name, f"{family} model")
    offline = hf_offline()
    verbosity = hf_logging.get_verbosity()
    # transformers logs a table of every unexpected key (a hub SigLIP / CLIP checkpoint holds the
    # text tower too); missing weights, the case that matters, are checked below.
    hf_logging.set_verbosity_error()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a "Loading weights" bar per model is noise in our logs
    try:
        # float32 whatever the checkpoint's dtype: reduced precision is the `precision` option's job.
        model, info = (model_class or vision_model_class(family)).from_pretrained(
            model_name, attn_implementation=attn_implementation, dtype=torch.float32, output_loading_info=True
        )
    except OSError as err:
        hint = " (HF_HUB_OFFLINE is set: use a local folder or a cached model)" if offline else ""
        raise SoIRError(f"cannot load {family} model {model_name!r}{hint}: {err}") from None
    except (RuntimeError, ValueError) as err:  # e.g. tensors of other shapes: another architecture or size
        raise SoIRError(
            _other_family(model_name, family, _model_type(model_name))
            or f"{model_name!r} does not fit a {family} model: {str(err).splitlines()[0]}"
        ) from None
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
    # transformers only warns when weights are missing and initialises them at random; a backbone
    # with random layers would give plausible-looking but meaningless features.
    missing = sorted(info["missing_keys"]) + sorted(k for k, *_ in info.get("mismatched_keys", []))
    if missing:
        raise SoIRError(
            f"{model_name!r} is not a {family} checkpoint: {len(missing)} weights missing or "
            f"mismatched (e.g. {missing[:3]}); check extractor= and model_name="
        )
    # A checkpoint of a related family can load with all weights present (a DINOv2-with-registers
    # folder into Dinov2Model: the register tokens are just unused), giving wrong features silently.
    wrong = _other_family(model_name, family, model.config.model_type)
    if wrong:
        raise SoIRError(wrong)
    return model.eval().requires_grad_(False)


def _model_type(model_name: str) -> str | None:
    """config.model_type of a checkpoint, or None if its config cannot be read."""
    try:
        return AutoConfig.from_pretrained(model_name).model_type
    except (OSError, ValueError):
        return None


def _other_family(model_name: str, family: str, model_type: str | None) -> str | None:
    """The refusal for a checkpoint whose model_type belongs to another known family, else None."""
    other = MODEL_TYPES.get(model_type)
    if other is None or other == family:
        return None
    return (
        f"{model_name!r} is a {other} checkpoint (config.model_type={model_type!r}), not {family}; use the "
        f"{other}_features / {other}_mi_features extractors"
    )


def embedding_dim(model: nn.Module, family: str) -> int:
    """Size of the global embedding of ``model`` as declared by its config."""
    return int(getattr(model.config, family_spec(family).dim_key))
