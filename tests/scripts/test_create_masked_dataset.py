"""scripts/create_masked_dataset.py (the CLI), utils/masks/creation.py and utils/masks/models.py with tiny random
OWLv2 and SAM.

The models are saved to a temp folder and loaded through the same loaders a user's run uses
(``Owlv2Detector.from_pretrained``, ``load_sam`` with ``--sam_config``).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from segment_anything import sam_model_registry
from transformers import CLIPVisionConfig, Owlv2ForObjectDetection, Owlv2Processor

from datasets.captions import decode_mask, encode_mask, load_captions
from scripts import create_masked_dataset as cmd
from utils.errors import SoIRError
from utils.masks.models import (
    SAM_ARCHITECTURES,
    DetectionOptions,
    ModelLoadError,
    Owlv2Detector,
    SamSegmenter,
    filter_detections,
    infer_sam_model_type,
    load_sam,
    sam_state_dict_shapes,
)
from utils.testing.tiny_models import TINY_SAM, save_tiny_owlv2, save_tiny_sam

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("mask_models")
    checkpoint, config = save_tiny_sam(root / "sam")
    return {"owlv2": save_tiny_owlv2(root / "owlv2"), "sam": checkpoint, "sam_config": config}


def _random_image(height: int, width: int, seed: int, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    pixels = rng.integers(0, 256, (height, width, channels), dtype=np.uint8)
    return Image.fromarray(pixels[..., 0] if channels == 1 else pixels, mode)


def _folder(root: Path, count: int, seed: int = 0) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        _random_image(40 + 8 * (i % 3), 64 - 8 * (i % 2), seed + i).save(root / f"img_{i:02d}.png")
    return root


def _base_args(models: dict, input_dir: Path, output_dir: Path, *extra: str) -> list[str]:
    return [
        "--input_dir",
        str(input_dir),
        "--output_dir",
        str(output_dir),
        "--owlv2_model",
        str(models["owlv2"]),
        "--sam_checkpoint",
        str(models["sam"]),
        "--sam_config",
        str(models["sam_config"]),
        "--device",
        "cpu",
        "--num_workers",
        "0",
        "--min_box_size",
        "2",
        "--fallback",
        "none",
        *extra,
    ]


def _detector(models, **options) -> Owlv2Detector:
    return Owlv2Detector.from_pretrained(str(models["owlv2"]), DetectionOptions(**options))


def _segmenter(models) -> SamSegmenter:
    return SamSegmenter(load_sam(models["sam"], sam_config=models["sam_config"])[0])


# --------------------------------------------------------------------------------------------
# Detection
# --------------------------------------------------------------------------------------------


def test_filter_detections_keeps_each_score_with_its_box():
    boxes = torch.tensor(
        [
            [0.0, 0.0, 10.0, 10.0],  # 0.5, suppressed by box 2 (IoU 0.81)
            [50.0, 50.0, 90.0, 90.0],  # 0.9, reaches into the padding: clipped to 60
            [1.0, 1.0, 10.0, 10.0],  # 0.7
            [20.0, 20.0, 22.0, 40.0],  # 0.95, 2 px wide: too small
            [30.0, 70.0, 40.0, 80.0],  # 0.8, entirely in the padding (H = 60)
            [30.0, 0.0, 45.0, 12.0],
        ]
    )  # 0.3
    scores = torch.tensor([0.5, 0.9, 0.7, 0.95, 0.8, 0.3])
    options = DetectionOptions(score_threshold=0.0, nms_iou=0.5, max_objects=10, min_box_size=4)
    kept_boxes, kept_scores = filter_detections(boxes, scores, (60, 100), options)
    assert kept_scores.tolist() == pytest.approx([0.9, 0.7, 0.3])
    assert kept_boxes.tolist() == [[50.0, 50.0, 90.0, 60.0], [1.0, 1.0, 10.0, 10.0], [30.0, 0.0, 45.0, 12.0]]
    capped_boxes, capped_scores = filter_detections(
        boxes, scores, (60, 100), DetectionOptions(0.0, 0.5, max_objects=2, min_box_size=4)
    )
    assert capped_scores.tolist() == pytest.approx([0.9, 0.7]) and capped_boxes.tolist() == kept_boxes[:2].tolist()


def test_boxes_are_in_original_pixels_of_a_non_square_image(models):
    """OWLv2 pads bottom/right to a square: a 32x64 image and the same image padded black to
    64x64 give the model identical input, so their boxes must be identical up to the clip at H=32."""
    detector = _detector(models, score_threshold=0.0, nms_iou=1.0, max_objects=1000, min_box_size=0)
    wide = _random_image(32, 64, seed=1)
    square = Image.new("RGB", (64, 64))
    square.paste(wide, (0, 0))
    pixels = torch.stack([detector.preprocess(wide), detector.preprocess(square)])
    assert torch.allclose(pixels[0], pixels[1])
    (wide_boxes, wide_scores), (square_boxes, square_scores) = detector.detect(pixels, [(32, 64), (64, 64)])
    clipped = square_boxes.clone()
    clipped[:, 1::2] = clipped[:, 1::2].clamp(max=32)
    inside = clipped[:, 3] > clipped[:, 1]
    assert 3 <= len(wide_boxes) < len(square_boxes)  # some square boxes lie in the padding only
    order = torch.argsort(wide_scores)
    assert torch.allclose(wide_scores[order], square_scores[inside][torch.argsort(square_scores[inside])])
    assert torch.allclose(wide_boxes[order], clipped[inside][torch.argsort(square_scores[inside])], atol=1e-4)
    assert wide_boxes[:, 3].max() <= 32 and wide_boxes[:, 2].max() <= 64


def test_text_queries_match_the_processor_path(models):
    """Our tokenisation + batching gives the scores of Owlv2Processor + post_process_grounded_object_detection."""
    queries = ("a mug", "a toy")
    detector = Owlv2Detector.from_pretrained(
        str(models["owlv2"]), DetectionOptions(0.0, 1.0, 1000, 0.0), queries=queries
    )
    images = [_random_image(64, 64, seed=2), _random_image(48, 64, seed=3)]
    ours = detector.detect(torch.stack([detector.preprocess(i) for i in images]), [(64, 64), (48, 64)])

    processor = Owlv2Processor.from_pretrained(models["owlv2"])
    model = Owlv2ForObjectDetection.from_pretrained(models["owlv2"]).eval()
    for image, (boxes, scores) in zip(images, ours):
        inputs = processor(text=[list(queries)], images=image, return_tensors="pt")
        with torch.inference_mode():
            outputs = model(**inputs)
        reference = processor.post_process_grounded_object_detection(
            outputs, threshold=0.0, target_sizes=[(image.height, image.width)]
        )[0]
        ref_boxes = reference["boxes"].clone()
        ref_boxes[:, 0::2] = ref_boxes[:, 0::2].clamp(0, image.width)
        ref_boxes[:, 1::2] = ref_boxes[:, 1::2].clamp(0, image.height)
        valid = (ref_boxes[:, 2] > ref_boxes[:, 0]) & (ref_boxes[:, 3] > ref_boxes[:, 1])
        assert len(scores) == int(valid.sum()) > 0
        for box, score in zip(boxes, scores):
            match = torch.argmin((reference["scores"] - score).abs())
            assert reference["scores"][match] == pytest.approx(float(score), abs=1e-5)
            assert torch.allclose(ref_boxes[match], box, atol=1e-3)


def test_owlv2_errors_are_clear_and_offline(models, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(
        SoIRError,
        match="'google/owlv2-no-such-model' is needed but is not in the HuggingFace cache "
        "and HF_HUB_OFFLINE is set; pass --owlv2_model /path/to/a/local/folder",
    ):
        Owlv2Detector.from_pretrained("google/owlv2-no-such-model", DetectionOptions())
    CLIPVisionConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=1, intermediate_size=8).save_pretrained(
        tmp_path / "clip"
    )
    with pytest.raises(ModelLoadError, match="'clip_vision_model' model, not OWLv2"):
        Owlv2Detector.from_pretrained(str(tmp_path / "clip"), DetectionOptions())


# --------------------------------------------------------------------------------------------
# SAM
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model_type", ["vit_h", "vit_l", "vit_b"])
def test_sam_architectures_mirror_segment_anything(model_type):
    with torch.device("meta"):
        reference = sam_model_registry[model_type]()
    assert sam_state_dict_shapes(SAM_ARCHITECTURES[model_type]) == {
        k: tuple(v.shape) for k, v in reference.state_dict().items()
    }


def test_sam_model_type_from_checkpoint_name():
    assert infer_sam_model_type("/ckpt/sam_vit_h_4b8939.pth") == "vit_h"
    assert infer_sam_model_type("sam_vit_b_01ec64.pth") == "vit_b"
    assert infer_sam_model_type("my_sam.pth") is None


def test_sam_checkpoint_errors(models, tmp_path, monkeypatch):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_sam(tmp_path / "sam_vit_b_missing.pth")
    (tmp_path / "garbage_vit_b.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ModelLoadError, match="could not be read as a PyTorch file"):
        load_sam(tmp_path / "garbage_vit_b.pth")
    state_dict = torch.load(models["sam"], weights_only=True)
    torch.save({"model": state_dict}, tmp_path / "wrapped_vit_b.pth")
    with pytest.raises(ModelLoadError, match="not a SAM state dict"):
        load_sam(tmp_path / "wrapped_vit_b.pth")
    with pytest.raises(ModelLoadError, match="pass --sam_model_type"):
        load_sam(models["sam"])  # "sam_tiny.pth" names no type

    # A tiny checkpoint loaded as vit_b: missing/unexpected/shape counts, and the matching type
    # once the registry (plain data) knows it.
    monkeypatch.setitem(SAM_ARCHITECTURES, "tiny", TINY_SAM)
    with pytest.raises(ModelLoadError) as err:
        load_sam(models["sam"], model_type="vit_b")
    message = str(err.value)
    assert "does not fit SAM type 'vit_b'" in message and "missing keys" in message
    # vit_b's 12 blocks against the tiny encoder's: the exact counts, and the first missing key named
    assert "missing keys 140 (e.g. ['image_encoder.blocks.10.attn.proj.bias'" in message
    assert "unexpected keys 0" in message and "shape mismatches 173" in message
    assert "shape mismatches" in message and "pass --sam_model_type tiny" in message
    sam, model_type = load_sam(models["sam"], model_type="tiny")
    assert model_type == "tiny" and sam.image_encoder.img_size == 64

    state_dict["mask_decoder.iou_token.weight"] = torch.zeros(1, 7)
    torch.save(state_dict, tmp_path / "bad_shape.pth")
    with pytest.raises(ModelLoadError, match=r"shape mismatches 1 \(e.g. \['mask_decoder.iou_token.weight"):
        load_sam(tmp_path / "bad_shape.pth", sam_config=models["sam_config"])


def test_bad_checkpoint_fails_before_any_image(models, tmp_path, capsys):
    images = _folder(tmp_path / "images", 2)
    args = _base_args(models, images, tmp_path / "out")
    args[args.index("--sam_checkpoint") + 1] = str(tmp_path / "sam_vit_h_missing.pth")
    args.remove("--sam_config"), args.remove(str(models["sam_config"]))
    assert cmd.main(args) == 1
    assert "sam_vit_h_missing.pth' does not exist" in capsys.readouterr().err
    assert not list((tmp_path / "out").glob("shards/*")) and not (tmp_path / "out" / "run_config.json").exists()

    args = _base_args(models, images, tmp_path / "out2")
    args[args.index("--owlv2_model") + 1] = "google/owlv2-no-such-model"
    assert cmd.main(args) == 1
    assert "is not in the HuggingFace cache and HF_HUB_OFFLINE is set" in capsys.readouterr().err
    assert not list((tmp_path / "out2").glob("shards/*"))


def test_rle_round_trips_through_torch_save(models, tmp_path):
    segmenter = _segmenter(models)
    image = np.array(_random_image(37, 53, seed=4))
    segmenter.embed(image)
    masks, _ = segmenter.decode(torch.tensor([[2.0, 3.0, 30.0, 20.0], [10.0, 10.0, 50.0, 36.0]]))
    assert masks.shape == (2, 37, 53) and masks.dtype == torch.bool
    as_str = [encode_mask(m) for m in masks.numpy()]
    as_bytes = [{"counts": r["counts"].encode(), "size": r["size"]} for r in as_str]
    torch.save({"str": as_str, "bytes": as_bytes}, tmp_path / "rle.pt")
    loaded = torch.load(tmp_path / "rle.pt", weights_only=True)
    for kind in ("str", "bytes"):
        decoded = np.stack([decode_mask(r) for r in loaded[kind]])
        assert np.array_equal(decoded, masks.numpy())


# --------------------------------------------------------------------------------------------
# The script, end to end
# --------------------------------------------------------------------------------------------


@pytest.mark.slow  # a whole gallery run (~5-7 s)
def test_gallery_run_with_awkward_images(models, tmp_path, capsys):
    images = tmp_path / "images"
    (images / "sub").mkdir(parents=True)
    _random_image(48, 64, seed=5).save(images / "rgb.png")
    _random_image(40, 56, seed=6, mode="L").save(images / "sub" / "gray.png")
    _random_image(64, 40, seed=7, mode="RGBA").save(images / "sub" / "rgba.png")
    ramp = np.linspace(0, 255, 4000, dtype=np.uint8)[None, :, None].repeat(3000, 0).repeat(3, 2)
    Image.fromarray(ramp).save(images / "huge.jpg", quality=50)
    (images / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    (images / "notes.txt").write_text("not an image")
    out = tmp_path / "out"
    assert (
        cmd.main(
            _base_args(
                models,
                images,
                out,
                "--max_objects",
                "3",
                "--num_workers",
                "1",
                "--preview",
                "2",
                "--shard_size",
                "2",
                "--batch_size",
                "2",
            )
        )
        == 0
    )
    captured = capsys.readouterr()
    assert "corrupt.jpg" in captured.err and "cannot load image" in captured.err

    captions = load_captions(out / "captions.pt")
    sizes = {"rgb.png": (48, 64), "sub/gray.png": (40, 56), "sub/rgba.png": (64, 40), "huge.jpg": (3000, 4000)}
    assert set(captions) == set(sizes)
    segmenter = _segmenter(models)
    for key, entry in captions.items():
        height, width = sizes[key]
        assert 1 <= len(entry) <= 3 and len(entry.bboxes) == len(entry.scores) == len(entry)
        assert entry.scores == sorted(entry.scores, reverse=True) and min(entry.scores) > 0.2
        boxes = torch.tensor(entry.bboxes)
        assert (boxes[:, 2] <= width).all() and (boxes[:, 3] <= height).all() and (boxes[:, :2] >= 0).all()
        masks = entry.masks()
        assert masks.shape == (len(entry), height, width) and masks.any(axis=(1, 2)).all()
    # Masks belong to their boxes: SAM prompted with the stored boxes reproduces them.
    segmenter.embed(np.array(Image.open(images / "rgb.png").convert("RGB")))
    assert np.array_equal(
        segmenter.decode(torch.tensor(captions["rgb.png"].bboxes))[0].numpy(), captions["rgb.png"].masks()
    )

    summary = json.loads((out / "summary.json").read_text())
    assert summary["images"] == 5 and summary["failed_images"] == 1 and summary["images_with_masks"] == 4
    assert summary["objects"] == sum(len(e) for e in captions.values())
    assert sum(summary["objects_per_image"].values()) == 4
    areas = [m.mean() * 100 for e in captions.values() for m in e.masks()]
    assert summary["mean_mask_area_percent"] == pytest.approx(np.mean(areas), rel=1e-6)
    assert set(summary["stage_seconds_this_run"]) >= {"load", "owlv2", "sam_embed", "sam_decode", "rle"}
    assert (out / "failed_images.txt").read_text().startswith("corrupt.jpg\tcannot load image")
    assert "unreadable/failed  1" in captured.out and "objects per image" in captured.out

    previews = sorted((out / "preview").glob("*.png"))
    assert [p.name for p in previews] == ["000001_huge.png", "000002_rgb.png"]  # corrupt.jpg (item 0) failed
    huge_preview = np.asarray(Image.open(previews[0]))
    assert huge_preview.shape == (768, 1024, 3)
    plain = np.asarray(Image.open(images / "huge.jpg").resize((1024, 768)))
    assert np.abs(huge_preview.astype(int) - plain).mean() > 5  # masks and boxes were drawn


def test_images_without_detections_are_recorded_empty(models, tmp_path):
    images = _folder(tmp_path / "images", 3)
    out = tmp_path / "out"
    assert (
        cmd.main(_base_args(models, images, out, "--score_threshold", "1.0", "--queries", "a mug", "a toy")) == 0
    )  # --fallback none
    captions = torch.load(out / "captions.pt", weights_only=True)
    assert captions == {f"img_{i:02d}.png": {"masks_rle": [], "bboxes": [], "scores": []} for i in range(3)}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["objects_per_image"] == {"0": 3} and summary["images_without_detections"] == 3
    assert "sam_embed" not in summary["stage_seconds_this_run"]  # no boxes, no SAM call


@pytest.mark.slow  # SAM's automatic mask generator (~10 s)
def test_defaults_are_the_originals_and_nothing_detected_falls_back_to_sams_automatic_masks(models, tmp_path):
    args = cmd.parse_args(["--input_dir", "i", "--output_dir", "o", "--sam_checkpoint", "s.pth"])
    assert (args.nms_iou, args.max_objects, args.min_box_size, args.fallback) == (0.4, None, 0.0, "automatic")
    assert DetectionOptions() == DetectionOptions(0.2, 0.4, None, 0.0)
    images = _folder(tmp_path / "images", 2)
    out = tmp_path / "out"
    # A random tiny SAM predicts no mask above SAM's default thresholds: lower them for the test.
    assert (
        cmd.main(
            [
                *_base_args(models, images, out, "--score_threshold", "1.0"),
                "--fallback",
                "automatic",
                "--automatic_pred_iou_thresh",
                "0",
                "--automatic_stability_thresh",
                "0",
            ]
        )
        == 0
    )
    captions = load_captions(out / "captions.pt")
    segmenter = SamSegmenter(load_sam(models["sam"], sam_config=models["sam_config"])[0], 0.0, 0.0)
    for key, entry in captions.items():
        image = np.array(Image.open(images / key).convert("RGB"))
        masks, boxes, iou = segmenter.automatic(image)  # SAM's own generator, as the original
        assert len(entry) == len(masks) > 0 and entry.scores == pytest.approx(iou.tolist())
        assert np.array_equal(entry.masks(), masks.numpy()) and entry.bboxes == boxes.tolist()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["automatic_fallback_this_run"] == 2 and "sam_automatic" in summary["stage_seconds_this_run"]


def test_absolute_keys(models, tmp_path):
    images = _folder(tmp_path / "images", 1)
    out = tmp_path / "out"
    assert cmd.main(_base_args(models, images, out, "--absolute_keys")) == 0
    assert list(load_captions(out / "captions.pt")) == [str((images / "img_00.png").resolve())]


def test_output_inside_input_dir_is_not_an_input(models, tmp_path):
    images = _folder(tmp_path / "images", 1)
    args = _base_args(models, images, images / "masks", "--preview", "1")
    assert cmd.main(args) == 0 and len(list((images / "masks" / "preview").glob("*.png"))) == 1
    assert cmd.main(args) == 0  # the preview PNG did not change the image list of the rerun
    assert list(load_captions(images / "masks" / "captions.pt")) == ["img_00.png"]


@pytest.mark.slow  # kill -9 of a subprocess, then resume
def test_resume_after_kill_gives_the_same_file(models, tmp_path):
    images = _folder(tmp_path / "images", 10)
    reference, resumed = tmp_path / "reference", tmp_path / "resumed"
    assert cmd.main(_base_args(models, images, reference, "--shard_size", "2", "--batch_size", "2")) == 0

    # kill -9 once the first shard is on disk, then run the same command again
    command = [
        sys.executable,
        str(ROOT / "scripts" / "create_masked_dataset.py"),
        *_base_args(models, images, resumed, "--shard_size", "2", "--batch_size", "2"),
    ]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while not (resumed / "shards" / "shard_000000.pt").exists():
        assert process.poll() is None, process.stderr.read().decode()[-2000:]
        assert time.monotonic() < deadline
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    process.stderr.close()
    assert not (resumed / "captions.pt").exists()
    done = len(list((resumed / "shards").glob("shard_*.pt")))
    assert 1 <= done < 5

    assert cmd.main(_base_args(models, images, resumed, "--shard_size", "2", "--batch_size", "2")) == 0
    assert (resumed / "captions.pt").read_bytes() == (reference / "captions.pt").read_bytes()
    assert json.loads((resumed / "summary.json").read_text())["processed_this_run"] == 10 - 2 * done


def test_max_shards_then_resume_and_changed_settings(models, tmp_path, capsys):
    images = _folder(tmp_path / "images", 5)
    out = tmp_path / "out"
    args = _base_args(models, images, out, "--shard_size", "2")
    assert cmd.main([*args, "--max_shards", "2"]) == 0
    assert "2 of 3 shards done" in capsys.readouterr().out and not (out / "captions.pt").exists()

    assert cmd.main([*args, "--score_threshold", "0.5"]) == 1  # other settings: refused, nothing touched
    assert "score_threshold: 0.2 -> 0.5" in capsys.readouterr().err
    assert cmd.main(args) == 0
    assert "resuming: 2 of 3 shards already done" in capsys.readouterr().out
    assert json.loads((out / "summary.json").read_text())["processed_this_run"] == 1
    assert len(load_captions(out / "captions.pt")) == 5

    _random_image(40, 40, seed=99).save(images / "new.png")  # the image list changed
    assert cmd.main(args) == 1
    assert "num_images: 5 -> 6" in capsys.readouterr().err
    assert cmd.main([*args, "--overwrite"]) == 0
    assert len(load_captions(out / "captions.pt")) == 6


def test_queries_mode_masks_annotated_boxes(models, tmp_path, capsys):
    root = tmp_path / "bench"
    (root / "q").mkdir(parents=True)
    _random_image(48, 64, seed=8).save(root / "q" / "mug.png")
    _random_image(56, 40, seed=9).save(root / "q" / "toy.png")
    _random_image(40, 40, seed=10).save(root / "q" / "nobox.png")
    _random_image(40, 40, seed=11).save(root / "q" / "outside.png")
    _random_image(40, 40, seed=12).save(root / "gallery.png")
    anns = {
        "q/mug.png": {"ins": 1, "is_query": True, "bbox": [5.0, 6.0, 40.0, 30.0]},
        "q/toy.png": {"ins": 2, "is_query": True, "bbox": [0.0, 10.0, 40.5, 56.0]},  # 0.5 px over: clipped
        "q/nobox.png": {"ins": 3, "is_query": True},
        "q/outside.png": {"ins": 4, "is_query": True, "bbox": [10.0, 10.0, 60.0, 30.0]},
        "gallery.png": {"ins": [1, 2], "is_query": False},
    }
    torch.save(anns, root / "anns.pt")
    out = tmp_path / "out"
    assert (
        cmd.main(
            [
                "--anns_file",
                str(root / "anns.pt"),
                "--queries_only",
                "--output_dir",
                str(out),
                "--sam_checkpoint",
                str(models["sam"]),
                "--sam_config",
                str(models["sam_config"]),
                "--device",
                "cpu",
                "--num_workers",
                "0",
            ]
        )
        == 0
    )
    captions = load_captions(out / "captions.pt")
    assert set(captions) == {"q/mug.png", "q/toy.png"}  # the anns.pt keys
    assert captions["q/mug.png"].bboxes == [[5.0, 6.0, 40.0, 30.0]]
    assert captions["q/toy.png"].bboxes == [[0.0, 10.0, 40.0, 56.0]]
    segmenter = _segmenter(models)
    for key, entry in captions.items():
        assert entry.scores == [1.0] and entry.size == Image.open(root / key).size[::-1]
        segmenter.embed(np.array(Image.open(root / key).convert("RGB")))
        assert np.array_equal(segmenter.decode(torch.tensor(entry.bboxes))[0].numpy(), entry.masks())
    summary = json.loads((out / "summary.json").read_text())
    assert summary["queries_without_bbox"] == 1 and summary["failed_images"] == 1
    assert "q/outside.png\t" in (out / "failed_images.txt").read_text()
    assert "lies outside the 40x40 image" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv,message",
    [
        (
            ["--anns_file", "a.pt", "--output_dir", "o"],
            "error: --anns_file needs --queries_only (gallery images are masked from --input_dir with OWLv2)",
        ),
        (
            ["--input_dir", "i", "--anns_file", "a.pt", "--queries_only", "--output_dir", "o"],
            "error: give either --input_dir (gallery mode) or --anns_file --queries_only (queries mode)",
        ),
        (["--input_dir", "i", "--output_dir", "o", "--nms_iou", "0"], "error: nms_iou must be in (0, 1], got 0.0"),
    ],
)
def test_cli_refuses_ambiguous_modes(argv, message, capsys):
    """argparse's exit status 2 with OUR message (a typo in the test's own arguments would give another)."""
    with pytest.raises(SystemExit) as exit_:
        cmd.parse_args([*argv, "--sam_checkpoint", "s.pth"])
    assert exit_.value.code == 2 and message in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# Never lose or mix what is not ours
# --------------------------------------------------------------------------------------------


def test_a_folder_soir_did_not_make_is_refused_even_with_overwrite(models, tmp_path, capsys):
    """Before: --overwrite removed a user's preview/ folder and a foreign captions.pt was replaced."""
    images = _folder(tmp_path / "images", 2)
    theirs = tmp_path / "theirs"
    (theirs / "preview").mkdir(parents=True)
    (theirs / "preview" / "figure.png").write_bytes(b"a user's figure")
    (theirs / "captions.pt").write_bytes(b"someone else's captions")
    for extra in ([], ["--overwrite"]):
        assert cmd.main(_base_args(models, images, theirs, *extra)) == 1
        assert "is not empty and was not made by SoIR" in capsys.readouterr().err
    assert (theirs / "preview" / "figure.png").read_bytes() == b"a user's figure"
    assert (theirs / "captions.pt").read_bytes() == b"someone else's captions"


