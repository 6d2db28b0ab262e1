"""utils/families.py: the one table of backbone families, and everything keyed by it agrees with it."""

from pathlib import Path

import pytest
from transformers import AutoConfig

from create_index import plan
from extractors import list_extractors
from extractors.registry import capabilities, extractor_class
from scripts.make_tiny_models import TINY_BUILDERS
from tests.pipeline import compose_config
from utils.config import default_vec_dim
from utils.errors import SoIRError
from utils.families import FAMILIES, MODEL_TYPES, family_spec, lora_families
from datasets.preprocessing import NaFlexPreprocess
from extractors.mi.vit_adapters import ADAPTERS

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def _compose(*overrides: str):
    return compose_config("anns_file=a.pt", *overrides)


def test_every_family_has_its_adapter_extractors_and_tiny_model():
    assert set(ADAPTERS) == set(FAMILIES) == set(TINY_BUILDERS)
    for name, spec in FAMILIES.items():
        assert extractor_class(f"{name}_features").family == name
        assert extractor_class(f"{name}_mi_features").family == name
        assert set(spec.default_models) == set(spec.vec_dims) and "base" in spec.default_models
    assert len(list_extractors()) == 2 * len(FAMILIES)
    for name in list_extractors():  # NaFlex families read patch sequences
        cls = extractor_class(name)
        assert (cls.preprocess_class is NaFlexPreprocess) == FAMILIES[cls.family].naflex


def test_tiny_checkpoints_are_recognised_by_their_model_type(tiny_model_dirs):
    """A whole checkpoint's config.model_type (e.g. "clip", not "clip_vision_model") picks its family."""
    for name, folder in tiny_model_dirs.items():
        model_type = AutoConfig.from_pretrained(folder).model_type
        assert model_type in family_spec(name).model_types and MODEL_TYPES[model_type] == name


def test_extractor_config_group_matches_the_registry():
    """configs/extractor/<name>.yaml exists for every registered extractor (and only those) and sets
    vec_dim to the family's default model: base, or large with B_model=false."""
    files = sorted(p.stem for p in (CONFIGS / "extractor").glob("*.yaml"))
    assert files == list_extractors()
    for name in files:
        spec = FAMILIES[capabilities(name)["family"]]
        cfg = _compose(f"extractor={name}")
        assert (cfg.extractor, cfg.vec_dim) == (name, spec.vec_dims["base"])
        assert _compose(f"extractor={name}", "B_model=false").vec_dim == spec.vec_dims.get(
            "large", spec.vec_dims["base"]
        )


def test_extractor_alone_sets_vec_dim_and_an_explicit_vec_dim_wins():
    assert _compose().vec_dim == 768  # siglip_mi_features
    assert _compose("extractor=clip_mi_features").vec_dim == 512
    assert _compose("extractor=siglip_mi_features", "B_model=false").vec_dim == 1152
    assert _compose("extractor=dinov2_mi_features", "vec_dim=1024").vec_dim == 1024  # original commands
    assert default_vec_dim("clip", False) == 512  # no large CLIP: the base one


def test_unknown_extractor_lists_the_config_group():
    from hydra.errors import MissingConfigException

    with pytest.raises(MissingConfigException, match="extractor/nope") as err:
        _compose("extractor=nope")
    assert "dinov3_mi_features" in str(err.value)  # the choices are listed


def test_lora_support_comes_from_the_spec():
    assert lora_families() == ["dinov2", "clip"]
    assert capabilities("dinov2reg_mi_features")["supports_lora"] is False  # no name parsing: not "dinov2*"
    assert capabilities("clip_features")["supports_lora"] is True


@pytest.mark.parametrize("extractor", ["siglip_features", "dinov2reg_mi_features"])
def test_lora_on_a_family_without_it_is_refused_before_reading_anything(extractor):
    cfg = _compose(f"extractor={extractor}", "lora_adapt=true", "weights=/nonexistent/lora.ckpt")
    with pytest.raises(SoIRError, match=f"lora_adapt=true: {extractor} has no LoRA support.*dinov2, clip"):
        plan(cfg)
