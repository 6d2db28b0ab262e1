"""The reliability suite (issue 20): nothing lost, nothing mixed, everywhere.

One test per case of the issue, each failing on main 4e786ae: a writer that replaced a user's files,
a resumable output that mixed two models or inputs, an input that gave wrong numbers without a word,
a refusal that was a traceback. User files are checked by their sha256 before and after.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from tests.pipeline import ROOT, compose_config
from tests.scripts.test_create_masked_dataset import _base_args, _folder
from utils.errors import SoIRError


def user_files(folder: Path, files: dict[str, bytes]) -> dict[Path, str]:
    """Write a user's ``files`` (relative path -> bytes) under ``folder``; returns {path: sha256}."""
    for name, data in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    return fingerprints(folder / name for name in files)


def fingerprints(paths) -> dict[Path, str]:
    return {Path(p): hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in paths}


def assert_untouched(before: dict[Path, str]) -> None:
    assert fingerprints(before) == before


@pytest.fixture(scope="module")
def mask_models(tmp_path_factory) -> dict[str, Path]:
    """Tiny random OWLv2 and SAM, as tests/scripts/test_create_masked_dataset.py's ``models``."""
    from utils.testing.tiny_models import save_tiny_owlv2, save_tiny_sam

    root = tmp_path_factory.mktemp("mask_models")
    checkpoint, sam_config = save_tiny_sam(root / "sam")
    return {"owlv2": save_tiny_owlv2(root / "owlv2"), "sam": checkpoint, "sam_config": sam_config}


def config(*overrides: str):
    return compose_config(*overrides)


# --------------------------------------------------------------------------------- 1-5: lose data
def test_1_search_refuses_a_run_folder_with_a_users_files(clip_demo_features, tmp_path):
    """search() (search_index.py, create_index.py's search phase, stage=search) into a ``hydra.run.dir``
    that holds a user's report.html, thumbs/ and results.json: refused, nothing replaced, nothing added.
    Fails on main 4e786ae (exit 0, all three replaced)."""
    from utils.pipeline.search import search

    _, folder = clip_demo_features
    run = tmp_path / "U"
    before = user_files(run, {"report.html": b"<p>mine</p>", "thumbs/g000000.jpg": b"jpeg", "results.json": b"{}"})
    (run / ".hydra").mkdir()  # what Hydra writes before main() does not make the folder SoIR's
    with pytest.raises(SoIRError, match="not made by SoIR"):
        search(config(f"features_dir={folder}"), folder, run)
    assert_untouched(before)
    assert sorted(p.name for p in run.iterdir()) == [".hydra", "report.html", "results.json", "thumbs"]

    # A SoIR run folder is reused only while it holds no results: a second search there is refused too.
    fresh = tmp_path / "fresh"
    search(config(f"features_dir={folder}", "report=false"), folder, fresh)
    first = fingerprints(p for p in fresh.rglob("*") if p.is_file())
    with pytest.raises(SoIRError, match="already holds another run's results"):
        search(config(f"features_dir={folder}", "report=false", "k_search=2"), folder, fresh)
    assert_untouched(first)


def test_1_create_index_refuses_the_run_folder_before_extracting(tiny_model_dirs, demo_dir, tmp_path):
    """create_index.py stage=all with ``hydra.run.dir`` at a user's folder: refused in one line before any
    model is loaded or features are written (Hydra's run folder, made by Hydra's run_job in this process).
    Fails on main 4e786ae (exit 0; report.html and results.json replaced)."""
    from tests.pipeline import run_main

    run = tmp_path / "U"
    before = user_files(run, {"report.html": b"<p>mine</p>", "results.json": b"{}"})
    proc = run_main(
        "create_index.py",
        "extractor=clip_features",
        f"model_name={tiny_model_dirs['clip']}",
        "vec_dim=24",
        f"anns_file={demo_dir / 'anns.pt'}",
        f"features_dir={tmp_path / 'features'}",
        f"hydra.run.dir={run}",
        cwd=tmp_path,
        check=False,
    )
    assert proc.returncode == 1 and "not made by SoIR" in proc.stderr and "Traceback" not in proc.stderr
    assert_untouched(before)
    assert not (tmp_path / "features").exists()


def test_2_make_demo_dataset_never_deletes_a_users_files(tmp_path):
    """``make_demo_dataset.py --out U --overwrite`` where U holds a user's gallery/IMG_0001.jpg and anns.pt:
    refused ("not made by SoIR"), both files kept; without the flag the refusal no longer claims the folder
    "already holds a dataset". Fails on main 4e786ae (shutil.rmtree removed both)."""
    from scripts.make_demo_dataset import main

    out = tmp_path / "U"
    before = user_files(out, {"gallery/IMG_0001.jpg": b"x\n", "anns.pt": b"x\n"})
    for extra in (["--overwrite"], []):
        with pytest.raises(SystemExit, match="not made by SoIR") as refused:
            main(["--out", str(out), "--num_objects", "1", "--gallery_per_object", "1", "--image_size", "128", *extra])
        assert "already holds a dataset" not in str(refused.value)
        assert_untouched(before)
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == [
        "anns.pt",
        "gallery",
        "gallery/IMG_0001.jpg",
    ]