def test_overwrite_removes_only_what_a_run_wrote(models, tmp_path):
    images = _folder(tmp_path / "images", 2)
    out = tmp_path / "out"
    assert cmd.main(_base_args(models, images, out, "--preview", "1")) == 0
    (out / "preview" / "my_notes.txt").write_text("mine")
    (out / "README.txt").write_text("mine too")
    assert cmd.main(_base_args(models, images, out, "--overwrite", "--score_threshold", "0.3")) == 0
    assert (out / "preview" / "my_notes.txt").read_text() == "mine" and (out / "README.txt").exists()
    assert json.loads((out / "run_config.json").read_text())["score_threshold"] == 0.3


def test_output_dir_containing_the_input_is_explained(models, tmp_path, capsys):
    """Before: "no images to process" (the output folder was excluded, and with it every image)."""
    images = _folder(tmp_path / "data" / "images", 1)
    assert cmd.main(_base_args(models, images, tmp_path / "data")) == 1
    assert "--output_dir" in (err := capsys.readouterr().err) and "contains --input_dir" in err


def test_damaged_shard_and_run_config_are_explained(models, tmp_path, capsys):
    images = _folder(tmp_path / "images", 4)
    out = tmp_path / "out"
    args = _base_args(models, images, out, "--shard_size", "2")
    assert cmd.main(args) == 0
    (out / "shards" / "shard_000001.pt").write_bytes(b"\0" * 10)
    (out / "captions.pt").unlink()
    assert cmd.main(args) == 1
    assert "shard_000001.pt' is damaged" in (err := capsys.readouterr().err) and "delete it and rerun" in err
    (out / "run_config.json").write_text("")
    assert cmd.main(args) == 1
    assert "run_config.json is empty or corrupt" in capsys.readouterr().err


