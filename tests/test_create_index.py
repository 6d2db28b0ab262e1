"""create_index.py end to end: outputs, resume after an interruption, refusals."""
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

from tests.pipeline import ROOT, features_dir_from, run_script


def _args(tiny_model_dirs, demo_dir, *extra):
    return ("extractor=siglip_features", f"model_name={tiny_model_dirs['siglip']}", "vec_dim=32",
            f"anns_file={demo_dir / 'anns.pt'}", "num_workers=0", "batch_size=2", "shard_size=2", *extra)


def _shard_bytes(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("shard-*.safetensors"))}


def test_outputs_and_relative_paths(tiny_model_dirs, demo_dir, tmp_path):
    proc = run_script("create_index.py", *_args(tiny_model_dirs, demo_dir, "dataset=demo"), cwd=tmp_path)
    out = features_dir_from(proc, tmp_path)
    assert out.is_relative_to(tmp_path / "outputs" / "features" / "demo")   # no chdir into the run dir
    gallery = json.loads((out / "gallery" / "images.json").read_text())
    shard = load_file(out / "gallery" / "shard-00000.safetensors")
    assert shard["features"].shape == (2, 32) and shard["owner"].tolist() == [0, 1]
    assert (out / "index-Flat.faiss").is_file() and (out / "config.yaml").is_file()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["gallery_images"] == len(gallery) == summary["gallery_rows"]
    run_dirs = list((tmp_path / "outputs" / "runs").glob("*/*create_index*"))
    assert len(run_dirs) == 1 and (run_dirs[0] / ".hydra" / "config.yaml").is_file()


def test_resume_after_kill_gives_byte_identical_features(tiny_model_dirs, demo_dir, tmp_path):
    (tmp_path / "a").mkdir()
    reference = features_dir_from(run_script("create_index.py", *_args(tiny_model_dirs, demo_dir),
                                             cwd=tmp_path / "a"), tmp_path / "a")
    expected = _shard_bytes(reference)
    # Interrupted run: kill -9 as soon as the first shard exists.
    work = tmp_path / "b"
    work.mkdir()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, str(ROOT / "create_index.py"), *_args(tiny_model_dirs, demo_dir)],
                            cwd=work, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
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
    out = features_dir_from(run_script("create_index.py", *_args(tiny_model_dirs, demo_dir), cwd=work), work)
    assert _shard_bytes(out) == {k: v for k, v in expected.items()}
    assert (out / "index-Flat.faiss").read_bytes() == (reference / "index-Flat.faiss").read_bytes()


def test_query_only_changes_keep_the_gallery_and_other_changes_are_refused(tiny_model_dirs, demo_dir, tmp_path):
    out = tmp_path / "feats"
    run_script("create_index.py", *_args(tiny_model_dirs, demo_dir, f"features_dir={out}"), cwd=tmp_path)
    gallery = {p: p.stat().st_mtime_ns for p in (out / "gallery").glob("shard-*")}
    queries = _shard_bytes(out / "queries")
    proc = run_script("create_index.py", *_args(tiny_model_dirs, demo_dir, f"features_dir={out}",
                                                "no_query_crop=true"), cwd=tmp_path)
    assert "recomputing the query features" in proc.stdout + proc.stderr
    assert {p: p.stat().st_mtime_ns for p in (out / "gallery").glob("shard-*")} == gallery
    assert _shard_bytes(out / "queries") != queries          # uncropped queries: other vectors
    proc = run_script("create_index.py", *_args(tiny_model_dirs, demo_dir, f"features_dir={out}",
                                                "batch_size=3"), cwd=tmp_path, check=False)
    assert proc.returncode != 0 and "made with other settings or inputs (batch_size)" in proc.stderr


@pytest.mark.parametrize("overrides,message", [
    (("vec_dim=768",), "vec_dim=768 but"),
    (("extractr=clip",), "extractr"),
    (("extractor=siglip_mi_features",), "have no masks in no captions_file given"),
    (("anns_file=/nonexistent/anns.pt",), "/nonexistent/anns.pt"),
])
def test_bad_runs_fail_with_a_clear_message(tiny_model_dirs, demo_dir, tmp_path, overrides, message):
    proc = run_script("create_index.py", *_args(tiny_model_dirs, demo_dir), *overrides, cwd=tmp_path, check=False)
    assert proc.returncode != 0
    assert message in proc.stderr + proc.stdout


def test_multirun_outputs_never_collide(tiny_model_dirs, demo_dir, tmp_path):
    proc = run_script("create_index.py", "-m", *_args(tiny_model_dirs, demo_dir), "batch_size=1,3",
                      cwd=tmp_path)
    outs = {l.split(": ", 1)[1] for l in proc.stdout.splitlines() if l.startswith("features and index: ")}
    assert len(outs) == 2
    job_dirs = list((tmp_path / "outputs" / "multirun").glob("*/*/[01]"))
    assert len(job_dirs) == 2 and all((d / ".hydra" / "config.yaml").is_file() for d in job_dirs)


