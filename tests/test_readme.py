"""README.md documents every configuration key that exists, and no key that does not.

The keys are read from the first column of the tables under "## Configuration reference" (every
backticked name in that cell: ``run_type`` / ``run_name`` and the original's aliases such as
"(or the original's ``subset``)" count) and, for scripts/train_mao.py, of the "key | default |
meaning" table under "## Training MaO adapters". They are compared with the schemas the code
validates against: ``utils.config.SoIRConfig`` (plus the config groups of configs/defaults.yaml) and
``utils.training.trainer.TrainConfig``.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import yaml

from utils.config import UNREAD_ORIGINAL_KEYS, SoIRConfig
from utils.training.trainer import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def section(text: str, heading: str) -> str:
    """The text of the level-2 section ``## <heading>``, up to the next level-2 heading."""
    match = re.search(rf"^## {re.escape(heading)}\n(.*?)(?=^## |\Z)", text, flags=re.S | re.M)
    assert match, f"README.md has no section '## {heading}'"
    return match.group(1)


def table_keys(text: str) -> set[str]:
    """Backticked names in the first column of the ``| key | default | meaning |`` tables of ``text``."""
    keys, in_table = set(), False
    for line in text.splitlines():
        if re.match(r"^\|\s*key\s*\|\s*default\s*\|\s*meaning\s*\|", line):
            in_table = True
            continue
        if not line.startswith("|"):
            in_table = False
            continue
        if in_table and not re.match(r"^\|[\s|:-]+\|$", line):
            first_cell = line.split("|")[1]
            keys.update(re.findall(r"`([A-Za-z_][A-Za-z0-9_]*)`", first_cell))
    return keys


def config_groups() -> set[str]:
    """Config groups chosen in configs/defaults.yaml's defaults list (``extractor``, ``compat``)."""
    defaults = yaml.safe_load((ROOT / "configs" / "defaults.yaml").read_text())["defaults"]
    return {next(iter(entry)) for entry in defaults if isinstance(entry, dict)}


def unread_original_keys(text: str) -> set[str]:
    """The keys named in the sentence on the original's keys that its code never read."""
    match = re.search(r"Keys of the original's config that its code never read \((.*?)\)", text, flags=re.S)
    assert match, "the configuration reference no longer lists the original's unread keys"
    return set(re.findall(r"`([A-Za-z_][A-Za-z0-9_]*)`", match.group(1)))


def assert_same(documented: set[str], schema: set[str], where: str) -> None:
    missing, extra = sorted(schema - documented), sorted(documented - schema)
    assert not missing and not extra, (
        f"{where}: keys missing from README.md: {missing}; README.md documents keys that do not exist: {extra}"
    )


def test_table_keys_reads_names_and_aliases_and_skips_other_tables():
    text = (
        "| key | default | meaning |\n|---|---|---|\n| `a` / `b_2` | `1` | x `not_a_key` |\n"
        "| `set` (or the original's `subset`) | `null` | y |\n\n| option | default | meaning |\n"
        "|---|---|---|\n| `--flag` | 1 | z |\n| `other` | 1 | z |\n"
    )
    assert table_keys(text) == {"a", "b_2", "set", "subset"}


def test_configuration_reference_documents_exactly_the_schema():
    reference = section(README, "Configuration reference")
    _reference_check(reference)
    assert_same(unread_original_keys(reference), set(UNREAD_ORIGINAL_KEYS), "the original's unread keys")


def test_training_section_documents_exactly_train_config():
    training = section(README, "Training MaO adapters")
    assert_same(table_keys(training), {f.name for f in dataclasses.fields(TrainConfig)}, "Training MaO adapters")


def _reference_check(text: str) -> None:
    schema = {f.name for f in dataclasses.fields(SoIRConfig)} - set(UNREAD_ORIGINAL_KEYS)
    assert_same(table_keys(text), schema | config_groups(), "Configuration reference")


@pytest.mark.parametrize("name", ["dataset", "mi_alpha", "search_nprobe"])
def test_a_missing_key_is_caught(name):
    """Dropping one key's row from the reference makes the check fail, naming the key."""
    reference = section(README, "Configuration reference")
    rows = [line for line in reference.splitlines() if not line.startswith(f"| `{name}` |")]
    assert len(rows) == len(reference.splitlines()) - 1
    with pytest.raises(AssertionError, match=f"missing from README.md: \\['{name}'\\]"):
        _reference_check("\n".join(rows))


def test_a_key_that_does_not_exist_is_caught():
    reference = section(README, "Configuration reference").replace(
        "| `mi_alpha` |", "| `mi_gamma` | `0` | no such key |\n| `mi_alpha` |"
    )
    with pytest.raises(AssertionError, match=r"do not exist: \['mi_gamma'\]"):
        _reference_check(reference)