def test_3_make_tiny_models_never_replaces_a_users_model(tmp_path, monkeypatch):
    """``make_tiny_models.py --out U`` where U/clip/ holds a user's model.safetensors and config.json:
    refused in one line, both kept. Fails on main 4e786ae (replaced by random weights, exit 0)."""
    from scripts.make_tiny_models import main

    before = user_files(tmp_path / "U", {"clip/model.safetensors": b"weights", "clip/config.json": b"{}"})
    monkeypatch.setattr("sys.argv", ["make_tiny_models.py", "--out", str(tmp_path / "U")])
    with pytest.raises(SystemExit, match="not made by SoIR"):
        main()
    assert_untouched(before)
    assert sorted(p.name for p in (tmp_path / "U").rglob("*")) == ["clip", "config.json", "model.safetensors"]


@pytest.mark.parametrize("out", ["gallery/mug/b.jpg", "anns.pt"])
def test_4_create_annotations_never_replaces_an_existing_file(tmp_path, out):
    """``example/create_annotations.py --root R --out R/gallery/mug/b.jpg`` (a JPEG) or ``--out R/anns.pt``
    (a hand-made one): refused in one line, the file kept. Fails on main 4e786ae (both became torch zips)."""
    from example.create_annotations import main

    before = user_files(
        tmp_path, {"queries/mug/a.jpg": b"\xff\xd8 query", "gallery/mug/b.jpg": b"\xff\xd8 gallery", "anns.pt": b"mine"}
    )
    with pytest.raises(SystemExit, match="already exists; SoIR does not replace files"):
        main(["--root", str(tmp_path), "--out", str(tmp_path / out)])
    assert_untouched(before)


def test_5_mask_overwrite_checks_the_checkpoint_before_deleting_the_run(mask_models, tmp_path, capsys):
    """``create_masked_dataset.py ... --overwrite`` with a --sam_checkpoint that cannot be loaded: one
    line, and the complete earlier run (captions.pt, shards, run_config.json) is kept.
    Fails on main 4e786ae (all three deleted before the checkpoint was read)."""
    from scripts import create_masked_dataset as cmd

    images, out = _folder(tmp_path / "images", 3), tmp_path / "masks"
    assert cmd.main(_base_args(mask_models, images, out, "--shard_size", "3")) == 0
    kept = fingerprints([out / "captions.pt", out / "run_config.json", out / "shards" / "shard_000000.pt"])
    broken = tmp_path / "broken" / "sam.pth"
    user_files(broken.parent, {"sam.pth": b"not a checkpoint"})
    args = _base_args(mask_models, images, out, "--shard_size", "3", "--overwrite")
    args[args.index("--sam_checkpoint") + 1] = str(broken)
    capsys.readouterr()
    assert cmd.main(args) == 1
    assert "sam.pth" in capsys.readouterr().err
    assert_untouched(kept)


# ------------------------------------------------------------------------------ 6-11: mix silently


def _masked_half(mask_models, images: Path, out: Path, checkpoint: Path) -> list[str]:
    """create_masked_dataset.py's first of two shards (3 images each) with ``checkpoint``; returns the args."""
    from scripts import create_masked_dataset as cmd

    args = _base_args(mask_models, images, out, "--shard_size", "3")
    args[args.index("--sam_checkpoint") + 1] = str(checkpoint)
    assert cmd.main([*args, "--max_shards", "1"]) == 0
    assert [p.name for p in (out / "shards").iterdir()] == ["shard_000000.pt"]
    return args


def test_6_mask_folder_does_not_resume_with_another_sam(mask_models, tmp_path, capsys):
    """A mask folder half made with X/sam.pth, then X/sam.pth replaced by another SAM: the rerun is refused
    (the checkpoint's sha256 differs), not resumed. Fails on main 4e786ae ("resuming: 1 of 2 shards
    already done", exit 0, captions.pt with masks of two models)."""
    import shutil

    from scripts import create_masked_dataset as cmd
    from utils.hub import model_weights_identity
    from utils.testing.tiny_models import save_tiny_sam

    images, out, checkpoint = _folder(tmp_path / "images", 6), tmp_path / "masks", tmp_path / "X" / "sam.pth"
    checkpoint.parent.mkdir()
    shutil.copy(mask_models["sam"], checkpoint)
    args = _masked_half(mask_models, images, out, checkpoint)
    # OWLv2 is pinned by its weights too (a local folder: the sha256 of its files), not by the name given.
    owlv2 = json.loads((out / "run_config.json").read_text())["owlv2_weights"]
    assert owlv2["model_files_sha256"] == model_weights_identity(str(mask_models["owlv2"]))["model_files_sha256"]
    other, _ = save_tiny_sam(tmp_path / "other_sam", seed=1)
    shutil.copy(other, checkpoint)
    capsys.readouterr()
    assert cmd.main(args) == 1
    err = capsys.readouterr().err
    assert "made with other settings or inputs" in err and "sam_checkpoint_sha256" in err
    assert not (out / "captions.pt").exists() and not (out / "shards" / "shard_000001.pt").exists()


