"""README.md and docs/*.md tell the truth about the code, and hold together as pages.

- docs/training.md's "key | default | meaning" table documents exactly the keys of
  ``utils.training.trainer.TrainConfig``. (docs/configuration.md is generated from the schema:
  tests/utils/test_settings.py checks it equals the generated text and documents exactly the schema.)
- The README is a front door: at most 250 lines, linking every page of docs/.
- Every relative link of the README and of docs/ leads to a file that exists, and a ``#section`` to a
  heading of that file (GitHub's anchors).
- The commands of the README and of docs/getting-started.md use only keys and flags that exist: the
  Hydra overrides of create_index.py / search_index.py compose against the schema, the argparse
  scripts parse them, and the README's first "own images" command runs as written.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import re
import shlex
from pathlib import Path

import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir
from PIL import Image

from example.create_annotations import main as create_annotations_main
from scripts.create_masked_dataset import parse_args as create_masked_dataset_args
from utils.config import CONFIG_GROUPS, SoIRConfig, check_overrides, register
from utils.training.trainer import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
PAGES = sorted(DOCS.glob("*.md"))
TRAINING = (DOCS / "training.md").read_text()
README_MAX_LINES = 250


def section(text: str, heading: str, where: str = "docs/configuration.md") -> str:
    """The text of the level-2 section ``## <heading>``, up to the next level-2 heading."""
    match = re.search(rf"^## {re.escape(heading)}\n(.*?)(?=^## |\Z)", text, flags=re.S | re.M)
    assert match, f"{where} has no section '## {heading}'"
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


def assert_same(documented: set[str], schema: set[str], where: str, page: str = "docs/configuration.md") -> None:
    missing, extra = sorted(schema - documented), sorted(documented - schema)
    assert not missing and not extra, (
        f"{where}: keys missing from {page}: {missing}; {page} documents keys that do not exist: {extra}"
    )


def test_table_keys_reads_names_and_aliases_and_skips_other_tables():
    text = (
        "| key | default | meaning |\n|---|---|---|\n| `a` / `b_2` | `1` | x `not_a_key` |\n"
        "| `set` (or the original's `subset`) | `null` | y |\n\n| option | default | meaning |\n"
        "|---|---|---|\n| `--flag` | 1 | z |\n| `other` | 1 | z |\n"
    )
    assert table_keys(text) == {"a", "b_2", "set", "subset"}


def test_training_page_documents_exactly_train_config():
    assert_same(
        table_keys(TRAINING),
        {f.name for f in dataclasses.fields(TrainConfig)},
        "Training MaO adapters",
        page="docs/training.md",
    )


# --------------------------------------------------------------------------------------------------
# The README as a front door, and the links between the pages
# --------------------------------------------------------------------------------------------------
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def without_code(text: str) -> str:
    """``text`` with its fenced code blocks and inline code blanked (links there are not links)."""
    text = re.sub(r"^ *```.*?^ *```", "", text, flags=re.S | re.M)
    return re.sub(r"`[^`\n]*`", "", text)


def relative_links(text: str) -> list[str]:
    """The link targets of ``text`` that are not web addresses (``page.md``, ``../x.png#part``)."""
    return [t for t in LINK.findall(without_code(text)) if not re.match(r"^[a-z]+:", t)]


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, every character that is not a letter, digit, space,
    hyphen or underscore dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(text: str) -> set[str]:
    """The ``#anchors`` of a Markdown file's headings (a repeated heading gets ``-1``, ``-2`` ...)."""
    seen: dict[str, int] = {}
    found = set()
    for heading in re.findall(r"^#{1,6} (.+)$", re.sub(r"^ *```.*?^ *```", "", text, flags=re.S | re.M), flags=re.M):
        base = slug(heading)
        found.add(base if base not in seen else f"{base}-{seen[base]}")
        seen[base] = seen.get(base, 0) + 1
    return found


