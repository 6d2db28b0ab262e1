"""MI extractors: mask formats, geometry of views, descriptor modes, end to end with each family."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from sklearn.metrics import average_precision_score

from extractors import (CLIPMIExtractor, DINOv2MIExtractor, DINOv2RegMIExtractor, DINOv3MIExtractor,
                        SigLIP2MIExtractor, SigLIPExtractor, SigLIPMIExtractor)
from extractors.views import ViewMaker, padded_box
from tests.pipeline import features_dir_from, read_results, results_dir_from, run_script
from utils.mask_inversion import legrad_map, mask_inversion

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


def test_no_masks_gives_the_global_embedding(tiny_model_dirs, siglip_mi, scene):
    plain = SigLIPExtractor(str(tiny_model_dirs["siglip"]), device="cpu")
    torch.testing.assert_close(siglip_mi.extract(scene[0]), plain.extract(scene[0]), atol=1e-5, rtol=1e-5)


def test_one_vector_per_image_modes(tiny_model_dirs, scene):
    image, masks = scene
    folder = str(tiny_model_dirs["siglip"])
    per_mask = SigLIPMIExtractor(folder, **MI).extract(image, masks)
    averaged = SigLIPMIExtractor(folder, avg_multiple_vecs=True, **MI).extract(image, masks)
    torch.testing.assert_close(averaged[0], torch.nn.functional.normalize(per_mask.mean(0), dim=0))
    union = SigLIPMIExtractor(folder, mi_sum=True, **MI).extract(image, masks)
    single = SigLIPMIExtractor(folder, **MI).extract(image, masks.any(0, keepdims=True))
    torch.testing.assert_close(union, single)


def test_smart_crop_cuts_each_mask_box_from_the_original_image(siglip_mi, scene):
    image, masks = scene
    box = padded_box(torch.from_numpy(masks[0]), pad=0.1)
    assert box == (16, 6, 64, 44)                    # 40x30 box, 4 px margin (10% of 40)
    views = ViewMaker(siglip_mi.preprocess, "smart_crop", 0.1)(image, masks)
    assert len(views.views) == 2
    torch.testing.assert_close(views.views[0].pixel_values, siglip_mi.preprocess.image(image.crop(box)))
    mask_crop = siglip_mi.preprocess.masks(masks[:1, 6:44, 16:64])
    torch.testing.assert_close(views.views[0].masks, mask_crop)


@pytest.mark.parametrize("cls,family", [(DINOv2MIExtractor, "dinov2"), (CLIPMIExtractor, "clip"),
                                        (DINOv2RegMIExtractor, "dinov2reg"), (DINOv3MIExtractor, "dinov3")])
def test_other_families(tiny_model_dirs, scene, cls, family):
    """The extractor's vectors are mask_inversion on its own resized image and masks."""
    extractor = cls(str(tiny_model_dirs[family]), **MI)
    image, masks = scene
    vectors = extractor.extract(image, masks)
    assert vectors.shape == (2, 24 if family == "clip" else 32) and torch.isfinite(vectors).all()
    expected = mask_inversion(extractor.model, extractor.preprocess.image(image)[None],
                              extractor.preprocess.masks(masks)[None], iterations=5)[0]
    torch.testing.assert_close(vectors, expected)


def test_fixed_resolution_siglip2_inverts_through_the_siglip_family(tiny_variant_dirs, scene):
    extractor = SigLIPMIExtractor(str(tiny_variant_dirs["siglip2_fixres"]), **MI)
    image, masks = scene
    expected = mask_inversion(extractor.model, extractor.preprocess.image(image)[None],
                              extractor.preprocess.masks(masks)[None], iterations=5)[0]
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
    expected = mask_inversion(siglip2_mi.model, view.pixel_values[None], view.masks[None], iterations=5,
                              spatial_shapes=view.spatial_shape[None])[0]
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
    on_grid = legrad_map(siglip2_mi.model, view.pixel_values[None], explained.vectors[None],
                         spatial_shapes=view.spatial_shape[None])[0]
    assert on_grid.shape == (2, 48, 64)
    expected = torch.nn.functional.interpolate(on_grid[None], size=(96, 128), mode="bilinear", align_corners=False)[0]
    torch.testing.assert_close(explained.maps, expected)


@pytest.mark.parametrize("family,dim", [("siglip", 32), ("clip", 24), ("dinov2", 32), ("dinov2reg", 32),
                                        ("dinov3", 32), ("siglip2", 32)])
def test_end_to_end_with_ground_truth_masks(tiny_model_dirs, demo_dir, tmp_path, family, dim):
    proc = run_script("create_index.py", f"extractor={family}_mi_features", f"model_name={tiny_model_dirs[family]}",
                      f"vec_dim={dim}", f"anns_file={demo_dir / 'anns.pt'}",
                      f"captions_file={demo_dir / 'captions.pt'}", "mi_iterations=3", "num_workers=1",
                      "mask_input=true", cwd=tmp_path)
    folder = features_dir_from(proc, tmp_path)
    search = run_script("search_index.py", f"features_dir={folder}", "k_search=5", cwd=tmp_path)
    results, rankings = read_results(results_dir_from(search))
    assert results["num_gallery_rows"] > results["num_gallery_images"]     # several masks per image
    assert len(rankings) == results["num_queries"] and all(len(l["ranking"]) == 5 for l in rankings)
    # Independent image-level scores: the best pair of (query row, gallery row), by plain loops.
    gallery = json.loads((folder / "gallery" / "images.json").read_text())
    queries = json.loads((folder / "queries" / "images.json").read_text())
    g_shards = [load_file(p) for p in sorted((folder / "gallery").glob("shard-*.safetensors"))]
    q_shards = [load_file(p) for p in sorted((folder / "queries").glob("shard-*.safetensors"))]
    g_feat, g_owner = (torch.cat([s[k] for s in g_shards]) for k in ("features", "owner"))
    q_feat, q_owner = (torch.cat([s[k] for s in q_shards]) for k in ("features", "owner"))
    scores = np.array([[float((q_feat[q_owner == q] @ g_feat[g_owner == g].T).max())
                        for g in range(len(gallery))] for q in range(len(queries))])
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
    torch.testing.assert_close(rows[1].vectors, siglip_mi.extract(image.transpose(Image.FLIP_LEFT_RIGHT),
                                                                  masks[:1, :, ::-1].copy()), atol=1e-5, rtol=0)


@pytest.mark.parametrize("mode,expected", [("per_mask", [0, 2]), ("smart_crop", [0, 2]), ("union", [-1])])
def test_rows_know_their_source_mask(tiny_model_dirs, scene, mode, expected):
    """An empty source mask is dropped; every row still names its mask in the captions entry."""
    image, masks = scene
    with_gap = np.stack([masks[0], np.zeros_like(masks[0]), masks[1]])
    extractor = SigLIPMIExtractor(str(tiny_model_dirs["siglip"]), mi_sum=mode == "union",
                                  smart_crop=mode == "smart_crop", **MI)
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
    expected = torch.nn.functional.interpolate(legrad_map(siglip_mi.model, pixels, vectors[None]), size=(96, 128),
                                               mode="bilinear", align_corners=False)[0]
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
    expected = torch.nn.functional.interpolate(on_crop[None], size=(y2 - y1, x2 - x1), mode="bilinear",
                                               align_corners=False)[0, 0]
    torch.testing.assert_close(explained.maps[0, y1:y2, x1:x2], expected)
    assert explained.history["loss"].shape == (5, 2)
