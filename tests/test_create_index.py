"""create_index.py end to end: outputs, resume after an interruption, refusals.

In this process (tests.pipeline.run_main); a subprocess only where the process is the subject:
kill -9 and resume, multirun and submitit launchers, the lock held by another process.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.pipeline import ROOT, features_dir_from, run_main, run_script


def _args(tiny_model_dirs, demo_dir, *extra):
    return (
        "extractor=siglip_features",
        f"model_name={tiny_model_dirs['siglip']}",
        "vec_dim=32",
        f"anns_file={demo_dir / 'anns.pt'}",
        "num_workers=0",
        "batch_size=2",
        "shard_size=2",
        *extra,
    )


def _shard_bytes(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("shard-*.safetensors"))}


def test_outputs_and_relative_paths(tiny_model_dirs, demo_dir, tmp_path):
    proc = run_main("create_index.py", *_args(tiny_model_dirs, demo_dir, "dataset=demo"), cwd=tmp_path)
    out = features_dir_from(proc, tmp_path)
    assert out.is_relative_to(tmp_path / "outputs" / "features" / "demo")  # no chdir into the run dir
    gallery = json.loads((out / "gallery" / "images.json").read_text())
    shard = load_file(out / "gallery" / "shard-00000.safetensors")
    assert shard["features"].shape == (2, 32) and shard["owner"].tolist() == [0, 1]
    assert (out / "index-Flat.faiss").is_file() and (out / "config.yaml").is_file()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["gallery_images"] == len(gallery) == summary["gallery_rows"]
    run_dirs = list((tmp_path / "outputs" / "runs").glob("*/*create_index*"))
    assert len(run_dirs) == 1 and (run_dirs[0] / ".hydra" / "config.yaml").is_file()


@pytest.mark.slow  # a subprocess: the process is the subject
def test_resume_after_kill_gives_byte_identical_features(tiny_model_dirs, demo_dir, tmp_path):
    (tmp_path / "a").mkdir()
    reference = features_dir_from(
        run_main("create_index.py", *_args(tiny_model_dirs, demo_dir), cwd=tmp_path / "a"), tmp_path / "a"
    )
    expected = _shard_bytes(reference)
    # Interrupted run: kill -9 as soon as the first shard exists.
    work = tmp_path / "b"
    work.mkdir()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "create_index.py"), *_args(tiny_model_dirs, demo_dir)],
        cwd=work,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 120
    while not list(work.rglob("shard-00000.safetensors")) and time.time() < deadline:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_dir = next(work.rglob("gallery")).parent
    partial = _shard_bytes(killed_dir)
    assert 0 < len(partial) < len(expected), "the run was not interrupted mid-way"
    # A torn write from the killed run must not count as a shard.
    first_missing = sorted(set(expected) - set(partial))[0]
    (killed_dir / (first_missing + ".tmp")).write_bytes(b"half a shard")
    out = features_dir_from(run_main("create_index.py", *_args(tiny_model_dirs, demo_dir), cwd=work), work)
    assert _shard_bytes(out) == {k: v for k, v in expected.items()}
    assert (out / "index-Flat.faiss").read_bytes() == (reference / "index-Flat.faiss").read_bytes()


def test_query_only_changes_keep_the_gallery_and_other_changes_are_refused(tiny_model_dirs, demo_dir, tmp_path):
    out = tmp_path / "feats"
    run_main("create_index.py", *_args(tiny_model_dirs, demo_dir, f"features_dir={out}"), cwd=tmp_path)
    gallery = {p: p.stat().st_mtime_ns for p in (out / "gallery").glob("shard-*")}
    queries = _shard_bytes(out / "queries")
    proc = run_main(
        "create_index.py", *_args(tiny_model_dirs, demo_dir, f"features_dir={out}", "no_query_crop=true"), cwd=tmp_path
    )
    assert "recomputing the query features" in proc.stdout + proc.stderr
    assert {p: p.stat().st_mtime_ns for p in (out / "gallery").glob("shard-*")} == gallery
    assert _shard_bytes(out / "queries") != queries  # uncropped queries: other vectors
    proc = run_main(
        "create_index.py",
        *_args(tiny_model_dirs, demo_dir, f"features_dir={out}", "batch_size=3"),
        cwd=tmp_path,
        check=False,
    )
    assert proc.returncode != 0 and "made with other settings or inputs (batch_size: 2 -> 3)" in proc.stderr


@pytest.mark.parametrize(
    "overrides,message",
    [
        (("vec_dim=768",), "vec_dim=768 but"),
        (("extractr=clip",), "extractr"),
        (("extractor=siglip_mi_features",), "have no masks in no captions_file given"),
        (("anns_file=/nonexistent/anns.pt",), "/nonexistent/anns.pt"),
    ],
)
def test_bad_runs_fail_with_a_clear_message(tiny_model_dirs, demo_dir, tmp_path, overrides, message):
    proc = run_main("create_index.py", *_args(tiny_model_dirs, demo_dir), *overrides, cwd=tmp_path, check=False)
    assert proc.returncode != 0
    assert message in proc.stderr + proc.stdout


@pytest.mark.slow  # a subprocess: the process is the subject
def test_multirun_outputs_never_collide(tiny_model_dirs, demo_dir, tmp_path):
    proc = run_script("create_index.py", "-m", *_args(tiny_model_dirs, demo_dir), "batch_size=1,3", cwd=tmp_path)
    outs = {s.split(": ", 1)[1] for s in proc.stdout.splitlines() if s.startswith("features and index: ")}
    assert len(outs) == 2
    job_dirs = list((tmp_path / "outputs" / "multirun").glob("*/*/[01]-batch_size=[13]"))
    assert len(job_dirs) == 2 and all((d / ".hydra" / "config.yaml").is_file() for d in job_dirs)


def test_skip_policies_are_counted_and_logged(tiny_model_dirs, demo_dir, tmp_path):
    """missing_masks=global and no_positive=skip: nothing is guessed silently."""
    import torch

    from datasets import load_captions, save_captions

    anns = torch.load(demo_dir / "anns.pt", weights_only=True)
    anns["queries/lonely.jpg"] = {"ins": 999, "is_query": True}  # no positive in the gallery
    (tmp_path / "queries").mkdir()
    (tmp_path / "queries" / "lonely.jpg").write_bytes(
        (demo_dir / next(k for k in anns if k.startswith("queries/q"))).read_bytes()
    )
    for key in anns:
        if not key.startswith("queries/lonely"):
            target = tmp_path / key
            target.parent.mkdir(parents=True, exist_ok=True)
            if not target.exists():
                target.symlink_to(demo_dir / key)
    torch.save(anns, tmp_path / "anns.pt")
    captions = load_captions(demo_dir / "captions.pt")
    gallery_keys = sorted(k for k, v in anns.items() if not v["is_query"])
    for key in gallery_keys[:3]:
        del captions[key]  # three gallery images lose their masks
    save_captions(captions, tmp_path / "captions.pt")

    args = (
        "extractor=siglip_mi_features",
        f"model_name={tiny_model_dirs['siglip']}",
        "vec_dim=32",
        f"anns_file={tmp_path / 'anns.pt'}",
        f"captions_file={tmp_path / 'captions.pt'}",
        "mi_iterations=2",
        "num_workers=0",
    )
    refused = run_main("create_index.py", *args, cwd=tmp_path, check=False)
    assert refused.returncode != 0 and "3 of" in refused.stderr and "missing_masks=global" in refused.stderr
    refused = run_main("create_index.py", *args, "missing_masks=global", cwd=tmp_path, check=False)
    assert refused.returncode != 0 and "queries/lonely.jpg" in refused.stderr
    proc = run_main("create_index.py", *args, "no_positive=skip", "missing_masks=global", cwd=tmp_path)
    summary = json.loads((features_dir_from(proc, tmp_path) / "summary.json").read_text())
    assert summary["gallery_counts"]["global_fallback"] == 3
    assert summary["queries"] == len([k for k, v in anns.items() if v["is_query"]]) - 1
    log = proc.stdout + proc.stderr
    assert "have no masks and get their global embedding" in log and "lonely" in log


def _copy(folder: Path, dest: Path) -> Path:
    """A copy of ``folder`` as a user's own (without the marker of the SoIR program that made it)."""
    import shutil

    shutil.copytree(folder, dest, ignore=shutil.ignore_patterns(".soir.json"))
    return dest