def broken_links(page: Path) -> list[str]:
    """The relative links of ``page`` whose file does not exist, or whose ``#anchor`` names no heading."""
    broken = []
    for target in relative_links(page.read_text()):
        file, _, anchor = target.partition("#")
        path = (page.parent / file).resolve() if file else page
        if not path.exists():
            broken.append(f"{target} (no file {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path})")
        elif anchor and path.suffix == ".md" and anchor not in anchors(path.read_text()):
            broken.append(f"{target} (no heading with anchor #{anchor} in {path.name})")
    return broken


def test_the_readme_is_a_front_door():
    lines = README.read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; move detail into docs/"


def test_every_docs_page_is_linked_from_the_readme():
    linked = {(ROOT / t.partition("#")[0]).resolve() for t in relative_links(README.read_text())}
    assert len(PAGES) >= 16  # the pages of issue 22 plus docs/interop.md
    missing = [page.name for page in PAGES if page.resolve() not in linked]
    assert not missing, f"docs pages not linked from README.md: {missing}"


@pytest.mark.parametrize("page", [README, *PAGES], ids=lambda p: p.name)
def test_every_relative_link_resolves(page):
    assert not broken_links(page), f"{page.relative_to(ROOT)}: broken links {broken_links(page)}"


def test_slug_and_anchors_follow_github():
    assert slug("Install (fresh machine, Python 3.11 + pip)") == "install-fresh-machine-python-311--pip"
    assert slug("Object masks: `scripts/create_masked_dataset.py`") == "object-masks-scriptscreate_masked_datasetpy"
    assert slug("1. Prepare a benchmark") == "1-prepare-a-benchmark"
    assert anchors("# A\n## B b\n```\n# not a heading\n```\n## B b\n") == {"a", "b-b", "b-b-1"}


def test_a_broken_link_is_caught(tmp_path):
    """A missing file, a missing heading and an image are each found; code and web links are not links."""
    (tmp_path / "other.md").write_text("# Other\n## Its part\n")
    (tmp_path / "pic.png").write_bytes(b"")
    page = tmp_path / "page.md"
    page.write_text(
        "# Page\n[ok](other.md#its-part) [ok](#page) ![ok](pic.png) [web](https://example.com/x.md)\n"
        "[gone](gone.md) [bad part](other.md#no-part) ![gone](gone.png) `[code](code.md)`\n"
        "```\n[block](block.md)\n```\n"
    )
    assert broken_links(page) == [
        f"gone.md (no file {tmp_path / 'gone.md'})",
        "other.md#no-part (no heading with anchor #no-part in other.md)",
        f"gone.png (no file {tmp_path / 'gone.png'})",
    ]


# --------------------------------------------------------------------------------------------------
# The commands of the README and of the getting-started page
# --------------------------------------------------------------------------------------------------
HYDRA_SCRIPTS = {"create_index.py", "search_index.py"}


def python_commands(text: str) -> list[list[str]]:
    """Every ``python <script>.py ...`` command of the ``bash`` blocks of ``text``, as argv (script
    first), continuation lines joined, comments dropped."""
    commands = []
    for block in re.findall(r"^```bash\n(.*?)^```", text, flags=re.S | re.M):
        for line in block.replace("\\\n", " ").splitlines():
            argv = shlex.split(line, comments=True)
            for start in (i for i, word in enumerate(argv) if word == "python" and i + 1 < len(argv)):
                if argv[start + 1].endswith(".py"):
                    commands.append(argv[start + 1 :])
    return commands


def check_command(argv: list[str], cwd: Path) -> None:
    """Fail unless ``argv`` (script first) uses only keys / flags its script has."""
    script, args = argv[0], argv[1:]
    if script in HYDRA_SCRIPTS:
        check_overrides(args, SoIRConfig, sorted(CONFIG_GROUPS), script)  # unknown key: SoIRError
        register()
        with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
            compose(config_name="defaults", overrides=args)  # wrong types fail here
    elif script == "scripts/create_masked_dataset.py":
        create_masked_dataset_args(args)  # an unknown flag exits (argparse)
    elif script == "example/create_annotations.py":
        run_create_annotations(args, cwd)
    else:
        raise AssertionError(f"no check for the commands of {script}: add one to tests/test_readme.py")


