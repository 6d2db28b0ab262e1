"""utils/families.py: the one table of backbone families, and everything keyed by it agrees with it."""

import subprocess
import sys
from pathlib import Path

import pytest
from hydra.core.config_store import ConfigStore
from torchvision.transforms import InterpolationMode
from transformers import AutoConfig

from datasets.preprocessing import NaFlexPreprocess
from extractors import list_extractors
from extractors.backbones import original_mi_resample, vision_model_class
from extractors.mi.vit_adapters import ADAPTERS
from extractors.registry import capabilities, extractor_class
from tests.pipeline import compose_config
from utils.config import default_vec_dim, extractor_group, register
from utils.errors import SoIRError
from utils.families import FAMILIES, MODEL_TYPES, family_spec, lora_families
from utils.pipeline.create import plan
from utils.testing.tiny_models import TINY_BUILDERS

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "configs"


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


def test_extractor_config_group_is_generated_from_the_table():
    """The ``extractor`` group holds one node per registered extractor (and only those), generated from
    the family table, none written by hand, each setting extractor and vec_dim to the family's default
    model: base, or large with B_model=false."""
    register()
    assert not (CONFIGS / "extractor").exists()  # a hand-written file would shadow a generated node
    stored = sorted(name.removesuffix(".yaml") for name in ConfigStore.instance().list("extractor"))
    assert stored == sorted(extractor_group()) == list_extractors()
    assert sorted(extractor_group()) == sorted(name for spec in FAMILIES.values() for name in spec.extractors)
    for name in stored:
        spec = FAMILIES[capabilities(name)["family"]]
        assert extractor_group()[name] == {"extractor": name, "vec_dim": f"${{soir_vec_dim:{spec.name},${{B_model}}}}"}
        cfg = _compose(f"extractor={name}")
        assert (cfg.extractor, cfg.vec_dim) == (name, spec.vec_dims["base"])
        assert _compose(f"extractor={name}", "B_model=false").vec_dim == spec.vec_dims.get(
            "large", spec.vec_dims["base"]
        )


def test_class_and_filter_names_resolve_to_the_familys_objects():
    """The table names classes and filters as strings; the models layer resolves them to the transformers
    class whose config.model_type is the family's, and to torchvision's filter."""
    for name, spec in FAMILIES.items():
        cls = vision_model_class(name)
        assert cls.__name__ == spec.model_class_name and cls.config_class.model_type in spec.model_types
    assert original_mi_resample("dinov2") is InterpolationMode.LANCZOS
    assert original_mi_resample("siglip") is original_mi_resample("clip") is InterpolationMode.BILINEAR
    assert [name for name, spec in FAMILIES.items() if spec.original] == ["dinov2", "siglip", "clip"]
    with pytest.raises(ValueError, match="original code had no dinov3 family"):
        original_mi_resample("dinov3")


def test_the_family_table_and_the_config_layer_import_nothing_heavy():
    """Fails before issue 28 part 4: utils/families.py imported transformers and torchvision classes, so
    every command paid for them before its settings were read."""
    code = (
        "import sys, utils.families, utils.config; "
        "print(sorted(m for m in ('torch', 'torchvision', 'transformers', 'faiss', 'numpy') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


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