def _start(models, images, out, *extra) -> subprocess.Popen:
    command = [
        sys.executable,
        str(ROOT / "scripts" / "create_masked_dataset.py"),
        *_base_args(models, images, out, *extra),
    ]
    return subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow  # two processes: the lock between processes is the subject
def test_two_concurrent_runs_on_one_folder_cannot_both_write(models, tmp_path):
    """Before: no lock; two runs with different --score_threshold both exited 0 and mixed their shards."""
    images = _folder(tmp_path / "images", 400)  # long enough to still be running when the second starts
    out = tmp_path / "out"
    first = _start(models, images, out, "--shard_size", "2", "--batch_size", "1")
    deadline = time.monotonic() + 120
    while not (out / "run_config.json").exists():
        assert first.poll() is None and time.monotonic() < deadline
        time.sleep(0.02)
    second = _start(models, images, out, "--shard_size", "2", "--batch_size", "1", "--score_threshold", "0.5")
    assert second.wait(timeout=120) == 1 and "is being written by process" in second.stderr.read()
    assert first.poll() is None, "the first run ended before the second started: the test proves nothing"
    assert first.wait(timeout=600) == 0
    first.stderr.close(), second.stderr.close()
    assert json.loads((out / "run_config.json").read_text())["score_threshold"] == 0.2