def test_features_dir_on_a_users_folder_is_refused_and_nothing_is_touched(tiny_model_dirs, demo_dir, tmp_path):
    """Before: features_dir=<the dataset folder> rmtree'd its queries/ and wrote into its gallery/."""
    data = _copy(demo_dir, tmp_path / "data")
    before = {p: p.read_bytes() for p in data.rglob("*") if p.is_file()}
    proc = run_main("create_index.py", *_args(tiny_model_dirs, data, f"features_dir={data}"), cwd=tmp_path, check=False)
    assert proc.returncode == 1 and "is not empty and was not made by SoIR" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert {p: p.read_bytes() for p in data.rglob("*") if p.is_file()} == before


def test_changed_weights_in_a_model_folder_are_refused_not_mixed(tiny_model_dirs, demo_dir, tmp_path):
    """Before: a local model folder was identified by its path; new weights + a deleted shard resumed
    into a gallery holding features of two models."""
    model = _copy(tiny_model_dirs["siglip"], tmp_path / "model")
    args = (
        "extractor=siglip_features",
        f"model_name={model}",
        "vec_dim=32",
        f"anns_file={demo_dir / 'anns.pt'}",
        "num_workers=0",
        "shard_size=4",
        f"features_dir={tmp_path / 'feats'}",
    )
    run_main("create_index.py", *args, cwd=tmp_path)
    from utils.testing.tiny_models import save_tiny_siglip

    save_tiny_siglip(model, seed=1)  # other weights, same folder
    (tmp_path / "feats" / "gallery" / "shard-00001.safetensors").unlink()
    proc = run_main("create_index.py", *args, cwd=tmp_path, check=False)
    assert proc.returncode == 1 and "made with other settings or inputs (extractor_identity)" in proc.stderr
    assert not (tmp_path / "feats" / "gallery" / "shard-00001.safetensors").exists()


