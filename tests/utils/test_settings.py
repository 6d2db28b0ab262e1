"""The settings groups of utils/config.py: one place per setting, the key sets derived from it, and the
reference (``--help``, docs/configuration.md) generated from it."""

from __future__ import annotations

import dataclasses
import inspect
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.test_readme import table_keys
from utils.config import (
    DOCS_PATH,
    MI_ITERATIONS,
    MI_ONLY_KEYS,
    MODEL_KEYS,
    NEEDS_MI_KEYS,
    QUERY_KEYS,
    REPORTED_MI_KEYS,
    RUN_KEYS,
    SETTINGS_GROUPS,
    UNREAD_ORIGINAL_KEYS,
    LoRASettings,
    MISettings,
    Plain,
    Role,
    SoIRConfig,
    docs_markdown,
    help_text,
    sums_masks,
)
from utils.errors import SoIRError

ROOT = Path(__file__).resolve().parents[2]
FIELDS = {f.name: f for f in dataclasses.fields(SoIRConfig)}


def config_groups() -> set[str]:
    """Config groups chosen in configs/defaults.yaml's defaults list (``extractor``, ``compat``)."""
    defaults = yaml.safe_load((ROOT / "configs" / "defaults.yaml").read_text())["defaults"]
    return {next(iter(entry)) for entry in defaults if isinstance(entry, dict)}


def unread_original_keys(text: str) -> set[str]:
    """The keys named in the sentence on the original's keys that its code never read."""
    match = re.search(r"Keys of the original's config that its code never read \((.*?)\)", text, flags=re.S)
    assert match, "the configuration reference no longer lists the original's unread keys"
    return set(re.findall(r"`([A-Za-z_][A-Za-z0-9_]*)`", match.group(1)))


def test_every_key_sits_in_exactly_one_group_with_help_and_role():
    names = [f.name for group in SETTINGS_GROUPS for f in dataclasses.fields(group)]
    assert len(names) == len(set(names)) == len(FIELDS)
    assert names == list(FIELDS)  # the schema's order is the groups'
    for field in FIELDS.values():
        assert isinstance(field.metadata["role"], Role), field.name
        help = field.metadata["help"]
        assert help.strip() and "\n" not in help and help == help.strip(), field.name


def test_derived_key_sets():
    """The facts the hand-kept sets held (the derived sets were checked equal to them, 79 run keys, 10
    query keys, 24 MI-only keys of which 9 refused, 13 reported MI keys, when they replaced them). No
    count is pinned here: adding a setting must not need an edit of this test."""
    # names, search settings, input paths and the model's name change no stored feature
    assert {"dataset", "tag", "k_search", "search", "anns_file", "captions_file", "report_k"} <= RUN_KEYS
    assert MODEL_KEYS == {"model_name", "B_model", "lora_adapt", "lora_rank", "lora_alpha", "weights"}
    assert MODEL_KEYS <= RUN_KEYS and set(UNREAD_ORIGINAL_KEYS) <= RUN_KEYS
    # the query inputs are run keys too (their files are hashed); the query-only keys change the queries
    assert QUERY_KEYS & RUN_KEYS == {"queries_dir", "query_captions_file"}
    assert {"mask_input", "query_mi", "query_masks", "crop", "no_query_crop", "query_extractor"} <= QUERY_KEYS
    # every other key changes the gallery features
    for key in ("extractor", "mi_alpha", "mi_lr", "mi_iterations", "mi_sum", "smart_crop", "batch_size", "pool"):
        assert key not in RUN_KEYS | QUERY_KEYS and FIELDS[key].metadata["role"] is Role.FEATURES
    assert UNREAD_ORIGINAL_KEYS == {
        "dumb_crop": False,
        "no_center_crop": False,
        "no_gallery_crop": False,
        "no_resize": False,
        "gallery": None,
        "read_dataset": True,
        "save_gallery_embeddings": False,
    }
    # a plain extractor logs an MI hyperparameter it ignores and refuses a setting that changes its output
    assert NEEDS_MI_KEYS < MI_ONLY_KEYS and FIELDS["mi_alpha"].metadata["plain"] is Plain.LOGGED
    assert {"mi_sum", "full_mask", "smart_crop", "descriptor", "mask_input"} <= NEEDS_MI_KEYS
    assert {"mi_alpha", "mi_sum", "smart_crop_pad", "missing_masks", "descriptor"} <= set(REPORTED_MI_KEYS)


def test_a_changed_role_changes_the_derived_sets():
    """The sets follow the metadata: a group whose key is declared a query key moves it."""
    from utils.config import keys_where, setting

    @dataclasses.dataclass
    class Probe:
        mi_gamma: float = setting(0.5, "probe", Role.QUERY)

    probe = dataclasses.fields(Probe)[0]
    assert probe.default == 0.5 and probe.metadata["role"] is Role.QUERY and probe.metadata["doc"] == "probe"
    assert "mi_gamma" not in keys_where(lambda m: m["role"] is Role.QUERY)  # only SoIRConfig's fields count


