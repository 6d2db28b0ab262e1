"""Config composition (hydra compose API) and the cross-key checks."""
from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ValidationError

from utils.config import check_config, register

CONFIGS = str(Path(__file__).resolve().parents[2] / "configs")
register()


def _compose(*overrides: str):
    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        return compose(config_name="defaults", overrides=list(overrides))


def test_defaults_match_the_reference_table():
    cfg = _compose("anns_file=a.pt")
    assert (cfg.dataset, cfg.extractor, cfg.vec_dim, cfg.mi_alpha) == ("pe", "siglip_mi_features", 768, 0.03)
    assert (cfg.global_features, cfg.smart_crop, cfg.B_model, cfg.lora_adapt) == (True, False, True, False)
    assert (cfg.lora_rank, cfg.weights, cfg.captions_file, cfg.model_name) == (256, None, None, None)
    assert cfg.lora_alpha == 32         # the original's default: scaling 32/256 at rank 256
    assert (cfg.mi_iterations, cfg.mi_lr, cfg.mi_layer_index, cfg.index) == (100, 0.1, -1, "Flat")
    assert (cfg.report, cfg.report_k, cfg.report_thumb_size, cfg.report_maps) == (True, 10, 160, False)
    check_config(cfg)


def test_misspelt_key_is_an_error_naming_it():
    with pytest.raises(ConfigCompositionException) as err:
        _compose("vecdim=512")
    assert "vecdim" in str(err.value) + str(err.value.__cause__)


def test_wrong_type_is_an_error_naming_the_key():
    with pytest.raises(ConfigCompositionException) as err:
        _compose("vec_dim=large")
    assert "vec_dim" in str(err.value) + str(err.value.__cause__)
    with pytest.raises((ConfigCompositionException, ValidationError)):
        _compose("smart_crop=maybe")


def test_anns_file_is_required():
    from omegaconf.errors import MissingMandatoryValue
    with pytest.raises(MissingMandatoryValue, match="anns_file"):
        _ = _compose().anns_file


@pytest.mark.parametrize("overrides,message", [
    (["global_features=false"], "global_features=false"),
    (["mi_sum=true", "avg_multiple_vecs=true"], "pick one"),
    (["missing_masks=skip"], "missing_masks='skip' is not one of error, global"),
    (["precision=fp8"], "precision='fp8'"),
    (["mi_layer_index=0"], "mi_layer_index=0 must be negative"),
    (["lora_adapt=true", "extractor=siglip_features"], "lora_adapt=true is for DINOv2 and CLIP"),
    (["weights=/x.ckpt"], "needs lora_adapt=true"),
    (["batch_size=0"], "batch_size=0 must be positive"),
    (["mi_beta=0.1", "smart_crop=true"], "mi_beta acts between the masks of one image"),
    (["report_k=0"], "report_k=0 must be positive"),
    (["report_thumb_size=8"], "report_thumb_size=8 must be in"),
    (["report=false", "report_maps=true"], "it needs report=true"),
])
def test_inconsistent_settings_are_refused(overrides, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        check_config(_compose("anns_file=a.pt", *overrides))


def test_masks_from_set_and_box_masks():
    cfg = _compose("anns_file=a.pt")
    assert (cfg.set, cfg.masks_from, cfg.box_masks) == (None, "captions", False)
    check_config(_compose("anns_file=a.pt", "set=RoboTools", "masks_from=anns", "box_masks=true"))
    for overrides, message in [(["masks_from=gt"], "masks_from='gt' is not one of captions, anns"),
                               (["masks_from=anns", "captions_file=c.pt"], "captions_file would be ignored"),
                               (["box_masks=true"], "box_masks=true .* needs masks_from=anns")]:
        with pytest.raises(ValueError, match=message):
            check_config(_compose("anns_file=a.pt", *overrides))
