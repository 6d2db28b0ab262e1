"""MI extractors: mask formats, geometry of views, descriptor modes, end to end with each family."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from sklearn.metrics import average_precision_score

from datasets.preprocessing import pil_nearest_masks
from datasets.views import ViewMaker, padded_box
from extractors import (
    CLIPMIExtractor,
    DINOv2MIExtractor,
    DINOv2RegMIExtractor,
    DINOv3MIExtractor,
    SigLIP2MIExtractor,
    SigLIPExtractor,
    SigLIPMIExtractor,
)
from extractors.mi.engine import legrad_map, mask_inversion
from tests.pipeline import features_dir_from, read_results, results_dir_from, run_main
from utils.errors import SoIRError
from utils.families import FAMILIES

MI = dict(mi_iterations=5, device="cpu")


@pytest.fixture(scope="module")
def scene():
    """A 96x128 noisy image with two rectangular object masks."""
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (96, 128, 3), dtype=np.uint8))
    masks = np.zeros((2, 96, 128), dtype=bool)
    masks[0, 10:40, 20:60] = True
    masks[1, 60:90, 90:120] = True
    return image, masks


@pytest.fixture(scope="module")
def siglip_mi(tiny_model_dirs):
    return SigLIPMIExtractor(str(tiny_model_dirs["siglip"]), **MI)


def test_extract_with_masks_is_mask_inversion_on_the_resized_image(siglip_mi, scene):
    image, masks = scene
    vectors = siglip_mi.extract(image, masks)
    assert vectors.shape == (2, 32)
    torch.testing.assert_close(vectors.norm(dim=-1), torch.ones(2))
    pixels = siglip_mi.preprocess.image(image)[None]
    resized = siglip_mi.preprocess.masks(masks)[None]
    assert resized.shape == (1, 2, 64, 64) and set(resized.unique().tolist()) == {0.0, 1.0}
    expected = mask_inversion(siglip_mi.model, pixels, resized, alpha=0.03, iterations=5, lr=0.1)[0]
    torch.testing.assert_close(vectors, expected)


def test_mask_formats_give_the_same_vectors(siglip_mi, scene):
    image, masks = scene
    as_bool = siglip_mi.extract(image, masks)
    torch.testing.assert_close(siglip_mi.extract(image, masks.astype(np.float32)), as_bool)
    torch.testing.assert_close(siglip_mi.extract(image, masks.astype(np.uint8) * 255), as_bool)
    torch.testing.assert_close(siglip_mi.extract(image, torch.from_numpy(masks).long()), as_bool)
    with pytest.raises(ValueError, match="bool, 0/1 or 0/255"):
        siglip_mi.extract(image, masks.astype(np.uint8) * 7)


def test_bad_masks_are_refused(siglip_mi, scene):
    image, masks = scene
    with pytest.raises(ValueError, match="do not match the image"):
        siglip_mi.extract(image, masks[:, :50])
    with pytest.raises(ValueError, match="empty"):
        siglip_mi.extract(image, np.zeros_like(masks))


def test_no_masks_and_no_captions_file_gives_the_global_embedding(tiny_model_dirs, siglip_mi, scene):
    """Nothing to look masks up in: extract(image) is the global embedding, as documented (and as the
    original README's ``extract(image)``)."""
    plain = SigLIPExtractor(str(tiny_model_dirs["siglip"]), device="cpu")
    torch.testing.assert_close(siglip_mi.extract(scene[0]), plain.extract(scene[0]), atol=1e-5, rtol=1e-5)


def test_notebook_paths_find_their_masks_as_the_cli_does(tiny_model_dirs, demo_dir, tmp_path, monkeypatch):
    """A gallery image named relative to the working folder, absolutely, with ./ or through a symlink
    gets its captions masks (captions keys are relative to the captions file's folder); an image the
    captions lack is an error naming it and the nearest keys. Fails on main 4e786ae (the (D,) global
    vector for every form but the literal key)."""
    from datasets import load_captions

    key = "gallery/g_003.jpg"
    captions = load_captions(demo_dir / "captions.pt")
    extractor = SigLIPMIExtractor(str(tiny_model_dirs["siglip"]), captions_file=demo_dir / "captions.pt", **MI)
    expected = extractor.extract(demo_dir / key, captions[key].masks())
    assert expected.shape == (len(captions[key]), 32)
    (tmp_path / "link.jpg").symlink_to(demo_dir / key)
    monkeypatch.chdir(demo_dir.parent)
    for form in (f"{demo_dir.name}/{key}", str(demo_dir / key), f"./{demo_dir.name}/./{key}", tmp_path / "link.jpg"):
        torch.testing.assert_close(extractor.extract(form), expected)
        torch.testing.assert_close(extractor.extract({"img_path": str(form)}), expected)

    # An image the captions lack: what missing_masks says, by default an error, never a quiet global vector.
    copy = tmp_path / "g_003_copy.jpg"
    copy.write_bytes((demo_dir / key).read_bytes())
    with pytest.raises(SoIRError, match=r"g_003_copy.jpg: no masks in .*captions.pt .*nearest keys: gallery/g_00"):
        extractor.extract(copy)
    with pytest.raises(SoIRError, match=r"an image without a path has no entry in .*captions.pt"):
        extractor.extract(Image.open(copy))
    folder, captions_file = str(tiny_model_dirs["siglip"]), demo_dir / "captions.pt"
    as_global = SigLIPMIExtractor(folder, captions_file=captions_file, missing_masks="global", **MI).extract(copy)
    torch.testing.assert_close(as_global, SigLIPExtractor(folder, device="cpu").extract(copy), atol=1e-5, rtol=1e-5)
    full = SigLIPMIExtractor(folder, captions_file=captions_file, missing_masks="full_mask", **MI).extract(copy)
    torch.testing.assert_close(full, extractor.extract(copy, np.ones((1, 160, 160), dtype=bool)))


def test_one_vector_per_image_modes(tiny_model_dirs, scene):
    image, masks = scene
    folder = str(tiny_model_dirs["siglip"])
    per_mask = SigLIPMIExtractor(folder, **MI).extract(image, masks)
    averaged = SigLIPMIExtractor(folder, avg_multiple_vecs=True, **MI).extract(image, masks)
    assert per_mask.shape == (2, 32) and averaged.shape == (32,)  # one-vector modes give [D]
    torch.testing.assert_close(averaged, torch.nn.functional.normalize(per_mask.mean(0), dim=0))
    union = SigLIPMIExtractor(folder, mi_sum=True, **MI).extract(image, masks)
    single = SigLIPMIExtractor(folder, **MI).extract(image, masks.any(0, keepdims=True))
    assert single.shape == (1, 32)
    torch.testing.assert_close(union, single[0])
    torch.testing.assert_close(SigLIPMIExtractor(folder, full_mask=True, **MI).extract(image, masks), union)


def test_smart_crop_cuts_each_mask_box_from_the_original_image(siglip_mi, scene):
    image, masks = scene
    box = padded_box(torch.from_numpy(masks[0]), pad=0.1)
    assert box == (16, 6, 64, 44)  # 40x30 box, 4 px margin (10% of 40)
    views = ViewMaker(siglip_mi.preprocess, "smart_crop", 0.1)(image, masks)
    assert len(views.views) == 2
    torch.testing.assert_close(views.views[0].pixel_values, siglip_mi.preprocess.image(image.crop(box)))
    mask_crop = siglip_mi.preprocess.masks(masks[:1, 6:44, 16:64])
    torch.testing.assert_close(views.views[0].masks, mask_crop)


@pytest.mark.parametrize(
    "cls,family",
    [
        (DINOv2MIExtractor, "dinov2"),
        (CLIPMIExtractor, "clip"),
        (DINOv2RegMIExtractor, "dinov2reg"),
        (DINOv3MIExtractor, "dinov3"),
    ],
)
def test_other_families(tiny_model_dirs, scene, cls, family):
    """The extractor's vectors are mask_inversion on its own resized image and masks."""
    extractor = cls(str(tiny_model_dirs[family]), **MI)
    image, masks = scene
    vectors = extractor.extract(image, masks)
    assert vectors.shape == (2, 24 if family == "clip" else 32) and torch.isfinite(vectors).all()
    expected = mask_inversion(
        extractor.model, extractor.preprocess.image(image)[None], extractor.preprocess.masks(masks)[None], iterations=5
    )[0]
    torch.testing.assert_close(vectors, expected)


def test_fixed_resolution_siglip2_inverts_through_the_siglip_family(tiny_variant_dirs, scene):
    extractor = SigLIPMIExtractor(str(tiny_variant_dirs["siglip2_fixres"]), **MI)
    image, masks = scene
    expected = mask_inversion(
        extractor.model, extractor.preprocess.image(image)[None], extractor.preprocess.masks(masks)[None], iterations=5
    )[0]
    torch.testing.assert_close(extractor.extract(image, masks), expected)


@pytest.fixture(scope="module")
def siglip2_mi(tiny_model_dirs):
    return SigLIP2MIExtractor(str(tiny_model_dirs["siglip2"]), **MI)


def test_naflex_masks_follow_their_images_grid(siglip2_mi, scene):
    """SigLIP2: a 96 x 128 image keeps its aspect ratio (3 x 4 patches of 16 within 16); its masks are resized
    to those 48 x 64 pixels, and extract() is mask_inversion on that patch sequence and those masks."""
    image, masks = scene
    view = siglip2_mi.view_maker()(image, masks).views[0]
    assert view.spatial_shape.tolist() == [3, 4] and view.masks.shape == (2, 48, 64)
    torch.testing.assert_close(view.masks, siglip2_mi.preprocess.masks(masks))
    vectors = siglip2_mi.extract(image, masks)
    expected = mask_inversion(
        siglip2_mi.model,
        view.pixel_values[None],
        view.masks[None],
        iterations=5,
        spatial_shapes=view.spatial_shape[None],
    )[0]
    torch.testing.assert_close(vectors, expected)


def test_naflex_images_of_different_aspect_ratios_share_a_batch(siglip2_mi, scene):
    """A landscape and a portrait image (different patch grids, masks on one padded canvas) in one batch give
    the vectors of each image alone."""
    image, masks = scene
    portrait, portrait_masks = image.transpose(Image.TRANSPOSE), masks[:1].transpose(0, 2, 1).copy()
    maker = siglip2_mi.view_maker()
    batch = [maker(image, masks), maker(portrait, portrait_masks)]
    assert [v.views[0].spatial_shape.tolist() for v in batch] == [[3, 4], [4, 3]]
    rows = siglip2_mi.describe(batch)
    assert [len(r) for r in rows] == [2, 1]
    # float32 model: the batch pads each image's tokens to 16 either way, so only the masks' canvas differs
    torch.testing.assert_close(rows[0].vectors, siglip2_mi.extract(image, masks), atol=1e-5, rtol=0)
    torch.testing.assert_close(rows[1].vectors, siglip2_mi.extract(portrait, portrait_masks), atol=1e-5, rtol=0)


def test_naflex_explain_maps_cover_the_image(siglip2_mi, scene):
    image, masks = scene
    explained = siglip2_mi.explain(image, masks)
    torch.testing.assert_close(explained.vectors, siglip2_mi.extract(image, masks))
    assert explained.maps.shape == (2, 96, 128) and explained.global_map.shape == (96, 128)
    view = siglip2_mi.view_maker()(image, masks).views[0]
    on_grid = legrad_map(
        siglip2_mi.model, view.pixel_values[None], explained.vectors[None], spatial_shapes=view.spatial_shape[None]
    )[0]
    assert on_grid.shape == (2, 48, 64)
    expected = torch.nn.functional.interpolate(on_grid[None], size=(96, 128), mode="bilinear", align_corners=False)[0]
    torch.testing.assert_close(explained.maps, expected)


def _tiny_dim(folder: Path, family: str) -> int:
    """The embedding size of a saved tiny model: its config's ``dim_key`` (utils.families), read at the top
    level or in the vision tower's config (whole CLIP / SigLIP checkpoints)."""
    config = json.loads((folder / "config.json").read_text())
    key = FAMILIES[family].dim_key
    return int(config[key] if key in config else config["vision_config"][key])


@pytest.mark.parametrize("family", list(FAMILIES))
def test_end_to_end_with_ground_truth_masks(tiny_model_dirs, demo_dir, tmp_path, family):
    dim = _tiny_dim(tiny_model_dirs[family], family)
    proc = run_main(
        "create_index.py",
        f"extractor={family}_mi_features",
        f"model_name={tiny_model_dirs[family]}",
        f"vec_dim={dim}",
        f"anns_file={demo_dir / 'anns.pt'}",
        f"captions_file={demo_dir / 'captions.pt'}",
        "mi_iterations=3",
        "num_workers=1",
        "mask_input=true",
        cwd=tmp_path,
    )
    folder = features_dir_from(proc, tmp_path)
    search = run_main("search_index.py", f"features_dir={folder}", "k_search=5", cwd=tmp_path)
    results, rankings = read_results(results_dir_from(search))
    assert results["num_gallery_rows"] > results["num_gallery_images"]  # several masks per image
    assert len(rankings) == results["num_queries"] and all(len(r["ranking"]) == 5 for r in rankings)
    # Independent image-level scores: the best pair of (query row, gallery row), by plain loops.
    gallery = json.loads((folder / "gallery" / "images.json").read_text())
    queries = json.loads((folder / "queries" / "images.json").read_text())
    g_shards = [load_file(p) for p in sorted((folder / "gallery").glob("shard-*.safetensors"))]
    q_shards = [load_file(p) for p in sorted((folder / "queries").glob("shard-*.safetensors"))]
    g_feat, g_owner = (torch.cat([s[k] for s in g_shards]) for k in ("features", "owner"))
    q_feat, q_owner = (torch.cat([s[k] for s in q_shards]) for k in ("features", "owner"))
    scores = np.array(
        [
            [float((q_feat[q_owner == q] @ g_feat[g_owner == g].T).max()) for g in range(len(gallery))]
            for q in range(len(queries))
        ]
    )
    relevant = np.array([[bool(set(q["ins"]) & set(g["ins"])) for g in gallery] for q in queries])
    expected = np.mean([average_precision_score(r, s) for r, s in zip(relevant, scores)])
    assert results["mAP"] == pytest.approx(expected, abs=1e-6)


def test_images_with_different_mask_counts_share_a_batch_exactly(siglip_mi, scene):
    """With beta = 0 the batch is padded with empty masks; results equal one image at a time."""
    image, masks = scene
    maker = siglip_mi.view_maker()
    batch = [maker(image, masks), maker(image.transpose(Image.FLIP_LEFT_RIGHT), masks[:1, :, ::-1].copy())]
    rows = siglip_mi.describe(batch)
    assert [len(r) for r in rows] == [2, 1]
    torch.testing.assert_close(rows[0].vectors, siglip_mi.extract(image, masks), atol=1e-5, rtol=0)
    torch.testing.assert_close(
        rows[1].vectors,
        siglip_mi.extract(image.transpose(Image.FLIP_LEFT_RIGHT), masks[:1, :, ::-1].copy()),
        atol=1e-5,
        rtol=0,
    )


@pytest.mark.parametrize("mode,expected", [("per_mask", [0, 2]), ("smart_crop", [0, 2]), ("union", [-1])])
def test_rows_know_their_source_mask(tiny_model_dirs, scene, mode, expected):
    """An empty source mask is dropped; every row still names its mask in the captions entry."""
    image, masks = scene
    with_gap = np.stack([masks[0], np.zeros_like(masks[0]), masks[1]])
    extractor = SigLIPMIExtractor(
        str(tiny_model_dirs["siglip"]), mi_sum=mode == "union", smart_crop=mode == "smart_crop", **MI
    )
    views = extractor.view_maker()(image, with_gap)
    rows = extractor.describe([views])[0]
    assert views.dropped_masks == 1 and rows.mask_index.tolist() == expected
    averaged = SigLIPMIExtractor(str(tiny_model_dirs["siglip"]), avg_multiple_vecs=True, **MI)
    assert averaged.describe([averaged.view_maker()(image, with_gap)])[0].mask_index.tolist() == [-1]


def test_explain_gives_the_extract_vectors_and_their_legrad_maps_at_image_size(siglip_mi, scene):
    image, masks = scene
    explained = siglip_mi.explain(image, masks)
    torch.testing.assert_close(explained.vectors, siglip_mi.extract(image, masks))
    torch.testing.assert_close(explained.global_vector, siglip_mi.extract(image))
    assert explained.mask_index.tolist() == [0, 1]
    assert explained.maps.shape == (2, 96, 128) and explained.global_map.shape == (96, 128)
    assert explained.maps.min() >= 0 and explained.maps.max() <= 1 and explained.maps.amax((1, 2)).gt(0.5).all()
    # Independent: the engine's maps at the model's input size, resized to the image by bilinear interpolation.
    pixels = siglip_mi.preprocess.image(image)[None]
    vectors = torch.cat([explained.global_vector[None], explained.vectors])
    expected = torch.nn.functional.interpolate(
        legrad_map(siglip_mi.model, pixels, vectors[None]), size=(96, 128), mode="bilinear", align_corners=False
    )[0]
    torch.testing.assert_close(explained.global_map, expected[0])
    torch.testing.assert_close(explained.maps, expected[1:])
    assert set(explained.history) == {"loss", "dice"} and explained.history["dice"].shape == (5, 2)
    resized = siglip_mi.preprocess.masks(masks)[None]
    _, history = mask_inversion(siglip_mi.model, pixels, resized, iterations=5, return_history=True)
    torch.testing.assert_close(explained.history["dice"], history["dice"][:, 0])


def test_explain_smart_crop_maps_live_inside_each_crop(tiny_model_dirs, scene):
    image, masks = scene
    extractor = SigLIPMIExtractor(str(tiny_model_dirs["siglip"]), smart_crop=True, **MI)
    explained = extractor.explain(image, masks)
    torch.testing.assert_close(explained.vectors, extractor.extract(image, masks))
    x1, y1, x2, y2 = padded_box(torch.from_numpy(masks[0]), pad=0.1)
    inside = torch.zeros(96, 128, dtype=torch.bool)
    inside[y1:y2, x1:x2] = True
    assert explained.maps[0][~inside].abs().max() == 0 and explained.maps[0][inside].max() > 0.5
    crop_pixels = extractor.preprocess.image(image.crop((x1, y1, x2, y2)))[None]
    on_crop = legrad_map(extractor.model, crop_pixels, explained.vectors[None, :1])[0]
    expected = torch.nn.functional.interpolate(
        on_crop[None], size=(y2 - y1, x2 - x1), mode="bilinear", align_corners=False
    )[0, 0]
    torch.testing.assert_close(explained.maps[0, y1:y2, x1:x2], expected)
    assert explained.history["loss"].shape == (5, 2)


# ------------------------------------------------------------------ issue 16: the original's rules
def test_global_features_false_is_the_plain_embedding(tiny_model_dirs, scene):
    """The original's MI extractors with global_features=false return the plain global embedding."""
    folder = str(tiny_model_dirs["siglip"])
    no_mi = SigLIPMIExtractor(folder, global_features=False, **MI)
    plain = SigLIPExtractor(folder, device="cpu")
    torch.testing.assert_close(no_mi.extract(scene[0], scene[1]), plain.extract(scene[0]), atol=1e-5, rtol=1e-5)


def test_b_model_false_picks_the_large_models():
    from extractors import CLIPExtractor, DINOv2Extractor

    assert DINOv2Extractor.default_model(False) == "facebook/dinov2-large"
    assert SigLIPExtractor.default_model(False) == "google/siglip-so400m-patch14-384"
    assert SigLIPExtractor.default_model(True) == "google/siglip-base-patch16-384"
    assert CLIPExtractor.default_model(False) == "openai/clip-vit-base-patch16"  # no large CLIP in the original


def test_original_smart_crop_is_cut_from_the_input_sized_image(tiny_model_dirs, scene):
    """smart_crop_source=resized, mi_resample=original: the original's rule, re-computed with PIL."""
    image, masks = scene
    extractor = SigLIPMIExtractor(
        str(tiny_model_dirs["siglip"]), smart_crop=True, smart_crop_source="resized", mi_resample="original", **MI
    )
    views = extractor.view_maker()(image, masks)
    size = extractor.preprocess.size[::-1]  # (W, H) for PIL
    small = image.resize(size, Image.BILINEAR)  # SigLIP: BILINEAR
    small_mask = extractor.preprocess.masks(masks[:1])[0] > 0  # nearest, as every mask
    ys, xs = torch.nonzero(small_mask, as_tuple=True)
    x1, y1 = max(0, int(xs.min()) - 5), max(0, int(ys.min()) - 5)  # SigLIP / CLIP: 5 px
    x2, y2 = min(size[0], int(xs.max()) + 1 + 5), min(size[1], int(ys.max()) + 1 + 5)
    crop = small.crop((x1, y1, x2, y2)).resize(size, Image.BILINEAR)
    expected = torch.from_numpy(np.array(crop)).permute(2, 0, 1).float() / 255
    mean, std = (
        torch.tensor(extractor.preprocess.mean)[:, None, None],
        torch.tensor(extractor.preprocess.std)[:, None, None],
    )
    torch.testing.assert_close(views.views[0].pixel_values, (expected - mean) / std, atol=1e-5, rtol=0)
    assert views.views[0].masks.shape == (1, *extractor.preprocess.size)


def test_missing_masks_full_mask_keeps_masks_that_vanish(tiny_model_dirs, scene):
    image, _ = scene
    speck = np.zeros((1, image.height, image.width), dtype=bool)
    speck[0, 40, 60] = True  # one pixel: gone at 64 x 64
    folder = str(tiny_model_dirs["siglip"])
    with pytest.raises(Exception, match="empty at the model's input size"):
        SigLIPMIExtractor(folder, **MI).extract(image, speck)
    kept = SigLIPMIExtractor(folder, missing_masks="full_mask", **MI).view_maker()(image, speck)
    assert kept.dropped_masks == 0 and kept.views[0].masks.sum() == 0  # MI with an empty target


def test_mean_dice_mode_gives_one_vector_for_siglip_and_the_union_for_dinov2(tiny_model_dirs, scene):
    image, masks = scene
    siglip = SigLIPMIExtractor(str(tiny_model_dirs["siglip"]), mi_sum=True, mi_sum_loss="mean_dice", **MI)
    vectors = siglip.extract(image, masks)
    pixels, resized = siglip.preprocess.image(image)[None], siglip.preprocess.masks(masks)[None]
    expected = mask_inversion(siglip.model, pixels, resized, iterations=5, shared=True)[0, 0]
    torch.testing.assert_close(vectors, expected)
    dinov2 = DINOv2MIExtractor(str(tiny_model_dirs["dinov2"]), mi_sum=True, mi_sum_loss="mean_dice", **MI)
    union = DINOv2MIExtractor(str(tiny_model_dirs["dinov2"]), mi_sum=True, **MI)
    torch.testing.assert_close(dinov2.extract(image, masks), union.extract(image, masks))


def test_mask_input_zeroes_the_background_so_outside_pixels_cannot_change_the_vector(tiny_model_dirs, scene):
    image, masks = scene
    folder = str(tiny_model_dirs["siglip"])
    changed = np.asarray(image).copy()
    changed[90:, :10] = 255 - changed[90:, :10]  # outside both masks
    changed = Image.fromarray(changed)
    zeroed = SigLIPMIExtractor(folder, mask_input=True, **MI)
    torch.testing.assert_close(zeroed.extract(changed, masks), zeroed.extract(image, masks))
    unmasked = SigLIPMIExtractor(folder, **MI)  # query_mi: MI on the whole image
    assert (unmasked.extract(changed, masks) - unmasked.extract(image, masks)).abs().max() > 1e-4


# ------------------------------------------------------------------ issue 14: notebooks
def test_the_original_readme_snippet_runs(tiny_model_dirs, tmp_path):
    """Verbatim but for the model location (no hub here): a tiny model saved to disk."""
    from PIL import Image

    Image.fromarray(np.random.default_rng(0).integers(0, 256, (90, 120, 3), dtype=np.uint8)).save(
        tmp_path / "image.jpg"
    )
    from extractors import SigLIPMIExtractor

    extractor = SigLIPMIExtractor(str(tiny_model_dirs["siglip"]), mi_alpha=0.03, global_features=True)
    features = extractor.extract(Image.open(tmp_path / "image.jpg"))  # shape (768,) with the real model
    assert features.shape == (32,)


def test_every_image_and_mask_form_gives_the_same_vectors(tiny_model_dirs, scene, tmp_path):
    from datasets import ImageMasks, encode_mask, save_captions

    image, masks = scene
    image.save(tmp_path / "scene.png")
    extractor = SigLIPMIExtractor(str(tiny_model_dirs["siglip"]), captions_file=None, **MI)
    expected = extractor.extract(image, masks)
    entry = ImageMasks([encode_mask(m) for m in masks], [[0, 0, 1, 1]] * 2, [1.0, 1.0])
    for image_form in (
        image,
        np.asarray(image),
        tmp_path / "scene.png",
        str(tmp_path / "scene.png"),
        {"image": image, "img_path": str(tmp_path / "scene.png")},
    ):
        for mask_form in (
            masks,
            [m for m in masks],
            masks.astype(np.uint8) * 255,
            torch.from_numpy(masks),
            [encode_mask(m) for m in masks],
            entry,
            entry.to_dict(),
        ):
            torch.testing.assert_close(extractor.extract(image_form, mask_form), expected)
    save_captions({str((tmp_path / "scene.png").resolve()): entry}, tmp_path / "captions.pt")
    with_captions = SigLIPMIExtractor(str(tiny_model_dirs["siglip"]), captions_file=tmp_path / "captions.pt", **MI)
    torch.testing.assert_close(
        with_captions.extract({"image": None, "img_path": str(tmp_path / "scene.png")}), expected
    )
    batch = extractor.extract_batch([image, image.transpose(Image.FLIP_LEFT_RIGHT)], [masks, masks[:, :, ::-1].copy()])
    torch.testing.assert_close(batch[0], expected, atol=1e-5, rtol=0)
    assert batch[1].shape == (2, 32)


def test_constructor_and_cli_give_identical_vectors(tiny_model_dirs, demo_dir, tmp_path):
    """The same words in a notebook and on the command line give the same vectors."""
    from datasets import crop_box, load_captions, load_rgb

    settings = dict(mi_alpha=0.05, mi_iterations=3, mi_sum=True, batch_size=1)
    proc = run_main(
        "create_index.py",
        "extractor=siglip_mi_features",
        f"model_name={tiny_model_dirs['siglip']}",
        "vec_dim=32",
        f"anns_file={demo_dir / 'anns.pt'}",
        f"captions_file={demo_dir / 'captions.pt'}",
        *(f"{k}={str(v).lower()}" for k, v in settings.items()),
        "num_workers=0",
        "only_create=true",
        cwd=tmp_path,
    )
    folder = features_dir_from(proc, tmp_path)
    extractor = SigLIPMIExtractor(str(tiny_model_dirs["siglip"]), device="cpu", **settings)
    captions = load_captions(demo_dir / "captions.pt")
    gallery = json.loads((folder / "gallery" / "images.json").read_text())
    stored = load_file(sorted((folder / "gallery").glob("shard-*.safetensors"))[0])
    for i in range(2):
        rows = stored["features"][stored["owner"] == i]
        torch.testing.assert_close(
            extractor.extract(gallery[i]["file"], captions[gallery[i]["key"]]), rows[0], atol=1e-6, rtol=0
        )
    query = json.loads((folder / "queries" / "images.json").read_text())[0]
    stored = load_file(sorted((folder / "queries").glob("shard-*.safetensors"))[0])
    crop = crop_box(load_rgb(query["file"]), query["bbox"], "q", square=True)
    torch.testing.assert_close(extractor.extract(crop), stored["features"][0], atol=1e-6, rtol=0)


@pytest.mark.parametrize("family", [name for name, spec in FAMILIES.items() if spec.original is None])
def test_compat_original_is_refused_for_families_the_original_never_had(tiny_model_dirs, family):
    """mi_resample / smart_crop_source=resized reproduce the original code, which had no such family."""
    from extractors.registry import extractor_class

    cls = extractor_class(f"{family}_mi_features")
    for setting in ({"mi_resample": "original"}, {"smart_crop_source": "resized"}):
        with pytest.raises(SoIRError, match=f"original code, which has no {family} extractor: use compat=none"):
            cls(str(tiny_model_dirs[family]), device="cpu", **setting)


def test_alpha_sum_full_is_the_originals_two_stage_mi_sum(tiny_model_dirs, scene):
    """DINOv2 mi_sum with alpha_sum_full (the original's compute_maskinversion_sum): per-mask MI on the
    image, then the union's vector started at the sum of their raw parameters, pulled towards them."""
    image, masks = scene
    extractor = DINOv2MIExtractor(str(tiny_model_dirs["dinov2"]), mi_sum=True, alpha_sum_full=0.5, **MI)
    vector = extractor.extract(image, masks)
    pixels = extractor.preprocess.image(image)[None]
    resized = extractor.preprocess.masks(masks)[None]
    raw = mask_inversion(extractor.model, pixels, resized, iterations=5, return_raw=True)
    expected = mask_inversion(
        extractor.model,
        pixels,
        resized.amax(1, keepdim=True),
        iterations=5,
        init=raw.sum(1, keepdim=True),
        anchors=raw,
        anchor_weight=0.5,
    )[0, 0]
    torch.testing.assert_close(vector, expected)
    plain = DINOv2MIExtractor(str(tiny_model_dirs["dinov2"]), mi_sum=True, **MI).extract(image, masks)
    assert vector.shape == plain.shape == (32,) and float(vector @ plain) < 1 - 1e-6
    assert (
        extractor.identity()["alpha_sum_full"] == 0.5
        and "alpha_sum_full" not in DINOv2MIExtractor(str(tiny_model_dirs["dinov2"]), mi_sum=True, **MI).identity()
    )
    explained = extractor.explain(image, masks)
    torch.testing.assert_close(explained.vectors[0], vector)


@pytest.mark.parametrize(
    "cls,family,setting,message",
    [
        (SigLIPMIExtractor, "siglip", dict(mi_sum=True, alpha_sum_full=0.5), "DINOv2 extractor only"),
        (DINOv2MIExtractor, "dinov2", dict(alpha_sum_full=0.5), "acts on mi_sum=true"),
        (DINOv2MIExtractor, "dinov2", dict(mi_sum=True, alpha_sum=0.5), "not reproduced by SoIR"),
    ],
)
def test_alpha_sum_where_the_original_never_read_it_is_refused(tiny_model_dirs, cls, family, setting, message):
    with pytest.raises(SoIRError, match=message):
        cls(str(tiny_model_dirs[family]), **setting, **MI)


def test_alpha_sum_full_under_compat_original(tiny_model_dirs, scene, hydra_compose):
    """compat=original + mi_sum + alpha_sum_full (the original's DINOv2 keys): the per-mask stage runs with
    its joint LeGrad normalisation, as the original's compute_maskinversion did."""
    from extractors import extractor_from_config

    cfg = hydra_compose(
        "extractor=dinov2_mi_features",
        f"model_name={tiny_model_dirs['dinov2']}",
        "vec_dim=32",
        "compat=original",
        "mi_sum=true",
        "alpha_sum_full=0.5",
        "mi_iterations=3",
        "device=cpu",
    )
    extractor = extractor_from_config(cfg)
    assert (extractor.mode, extractor.sum_pull, extractor.mi.joint_norm) == ("union", 0.5, True)
    image, masks = scene
    vector = extractor.extract(image, masks)
    pixels = extractor.mi_preprocess.image(image)[None]
    # compat=original resizes masks with PIL NEAREST (its pixel geometry, issue 21's D4)
    resized = pil_nearest_masks(torch.as_tensor(masks), extractor.mi_preprocess.size)[None]
    raw = mask_inversion(extractor.model, pixels, resized, iterations=3, joint_norm=True, return_raw=True)
    pull = dict(init=raw.sum(1, keepdim=True), anchors=raw, anchor_weight=0.5)
    expected = mask_inversion(extractor.model, pixels, resized.amax(1, keepdim=True), iterations=3, **pull)
    torch.testing.assert_close(vector, expected[0, 0])


def test_siglip_maps_are_upsampled_by_16_under_compat_whatever_the_patch(tmp_path, scene):
    """D7 (issue 21): the original upsampled SigLIP's LeGrad maps by a hard-coded 16. On a patch-14 tiny
    SigLIP (56 px, 4 x 4 patches), pixel_geometry=original (compat=original) upsamples them by 16 and
    the default by the model's patch, 14; that factor is the only difference, and the extractors'
    vectors are mask_inversion's with it. New coverage: the tiny SigLIP of the other tests has patch 16,
    where both factors agree."""
    from extractors.mi.legrad import LeGrad
    from extractors.mi.vit_adapters import vit_parts
    from utils.testing.tiny_models import save_tiny_siglip

    folder = save_tiny_siglip(tmp_path / "siglip14", patch_size=14, image_size=56)
    compat = SigLIPMIExtractor(str(folder), pixel_geometry="original", **MI)
    plain = SigLIPMIExtractor(str(folder), **MI)
    assert vit_parts(plain.model).patch_size == 14
    assert compat.mi.kwargs() == {**plain.mi.kwargs(), "map_patch_size": 16} and plain.mi.map_patch_size is None
    image, masks = scene
    pixels, resized = plain.preprocess.image(image)[None], plain.preprocess.masks(masks)[None]
    for extractor, scale in ((compat, 16), (plain, 14)):
        legrad = LeGrad(vit_parts(extractor.model), pixels, map_patch_size=extractor.mi.map_patch_size)
        assert legrad.map_scale == scale
    by16 = mask_inversion(plain.model, pixels, resized, **{**plain.mi.kwargs(), "map_patch_size": 16})
    by14 = mask_inversion(plain.model, pixels, resized, **plain.mi.kwargs())
    torch.testing.assert_close(compat.invert(pixels, resized).cpu(), by16)
    torch.testing.assert_close(plain.invert(pixels, resized).cpu(), by14)
    assert (by16 - by14).abs().max() > 1e-4  # the factor changes the vectors