def test_skip_policies_are_counted_and_logged(tiny_model_dirs, demo_dir, tmp_path):
    """missing_masks=global and no_positive=skip: nothing is guessed silently."""
    import torch
    from datasets import load_captions, save_captions

    anns = torch.load(demo_dir / "anns.pt", weights_only=True)
    anns["queries/lonely.jpg"] = {"ins": 999, "is_query": True}            # no positive in the gallery
    (tmp_path / "queries").mkdir()
    (tmp_path / "queries" / "lonely.jpg").write_bytes((demo_dir / next(k for k in anns if k.startswith("queries/q"))).read_bytes())
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
        del captions[key]                                                   # three gallery images lose their masks
    save_captions(captions, tmp_path / "captions.pt")

    args = ("extractor=siglip_mi_features", f"model_name={tiny_model_dirs['siglip']}", "vec_dim=32",
            f"anns_file={tmp_path / 'anns.pt'}", f"captions_file={tmp_path / 'captions.pt'}",
            "mi_iterations=2", "num_workers=0")
    refused = run_script("create_index.py", *args, cwd=tmp_path, check=False)
    assert refused.returncode != 0 and "queries/lonely.jpg" in refused.stderr
    refused = run_script("create_index.py", *args, "no_positive=skip", cwd=tmp_path, check=False)
    assert refused.returncode != 0 and "3 of" in refused.stderr and "missing_masks=global" in refused.stderr
    proc = run_script("create_index.py", *args, "no_positive=skip", "missing_masks=global", cwd=tmp_path)
    summary = json.loads((features_dir_from(proc, tmp_path) / "summary.json").read_text())
    assert summary["gallery_counts"]["global_fallback"] == 3
    assert summary["queries"] == len([k for k, v in anns.items() if v["is_query"]]) - 1
    log = proc.stdout + proc.stderr
    assert "have no masks and get their global embedding" in log and "lonely" in log


def test_query_mask_is_the_caption_mask_overlapping_the_bbox():
    from create_index import query_mask
    from datasets import Annotation, ImageMasks

    masks = ImageMasks([{"counts": "a", "size": [100, 100]}, {"counts": "b", "size": [100, 100]}],
                       [[0, 0, 10, 10], [30, 30, 70, 70]], [0.9, 0.8])
    query = Annotation(key="q.jpg", file=Path("q.jpg"), ins=(1,), is_query=True, bbox=(40, 40, 60, 60))
    assert query_mask(masks, query).bboxes == [[30, 30, 70, 70]]
    elsewhere = Annotation(key="q.jpg", file=Path("q.jpg"), ins=(1,), is_query=True, bbox=(80, 80, 90, 90))
    assert query_mask(masks, elsewhere) is None          # no overlap: the caller uses the bbox rectangle
    no_box = Annotation(key="q.jpg", file=Path("q.jpg"), ins=(1,), is_query=True)
    with pytest.raises(ValueError, match="2 masks and no bbox"):
        query_mask(masks, no_box)


def test_run_lock_refuses_a_live_run_and_takes_over_a_dead_one(tmp_path):
    import socket
    from create_index import run_lock

    lock = tmp_path / ".lock"
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        lock.write_text(f"{socket.gethostname()} {live.pid}")
        with pytest.raises(RuntimeError, match=f"being written by process {live.pid}"):
            with run_lock(tmp_path):
                pass
    finally:
        live.kill()
        live.wait()
    with run_lock(tmp_path):                                # the process is gone: stale
        assert lock.read_text() == f"{socket.gethostname()} {os.getpid()}"
    assert not lock.exists()
    lock.write_text(f"{socket.gethostname()} {os.getpid()}")   # our own pid (container restart): stale
    with run_lock(tmp_path):
        pass
    lock.write_text("other-host 123")
    with pytest.raises(RuntimeError, match="on other-host"):
        with run_lock(tmp_path):
            pass


def test_report_settings_are_not_part_of_the_features_identity():
    """search_index.py's report keys must not move features to a new folder or refuse an existing one."""
    from types import SimpleNamespace

    from hydra import compose, initialize_config_dir

    from create_index import feature_identity
    extractor = SimpleNamespace(model_name="m", device="cpu")
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        default = compose(config_name="defaults", overrides=["anns_file=a.pt"])
        changed = compose(config_name="defaults", overrides=["anns_file=a.pt", "report=false", "report_k=3",
                                                             "report_thumb_size=64", "report_maps=true"])
    identity = feature_identity(default, extractor)
    assert identity == feature_identity(changed, extractor)
    assert not any(key.startswith("report") for key in identity)