def test_7_mask_folder_does_not_keep_stale_masks_of_an_edited_image(mask_models, tmp_path, capsys):
    """A mask folder half made, then one of its images edited (same name, other pixels): the rerun is
    refused (images_sha256 hashes the image bytes). Fails on main 4e786ae (it resumed with the old
    image's masks)."""
    from scripts import create_masked_dataset as cmd

    images, out = _folder(tmp_path / "images", 6), tmp_path / "masks"
    args = _masked_half(mask_models, images, out, mask_models["sam"])
    _folder(images, 1, seed=99)  # img_00.png: new pixels
    capsys.readouterr()
    assert cmd.main(args) == 1
    assert "images_sha256" in capsys.readouterr().err
    assert not (out / "captions.pt").exists()


def test_8_training_does_not_resume_after_the_base_model_or_an_image_changed(tiny_model_dirs, demo_dir, tmp_path):
    """train_mao.py's identity (what decides whether ``last.ckpt`` is resumed) holds the base model's weights
    by content and every image's bytes: the model folder rewritten with other weights, or one image
    edited, is another run and is refused. Fails on main 4e786ae (the identity held the folder's path
    only: "resuming ... at step 4" with other weights)."""
    import shutil

    from scripts.train_mao import train_identity
    from utils.files import check_identity
    from utils.testing.tiny_models import save_tiny_dinov2

    data, model = tmp_path / "data", tmp_path / "model"
    shutil.copytree(demo_dir, data)
    shutil.copytree(tiny_model_dirs["dinov2"], model)
    cfg = compose_config(
        f"anns_file={data / 'anns.pt'}",
        f"captions_file={data / 'captions.pt'}",
        f"model_name={model}",
        config_name="train",
    )
    saved = tmp_path / "run" / "identity.json"
    check_identity(saved, train_identity(cfg), "a training run", fix="use another output_dir")
    check_identity(saved, train_identity(cfg), "a training run", fix="use another output_dir")  # the same run

    save_tiny_dinov2(model, seed=1)  # other weights under the same path
    with pytest.raises(SoIRError, match="other settings or inputs \\(model_weights\\)"):
        check_identity(saved, train_identity(cfg), "a training run", fix="use another output_dir")
    save_tiny_dinov2(model, seed=0)  # the original weights again: the same run
    check_identity(saved, train_identity(cfg), "a training run", fix="use another output_dir")

    image = next((data / "gallery").glob("*.jpg"))
    image.write_bytes(image.read_bytes()[:-64] + bytes(64))  # other pixels, same name
    with pytest.raises(SoIRError, match="other settings or inputs \\(images_sha256: "):
        check_identity(saved, train_identity(cfg), "a training run", fix="use another output_dir")


def test_9_features_folder_without_its_identity_is_refused_not_adopted(tmp_path):
    """A features folder whose identity.json was deleted is refused (with the fix) when another model's
    run opens it; its gallery shards are never adopted. Fails on main 4e786ae (the new identity was
    saved and shards 0-1 of model A were kept next to model B's shard 2)."""
    from utils.retrieval.feature_store import FeaturesFolder

    root = tmp_path / "features"
    with FeaturesFolder(root).open({"model": "A"}, {"model": "A", "q": 1}, "cfg"):
        (root / "gallery").mkdir()
        (root / "gallery" / "shard-00000.safetensors").write_bytes(b"model A's features")
    (root / "identity.json").unlink()
    before = fingerprints([root / "gallery" / "shard-00000.safetensors"])
    with pytest.raises(SoIRError, match="holds features .*shard-00000.safetensors.* but no identity.json"):
        FeaturesFolder(root).open({"model": "B"}, {"model": "B", "q": 1}, "cfg")
    assert_untouched(before)
    assert not (root / "identity.json").exists()


