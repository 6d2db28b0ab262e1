"""Config composition (hydra compose API) and the cross-key checks."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra.core.config_store import ConfigStore
from hydra.errors import ConfigCompositionException

from tests.pipeline import compose_config
from utils.config import CONFIG_GROUPS, RUN_KEYS, SoIRConfig, check_config, check_overrides, register
from utils.errors import SoIRError

CONFIGS = str(Path(__file__).resolve().parents[2] / "configs")
register()


def _compose(*overrides: str):
    return compose_config(*overrides)


def test_defaults_match_the_reference_table():
    cfg = _compose("anns_file=a.pt")
    assert (cfg.dataset, cfg.extractor, cfg.vec_dim, cfg.mi_alpha) == ("pe", "siglip_mi_features", 768, 0.03)
    assert (cfg.global_features, cfg.smart_crop, cfg.B_model, cfg.lora_adapt) == (True, False, True, False)
    assert (cfg.lora_rank, cfg.weights, cfg.captions_file, cfg.model_name) == (256, None, None, None)
    assert cfg.lora_alpha == 32  # the original's default: scaling 32/256 at rank 256
    # mi_iterations: null = 100 for the published code's descriptors, 80 for descriptor=mao (the extractor)
    assert (cfg.mi_iterations, cfg.mi_lr, cfg.mi_layer_index, cfg.index) == (None, 0.1, -1, "Flat")
    assert (cfg.descriptor, cfg.mao_overlap) == ("mi", "iou")
    assert (cfg.report, cfg.report_k, cfg.report_thumb_size, cfg.report_maps) == (True, 10, 160, False)
    check_config(cfg)


def test_misspelt_key_is_an_error_naming_it():
    with pytest.raises(ConfigCompositionException) as err:
        _compose("vecdim=512")
    assert "vecdim" in str(err.value) + str(err.value.__cause__)


@pytest.mark.parametrize(
    "override,message",
    [
        ("mi_alhpa=0.03", "mi_alhpa=0.03: unknown key 'mi_alhpa'; did you mean mi_alpha or mi_lr?"),
        # Hydra's own hint for the line above: appended silently, the run used the default mi_alpha
        ("+mi_alhpa=0.03", "+mi_alhpa=0.03: unknown key 'mi_alhpa'; did you mean mi_alpha or mi_lr?"),
        ("++mi_alhpa=0.03", "unknown key 'mi_alhpa'; did you mean mi_alpha"),
        ("extractr=clip_features", "did you mean extractor or query_extractor?"),
        ("vecdim=512", "did you mean vec_dim?"),
        ("mi_alhpa=0.01,0.03", "unknown key 'mi_alhpa'"),  # a sweep's values
        ("+mi_alpha=0.1", "+mi_alpha=0.1: mi_alpha is already a key; set it without the '+': mi_alpha=0.1"),
        ("qwerty=1", "unknown key 'qwerty'; no key is close"),
    ],
)
def test_unknown_keys_are_refused_naming_the_closest(override, message):
    """Fails on main 4e786ae (no check_overrides: `+mi_alhpa=0.03` composed and ran with mi_alpha's default)."""
    with pytest.raises(SoIRError) as err:
        check_overrides([override], SoIRConfig, CONFIG_GROUPS, "create_index.py")
    assert message in str(err.value) and "\n" not in str(err.value)
    assert "`python create_index.py --help` lists every key" in str(err.value) or "already a key" in message


def test_known_keys_groups_and_hydras_own_pass():
    check_overrides(
        [
            "mi_alpha=0.01,0.03",
            "++mi_alpha=0.1",
            "extractor=clip_features",
            "compat=original",
            "query_extractor_args.smart_crop=true",
            "hydra.sweep.dir=x",
            "hydra/launcher=basic",
            "~tag",
        ],
        SoIRConfig,
        CONFIG_GROUPS,
    )
    register()  # the extractor group is generated (utils/config.py:extractor_group), the others are folders
    stored = {group for group, entry in ConfigStore.instance().repo.items() if isinstance(entry, dict)} - {"hydra"}
    assert stored == {"extractor"}
    assert set(CONFIG_GROUPS) == {p.name for p in Path(CONFIGS).iterdir() if p.is_dir()} | stored


def test_a_device_torch_does_not_know_is_one_line():
    """Fails on main 4e786ae: device=gpu passed the checks and became an 8-frame torch RuntimeError."""
    from extractors.base import resolve_device

    with pytest.raises(SoIRError, match="device=gpu is not a device name: use auto .*, cpu, cuda or cuda:N"):
        check_config(_compose("anns_file=a.pt", "device=gpu"))
    with pytest.raises(SoIRError, match="device=gpu is not a device name"):
        resolve_device("gpu")  # the Python API and scripts/train_mao.py
    check_config(_compose("anns_file=a.pt", "device=cuda:1"))  # a name is checked, not the hardware


def test_wrong_type_is_an_error_naming_the_key():
    with pytest.raises(ConfigCompositionException) as err:
        _compose("vec_dim=large")
    assert "vec_dim" in str(err.value) + str(err.value.__cause__)
    with pytest.raises(ConfigCompositionException, match="Error merging override smart_crop=maybe") as err:
        _compose("smart_crop=maybe")
    assert "Value 'maybe' is not a valid bool" in str(err.value.__cause__)


def test_anns_file_is_required():
    from omegaconf.errors import MissingMandatoryValue

    with pytest.raises(MissingMandatoryValue, match="anns_file"):
        _ = _compose().anns_file


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["mi_sum=true", "avg_multiple_vecs=true"], "pick one"),
        (["mask_input=true", "query_mi=true"], "pick one"),
        (["crop=true", "no_query_crop=true"], "contradict"),
        (["mi_layer_index=0"], "mi_layer_index=0 must be negative"),
        (["weights=/x.ckpt"], "needs lora_adapt=true"),
        (["batch_size=0"], "batch_size=0 must be positive"),
        (["mi_beta=0.1", "smart_crop=true"], "mi_beta acts between the masks of one image"),
        (["report_k=0"], "report_k=0 must be positive"),
        (["report_thumb_size=8"], "report_thumb_size=8 must be in"),
        (["report=false", "report_maps=true"], "it needs report=true"),
        (["search_block_mb=0"], "search_block_mb=0.0 must be positive"),
        (["search=faiss", "search_candidates=0"], "search_candidates=0 must be positive"),
        (["stage=extract", "features_dir=f", "workers=2", "worker=2"], "worker=2 must lie in"),
        (["stage=index", "features_dir=f", "workers=2"], "workers=2 splits stage=extract"),
        (["stage=extract"], "stage=extract needs features_dir="),
    ],
)
def test_inconsistent_settings_are_refused(overrides, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        check_config(_compose("anns_file=a.pt", *overrides))


def test_masks_from_set_and_box_masks():
    cfg = _compose("anns_file=a.pt")
    assert (cfg.set, cfg.masks_from, cfg.box_masks) == (None, "captions", False)
    check_config(_compose("anns_file=a.pt", "set=RoboTools", "masks_from=anns", "box_masks=true"))
    with pytest.raises(ConfigCompositionException) as err:
        _compose("anns_file=a.pt", "masks_from=gt")
    assert "masks_from" in str(err.value) and "captions, anns" in str(err.value) + str(err.value.__cause__)
    for overrides, message in [
        (["masks_from=anns", "captions_file=c.pt"], "captions_file would be ignored"),
        (["box_masks=true"], "box_masks=true .* needs masks_from=anns"),
    ]:
        with pytest.raises(ValueError, match=message):
            check_config(_compose("anns_file=a.pt", *overrides))


# The original code's configs/defaults.yaml: its 51 keys at its defaults (../shared/reference/original-config-keys.md).
ORIGINAL_DEFAULTS = {
    "dataset": "custom_dataset",
    "run_type": "retrieval",
    "run_name": "experiment",
    "extractor": "dinov2_mi_features",
    "B_model": False,
    "vec_dim": 768,
    "global_features": False,
    "mi_alpha": 0.03,
    "mi_beta": 0.0,
    "mi_sum": False,
    "mi_iterations": 100,
    "mi_layer_index": -1,
    "lora_adapt": False,
    "lora_rank": 256,
    "lora_alpha": 32,
    "weights": None,
    "smart_crop": False,
    "dumb_crop": False,
    "crop": False,
    "mask_input": False,
    "full_mask": False,
    "no_center_crop": False,
    "no_query_crop": False,
    "no_gallery_crop": False,
    "no_resize": False,
    "anns_file": None,
    "captions_file": None,
    "gallery": None,
    "features_dir": None,
    "ds_inds_file": None,
    "k_search": 100,
    "max_k_search": 1000000,
    "save_knns": True,
    "experiment": None,
    "tag": "",
    "add_string": "",
    "debug": False,
    "only_create": False,
    "only_gallery": False,
    "rerank": False,
    "save_gallery_embeddings": False,
    "no_faiss": False,
    "avg_multiple_vecs": False,
    "single_from_sc": True,
    "read_dataset": True,
    "max_ds_index": None,
    "gallery_chunk_size": 10000,
    "subset": "all",
    "T2I": False,
    "query_extractor": None,
    "query_extractor_args": None,
}


def _override(key: str, value) -> str:
    return f"{key}=" + (
        "null"
        if value is None
        else "''"
        if value == ""
        else str(value).lower()
        if isinstance(value, bool)
        else str(value)
    )


def test_every_key_of_the_original_defaults_file_composes():
    from utils.config import resolve_aliases

    assert len(ORIGINAL_DEFAULTS) == 51
    cfg = _compose(*(_override(k, v) for k, v in ORIGINAL_DEFAULTS.items()))
    resolve_aliases(cfg)
    check_config(cfg)
    assert cfg.shard_size == 10000 and cfg.set is None  # gallery_chunk_size and subset are aliases
    assert (cfg.global_features, cfg.B_model, cfg.lora_alpha) == (False, False, 32)


@pytest.mark.parametrize(
    "key,value",
    [
        ("dumb_crop", "true"),
        ("no_center_crop", "true"),
        ("no_gallery_crop", "true"),
        ("no_resize", "true"),
        ("gallery", "x"),
        ("read_dataset", "false"),
        ("save_gallery_embeddings", "true"),
    ],
)
def test_keys_the_original_never_read_are_refused_at_other_values(key, value):
    with pytest.raises(SoIRError, match=f"{key}=.* the original code accepted this key but never read it"):
        check_config(_compose("anns_file=a.pt", f"{key}={value}"))


def test_compat_original_sets_each_switch_and_the_command_line_still_wins():
    cfg = _compose("anns_file=a.pt", "compat=original")
    assert (
        cfg.legrad_norm,
        cfg.missing_masks,
        cfg.mi_sum_loss,
        cfg.smart_crop_source,
        cfg.mi_resample,
        cfg.gallery_crop,
        cfg.no_positive,
        cfg.query_masks,
    ) == ("joint", "full_mask", "mean_dice", "resized", "original", True, "zero", "all")
    assert _compose("anns_file=a.pt", "compat=original", "no_positive=error").no_positive == "error"
    default = _compose("anns_file=a.pt")
    assert (default.legrad_norm, default.missing_masks, default.gallery_crop) == ("per_map", "error", False)


def test_aliases_of_the_original_and_their_conflicts():
    from utils.config import resolve_aliases

    cfg = _compose("anns_file=a.pt", "gallery_chunk_size=64", "subset=RoboTools")
    resolve_aliases(cfg)
    assert (cfg.shard_size, cfg.set) == (64, "RoboTools")
    with pytest.raises(SoIRError, match="gallery_chunk_size=64 .* and shard_size=32 disagree"):
        resolve_aliases(_compose("anns_file=a.pt", "gallery_chunk_size=64", "shard_size=32"))


def test_text_and_ad_hoc_query_keys():
    cfg = _compose("anns_file=a.pt", "T2I=true", "text_prompt='a picture of a {obj_name}, small'")
    check_config(cfg)  # T2I is implemented (it used to be refused)
    assert cfg.text_prompt.format(obj_name="mug") == "a picture of a mug, small"
    cfg = _compose("anns_file=a.pt", "query_image=q.jpg", "query_bbox=[1,2,30.5,40]", "query_mask=m.png")
    check_config(cfg)
    assert list(cfg.query_bbox) == [1, 2, 30.5, 40] and cfg.query_text is None
    check_config(_compose("anns_file=a.pt", "query_text='a red mug'"))
    for key in ("T2I", "text_prompt", "query_image", "query_bbox", "query_mask", "query_text", "query_exact_max_rows"):
        assert key in RUN_KEYS  # they change no stored feature


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["text_prompt='a photo'"], "must contain {obj_name}"),
        (["text_prompt='{obj_name} in {place}'"], "no other {field}"),
        (["query_text=' '"], "query_text is empty"),
        (["query_image=q.jpg", "query_text=mug"], "run one per search"),
        (["T2I=true", "query_text=mug"], "T2I=true evaluates the features folder's queries as texts"),
        (["query_bbox=[1,2,3,4]"], "query_bbox describes the object in query_image"),
        (["query_mask=m.png"], "query_mask describes the object in query_image"),
        (["query_image=q.jpg", "query_bbox=[1,2,3]"], "must be \\[x1,y1,x2,y2\\]"),
        (["query_exact_max_rows=-1"], "must be >= 0"),
    ],
)
def test_inconsistent_query_keys_are_refused(overrides, message):
    with pytest.raises(SoIRError, match=message):
        check_config(_compose("anns_file=a.pt", *overrides))


def test_choice_keys_are_enums_that_name_the_key_and_the_choices():
    with pytest.raises(ConfigCompositionException) as err:
        _compose("anns_file=a.pt", "legrad_norm=both")
    text = str(err.value) + str(err.value.__cause__)
    assert "legrad_norm" in text and "per_map, joint" in text