def run_create_annotations(args: list[str], cwd: Path) -> dict:
    """Run example/create_annotations.py with ``args`` in ``cwd`` (its paths are relative) on a
    two-instance layout made under its ``--root``; return the anns.pt it wrote."""
    root = cwd / args[args.index("--root") + 1]
    for key in ("queries/mug/q.jpg", "queries/toy/q.jpg", "gallery/mug/g.jpg", "gallery/toy/t.jpg"):
        (root / key).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8)).save(root / key)
    with contextlib.chdir(cwd):
        create_annotations_main(args)
    return torch.load(cwd / args[args.index("--out") + 1], weights_only=True)


@pytest.mark.parametrize("page", [README, DOCS / "getting-started.md"], ids=lambda p: p.name)
def test_the_pages_commands_use_only_existing_keys_and_flags(page, tmp_path):
    commands = python_commands(page.read_text())
    scripts = {argv[0] for argv in commands}
    assert "create_index.py" in scripts and "search_index.py" in scripts, scripts
    for argv in commands:
        check_command(argv, tmp_path)


def test_the_readmes_own_images_commands():
    """The four commands: annotations, masks, features, search, with the scripts that exist today."""
    block = section(README.read_text(), "Your own images in four commands", where="README.md")
    assert [argv[0] for argv in python_commands(block)] == [
        "example/create_annotations.py",
        "scripts/create_masked_dataset.py",
        "create_index.py",
        "search_index.py",
    ]


def test_the_readmes_first_own_images_command_writes_anns(tmp_path):
    argv = python_commands(section(README.read_text(), "Your own images in four commands", where="README.md"))[0]
    anns = run_create_annotations(argv[1:], tmp_path)
    assert anns == {
        "gallery/mug/g.jpg": {"ins": [0], "is_query": False, "obj_name": "mug"},
        "gallery/toy/t.jpg": {"ins": [1], "is_query": False, "obj_name": "toy"},
        "queries/mug/q.jpg": {"ins": 0, "is_query": True, "obj_name": "mug"},
        "queries/toy/q.jpg": {"ins": 1, "is_query": True, "obj_name": "toy"},
    }


def test_an_invented_key_or_flag_is_caught(tmp_path, capsys):
    with pytest.raises(Exception, match="unknown key 'mi_alhpa'; did you mean mi_alpha"):
        check_command(["create_index.py", "mi_alhpa=0.03"], tmp_path)
    with pytest.raises(Exception, match="query_bbox"):
        check_command(["search_index.py", "query_bbox=not_a_list"], tmp_path)
    masks = ["scripts/create_masked_dataset.py", "--input_dir", "x", "--output_dir", "y", "--sam_checkpoint", "z"]
    check_command(masks, tmp_path)
    with pytest.raises(SystemExit):
        check_command([*masks, "--no_such_flag"], tmp_path)
    assert "unrecognized arguments: --no_such_flag" in capsys.readouterr().err
    with pytest.raises(AssertionError, match="no check for the commands of scripts/other.py"):
        check_command(["scripts/other.py"], tmp_path)


# --------------------------------------------------------------------------------------------------
# What the code tells users to read
# --------------------------------------------------------------------------------------------------
CODE_PLACES = [
    "create_index.py",
    "search_index.py",
    "configs",
    "utils",
    "extractors",
    "datasets",
    "scripts",
    "benchmarks",
    "example",
    "requirements-cluster.txt",
    "requirements-interop.txt",
    ".ci",
]


def code_files() -> list[Path]:
    files = []
    for place in map(ROOT.joinpath, CODE_PLACES):
        candidates = [place] if place.is_file() else sorted(place.rglob("*"))
        files += [
            p for p in candidates if p.is_file() and (p.suffix in {".py", ".yaml", ".txt", ".sh"} or p.name == "run")
        ]
    return files


def stale_pointers(text: str) -> list[str]:
    """Pointers to a README section (which moved to docs/) and to docs pages that do not exist."""
    stale = re.findall(r"README(?:'s|,)? \"[^\"]+\"", text)
    return stale + [page for page in re.findall(r"docs/[\w-]+\.md", text) if not (ROOT / page).is_file()]