def test_10_staged_runs_notice_an_image_edited_after_prepare(tiny_model_dirs, demo_dir, tmp_path):
    """create_index.py stage=prepare, then one gallery image edited: stage=extract and stage=index refuse
    it (naming the image) instead of writing features of the new pixels under prepare's gallery_sha256.
    Fails on main 4e786ae (extract, index and search all succeeded)."""
    import shutil

    from utils.config import check_config, resolve_aliases
    from utils.pipeline.create import build, extract, prepare

    data = tmp_path / "data"
    shutil.copytree(demo_dir, data)

    def staged(stage: str):
        cfg = config(
            "extractor=clip_features",
            f"model_name={tiny_model_dirs['clip']}",
            "vec_dim=24",
            f"anns_file={data / 'anns.pt'}",
            f"features_dir={tmp_path / 'features'}",
            f"stage={stage}",
            "num_workers=0",
            "shard_size=5",
            "device=cpu",
        )
        resolve_aliases(cfg)
        check_config(cfg)
        return cfg

    prepare(staged("prepare"))
    image = sorted((data / "gallery").glob("*.jpg"))[0]
    original = image.read_bytes()
    image.write_bytes(original[:-64] + bytes(64))
    with pytest.raises(SoIRError, match=f"{image.name} changed since stage=prepare"):
        extract(staged("extract"))
    assert not list((tmp_path / "features" / "gallery").glob("shard-*.safetensors"))

    image.write_bytes(original)  # restored: the stages run
    extract(staged("extract"))
    image.write_bytes(original[:-64] + bytes(64))  # edited after extract: the index is refused
    with pytest.raises(SoIRError, match=f"{image.name} changed since stage=prepare"):
        build(staged("index"))
    assert not (tmp_path / "features" / "summary.json").exists()


def test_11_weights_hash_cache_sees_a_file_rewritten_in_place_with_its_mtime_restored(tmp_path):
    """The sha256 cache (utils.files.FileFacts) behind every weights and image identity: a checkpoint
    rewritten in place (same size, same inode) with its mtime set back is hashed again (its ctime moved).
    Fails on main 4e786ae (the old sha256 came back from the cache: two models' features mixed)."""
    import os

    from utils.files import cached_sha256

    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"A" * 4096)
    first = cached_sha256([weights])[0]
    st = weights.stat()
    with open(weights, "r+b") as handle:  # in place: the inode stays
        handle.write(b"B" * 4096)
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (weights.stat().st_size, weights.stat().st_mtime_ns, weights.stat().st_ino) == (
        st.st_size,
        st.st_mtime_ns,
        st.st_ino,
    )
    assert cached_sha256([weights])[0] == hashlib.sha256(b"B" * 4096).hexdigest() != first


# --------------------------------------------------------------------- 12-14: wrong numbers, no word
@pytest.mark.parametrize("how", ["same file", "symlink", "copy"])
def test_12_a_query_that_is_also_a_gallery_image_is_refused(demo_dir, tmp_path, how):
    """A query image that is also a gallery image (the same file under a query key, a symlink to it, a
    byte-identical copy) is refused before any model loads: it would retrieve itself. Fails on main
    4e786ae (accepted)."""
    import os
    import shutil

    import torch

    from datasets import save_anns
    from utils.pipeline.create import plan

    data = tmp_path / "data"
    shutil.copytree(demo_dir, data)
    anns = torch.load(data / "anns.pt", weights_only=True)
    key, entry = next((k, e) for k, e in sorted(anns.items()) if not e["is_query"] and e["ins"])
    query_key = {"same file": str(data / key), "symlink": "queries/link.jpg", "copy": "queries/copy.jpg"}[how]
    if how == "symlink":
        os.symlink(data / key, data / query_key)
    elif how == "copy":
        shutil.copy(data / key, data / query_key)
    anns[query_key] = {"ins": entry["ins"][0], "is_query": True}
    save_anns(anns, data / "anns.pt")
    with pytest.raises(SoIRError, match=f"1 queries are also gallery images .*query {query_key} = gallery {key}"):
        plan(config("extractor=clip_features", f"anns_file={data / 'anns.pt'}"))


def test_13_vectors_that_are_not_unit_norm_stop_the_run(tiny_model_dirs, demo_dir, tmp_path):
    """``mi_lr=1e30``: the Mask Inversion diverges to rows of norm 0; the extraction stops naming the
    images instead of storing them. Fails on main 4e786ae (rows of norm 0.0 written, exit 0)."""
    from utils.config import check_config, resolve_aliases
    from utils.pipeline.create import extract, prepare

    def staged(stage: str):
        cfg = config(
            "extractor=clip_mi_features",
            f"model_name={tiny_model_dirs['clip']}",
            "vec_dim=24",
            f"anns_file={demo_dir / 'anns.pt'}",
            f"captions_file={demo_dir / 'captions.pt'}",
            f"features_dir={tmp_path / 'features'}",
            f"stage={stage}",
            "mi_lr=1e30",
            "mi_iterations=3",
            "num_workers=0",
            "shard_size=4",
            "device=cpu",
        )
        resolve_aliases(cfg)
        check_config(cfg)
        return cfg

    prepare(staged("prepare"))
    with pytest.raises(SoIRError, match=r"gallery: \d+ of \d+ feature vectors are not unit-norm .*images \['gallery/"):
        extract(staged("extract"))
    assert not list((tmp_path / "features" / "gallery").glob("shard-*.safetensors"))


