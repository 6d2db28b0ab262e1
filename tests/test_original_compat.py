"""Coming from the original code (issues 15, 16): its files, keys, example command and its numbers'
rules (compat=original), end to end through the real CLIs with tiny models."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from datasets import encode_mask_row_major, load_captions
from tests.pipeline import features_dir_from, read_results, results_dir_from, run_script

pytestmark = pytest.mark.slow  # end-to-end runs of the CLIs in subprocesses


def _shards(folder):
    return [load_file(p) for p in sorted(folder.glob("shard-*.safetensors"))]


def test_original_segmentation_results_give_the_same_mi_features_as_our_captions(tiny_model_dirs, demo_dir, tmp_path):
    """The original mask script's file (row-major list RLE, extra keys, an error entry, pre-NMS scores)
    gives exactly the features of the same masks in SoIR's captions.pt."""
    ours = load_captions(demo_dir / "captions.pt")
    original = {"gallery/broken_elsewhere.jpg": {"error": "cannot identify image file"}}
    for key, masks in ours.items():
        decoded = masks.masks()
        original[key] = {
            "image_path": key,
            "image_size": list(decoded.shape[:0:-1]),
            "num_objects": len(masks),
            "masks_rle": [encode_mask_row_major(m) for m in decoded],
            "bboxes": masks.bboxes,
            "scores": masks.scores + [0.1, 0.05],
        }  # pre-NMS: longer than the masks
    torch.save(original, tmp_path / "segmentation_results.pt")
    common = (
        "extractor=siglip_mi_features",
        f"model_name={tiny_model_dirs['siglip']}",
        "vec_dim=32",
        f"anns_file={demo_dir / 'anns.pt'}",
        "mi_iterations=3",
        "num_workers=0",
        "only_create=true",
    )
    a = features_dir_from(
        run_script("create_index.py", *common, f"captions_file={demo_dir / 'captions.pt'}", cwd=tmp_path), tmp_path
    )
    proc = run_script("create_index.py", *common, f"captions_file={tmp_path / 'segmentation_results.pt'}", cwd=tmp_path)
    assert "in the original code's format" in proc.stdout + proc.stderr
    b = features_dir_from(proc, tmp_path)
    assert a != b  # other inputs, other folder
    for x, y in zip(_shards(a / "gallery"), _shards(b / "gallery")):
        assert torch.equal(x["features"], y["features"]) and torch.equal(x["mask_index"], y["mask_index"])


def test_the_original_example_command_runs_and_reports_metrics(tiny_model_dirs, demo_dir, tmp_path):
    """example/run_example.sh of the original: DINOv2 + LoRA (4.x key names) + mi_sum + smart_crop + single_from_sc."""
    from tests.extractors.test_lora import RANK, _original_dinov2_checkpoint

    _, ckpt = _original_dinov2_checkpoint(tiny_model_dirs["dinov2"])
    torch.save(ckpt, tmp_path / "lora_weights.ckpt")
    proc = run_script(
        "create_index.py",
        "tag=example_run",
        "dataset=demo",
        "extractor=dinov2_mi_features",
        "B_model=true",
        "vec_dim=32",
        "mi_alpha=0.03",
        "lora_adapt=true",
        f"lora_rank={RANK}",
        "single_from_sc=true",
        "mi_sum=true",
        "global_features=true",
        "smart_crop=true",
        f"anns_file={demo_dir / 'anns.pt'}",
        f"captions_file={demo_dir / 'captions.pt'}",
        f"weights={tmp_path / 'lora_weights.ckpt'}",
        f"model_name={tiny_model_dirs['dinov2']}",
        "mi_iterations=2",
        "num_workers=0",
        cwd=tmp_path,
    )
    out = features_dir_from(proc, tmp_path)
    (log,) = results_dir_from(proc).glob("create_index.log")  # INFO lines go to the run's log file
    assert out.name.endswith("_example_run") and "smart crop" in log.read_text()
    lines = proc.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.strip().startswith("mAP"))
    assert float(lines[header + 1].split("|")[0]) >= 0  # the table, as search_index.py prints it
    results, _ = read_results(results_dir_from(proc))
    identity = json.loads((out / "identity.json").read_text())
    assert identity["extractor_identity"]["mode"] == "smart_crop"
    assert identity["extractor_identity"]["lora"]["alpha"] == 32  # the original's default alpha
    rows = torch.cat([s["features"] for s in _shards(out / "gallery")])
    assert results["num_gallery_rows"] == len(rows) > results["num_gallery_images"]  # one row per mask