# A literal default repeated outside utils/config.py: the key, the names it goes by, the literal.
DEFAULT_COPIES = {
    "mi_alpha": (r"mi_alpha|alpha", r"0\.03", MISettings.mi_alpha == 0.03),
    "mi_lr": (r"mi_lr|lr", r"0\.1", MISettings.mi_lr == 0.1),
    "mi_iterations": (r"mi_iterations|iterations", r"(?:100|80)", MI_ITERATIONS == {"mi": 100, "mao": 80}),
    "smart_crop_pad": (r"smart_crop_pad|crop_pad|pad", r"0\.1", MISettings.smart_crop_pad == 0.1),
    "lora_rank": (r"lora_rank|rank", r"256", LoRASettings.lora_rank == 256),
    "lora_alpha": (r"lora_alpha|alpha", r"32(?:\.0)?", LoRASettings.lora_alpha == 32),
    "gem_p": (r"gem_p|p", r"3\.0", FIELDS["gem_p"].default == 3.0),
    "rmac_levels": (r"rmac_levels|levels", r"3", FIELDS["rmac_levels"].default == 3),
    "batch_size": (r"batch_size", r"16", FIELDS["batch_size"].default == 16),
    "shard_size": (r"shard_size", r"512", FIELDS["shard_size"].default == 512),
    "report_k": (r"report_k", r"10", FIELDS["report_k"].default == 10),
    "report_thumb_size": (r"report_thumb_size|thumb_size", r"160", FIELDS["report_thumb_size"].default == 160),
    "search_nprobe": (r"search_nprobe|nprobe", r"16", FIELDS["search_nprobe"].default == 16),
    "search_block_mb": (r"search_block_mb|block_mb", r"256", FIELDS["search_block_mb"].default == 256),
    "rerank_alpha": (r"rerank_alpha", r"3\.0", FIELDS["rerank_alpha"].default == 3.0),
    "rerank_k": (r"rerank_k", r"2", FIELDS["rerank_k"].default == 2),
    "text_prompt": (
        r"text_prompt",
        r"[\"']a photo of \{obj_name\}[\"']",
        FIELDS["text_prompt"].default == "a photo of {obj_name}",
    ),
}
# extractors/mi/reference.py is the engine's independent yardstick (it imports nothing from utils/): its
# defaults are checked equal to the schema's below instead.
NOT_SCANNED = {"utils/config.py", "extractors/mi/reference.py"}


def default_copies(text: str) -> list[str]:
    """The keys of DEFAULT_COPIES whose literal default ``text`` assigns or passes (``alpha=0.03``,
    ``lora_rank: int = 256``, ``("mi_lr", float, 0.1)``)."""
    found = []
    for key, (names, literal, _) in DEFAULT_COPIES.items():
        pattern = rf"\b(?:{names})\b[\"']?\s*(?::[^=,\n]*)?[=,]\s*(?:\w+,\s*)?{literal}(?![\w.])"
        if re.search(pattern, text):
            found.append(key)
    return found


def test_the_copy_finder_finds_copies():
    assert default_copies("    mi_alpha: float = 0.03,") == ["mi_alpha"]
    assert default_copies('        ("mi_lr", float, 0.1),') == ["mi_lr"]
    assert default_copies("    lora_rank: int = 256") == ["lora_rank"]
    assert default_copies("DEFAULT_ALPHA = 32.0") == []  # a name of its own: found by its use instead
    assert default_copies("    lora_alpha: float = 32") == ["lora_alpha"]
    assert default_copies("def f(alpha=0.03, iterations=80):") == ["mi_alpha", "mi_iterations"]
    assert default_copies("    pad: float = 0.1") == ["smart_crop_pad"]
    assert default_copies("    alpha: float = MISettings.mi_alpha,  # 0.03 in the paper") == []
    assert default_copies("TEXT_BATCH = 256") == [] and default_copies("lr = 0.01") == []
    assert default_copies('    text_prompt: str = "a photo of {obj_name}"') == ["text_prompt"]
    assert default_copies("def rmac(x, levels: int = 3):") == ["rmac_levels"]


def test_no_literal_default_is_repeated_outside_the_schema():
    assert all(ok for *_, ok in DEFAULT_COPIES.values())  # the literals above are the schema's defaults
    copies = []
    for path in sorted(ROOT.rglob("*.py")):
        relative = path.relative_to(ROOT).as_posix()
        if relative.startswith((".venv/", "tests/", "outputs/")) or relative in NOT_SCANNED:
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            copies += [f"{relative}:{number}: {key}: {line.strip()}" for key in default_copies(line)]
    assert not copies, "literal defaults repeated outside utils/config.py (use the settings groups):\n" + "\n".join(
        copies
    )


def test_the_reference_implementation_uses_the_schema_defaults():
    from extractors.mi.reference import reference_mao, reference_mask_inversion

    plain, mao = inspect.signature(reference_mask_inversion).parameters, inspect.signature(reference_mao).parameters
    assert (plain["alpha"].default, plain["lr"].default) == (MISettings.mi_alpha, MISettings.mi_lr)
    assert (mao["alpha"].default, mao["lr"].default) == (MISettings.mi_alpha, MISettings.mi_lr)
    assert (plain["iterations"].default, mao["iterations"].default) == (MI_ITERATIONS["mi"], MI_ITERATIONS["mao"])