def test_14_converters_and_builders_refuse_what_create_index_would_refuse(tmp_path, capsys):
    """convert_captions.py with masks of another size than their image, and prepare_benchmark.py on a
    folder that gives no queries and no gallery images: one line each, nothing written (and an earlier
    benchmark in --out kept). Fails on main 4e786ae (both wrote their files, exit 0)."""
    import numpy as np
    import torch
    from PIL import Image

    from datasets import encode_mask_row_major
    from scripts import convert_captions
    from scripts.prepare_benchmark import main as prepare_benchmark

    Image.new("RGB", (30, 20)).save(tmp_path / "plain.png")
    other = np.zeros((40, 60), dtype=bool)
    other[2:4, 3:9] = True
    source = {"plain.png": {"masks_rle": [encode_mask_row_major(other)], "bboxes": [[3, 2, 9, 4]], "scores": [0.8]}}
    torch.save(source, tmp_path / "segmentation_results.pt")
    out = tmp_path / "captions.pt"
    assert convert_captions.main([str(tmp_path / "segmentation_results.pt"), "--out", str(out)]) == 1
    assert "the masks of plain.png are 40x60 (H x W) but the image" in capsys.readouterr().err
    assert not out.exists()

    empty = tmp_path / "INSTRE"
    for subset in ("INSTRE-S1", "INSTRE-S2", "INSTRE-M"):
        (empty / subset).mkdir(parents=True)
    bench = tmp_path / "bench"
    with pytest.raises(SystemExit, match="gives an empty instre_xs benchmark \\(0 queries, 0 gallery images"):
        prepare_benchmark(["instre_xs", "--root", str(empty), "--out", str(bench)])
    assert not bench.exists() or not list(bench.iterdir())


def test_15_refusals_are_one_line_naming_the_file(tmp_path, capsys):
    """Bad inputs that gave tracebacks: an RLE claiming 1e6 x 1e6 pixels (convert_captions.py tried to
    allocate 931 GiB), a BURST sequence without "dataset" (KeyError) and a BURST file that is not JSON (an
    error without the file's name) in prepare_benchmark.py permir, a truncated or pickled last.ckpt in
    train_mao.py (UnpicklingError). Fails on main 4e786ae."""
    import json

    import torch
    from PIL import Image

    from scripts import convert_captions
    from scripts.prepare_benchmark import main as prepare_benchmark
    from utils.training.trainer import load_resume_state

    Image.new("RGB", (30, 20)).save(tmp_path / "plain.png")
    rle = {"counts": [10**12], "size": [1_000_000, 1_000_000]}  # a valid RLE of 10^12 pixels
    torch.save({"plain.png": {"masks_rle": [rle], "bboxes": [[0, 0, 1, 1]], "scores": [0.5]}}, tmp_path / "huge.pt")
    assert convert_captions.main([str(tmp_path / "huge.pt"), "--out", str(tmp_path / "c.pt")]) == 1
    assert "are 1000000x1000000 (H x W) but the image" in capsys.readouterr().err

    burst = tmp_path / "all_classes.json"
    burst.write_text(json.dumps({"sequences": [{"id": 1}], "categories": [], "split": "val"}))
    with pytest.raises(SystemExit, match=f"{burst}: not in BURST's format \\(KeyError: 'dataset'"):
        prepare_benchmark(
            ["permir", "--root", str(tmp_path), "--out", str(tmp_path / "b"), "--burst_annotations", str(burst)]
        )
    burst.write_text("{not json")
    with pytest.raises(SystemExit, match=f"{burst}: cannot be read as JSON"):
        prepare_benchmark(
            ["permir", "--root", str(tmp_path), "--out", str(tmp_path / "b"), "--burst_annotations", str(burst)]
        )

    torch.save({"state_dict": {}, "optimizer": {}, "scheduler": {}, "step": 4, "best": {}}, tmp_path / "last.ckpt")
    good = (tmp_path / "last.ckpt").read_bytes()
    (tmp_path / "last.ckpt").write_bytes(good[: len(good) // 2])
    with pytest.raises(SoIRError, match="last.ckpt cannot be read as a training checkpoint"):
        load_resume_state(tmp_path / "last.ckpt")
    torch.save(
        {"state_dict": {}, "optimizer": {}, "scheduler": {}, "step": 4, "best": Image.new("L", (1, 1))},
        tmp_path / "last.ckpt",
    )
    with pytest.raises(SoIRError, match="last.ckpt cannot be read as a training checkpoint"):
        load_resume_state(tmp_path / "last.ckpt")


def test_15_a_pickled_ds_inds_file_is_one_line(demo_dir, tmp_path):
    """``ds_inds_file=evil.pt`` holding an object that weights_only refuses: an AnnotationError naming the
    file (one line from the CLIs). Fails on main 4e786ae (UnpicklingError traceback)."""
    import torch
    from PIL import Image

    from datasets import load_anns, select_indices

    torch.save([0, 1, Image.new("L", (1, 1))], tmp_path / "evil.pt")
    with pytest.raises(SoIRError, match="ds_inds_file .*evil.pt.*: expected a list of integer indices"):
        select_indices(load_anns(demo_dir / "anns.pt"), tmp_path / "evil.pt")


@pytest.mark.slow  # a subprocess under ulimit -f (~15 s)
def test_15_a_file_size_limit_is_one_line_and_keeps_what_was_written(clip_demo_features, tmp_path):
    """search_index.py under ``ulimit -f`` (the process's file-size limit is the subject: a subprocess):
    one ``error: cannot write <file>: File too large`` line naming the fix, no traceback, and no
    half-written file. Fails on main 4e786ae (an OSError traceback)."""
    import os
    import resource
    import subprocess
    import sys

    _, folder = clip_demo_features
    limit = 4096  # bytes: the logs and results.json fit, the report's thumbnails do not

    def limited() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    run = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "search_index.py"), f"features_dir={folder}", f"hydra.run.dir={run}"],
        cwd=tmp_path,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        preexec_fn=limited,
        timeout=600,
    )
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert "error: cannot write" in proc.stderr and "File too large (EFBIG); free disk space" in proc.stderr
    assert not [p for p in run.rglob("*.tmp")]  # atomic writes: no half-written file left