def test_query_only_edits_of_anns_keep_the_gallery(tiny_model_dirs, demo_dir, tmp_path):
    """Before: any edit of anns.pt changed its hash and the finished gallery was refused."""
    import torch

    data = _copy(demo_dir, tmp_path / "data")
    args = _args(tiny_model_dirs, data, f"features_dir={tmp_path / 'feats'}")
    run_main("create_index.py", *args, cwd=tmp_path)
    gallery = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "feats" / "gallery").glob("shard-*")}
    anns = torch.load(data / "anns.pt", weights_only=True)
    query = next(k for k, v in anns.items() if v["is_query"])
    x1, y1, x2, y2 = anns[query]["bbox"]
    anns[query]["bbox"] = [x1 + 1, y1, x2, y2]  # a fixed query box
    some_gallery = next(k for k, v in anns.items() if not v["is_query"])
    anns[some_gallery]["obj_name"] = "relabelled"  # a fixed gallery label
    torch.save(anns, data / "anns.pt")
    proc = run_main("create_index.py", *args, cwd=tmp_path)
    assert "recomputing the query features" in proc.stdout + proc.stderr
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "feats" / "gallery").glob("shard-*")} == gallery


@pytest.mark.parametrize(
    "edit,message",
    [
        ("bbox", "bbox [0.0, 0.0, 5000.0, 10.0] lies outside"),
        ("index", "index='IVF99999,Flat' has 99999 inverted lists"),
        ("mask", "its masks are 7x7 (H x W) but the image is"),
    ],
)
def test_input_problems_are_found_before_the_model_is_loaded(tiny_model_dirs, demo_dir, tmp_path, edit, message):
    """A model_name that does not exist proves no model was loaded (nor a forward pass run)."""
    import numpy as np
    import torch

    from datasets import encode_mask, load_captions, save_captions

    data = _copy(demo_dir, tmp_path / "data")
    extra = ["model_name=/no/such/model", "extractor=siglip_mi_features", f"captions_file={data / 'captions.pt'}"]
    if edit == "bbox":
        anns = torch.load(data / "anns.pt", weights_only=True)
        anns[next(k for k, v in anns.items() if v["is_query"])]["bbox"] = [0.0, 0.0, 5000.0, 10.0]
        torch.save(anns, data / "anns.pt")
    elif edit == "index":
        extra.append("index='IVF99999,Flat'")
    else:
        captions = load_captions(data / "captions.pt")
        key = sorted(k for k in captions if k.startswith("gallery/"))[-1]
        captions[key].masks_rle[0] = encode_mask(np.ones((7, 7), dtype=bool))
        captions[key].masks_rle[1:] = []
        captions[key].bboxes[1:], captions[key].scores[1:] = [], []
        save_captions(captions, data / "captions.pt")
    proc = run_main("create_index.py", f"anns_file={data / 'anns.pt'}", "vec_dim=32", *extra, cwd=tmp_path, check=False)
    assert proc.returncode == 1 and message in proc.stderr and "/no/such/model" not in proc.stderr
    assert "Traceback" not in proc.stderr