def test_the_code_points_to_docs_pages_that_exist():
    files = code_files()
    assert ROOT / "configs" / "defaults.yaml" in files and ROOT / "utils" / "config.py" in files
    stale = {str(p.relative_to(ROOT)): stale_pointers(p.read_text()) for p in files}
    bad = {k: v for k, v in stale.items() if v}
    assert not bad, f"point users to the docs/ page instead: {bad}"
    footer = yaml.safe_load((ROOT / "configs" / "defaults.yaml").read_text())["hydra"]["help"]["footer"]
    assert "docs/configuration.md" in footer  # what `--help` tells a user to read


def test_a_stale_pointer_is_caught():
    assert stale_pointers('stages (README "Scaling out"); README, "Reports"; docs/speed.md; docs/nope.md') == [
        'README "Scaling out"',
        'README, "Reports"',
        "docs/nope.md",
    ]
    assert stale_pointers("as the original README's ``extract(image)``") == []


def test_the_readmes_four_own_images_commands_run_as_written(tmp_path, demo_dir, tiny_model_dirs):
    """The README's "Your own images in four commands", run in order as written, offline: the demo's
    images laid out per instance, and only what a machine without the hub needs added to each command
    (the tiny random OWLv2 / SAM / SigLIP in place of the real checkpoints, fewer MI steps, the
    features folder step 3 printed in place of its `...`). Each step reads what the one before wrote."""
    from scripts import create_masked_dataset
    from tests.pipeline import features_dir_from, run_main
    from utils.testing.tiny_models import save_tiny_owlv2, save_tiny_sam

    commands = python_commands(section(README.read_text(), "Your own images in four commands", where="README.md"))
    anns = torch.load(demo_dir / "anns.pt", weights_only=False)
    names = {a["ins"]: a["obj_name"] for a in anns.values() if a["is_query"]}  # instance id -> folder name
    for key, entry in anns.items():  # my_data/{queries,gallery}/<instance>/<file>, as the README asks
        instances = [entry["ins"]] if entry["is_query"] else entry["ins"]
        folder = names[instances[0]] if instances else "_distractors"
        target = tmp_path / "my_data" / key.split("/")[0] / folder / Path(key).name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes((demo_dir / key).read_bytes())
    checkpoint, sam_config = save_tiny_sam(tmp_path / "models" / "sam")
    owlv2 = save_tiny_owlv2(tmp_path / "models" / "owlv2")
    # the README's photo.jpg: a query image, large enough for the README's query_bbox
    Image.open(tmp_path / "my_data" / "queries" / names[0] / "q_000.jpg").resize((320, 320)).save(
        tmp_path / "photo.jpg"
    )

    annotations, masks, features, search = commands
    with contextlib.chdir(tmp_path):
        create_annotations_main(annotations[1:])
        masks = [a if a != "/path/to/sam_vit_b_01ec64.pth" else str(checkpoint) for a in masks[1:]]
        assert create_masked_dataset.main([*masks, "--owlv2_model", str(owlv2), "--sam_config", str(sam_config)]) == 0
    tiny = [f"model_name={tiny_model_dirs['siglip']}", "vec_dim=32", "mi_iterations=3", "device=cpu"]
    indexed = run_main(features[0], *features[1:], *tiny, cwd=tmp_path)
    folder = features_dir_from(indexed, tmp_path)
    assert folder.parent == tmp_path / "outputs" / "features" / "mine" and "mAP" in indexed.stdout
    asked = [a.replace("siglip_mi_features-...", folder.name) for a in search[1:]]
    assert f"features_dir=outputs/features/mine/{folder.name}" in asked
    answer = run_main(search[0], *asked, "device=cpu", cwd=tmp_path)
    ranked = json.loads((Path(answer.stdout.split("results: ")[1].strip()) / "results.json").read_text())
    gallery = {str(p.relative_to(tmp_path / "my_data")) for p in (tmp_path / "my_data" / "gallery").rglob("*.jpg")}
    assert len(gallery) == sum(not a["is_query"] for a in anns.values())
    # k_search=20 over a 16-image gallery: every gallery image, once, best first
    assert [hit["rank"] for hit in ranked["ranking"]] == list(range(1, len(gallery) + 1))
    assert {hit["key"] for hit in ranked["ranking"]} == gallery