# ------------------------------------------------------------------------------- 16: small promises
def test_16_temporaries_of_a_killed_run_are_removed_by_the_next_run(tmp_path):
    """``kill -9`` leaves ``.shard-*.tmp`` and ``.index-*.faiss.*.tmp`` files; the next run that owns the
    folder removes those of dead writers on this host, and keeps a live writer's and another host's.
    Fails on main 4e786ae (no rerun removed them)."""
    import socket
    import subprocess

    from utils.retrieval.feature_store import FeaturesFolder

    dead = subprocess.Popen(["true"])
    dead.wait()
    host = socket.gethostname()
    root = tmp_path / "features"
    with FeaturesFolder(root).open({"g": 1}, {"g": 1, "q": 1}, "cfg"):
        (root / "gallery").mkdir()
    stale = [
        root / "gallery" / f".shard-00001.safetensors.{host}.{dead.pid}.tmp",
        root / f".index-Flat.faiss.{host}.{dead.pid}.tmp",
    ]
    kept = [
        root / "gallery" / f".shard-00002.safetensors.{host}.{os.getpid()}.tmp",  # a live writer (a worker)
        root / "gallery" / f".shard-00003.safetensors.other-node.{dead.pid}.tmp",  # cannot be checked here
    ]
    for path in stale + kept:
        path.write_bytes(b"half a shard")
    with FeaturesFolder(root).open({"g": 1}, {"g": 1, "q": 1}, "cfg"):
        pass
    assert [p.exists() for p in stale + kept] == [False, False, True, True]


def test_16_training_checks_the_batch_before_claiming_its_folder(demo_dir, tiny_model_dirs, tmp_path):
    """``train_mao.py batch_size=5 micro_batch=2``: refused before the output folder is claimed and its
    identity saved, so the corrected rerun into the same output_dir is not refused as "another run"
    (Hydra's entry point, in this process). Fails on main 4e786ae (identity.json saved with batch_size=5)."""
    from tests.pipeline import run_main

    out = tmp_path / "train"
    proc = run_main(
        "scripts/train_mao.py",
        f"anns_file={demo_dir / 'anns.pt'}",
        f"captions_file={demo_dir / 'captions.pt'}",
        f"model_name={tiny_model_dirs['dinov2']}",
        f"output_dir={out}",
        "batch_size=5",
        "micro_batch=2",
        "device=cpu",
        cwd=tmp_path,
        check=False,
    )
    assert proc.returncode == 1 and "batch_size=5 must be a multiple of micro_batch=2" in proc.stderr
    assert not (out / "identity.json").exists()


def test_16_a_query_refresh_says_what_happened_and_a_symlink_is_named(tmp_path, caplog):
    """A query-identity change logs "recomputing the query features", not also "held query shards without
    an identity"; a ``queries/`` symlink out of the folder is refused as such, not as "not made by SoIR".
    Fails on main 4e786ae."""
    from utils.retrieval.feature_store import FeaturesFolder

    root = tmp_path / "features"
    with FeaturesFolder(root).open({"g": 1}, {"g": 1, "q": 1}, "cfg"):
        (root / "queries" / "shard-00000.safetensors").write_bytes(b"old queries")
    with caplog.at_level("WARNING"), FeaturesFolder(root).open({"g": 1}, {"g": 1, "q": 2}, "cfg"):
        pass
    assert "recomputing the query features" in caplog.text and "without an identity" not in caplog.text

    elsewhere = tmp_path / "big_disk" / "queries"
    (root / "queries").rename(elsewhere.parent.mkdir() or elsewhere)
    (root / "queries").symlink_to(elsewhere)
    with pytest.raises(SoIRError, match="leads out of .* \\(a symbolic link to .*big_disk/queries\\)"):
        FeaturesFolder(root).open({"g": 1}, {"g": 1, "q": 3}, "cfg")