def test_bad_images_skip_counts_lists_and_searches_without_them(tiny_model_dirs, demo_dir, tmp_path):
    data = _copy(demo_dir, tmp_path / "data")
    gallery = sorted((data / "gallery").glob("*.jpg"))
    gallery[0].write_bytes(b"this is not a jpeg")  # header unreadable
    gallery[1].write_bytes(gallery[1].read_bytes()[:1500])  # header fine, pixels truncated
    refused = run_main("create_index.py", *_args(tiny_model_dirs, data), cwd=tmp_path, check=False)
    assert refused.returncode == 1 and "set bad_images=skip" in refused.stderr and gallery[0].name in refused.stderr
    proc = run_main(
        "create_index.py", *_args(tiny_model_dirs, data, "bad_images=skip", "no_positive=skip"), cwd=tmp_path
    )
    out = features_dir_from(proc, tmp_path)
    listed = (out / "bad_images.txt").read_text().splitlines()
    assert [line.split("\t")[1] for line in listed] == [f"gallery/{gallery[0].name}"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["skipped_bad_images"] == 1 and summary["gallery_counts"]["bad_images"] == 1
    search = run_main("search_index.py", f"features_dir={out}", "no_positive=skip", cwd=tmp_path)
    assert "have no features (unreadable, bad_images=skip) and are left out" in search.stdout + search.stderr
    from tests.pipeline import read_results, results_dir_from

    results, _ = read_results(results_dir_from(search))
    assert results["num_gallery_images"] == len(gallery) - 2


@pytest.mark.parametrize("override", ["mi_alpha=nan", "mi_lr=inf"])
def test_non_finite_settings_are_refused(tiny_model_dirs, demo_dir, tmp_path, override):
    proc = run_main("create_index.py", *_args(tiny_model_dirs, demo_dir), override, cwd=tmp_path, check=False)
    assert proc.returncode == 1 and f"{override.split('=')[0]}=" in proc.stderr and "not a finite number" in proc.stderr


def test_a_hub_model_that_is_not_cached_offline_is_one_line(demo_dir, tmp_path):
    """Before: ~60 s of retries and a long traceback through Hydra."""
    started = time.time()
    proc = run_main(
        "create_index.py", "extractor=siglip_features", f"anns_file={demo_dir / 'anns.pt'}", cwd=tmp_path, check=False
    )
    assert proc.returncode == 1 and time.time() - started < 60
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]  # one line
    assert "'google/siglip-base-patch16-384' is needed but is not in the HuggingFace cache" in proc.stderr
    assert "model_name=/path/to/a/local/folder" in proc.stderr and "--tiny" in proc.stderr