def _children(pid: int) -> list[int]:
    children = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(c) for c in children.read_text().split()] if children.exists() else []


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux only")
@pytest.mark.slow  # DataLoader workers dying with their killed parent process
def test_kill_9_takes_the_dataloader_workers_with_it(models, tmp_path):
    """Before: kill -9 left the 2 DataLoader workers blocked forever (~475 MB each)."""
    images = _folder(tmp_path / "images", 40)
    run = _start(models, images, tmp_path / "out", "--shard_size", "2", "--batch_size", "1", "--num_workers", "2")
    deadline = time.monotonic() + 120
    while len(workers := _children(run.pid)) < 2:
        assert run.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    run.send_signal(signal.SIGKILL)
    run.wait()
    run.stderr.close()
    deadline = time.monotonic() + 20
    while (
        any(Path(f"/proc/{w}").exists() and "zombie" not in Path(f"/proc/{w}/status").read_text() for w in workers)
        and time.monotonic() < deadline
    ):
        time.sleep(0.1)
    alive = [
        w for w in workers if Path(f"/proc/{w}").exists() and "zombie" not in Path(f"/proc/{w}/status").read_text()
    ]
    for w in alive:  # do not leave them behind if the test fails
        os.kill(w, signal.SIGKILL)
    assert alive == []


def test_tar_shards_as_input_give_the_folders_captions(models, tmp_path):
    """--input_dir naming webdataset tar shards: keys are the member names, masks those of the folder run."""
    from tests.datasets.test_tar_shards import write_shards

    images = _folder(tmp_path / "images", 3)
    spec = write_shards(tmp_path / "shards", [(p.name, p.read_bytes()) for p in sorted(images.iterdir())], 2)
    assert cmd.main(_base_args(models, images, tmp_path / "from_folder")) == 0
    assert cmd.main(_base_args(models, Path(spec), tmp_path / "from_tars")) == 0
    folder_run = load_captions(tmp_path / "from_folder" / "captions.pt")
    tar_run = load_captions(tmp_path / "from_tars" / "captions.pt")
    assert list(tar_run) == list(folder_run) == ["img_00.png", "img_01.png", "img_02.png"]
    assert all(len(masks) > 0 for masks in folder_run.values())  # something to compare
    assert {k: v.to_dict() for k, v in tar_run.items()} == {k: v.to_dict() for k, v in folder_run.items()}