def test_consumers_take_their_defaults_from_the_settings_groups(monkeypatch):
    """The notebook constructors' and the engine's keyword defaults are the schema's (not copies)."""
    from extractors import SigLIPMIExtractor
    from extractors.base import Extractor
    from extractors.mi.engine import mask_inversion
    from utils.training.trainer import TrainConfig

    mi = inspect.signature(SigLIPMIExtractor.__init__).parameters
    for key in ("mi_alpha", "mi_beta", "mi_lr", "mi_iterations", "mi_layer_index", "smart_crop_pad", "mi_sum"):
        assert mi[key].default == FIELDS[key].default, key
    base = inspect.signature(Extractor.__init__).parameters
    for key in ("lora_rank", "lora_alpha", "batch_size", "pool", "gem_p", "device", "precision"):
        assert base[key].default == FIELDS[key].default, key
    engine = inspect.signature(mask_inversion).parameters
    assert (engine["alpha"].default, engine["lr"].default, engine["iterations"].default) == (0.03, 0.1, 100)
    train = TrainConfig(anns_file="a.pt")
    assert (train.lora_rank, train.lora_alpha, train.crop_pad) == (256, 32, 0.1)


@pytest.mark.parametrize(
    "mi_sum,smart_crop,single_from_sc,expected",
    [(True, True, True, False), (True, False, True, True), (False, True, False, False)],
)
def test_the_mi_sum_smart_crop_rule(mi_sum, smart_crop, single_from_sc, expected):
    assert sums_masks(mi_sum, smart_crop, single_from_sc) is expected


def test_the_mi_sum_smart_crop_rule_is_written_once():
    with pytest.raises(SoIRError, match="mi_sum=true smart_crop=true single_from_sc=false is ill-defined"):
        sums_masks(True, True, False)
    writers = [
        path.relative_to(ROOT).as_posix()
        for path in ROOT.rglob("*.py")
        if not path.relative_to(ROOT).as_posix().startswith((".venv/", "tests/"))
        and "single_from_sc=false is ill-defined" in path.read_text()
    ]
    assert writers == ["utils/config.py"]


def test_help_lists_every_key_with_its_default_and_help_by_group():
    text = help_text()
    for group in SETTINGS_GROUPS:
        assert f"\n{group.__doc__.splitlines()[0].rstrip('.')}:\n" in text
    for name, field in FIELDS.items():
        assert field.metadata["help"] in text, name
    assert re.search(r"^  mi_alpha=0\.03 +pull towards the global embedding$", text, flags=re.M)
    assert re.search(r"^  text_prompt='a photo of \{obj_name\}' +T2I: ", text, flags=re.M)
    assert re.search(r"^  anns_file=required +anns\.pt", text, flags=re.M)


@pytest.mark.parametrize("script", ["search_index.py", "create_index.py"])
def test_the_scripts_help_prints_the_generated_list(script):
    out = subprocess.run(
        [sys.executable, script, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=300, check=True
    ).stdout
    assert out.startswith(f"== SoIR: Small Object Image Retrieval ==\nUsage: python {script.removesuffix('.py')}.py")
    assert help_text().strip() in out and "docs/configuration.md" in out


def test_committed_configuration_docs_are_the_generated_ones():
    assert DOCS_PATH.read_text() == docs_markdown(), (
        "docs/configuration.md differs from utils/config.py's settings: run python -m utils.config --write-docs"
    )


def test_write_docs_rewrites_its_own_page_and_never_a_users(tmp_path, monkeypatch, capsys):
    """--write-docs replaces a page it wrote (the generated-page line is there); a file without that line
    (a hand-written page at that path) is refused in one line and left as it was."""
    import utils.config

    page = tmp_path / "configuration.md"
    monkeypatch.setattr(utils.config, "DOCS_PATH", page)
    page.write_text("# my own notes\n")
    with pytest.raises(SystemExit, match="was not written by --write-docs"):
        utils.config.main(["--write-docs"])
    assert page.read_text() == "# my own notes\n"
    page.write_text(utils.config.DOCS_MARK + "\nan older generated page\n")
    utils.config.main(["--write-docs"])
    assert (
        page.read_text() == docs_markdown() and f"wrote configuration.md: {len(FIELDS)} keys" in capsys.readouterr().out
    )


def test_configuration_docs_document_exactly_the_schema():
    text = docs_markdown()
    assert table_keys(text) == (set(FIELDS) - set(UNREAD_ORIGINAL_KEYS)) | config_groups()
    assert unread_original_keys(text) == set(UNREAD_ORIGINAL_KEYS)
    assert "| `set` (or the original's `subset`) | `null` |" in text  # aliases on their SoIR name's row
    assert (
        "| `mi_alpha` | `0.03` | weight of `1 - cos(e, g)`, the pull towards the global embedding | gallery features |"
        in text
    )
    assert "| `mi_beta` | `0.0` | weight of the mean \\|cos\\| between different masks of one image |" in text