def test_corrupt_metadata_and_half_written_folders_are_explained(tiny_model_dirs, demo_dir, tmp_path):
    out = tmp_path / "feats"
    run_main("create_index.py", *_args(tiny_model_dirs, demo_dir, f"features_dir={out}"), cwd=tmp_path)
    (out / "gallery" / "shard-00002.safetensors").unlink()
    search = run_main("search_index.py", f"features_dir={out}", cwd=tmp_path, check=False)
    assert search.returncode == 1 and "shard-00002.safetensors" in search.stderr
    assert "rerun create_index.py with the same settings, it resumes" in search.stderr
    (out / "identity.json").write_text("")  # a full disk, before atomic writes
    proc = run_main(
        "create_index.py", *_args(tiny_model_dirs, demo_dir, f"features_dir={out}"), cwd=tmp_path, check=False
    )
    assert proc.returncode == 1 and "identity.json is empty or corrupt" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_report_settings_are_not_part_of_the_features_identity(hydra_compose):
    """search_index.py's report keys (and query_vectors, a scoring rule) must not move features to a new
    folder or refuse an existing one."""
    from types import SimpleNamespace

    from utils.pipeline.create import feature_identity

    extractor = SimpleNamespace(identity=lambda: {"model": "m"})
    default = hydra_compose("anns_file=a.pt")
    changed = hydra_compose(
        "anns_file=a.pt", "report=false", "report_k=3", "report_thumb_size=64", "report_maps=true", "query_vectors=each"
    )
    for queries in (False, True):
        identity = feature_identity(default, extractor, [], {}, queries=queries)
        assert identity == feature_identity(changed, extractor, [], {}, queries=queries)
        assert not any(key.startswith("report") for key in identity)


# ---------------------------------------------------------------------------------------------------
# Stages for many processes: prepare, extract (workers, submitit), index (IVF in blocks), search
# ---------------------------------------------------------------------------------------------------
def _stage_args(tiny_model_dirs, anns, *extra):
    return (
        "extractor=siglip_features",
        f"model_name={tiny_model_dirs['siglip']}",
        "vec_dim=32",
        f"anns_file={anns}",
        "num_workers=0",
        "batch_size=1",
        "shard_size=1",
        *extra,
    )


@pytest.fixture(scope="module")
def one_process(tiny_model_dirs, demo_dir, tmp_path_factory):
    """stage=all (today's single command) with the stage tests' settings: the reference."""
    cwd = tmp_path_factory.mktemp("one_process")
    run_main(
        "create_index.py", *_stage_args(tiny_model_dirs, demo_dir / "anns.pt", f"features_dir={cwd / 'feats'}"), cwd=cwd
    )
    return cwd / "feats"


@pytest.mark.slow  # a subprocess: the process is the subject
def test_two_submitit_workers_give_byte_identical_shards_and_blocks_give_the_in_ram_index(
    tiny_model_dirs, demo_dir, one_process, tmp_path
):
    import faiss
    import numpy as np

    from utils.retrieval.feature_store import FeatureShards
    from utils.retrieval.index_io import build_index, load_index

    args = _stage_args(tiny_model_dirs, demo_dir / "anns.pt", f"features_dir={tmp_path / 'feats'}")
    prepared = run_main("create_index.py", *args, "stage=prepare", cwd=tmp_path)
    assert f"prepared: {tmp_path / 'feats'}" in prepared.stdout and not _shard_bytes(tmp_path / "feats")
    run_script(
        "create_index.py",
        "-m",
        *args,
        "stage=extract",
        "workers=2",
        "worker=range(0,2)",
        "hydra/launcher=submitit_local",
        cwd=tmp_path,
    )
    logs = "".join(p.read_text() for p in (tmp_path / "outputs" / "multirun").rglob("*_log.out"))
    assert "worker 0 of 2 done" in logs and "worker 1 of 2 done" in logs  # two jobs, one half each
    assert _shard_bytes(tmp_path / "feats") == _shard_bytes(one_process)

    # The IVF built in 3 blocks, merged on disk, answers with the ids of the one built in RAM.
    run_main("create_index.py", *args, "stage=index", "index='IVF2,Flat'", "index_blocks=3", cwd=tmp_path)
    blocks = sorted(p.name for p in (tmp_path / "feats" / "index-IVF2_Flat-blocks").glob("block-*.faiss"))
    assert blocks == ["block-00000.faiss", "block-00001.faiss", "block-00002.faiss"]
    assert (tmp_path / "feats" / "index-IVF2_Flat.ivfdata").is_file()
    features = FeatureShards.prepared(tmp_path / "feats" / "gallery").load()[0].numpy()
    merged, in_ram = load_index(tmp_path / "feats" / "index-IVF2_Flat.faiss"), build_index(features, "IVF2,Flat")
    for index in (merged, in_ram):
        faiss.ParameterSpace().set_index_parameter(index, "nprobe", 1)  # approximate: the lists must agree
    (d_blocks, i_blocks), (d_ram, i_ram) = merged.search(features, 5), in_ram.search(features, 5)
    np.testing.assert_array_equal(i_blocks, i_ram)
    np.testing.assert_allclose(d_blocks, d_ram, atol=1e-6)
    summary = json.loads((tmp_path / "feats" / "summary.json").read_text())
    assert (summary["gallery_images"], summary["gallery_rows"]) == (16, 16)

    # stage=search is search_index.py: the same numbers as the one-process run's search.
    from tests.pipeline import read_results, results_dir_from

    staged, _ = read_results(
        results_dir_from(run_main("create_index.py", *args, "stage=search", "index='IVF2,Flat'", cwd=tmp_path))
    )
    reference, _ = read_results(
        results_dir_from(run_main("search_index.py", f"features_dir={one_process}", cwd=tmp_path))
    )
    assert 0 < staged.pop("index_recall@16") <= 1 and staged.pop("index") == "IVF2,Flat"
    own = ("features_dir", "index", "overrides", "settings")  # each run's own command line and settings
    assert {k: v for k, v in staged.items() if k not in own} == {k: v for k, v in reference.items() if k not in own}