@pytest.mark.slow  # makes a crowded demo set (~9 s)
def test_15_a_crowded_small_demo_is_made_or_refused_whole(tmp_path):
    """``make_demo_dataset.py --image_size 128 --num_objects 20`` (here with seed 1, 10 scenes per object):
    a scene too full for an object draws it again instead of stopping with a RuntimeError and half a
    dataset. Fails on main 4e786ae (RuntimeError "no free place for a 63x63 object", 180 images left)."""
    from datasets import load_anns, split
    from scripts.make_demo_dataset import make_demo_dataset

    out = make_demo_dataset(tmp_path / "demo", num_objects=20, gallery_per_object=10, image_size=128, seed=1)
    queries, gallery = split(load_anns(out / "anns.pt"))
    assert len(queries) == 20 and len(gallery) == 20 * 10 + 8


# ------------------------------------------------------------------------- the walk: every writer
# Every program that writes files, by path; the walk below must name each one (a new script fails the
# walk until it is added here with its refusal).
WRITERS = {
    "create_index.py",
    "search_index.py",
    "example/create_annotations.py",
    "scripts/convert_captions.py",
    "scripts/create_masked_dataset.py",
    "scripts/export_features.py",
    "scripts/inspect_mi.py",
    "scripts/make_demo_dataset.py",
    "scripts/make_tiny_models.py",
    "scripts/paper_table.py",
    "scripts/prepare_benchmark.py",
    "scripts/train_mao.py",
    "benchmarks/scale.py",
    "benchmarks/gpu_check.py",
}


READERS = {"scripts/compare_runs.py"}  # read run folders, print, write no file


