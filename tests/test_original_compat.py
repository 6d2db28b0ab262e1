"""Coming from the original code (issues 15, 16): its files, keys, example command and its numbers'
rules (compat=original), end to end through the real CLIs with tiny models."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from datasets import encode_mask_row_major, load_captions
from extractors import CLIPMIExtractor, DINOv2MIExtractor, SigLIPMIExtractor
from extractors.mi.reference import reference_mask_inversion
from tests.pipeline import features_dir_from, read_results, results_dir_from, run_main
from utils.errors import SoIRError


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
        run_main("create_index.py", *common, f"captions_file={demo_dir / 'captions.pt'}", cwd=tmp_path), tmp_path
    )
    proc = run_main("create_index.py", *common, f"captions_file={tmp_path / 'segmentation_results.pt'}", cwd=tmp_path)
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
    proc = run_main(
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
    proc = run_main(
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
    proc = run_main("create_index.py", *common, "only_create=true", "tag=t1", "add_string=s2", cwd=tmp_path)
    assert "results: " not in proc.stdout and features_dir_from(proc, tmp_path).name.endswith("_t1_s2")
    proc = run_main(
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
    search = run_main("search_index.py", f"features_dir={out}", "k_search=10", "max_k_search=3", cwd=tmp_path)
    rankings = [json.loads(line) for line in (results_dir_from(search) / "rankings.jsonl").read_text().splitlines()]
    assert {len(r["ranking"]) for r in rankings} == {3}
    proc = run_main("create_index.py", *common, "only_gallery=true", cwd=tmp_path)
    out = features_dir_from(proc, tmp_path)
    assert not (out / "queries" / "images.json").exists() and "results: " not in proc.stdout
    refused = run_main("search_index.py", f"features_dir={out}", cwd=tmp_path, check=False)
    assert refused.returncode == 1 and "only_gallery=true" in refused.stderr


def test_subsets_by_index_and_another_extractor_for_the_queries(tiny_model_dirs, demo_dir, tmp_path):
    import torch as _torch

    keys = sorted(_torch.load(demo_dir / "anns.pt", weights_only=True))
    (tmp_path / "inds.txt").write_text(
        " ".join(str(i) for i in range(len(keys)) if i % 2 == 0 or keys[i].startswith("q"))
    )
    proc = run_main(
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


# ---------------------------------------------------------------------------------------------------
# compat=original against the original code's geometry, restated here from its source (pihash2k/SoIR
# at 02d2152; file:line of each step in the comments; its code is not copied), on tiny random models.
# The model input size S stands for its hard-coded 224 (DINOv2, CLIP) / 384 (SigLIP); the pixels are
# normalised with the checkpoint's mean / std (datasets/preprocessing.py; which resize backend the
# original's processor used is README, "Coming from the original code").
# ---------------------------------------------------------------------------------------------------

COMPAT = dict(  # configs/compat/original.yaml, as the extractors take it
    legrad_norm="joint",
    missing_masks="full_mask",
    mi_sum_loss="mean_dice",
    smart_crop_source="resized",
    mi_resample="original",
    pixel_geometry="original",
    mi_beta_used=False,
    mi_iterations=8,
    device="cpu",
)
# family: (extractor class, the original's resize filter for MI images, smart-crop padding, min-max eps)
ORIGINAL = {
    # dinov2_extractor.py:330 (LANCZOS), :370-372 (pad int(0.1 x longer inclusive extent)); no eps (:442-446)
    "dinov2": (DINOv2MIExtractor, Image.Resampling.LANCZOS, None, 0.0),
    # siglip_mi_extractor.py:211 (BILINEAR), :259 (pad 5); no eps (mask_inversion.py:1044-1048)
    "siglip": (SigLIPMIExtractor, Image.Resampling.BILINEAR, 5, 0.0),
    # clip_mi_extractor.py:206 (BILINEAR), :254 (pad 5); min_max's eps 1e-6 (mask_inversion.py:18-24, :1394)
    "clip": (CLIPMIExtractor, Image.Resampling.BILINEAR, 5, 1e-6),
}


def _compat_scene():
    """A 150 x 118 smooth random image and three irregular masks (0/255 uint8, the original's format):
    an ellipse, one touching the right border, and a blob whose box is 40 px wide (a multiple of 10,
    where the original's pad from side - 1 differs)."""
    rng = np.random.default_rng(3)
    coarse = rng.integers(0, 256, (12, 15, 3), dtype=np.uint8)
    image = Image.fromarray(coarse).resize((150, 118), Image.Resampling.BICUBIC)
    ys, xs = np.mgrid[:118, :150]
    masks = np.zeros((3, 118, 150), dtype=np.uint8)
    masks[0][((xs - 40) / 27.0) ** 2 + ((ys - 35) / 19.0) ** 2 <= 1] = 255
    masks[1][(xs >= 118) & (ys >= 50) & (ys < 101) & ((xs + ys) % 7 != 0)] = 255
    masks[2][(xs >= 60) & (xs < 100) & (ys >= 70) & (ys < 111) & ((xs - 80) ** 2 + (ys - 90) ** 2 <= 500)] = 255
    return image, masks


def _resized(image, masks, size, resample):
    """The image and each 0/255 mask resized to size x size: the image with the family's filter, the masks
    as PIL images with NEAREST (dinov2_extractor.py:314-339, siglip_mi_extractor.py:208-222,
    clip_mi_extractor.py:203-217)."""
    small = image.resize((size, size), resample)
    return small, [np.asarray(Image.fromarray(m).resize((size, size), Image.Resampling.NEAREST)) for m in masks]


def _smart_crops(image, masks, pad_pixels):
    """The original's smart crops of an input-sized image and its 0/255 masks (dinov2_extractor.py:341-383,
    siglip_mi_extractor.py:241-266, clip_mi_extractor.py:236-261): first and last rows / columns that hold
    the mask (inclusive), padded, then used as PIL crop / slice ends (so exclusive)."""
    crops = []
    for mask in masks:
        rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
        top, bottom, left, right = rows[0], rows[-1], cols[0], cols[-1]
        pad = pad_pixels if pad_pixels is not None else int(max(bottom - top, right - left) * 0.1)
        top, left = max(0, top - pad), max(0, left - pad)
        bottom, right = min(image.height, bottom + pad), min(image.width, right + pad)
        crops.append((image.crop((left, top, right, bottom)), mask[top:bottom, left:right]))
    return crops


def _original_vectors(ext, family, mode, image, masks):
    """What the original computes for ``mode`` on ``image`` / ``masks``, through the plain autograd MI
    (extractors/mi/reference.py) with its normalisation: one min-max over its whole batch ("batch")."""
    _, resample, pad_pixels, eps = ORIGINAL[family]
    size = ext.mi_preprocess.size[0]
    small, small_masks = _resized(image, masks, size, resample)
    pixels = lambda images: torch.stack([ext.mi_preprocess.image(im) for im in images])  # noqa: E731
    as_target = lambda ms: torch.from_numpy(np.stack(ms) / 255.0).float()  # noqa: E731
    run = dict(alpha=0.03, iterations=COMPAT["mi_iterations"], lr=0.1, eps=eps)
    if mode == "mask_input":  # dinov2_mi_extractor.py:127,136-139; siglip / clip_mi_extractor.py:117,128
        union = np.stack(small_masks).sum(0)[..., None] / 255
        small = Image.fromarray((np.asarray(small) * union).astype(np.uint8))
    if mode in ("per_mask", "mask_input"):  # one copy of the image per mask, one batch
        out = reference_mask_inversion(
            ext.model, pixels([small] * len(masks)), as_target(small_masks)[:, None], joint="batch", **run
        )
        return out[:, 0]
    if mode == "mi_sum" and family == "dinov2":  # the union of the masks, one vector
        union = (np.stack(small_masks).max(0),)
        return reference_mask_inversion(ext.model, pixels([small]), as_target(union)[None], **run)[0]
    if mode == "mi_sum":  # SigLIP / CLIP: one vector fitted to the mean of the per-mask Dice terms
        return reference_mask_inversion(ext.model, pixels([small]), as_target(small_masks)[None], shared=True, **run)[0]
    # smart_crop (and mi_sum + smart_crop + single_from_sc): each crop and its mask resized back to the
    # input size (dinov2_mi_extractor.py:165-177, siglip_mi_extractor.py:153-165), all crops in one batch
    crops = [_resized(crop, [mask], size, resample) for crop, mask in _smart_crops(small, small_masks, pad_pixels)]
    target = as_target([m[0] for _, m in crops])[:, None]
    return reference_mask_inversion(ext.model, pixels([c for c, _ in crops]), target, joint="batch", **run)[:, 0]


MODES = {
    "per_mask": {},
    "mi_sum": dict(mi_sum=True),
    "smart_crop": dict(smart_crop=True),
    "mi_sum+smart_crop+single_from_sc": dict(mi_sum=True, smart_crop=True, single_from_sc=True),
    "mask_input": dict(mask_input=True),
}


@pytest.mark.parametrize("family", list(ORIGINAL))
def test_compat_original_equals_the_original_geometry_and_normalisation(tiny_model_dirs, family):
    """compat=original vectors equal the original's (restated above) to cos >= 0.999 in every mode of
    each family the original has. Fails on main 4e786ae (no pixel_geometry / mi_beta_used there); its
    geometry (pixel_geometry=soir) gives min cos 0.71-0.94 in the smart-crop modes and 0.88 with
    mask_input, and crops normalised one by one (main's legrad_norm=joint) 0.86-0.93."""
    image, masks = _compat_scene()
    cls = ORIGINAL[family][0]
    for mode, flags in MODES.items():
        ext = cls(str(tiny_model_dirs[family]), **COMPAT, **flags)
        ours = ext.extract(image, masks).reshape(-1, ext.dim)
        expected = _original_vectors(ext, family, "smart_crop" if "smart_crop" in mode else mode, image, masks)
        assert ours.shape == expected.shape, mode
        cos = torch.nn.functional.cosine_similarity(ours, expected.float(), dim=-1)
        assert cos.min() >= 0.999, (family, mode, cos.tolist())


def test_soir_geometry_does_not_pass_for_the_original(tiny_model_dirs):
    """The comparison above can fail: SoIR's own smart-crop geometry (crop from the original image, box
    padded from the side, each crop normalised alone) is measurably not the original's."""
    image, masks = _compat_scene()
    ext = CLIPMIExtractor(str(tiny_model_dirs["clip"]), **{**COMPAT, "pixel_geometry": "soir"}, smart_crop=True)
    soir = CLIPMIExtractor(str(tiny_model_dirs["clip"]), mi_iterations=COMPAT["mi_iterations"], smart_crop=True)
    expected = _original_vectors(ext, "clip", "smart_crop", image, masks)
    for other in (ext, soir):
        cos = torch.nn.functional.cosine_similarity(other.extract(image, masks), expected.float(), dim=-1)
        assert cos.min() < 0.999, cos.tolist()


def _original_square_crop(image, bbox):
    """The original's square query crop, restated: box corners truncated with int() and clipped
    (image_preprocessor.py:138-139), a square of the longer side centred on the box centre, its corners
    truncated again (:150-162), the image padded with black where the square leaves it, then cropped
    (:165-187)."""
    x1, y1 = max(0, int(bbox[0])), max(0, int(bbox[1]))
    x2, y2 = min(image.width, int(bbox[2])), min(image.height, int(bbox[3]))
    side = max(x2 - x1, y2 - y1)
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    left, top, right, bottom = (int(cx - side / 2), int(cy - side / 2), int(cx + side / 2), int(cy + side / 2))
    pad_left, pad_top = max(0, -left), max(0, -top)
    pad_right, pad_bottom = max(0, right - image.width), max(0, bottom - image.height)
    canvas = Image.new("RGB", (image.width + pad_left + pad_right, image.height + pad_top + pad_bottom))
    canvas.paste(image, (pad_left, pad_top))
    return canvas.crop((left + pad_left, top + pad_top, right + pad_left, bottom + pad_top))


def test_pixel_geometry_original_crops_queries_as_the_original():
    """pixel_geometry=original: the square query crop rounds as the original (D6); SoIR's own rounding
    (floor / ceil, the odd pixel right / bottom) crops most of these boxes differently."""
    from datasets import crop_box

    image, _ = _compat_scene()
    boxes = [
        (10.0, 20.0, 41.0, 30.0),
        (10.6, 20.2, 41.7, 30.9),
        (0.4, 3.5, 20.5, 60.2),
        (120.3, 90.1, 150.0, 118.0),
        (-0.5, 100.7, 33.3, 117.9),
        (70.0, 5.0, 71.0, 40.0),
        (30.5, 30.5, 91.5, 62.5),
    ]
    different = 0
    for box in boxes:
        ours = crop_box(image, box, "q.jpg", square=True, geometry="original")
        expected = _original_square_crop(image, box)
        assert ours.size == expected.size and np.array_equal(np.asarray(ours), np.asarray(expected)), box
        soir = crop_box(image, box, "q.jpg", square=True)
        different += soir.size != ours.size or not np.array_equal(np.asarray(soir), np.asarray(ours))
    assert different >= 4


def test_mi_beta_is_ignored_and_logged_under_compat(tiny_model_dirs, caplog):
    """mi_beta_used=false (compat=original): the original never passed mi_beta to MI (D8)."""
    image, masks = _compat_scene()
    folder = str(tiny_model_dirs["siglip"])
    ignored = SigLIPMIExtractor(folder, mi_iterations=4, device="cpu", mi_beta=0.5, mi_beta_used=False)
    assert "mi_beta=0.5 is ignored" in caplog.text
    without = SigLIPMIExtractor(folder, mi_iterations=4, device="cpu")
    used = SigLIPMIExtractor(folder, mi_iterations=4, device="cpu", mi_beta=0.5)
    torch.testing.assert_close(ignored.extract(image, masks), without.extract(image, masks))
    assert not torch.allclose(used.extract(image, masks), without.extract(image, masks), atol=1e-4)


def test_query_vectors_each_scores_every_query_vector_as_a_query():
    """query_vectors=each (compat=original, D10): a query image with two vectors counts twice, each
    vector ranking the gallery on its own (the original's search_index.py:209-213); sklearn's AP per
    vector is the reference. SoIR's default (max) scores the image once by its best pair."""
    from sklearn.metrics import average_precision_score

    from utils.retrieval.metrics import per_query_metrics
    from utils.retrieval.ranking import each_vector_a_query, image_scores

    rng = np.random.default_rng(5)
    gallery = rng.normal(size=(7, 8)).astype(np.float32)  # 6 gallery images, image 2 with two rows
    gallery_owner = np.array([0, 1, 2, 2, 3, 4, 5])
    query = rng.normal(size=(3, 8)).astype(np.float32)  # query image 0: two vectors; query image 1: one
    queries, owner = each_vector_a_query([{"key": "q0"}, {"key": "q1"}], np.array([0, 0, 1]))
    assert [q["key"] for q in queries] == ["q0", "q0", "q1"] and owner.tolist() == [0, 1, 2]
    relevant_images = {"q0": np.array([1, 0, 1, 0, 0, 1], bool), "q1": np.array([0, 1, 0, 0, 1, 0], bool)}
    relevant = np.stack([relevant_images[q["key"]] for q in queries])
    scores = image_scores(query, owner, range(0, 3), gallery, gallery_owner, 6)
    ap = per_query_metrics(scores, relevant)["ap"]
    for row in range(3):
        per_image = [max(query[row] @ gallery[gallery_owner == g].T) for g in range(6)]
        assert ap[row] == pytest.approx(average_precision_score(relevant[row], per_image))
    max_scores = image_scores(query, np.array([0, 0, 1]), range(0, 2), gallery, gallery_owner, 6)
    assert len(per_query_metrics(max_scores, relevant[[0, 2]])["ap"]) == 2 and len(ap) == 3


def test_masks_rle_ignore_reads_segmentation_results_as_the_original_extractors(demo_dir, tmp_path, caplog):
    """masks_rle=ignore (compat=original, D9): the original's extractors look for masks / mask / rle / bbox
    (dinov2_extractor.py:261-311), never masks_rle, so every image of its segmentation_results.pt gets one
    full-image mask; said loudly. SoIR's own captions.pt is read as always."""
    from datasets import load_anns, split
    from datasets.captions import without_original_masks
    from datasets.extraction import gallery_jobs

    ours = load_captions(demo_dir / "captions.pt")
    original = {
        key: {
            "image_path": key,
            "masks_rle": [encode_mask_row_major(m) for m in masks.masks()],
            "bboxes": masks.bboxes,
            "scores": masks.scores,
        }
        for key, masks in ours.items()
    }
    torch.save(original, tmp_path / "segmentation_results.pt")
    ignored = without_original_masks(load_captions(tmp_path / "segmentation_results.pt"), "segmentation_results.pt")
    assert f"the masks of {len(ours)} images in segmentation_results.pt" in caplog.text
    assert "Mask Inversion ignores every object mask" in caplog.text
    assert set(ignored) == set(ours) and all(len(m) == 0 for m in ignored.values())
    assert without_original_masks(ours, "captions.pt") == ours  # SoIR's format: untouched
    _, gallery = split(load_anns(demo_dir / "anns.pt"))
    jobs = gallery_jobs(gallery, ignored, True, "full_mask", "segmentation_results.pt")
    assert jobs and all(job.full_mask for job in jobs)  # one full-image mask each


def test_mask_input_smart_crops_of_the_original_image_are_refused_with_its_order(tiny_model_dirs):
    """pixel_geometry=original zeroes the input-sized image; smart crops from the original image cannot
    follow: refused when the extractor is built, before any forward pass."""
    with pytest.raises(SoIRError, match="smart_crop_source=resized"):
        CLIPMIExtractor(str(tiny_model_dirs["clip"]), pixel_geometry="original", mask_input=True, smart_crop=True)
