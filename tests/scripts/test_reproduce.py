"""scripts/reproduce.sh end to end with tiny models on a VoxDet-SoIR replica, and scripts/paper_table.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from peft import LoraConfig, get_peft_model
from transformers import Dinov2Model

from datasets import save_captions
from datasets.captions import ImageMasks, encode_mask
from datasets.fields import bbox_from_mask
from scripts.paper_table import collect, table
from scripts.prepare_benchmark import main as prepare
from tests.datasets.voxdet_replica import rect, write_voxdet_soir
from tests.pipeline import ROOT

# One run per branch of reproduce.sh: global, ground-truth masks (the paper's method and the published
# code's), detector masks + LoRA weights.

SETTINGS = (
    "dinov2_global mao_clip_zeroshot_gt_paper mao_clip_zeroshot_gt mao_dinov2_finetuned_det dinov2_gem dinov2_crop_gt "
    "dinov2_global_aqe"
)


def _lora_checkpoint(model_dir: Path, path: Path, rank: int = 4) -> Path:
    """LoRA state dict (q/k/v adapters, non-zero) for the tiny DINOv2, as a fine-tuning run saves it."""
    torch.manual_seed(0)
    peft_model = get_peft_model(
        Dinov2Model.from_pretrained(model_dir),
        LoraConfig(r=rank, lora_alpha=rank, target_modules=["q_proj", "k_proj", "v_proj"]),
    )
    for name, param in peft_model.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0, 0.5)
    torch.save({k: v for k, v in peft_model.state_dict().items() if "lora_" in k}, path)
    return path


def _row(text: str, name: str) -> list[str]:
    line = next(s for s in text.splitlines() if s.startswith(f"| {name} |"))
    return [cell.strip() for cell in line.strip("|").split("|")][1:]


@pytest.mark.slow  # scripts/reproduce.sh: a shell script that runs the CLIs (the script is the subject)
def test_reproduce_runs_the_settings_and_writes_the_table(tiny_model_dirs, tmp_path):
    anns_file, facts = write_voxdet_soir(tmp_path / "VoxDet")
    prepare(["voxdet", "--root", str(anns_file.parent), "--out", str(tmp_path / "bench")])
    detections = {
        key: ImageMasks([encode_mask(rect(*map(int, boxes[0])))], [bbox_from_mask(rect(*map(int, boxes[0])))], [0.9])
        for key, boxes in facts["gallery_boxes"].items()
        if "RoboTools" in key
    }
    save_captions(detections, tmp_path / "detections.pt")
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "PYTHON": sys.executable,
        "SETTINGS": SETTINGS,
        "DINOV2_MODEL": str(tiny_model_dirs["dinov2"]),
        "DINOV2_DIM": "32",
        "CLIP_MODEL": str(tiny_model_dirs["clip"]),
        "CLIP_DIM": "24",
        "LORA_RANK": "4",
        "DINOV2_WEIGHTS": str(_lora_checkpoint(tiny_model_dirs["dinov2"], tmp_path / "lora.ckpt")),
        "DETECTOR_CAPTIONS": str(tmp_path / "detections.pt"),
    }
    proc = subprocess.run(
        [
            "bash",
            str(ROOT / "scripts" / "reproduce.sh"),
            str(tmp_path / "bench"),
            "num_workers=0",
            "batch_size=4",
            "mi_iterations=2",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    [run_dir] = (tmp_path / "bench").glob("reproduce-*")
    runs = [line.split("\t") for line in (run_dir / "runs.tsv").read_text().splitlines()]
    assert [(b, s) for b, s, _ in runs] == [("voxdet", s) for s in SETTINGS.split()]
    assert (tmp_path / "outputs" / "features" / "voxdet").is_dir()  # outputs go to the caller's folder
    text = (run_dir / "table.md").read_text()
    assert text in proc.stdout
    for _, setting, folder in runs:
        results = json.loads((Path(folder) / "results.json").read_text())
        assert results["num_queries"] == 3 and results["num_gallery_images"] == 3  # set=RoboTools
    ours = {
        setting: f"{100 * json.loads((Path(folder) / 'results.json').read_text())['mAP']:.2f}"
        for _, setting, folder in runs
    }
    gt, det = "with ground truth annotations", "detector masks"
    assert _row(text, "plain DINOv2 global, zero-shot") == [ours["dinov2_global"], "51.23"]
    assert _row(text, "plain CLIP global, zero-shot") == ["-", "44.52"]  # not in SETTINGS; the paper's number
    assert _row(text, f"MaO-CLIP, zero-shot (paper's method, {gt})") == [ours["mao_clip_zeroshot_gt_paper"], "65.22"]
    assert _row(text, f"MaO-CLIP, zero-shot (published code, {gt})") == [ours["mao_clip_zeroshot_gt"], "65.22"]
    assert _row(text, f"MaO-DINOv2, fine-tuned (published code, {det})") == [ours["mao_dinov2_finetuned_det"], "83.70"]
    assert _row(text, f"MaO-DINOv2, fine-tuned (published code, {gt})") == ["-", "83.70"]
    assert _row(text, f"MaO-DINOv2, zero-shot (paper's method, {gt})") == ["-", "70.20"]  # not in SETTINGS
    assert _row(text, f"MaO-CLIP, fine-tuned (paper's method, {det})") == ["-", "79.86"]  # no CLIP_WEIGHTS
    folders = {setting: Path(folder) for _, setting, folder in runs}
    paper = OmegaConf.load(folders["mao_clip_zeroshot_gt_paper"] / "features_config.yaml")
    assert (paper.descriptor, paper.masks_from) == ("mao", "anns")
    results = json.loads((folders["mao_clip_zeroshot_gt_paper"] / "results.json").read_text())
    assert results["num_gallery_rows"] == results["num_gallery_images"] == 3  # one row per image
    made_with = OmegaConf.load(folders["mao_dinov2_finetuned_det"] / "features_config.yaml")
    assert (made_with.extractor, made_with.lora_adapt, made_with.lora_rank, made_with.missing_masks) == (
        "dinov2_mi_features",
        True,
        4,
        "global",
    )
    assert (made_with.weights, made_with.captions_file) == (env["DINOV2_WEIGHTS"], env["DETECTOR_CAPTIONS"])
    published = OmegaConf.load(folders["mao_clip_zeroshot_gt"] / "features_config.yaml")
    assert (published.masks_from, published.descriptor) == ("anns", "mi")
    made = {setting: json.loads((Path(f) / "results.json").read_text()) for _, setting, f in runs}
    # every setting has features of its own, except re-ranking, which searches dinov2_global's
    assert len({r["features_dir"] for r in made.values()}) == len(runs) - 1
    assert made["dinov2_global_aqe"]["features_dir"] == made["dinov2_global"]["features_dir"]
    assert (made["dinov2_global_aqe"]["rerank"], made["dinov2_global"]["rerank"]) == ("aqe", "none")
    assert _row(text, "DINOv2 GeM, zero-shot (pool=gem, p = 3, patch tokens)") == [ours["dinov2_gem"], "-"]
    assert _row(text, "DINOv2 crop-and-encode, zero-shot (GT masks, object_desc=crop)") == [ours["dinov2_crop_gt"], "-"]
    assert OmegaConf.load(folders["dinov2_crop_gt"] / "features_config.yaml").object_desc == "crop"


def test_table_layout_with_two_benchmarks(tmp_path):
    runs = tmp_path / "runs"
    runs.mkdir()
    lines = []
    for benchmark, setting, value in [
        ("instre_xs", "clip_global", 0.5),
        ("permir", "clip_global", 0.25),
        ("permir", "mao_dinov2_zeroshot_gt", 0.875),
    ]:
        folder = tmp_path / f"{benchmark}-{setting}"
        folder.mkdir()
        (folder / "results.json").write_text(json.dumps({"mAP": value}))
        lines.append(f"{benchmark}\t{setting}\t{folder}")
    (runs / "runs.tsv").write_text("\n".join(lines) + "\n")
    text = table(collect([runs]))
    assert text.splitlines()[0] == "| setting | PerMiR ours | PerMiR paper | INSTRE-XS ours | INSTRE-XS paper |"
    assert _row(text, "plain CLIP global, zero-shot") == ["25.00", "-", "50.00", "-"]
    assert _row(text, "plain DINOv2 global, zero-shot") == ["-", "40.57", "-", "-"]
    assert _row(text, "MaO-DINOv2, zero-shot (published code, with ground truth annotations)") == [
        "87.50",
        "89.86",
        "-",
        "71.28",
    ]
    (runs / "runs.tsv").write_text(f"permir\tclip_global\t{tmp_path / 'nowhere'}\n")
    with pytest.raises(FileNotFoundError, match="runs.tsv, line 1: .*nowhere/results.json does not exist"):
        collect([runs])