def test_compat_original_runs_end_to_end(tiny_model_dirs, demo_dir, tmp_path):
    proc = run_script(
        "create_index.py",
        "compat=original",
        "extractor=clip_mi_features",
        f"model_name={tiny_model_dirs['clip']}",
        "vec_dim=24",
        f"anns_file={demo_dir / 'anns.pt'}",
        f"captions_file={demo_dir / 'captions.pt'}",
        "mask_input=true",
        "mi_sum=true",
        "mi_iterations=2",
        "num_workers=0",
        cwd=tmp_path,
    )
    out = features_dir_from(proc, tmp_path)
    identity = json.loads((out / "identity.json").read_text())
    assert identity["legrad_norm"] == "joint" and identity["extractor_identity"]["mode"] == "mean_dice"
    assert identity["extractor_identity"]["mi_resample"] == "bilinear"
    queries = json.loads((out / "queries" / "identity.json").read_text())
    assert queries["query_masks"] == "all"
    results, _ = read_results(results_dir_from(proc))
    assert 0 <= results["mAP"] <= 1 and results["queries_without_positives"] == 0


def test_what_create_index_does_at_the_end(tiny_model_dirs, demo_dir, tmp_path):
    """The search runs at the end unless only_create; only_gallery, no_faiss, save_knns, max_k_search, names."""
    common = (
        "extractor=siglip_features",
        f"model_name={tiny_model_dirs['siglip']}",
        "vec_dim=32",
        f"anns_file={demo_dir / 'anns.pt'}",
        "num_workers=0",
    )
    proc = run_script("create_index.py", *common, "only_create=true", "tag=t1", "add_string=s2", cwd=tmp_path)
    assert "results: " not in proc.stdout and features_dir_from(proc, tmp_path).name.endswith("_t1_s2")
    proc = run_script(
        "create_index.py",
        *common,
        "no_faiss=true",
        "save_knns=false",
        "max_k_search=3",
        "k_search=10",
        "experiment=x",
        "run_type=eval",
        "run_name=mine",
        cwd=tmp_path,
    )
    out, run = features_dir_from(proc, tmp_path), results_dir_from(proc)
    assert not list(out.glob("index-*.faiss")) and not (run / "rankings.jsonl").exists()
    assert "_eval-mine-" in run.name and json.loads((run / "results.json").read_text())["k_search"] == 3
    search = run_script("search_index.py", f"features_dir={out}", "k_search=10", "max_k_search=3", cwd=tmp_path)
    rankings = [json.loads(line) for line in (results_dir_from(search) / "rankings.jsonl").read_text().splitlines()]
    assert {len(r["ranking"]) for r in rankings} == {3}
    proc = run_script("create_index.py", *common, "only_gallery=true", cwd=tmp_path)
    out = features_dir_from(proc, tmp_path)
    assert not (out / "queries" / "images.json").exists() and "results: " not in proc.stdout
    refused = run_script("search_index.py", f"features_dir={out}", cwd=tmp_path, check=False)
    assert refused.returncode == 1 and "only_gallery=true" in refused.stderr


def test_subsets_by_index_and_another_extractor_for_the_queries(tiny_model_dirs, demo_dir, tmp_path):
    import torch as _torch

    keys = sorted(_torch.load(demo_dir / "anns.pt", weights_only=True))
    (tmp_path / "inds.txt").write_text(
        " ".join(str(i) for i in range(len(keys)) if i % 2 == 0 or keys[i].startswith("q"))
    )
    proc = run_script(
        "create_index.py",
        "extractor=siglip_mi_features",
        f"model_name={tiny_model_dirs['siglip']}",
        "vec_dim=32",
        f"anns_file={demo_dir / 'anns.pt'}",
        f"captions_file={demo_dir / 'captions.pt'}",
        f"ds_inds_file={tmp_path / 'inds.txt'}",
        "no_positive=skip",
        "query_extractor=siglip_features",
        "mi_iterations=2",
        "num_workers=0",
        cwd=tmp_path,
    )
    out = features_dir_from(proc, tmp_path)
    gallery = json.loads((out / "gallery" / "images.json").read_text())
    assert [g["key"] for g in gallery] == [k for i, k in enumerate(keys) if i % 2 == 0 and not k.startswith("q")]
    query_identity = json.loads((out / "queries" / "identity.json").read_text())
    assert query_identity["query_extractor_identity"]["class"] == "SigLIPExtractor"
    from extractors import SigLIPExtractor

    first = json.loads((out / "queries" / "images.json").read_text())[0]
    from datasets import crop_box, load_rgb

    plain = SigLIPExtractor(str(tiny_model_dirs["siglip"]), device="cpu")
    expected = plain.extract(crop_box(load_rgb(first["file"]), first["bbox"], "q", square=True))
    stored = _shards(out / "queries")[0]["features"][0]
    torch.testing.assert_close(stored, expected, atol=1e-5, rtol=1e-5)