def _descendants(pid: int) -> list[int]:
    children = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        children += [int(c) for c in (task / "children").read_text().split()]
    return children + [d for c in children for d in _descendants(c)]


@pytest.mark.slow  # a subprocess: the process is the subject
def test_a_preempted_worker_is_requeued_by_submitit_and_resumes(tiny_model_dirs, demo_dir, one_process, tmp_path):
    """SIGUSR2 is what SLURM (and submitit's local executor, before its time-out) sends before it stops a
    job: submitit checkpoints the Hydra job and requeues it; the rerun computes only the missing shards."""
    args = _stage_args(tiny_model_dirs, demo_dir / "anns.pt", f"features_dir={tmp_path / 'feats'}")
    run_main("create_index.py", *args, "stage=prepare", cwd=tmp_path)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    launcher = subprocess.Popen(
        [sys.executable, str(ROOT / "create_index.py"), "-m", *args, "stage=extract", "hydra/launcher=submitit_local"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.time() + 300
    while not (tmp_path / "feats" / "gallery" / "shard-00000.safetensors").exists() and time.time() < deadline:
        time.sleep(0.01)
    tasks = [
        p for p in _descendants(launcher.pid) if b"submitit.core._submit" in Path(f"/proc/{p}/cmdline").read_bytes()
    ]
    assert len(tasks) == 1, "the submitit job is not running"
    os.kill(tasks[0], signal.SIGUSR2)
    output, _ = launcher.communicate(timeout=600)
    assert launcher.returncode == 0, output[-3000:]
    multirun = tmp_path / "outputs" / "multirun"
    # submitit's own logs, and the job's log file (INFO lines go there, not to the terminal)
    log = "".join(p.read_text() for p in [*multirun.rglob("*_log.*"), *multirun.rglob("create_index.log")])
    assert "Calling checkpoint method" in log and "Requeued job" in log, log[-3000:]
    starts = [line for line in log.splitlines() if "gallery: worker 0 of 1:" in line]
    assert len(starts) == 2 and "(16 of 16 missing in all)" in starts[0] and "(16 of 16" not in starts[1]
    assert _shard_bytes(tmp_path / "feats") == _shard_bytes(one_process)
    assert not list((tmp_path / "feats").rglob("*.tmp"))  # the interrupted shard left nothing


@pytest.mark.slow  # a subprocess: the process is the subject
def test_workers_take_no_lock_and_refuse_other_settings(tiny_model_dirs, demo_dir, tmp_path):
    from utils.files import FolderLock

    args = _stage_args(tiny_model_dirs, demo_dir / "anns.pt", f"features_dir={tmp_path / 'feats'}")
    refused = run_main("create_index.py", *args, "stage=extract", cwd=tmp_path, check=False)
    assert refused.returncode == 1 and "run create_index.py stage=prepare" in refused.stderr
    run_main("create_index.py", *args, "stage=prepare", cwd=tmp_path)
    refused = run_main("create_index.py", *args, "stage=extract", "batch_size=2", cwd=tmp_path, check=False)
    assert refused.returncode == 1 and "(batch_size: 1 -> 2)" in refused.stderr
    assert "settings (and model, device type) of stage=prepare" in refused.stderr
    refused = run_main("create_index.py", *args, "stage=extract", "worker=2", "workers=2", cwd=tmp_path, check=False)
    assert refused.returncode == 1 and "worker=2 must lie in [0, workers=2)" in refused.stderr
    with FolderLock(tmp_path / "feats"):  # e.g. another host's prepare, still running
        run_main("create_index.py", *args, "stage=extract", "workers=3", "worker=1", cwd=tmp_path)
        blocked = run_script("create_index.py", *args, "stage=index", cwd=tmp_path, check=False)
    assert blocked.returncode == 1 and "is being written by process" in blocked.stderr
    gallery = sorted(p.name for p in (tmp_path / "feats" / "gallery").glob("shard-*"))
    assert gallery == [f"shard-{s:05d}.safetensors" for s in range(16) if s % 3 == 1]
    assert sorted(p.name for p in (tmp_path / "feats" / "queries").glob("shard-*")) == ["shard-00001.safetensors"]
    missing = run_main("create_index.py", *args, "stage=index", cwd=tmp_path, check=False)
    assert missing.returncode == 1 and "shards are missing" in missing.stderr


def test_undecodable_pixels_are_recorded_by_workers_and_refused_by_stage_index(tiny_model_dirs, demo_dir, tmp_path):
    """Before: a worker died on the first truncated image, and with it the rest of its array task."""
    data = _copy(demo_dir, tmp_path / "data")
    broken = sorted((data / "gallery").glob("*.jpg"))[1]
    broken.write_bytes(broken.read_bytes()[:1500])  # header fine, pixels truncated
    args = _stage_args(tiny_model_dirs, data / "anns.pt", f"features_dir={tmp_path / 'feats'}")
    run_main("create_index.py", *args, "stage=prepare", cwd=tmp_path)
    run_main("create_index.py", *args, "stage=extract", cwd=tmp_path)
    shard = load_file(tmp_path / "feats" / "gallery" / "shard-00001.safetensors")
    assert shard["failed"].tolist() == [1] and int(shard["stat.bad_images"]) == 1 and len(shard["owner"]) == 0
    assert len(_shard_bytes(tmp_path / "feats")) == 20  # the worker went on: every shard
    refused = run_main("create_index.py", *args, "stage=index", cwd=tmp_path, check=False)
    assert refused.returncode == 1 and f"gallery/gallery/{broken.name}" in refused.stderr
    assert "set bad_images=skip" in refused.stderr
    run_main("create_index.py", *args, "stage=index", "bad_images=skip", cwd=tmp_path)
    summary = json.loads((tmp_path / "feats" / "summary.json").read_text())
    assert summary["gallery_counts"]["bad_images"] == 1 and summary["gallery_rows"] == 15


def test_summary_keeps_each_runs_seconds(tmp_path):
    """A resumed run adds its time to summary.json instead of replacing the first run's (fails on main
    4e786ae: no write_summary; `seconds` was overwritten); a summary from before `runs` counts as one run."""
    from utils.pipeline.create import write_summary

    (tmp_path / "summary.json").write_text(json.dumps({"gallery_images": 3, "seconds": 100.0}))
    first = write_summary(tmp_path, {"gallery_images": 4}, "all", 12.34)
    assert [run["seconds"] for run in first["runs"]] == [100.0, 12.3] and first["seconds"] == 112.3
    second = write_summary(tmp_path, {"gallery_images": 4}, "index", 0.5)
    assert json.loads((tmp_path / "summary.json").read_text()) == second
    assert [(r.get("stage"), r["seconds"]) for r in second["runs"]] == [(None, 100.0), ("all", 12.3), ("index", 0.5)]
    assert second["seconds"] == 112.8 and second["gallery_images"] == 4