def test_every_writer_leaves_a_folder_of_user_files_as_it_was(
    clip_demo_features, tiny_model_dirs, demo_dir, mask_models, tmp_path, capsys
):
    """Every program in scripts/, example/ and the two CLIs, pointed at a folder of a user's files whose
    names are the names SoIR writes (with --overwrite where it has one): each refuses in one line, and
    afterwards every file has its sha256 and nothing was added. Fails on main 4e786ae (make_demo_dataset,
    make_tiny_models, create_annotations and search_index replaced files). The benchmarks' writers
    (scale.py's data folder, gpu_check.py's report) are walked at their writing functions: the
    measurements before them take minutes; their walk fails on 23ee6a3 (gpu_check had no such function,
    and neither was walked)."""
    import argparse

    from benchmarks import gpu_check, scale
    from example.create_annotations import main as create_annotations
    from scripts import (
        compare_runs,
        convert_captions,
        create_masked_dataset,
        inspect_mi,
        make_demo_dataset,
        make_tiny_models,
        paper_table,
        prepare_benchmark,
    )
    from tests.datasets.benchmark_replicas import write_instre
    from tests.pipeline import run_main
    from utils.pipeline.create import prepare
    from utils.pipeline.search import search
    from utils.queries.own_queries import own_query
    from utils.results.interop import export_embeddings

    user = tmp_path / "user"
    names = [
        "anns.pt", "captions.pt", "benchmark.json", "run_config.json", "summary.json", "identity.json",
        "config.yaml", "results.json", "rankings.jsonl", "per_query.csv", "report.html", "thumbs/g000000.jpg",
        "table.md", "inspect.png", "gallery/IMG_0001.jpg", "queries/q_000.jpg", "shards/shard_000000.pt",
        "clip/model.safetensors", "clip/config.json", "sam/sam_tiny.pth", "failed_images.txt", "gpu_check.json",
    ]  # fmt: skip
    before = user_files(user, {name: f"the user's {name}".encode() for name in names})
    (tmp_path / "segmentation_results.pt").write_bytes((demo_dir / "captions.pt").read_bytes())
    _, features = clip_demo_features
    instre = write_instre(tmp_path / "INSTRE")

    def refused(call, *args) -> str:
        """Run a program's entry point; it must stop (exit status 1 or an exception) and say why."""
        try:
            status = call(*args)
        except (SystemExit, SoIRError) as err:
            return str(err)
        assert status == 1, f"{call} wrote into the user's folder"
        return capsys.readouterr().err

    # scale.py writes its data into <--dir>/rows<N>-...: a user's folder of that name.
    scale_args = argparse.Namespace(dir=str(tmp_path), rows=20, rows_per_image=2, queries=2, positives=1, seed=0)
    scale_args.shard_size = 4
    before.update(user_files(scale.folder_of(scale_args), {"gallery/shard-000000.safetensors": b"the user's"}))
    walked = {
        "benchmarks/scale.py": refused(scale.write_data, scale_args),
        "benchmarks/gpu_check.py": refused(gpu_check.write_report, user, "a table", {}),
        "scripts/make_demo_dataset.py": refused(make_demo_dataset.main, ["--out", str(user), "--overwrite"]),
        "scripts/make_tiny_models.py": refused(make_tiny_models.main, ["--out", str(user)]),
        "example/create_annotations.py": refused(
            create_annotations, ["--root", str(demo_dir), "--out", str(user / "anns.pt")]
        ),
        "scripts/convert_captions.py": refused(
            convert_captions.main,
            [str(tmp_path / "segmentation_results.pt"), "--out", str(user / "captions.pt")],
        ),
        "scripts/create_masked_dataset.py": refused(
            create_masked_dataset.main, [*_base_args(mask_models, demo_dir / "gallery", user), "--overwrite"]
        ),
        "scripts/prepare_benchmark.py": refused(
            prepare_benchmark.main, ["instre_xs", "--root", str(instre), "--out", str(user), "--overwrite"]
        ),
        "scripts/export_features.py": refused(
            export_embeddings, config(f"features_dir={features}", "format=embeddings"), features, user
        ),
        "scripts/paper_table.py": refused(paper_table.main, ["table", str(features), "--out", str(user / "table.md")]),
        "scripts/inspect_mi.py": refused(
            inspect_mi.main,
            [
                "--image",
                str(next((demo_dir / "gallery").glob("*.jpg"))),
                "--captions",
                str(demo_dir / "captions.pt"),
                "--tiny",
                "--out",
                str(user / "inspect.png"),
                "--overwrite",
            ],
        ),  # fmt: skip
        "search_index.py": refused(search, config(f"features_dir={features}"), features, user)
        + refused(own_query, config(f"features_dir={features}", "query_text=a mug"), features, user),
        "create_index.py": refused(
            prepare,
            config(
                "extractor=clip_features",
                f"model_name={tiny_model_dirs['clip']}",
                "vec_dim=24",
                f"anns_file={demo_dir / 'anns.pt'}",
                f"features_dir={user}",
                "stage=prepare",
                "device=cpu",
            ),
        ),  # fmt: skip
    }
    proc = run_main(
        "scripts/train_mao.py",
        f"anns_file={demo_dir / 'anns.pt'}",
        f"captions_file={demo_dir / 'captions.pt'}",
        f"model_name={tiny_model_dirs['dinov2']}",
        f"output_dir={user}",
        "batch_size=2",  # valid inputs (checked before the folder): the demo has 8 training pairs
        "micro_batch=2",
        "device=cpu",
        cwd=tmp_path,
        check=False,
    )
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    walked["scripts/train_mao.py"] = proc.stderr

    assert set(walked) == WRITERS
    # Programs that only read (they print a table): pointed at the user's folder, they stop in one line
    # and write nothing (checked by the sha256 walk below).
    capsys.readouterr()
    with pytest.raises(SystemExit):
        compare_runs.main([f"global={user}"])
    assert "results.json is empty or corrupt" in capsys.readouterr().err
    programs = {
        p.relative_to(ROOT).as_posix()
        for p in [*ROOT.glob("*.py"), *ROOT.glob("scripts/*.py"), *ROOT.glob("example/*.py")]
    }
    assert programs - {"scripts/__init__.py", "example/__init__.py"} <= WRITERS | READERS, (
        "a new program: add it to the walk"
    )
    for program, why in walked.items():
        assert any(s in why for s in ("not made by SoIR", "already exists", "not written by")), (
            program,
            why,
        )
    assert_untouched(before)
    assert sorted(p.relative_to(user).as_posix() for p in user.rglob("*") if p.is_file()) == sorted(names)


def test_9_training_folder_without_its_identity_is_refused_not_adopted(demo_dir, tiny_model_dirs, tmp_path):
    """As case 9 for training: a train_mao.py folder whose identity.json was deleted, with a last.ckpt
    left, is refused with the fix instead of resuming someone's checkpoint under a new identity
    (Hydra's entry point, in this process). Fails on main 4e786ae (identity saved, the checkpoint loaded)."""
    from tests.pipeline import run_main
    from utils.files import claim_folder

    out = claim_folder(tmp_path / "train", "training")
    before = user_files(out, {"last.ckpt": b"another run's checkpoint"})
    proc = run_main(
        "scripts/train_mao.py",
        f"anns_file={demo_dir / 'anns.pt'}",
        f"captions_file={demo_dir / 'captions.pt'}",
        f"model_name={tiny_model_dirs['dinov2']}",
        f"output_dir={out}",
        "batch_size=2",  # valid inputs (checked before the folder): the demo has 8 training pairs
        "micro_batch=2",
        "device=cpu",
        cwd=tmp_path,
        check=False,
    )
    assert proc.returncode == 1 and "holds last.ckpt but no identity.json" in proc.stderr
    assert "Traceback" not in proc.stderr and not (out / "identity.json").exists()
    assert_untouched(before)
