"""descriptor=mao: MaO's Stage B as the paper describes it, one vector per image over its object crops."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from sklearn.metrics import average_precision_score

from datasets import find_masks, load_anns, load_captions, split
from datasets.views import mao_box, stack_masks, stack_views
from extractors import DINOv2MIExtractor, SigLIPMIExtractor, extractor_from_config
from extractors.mi.engine import mask_inversion
from extractors.mi.reference import reference_mao
from tests.pipeline import features_dir_from, read_results, results_dir_from, run_main
from utils.errors import SoIRError

MAO = dict(descriptor="mao", mi_iterations=5, device="cpu")


@pytest.fixture(scope="module")
def scene():
    """A 96x128 noisy image with three object masks: two small, one at the border."""
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (96, 128, 3), dtype=np.uint8))
    masks = np.zeros((3, 96, 128), dtype=bool)
    masks[0, 10:20, 20:34] = True
    masks[1, 60:90, 90:120] = True
    masks[2, 80:96, 0:6] = True
    return image, masks


@pytest.fixture(scope="module")
def siglip_mao(tiny_model_dirs):
    return SigLIPMIExtractor(str(tiny_model_dirs["siglip"]), **MAO)


def test_crops_are_cut_as_stage_a_cuts_them(siglip_mao, scene):
    """One view per mask: its padded box grown to the input side (64), inside the image, the mask cut alike."""
    image, masks = scene
    views = siglip_mao.view_maker()(image, masks)
    assert len(views.views) == 3 and [v.mask_index.tolist() for v in views.views] == [[0], [1], [2]]
    preprocess = siglip_mao.preprocess
    assert preprocess.size == (64, 64)
    # mask 1: box x 90..120, y 60..90, padded by round(0.1 * 30) = 3 -> x 87..123, y 57..93; grown to
    # 64 around its centre (105, 75) and shifted into the 128 x 96 image
    assert mao_box(torch.from_numpy(masks[1]), 0.1, 64) == (64, 32, 128, 96)
    for view, mask in zip(views.views, masks):
        x1, y1, x2, y2 = mao_box(torch.from_numpy(mask), 0.1, 64)
        assert x2 - x1 == 64 and y2 - y1 == 64 and x1 >= 0 and y1 >= 0 and x2 <= 128 and y2 <= 96
        torch.testing.assert_close(view.pixel_values, preprocess.image(image.crop((x1, y1, x2, y2))))
        torch.testing.assert_close(view.masks, preprocess.masks(mask[None, y1:y2, x1:x2]))


def test_one_vector_per_image_from_the_engine_with_groups(siglip_mao, scene):
    """extract -> [D]: the engine's Stage B over the image's crops; MI's defaults are the paper's."""
    image, masks = scene
    vector = siglip_mao.extract(image, masks)
    assert vector.shape == (32,)
    views = siglip_mao.view_maker()(image, masks).views
    expected = mask_inversion(
        siglip_mao.model,
        stack_views(views)[0],
        stack_masks(views),
        groups=torch.zeros(3, dtype=torch.long),
        iterations=5,
        overlap="iou",
    )
    torch.testing.assert_close(vector, expected[0, 0])
    paper = SigLIPMIExtractor(siglip_mao.model_name, descriptor="mao", device="cpu")
    assert (paper.mi.iterations, paper.mi.lr, paper.mi.alpha, paper.mi.overlap) == (80, 0.1, 0.03, "iou")
    assert SigLIPMIExtractor(siglip_mao.model_name, device="cpu").mi.iterations == 100  # the published code's
    assert "overlap" not in SigLIPMIExtractor(siglip_mao.model_name, device="cpu").identity()["mi"]  # unchanged


def test_images_of_a_batch_are_independent(siglip_mao, scene):
    """All crops of a batch in one optimisation; each image's vector equals its vector alone."""
    image, masks = scene
    flipped, flipped_masks = image.transpose(Image.FLIP_LEFT_RIGHT), masks[:2, :, ::-1].copy()  # 2 masks, 3 before
    together = siglip_mao.extract_batch([image, flipped], [masks, flipped_masks])
    alone = siglip_mao.extract(flipped, flipped_masks)
    torch.testing.assert_close(together[0], siglip_mao.extract(image, masks), atol=1e-6, rtol=0)
    torch.testing.assert_close(together[1], alone, atol=1e-6, rtol=0)


def test_dice_overlap_differs_from_iou(tiny_model_dirs, siglip_mao, scene):
    image, masks = scene
    dice = SigLIPMIExtractor(str(tiny_model_dirs["siglip"]), mao_overlap="dice", **MAO).extract(image, masks)
    assert float(dice @ siglip_mao.extract(image, masks)) < 1 - 1e-6


def test_explain_gives_the_vector_and_its_map_over_the_crops(siglip_mao, scene):
    image, masks = scene
    explained = siglip_mao.explain(image, masks)
    torch.testing.assert_close(explained.vectors[0], siglip_mao.extract(image, masks))
    assert explained.maps.shape == (1, 96, 128) and explained.mask_index.tolist() == [-1]
    assert explained.history["dice"].shape == (5, 1)


@pytest.mark.parametrize(
    "setting", [dict(smart_crop=True), dict(mi_sum=True), dict(avg_multiple_vecs=True), dict(mi_beta=0.1)]
)
def test_the_published_codes_modes_are_refused_with_mao(tiny_model_dirs, setting):
    with pytest.raises(SoIRError, match="descriptor=mao .* does not combine with"):
        SigLIPMIExtractor(str(tiny_model_dirs["siglip"]), **MAO, **setting)


@pytest.mark.parametrize("setting", [{"object_desc": "mask_pool"}, {"mi_init": "mask_pool"}])
def test_per_mask_descriptors_are_refused_with_mao_before_the_model_loads(setting):
    """object_desc / mi_init (issue 23) shape per-mask vectors; MaO optimises its own: refused, naming both,
    before any model is read (the folder does not exist)."""
    with pytest.raises(SoIRError, match="are per-mask descriptors .* descriptor=mao and alpha_sum_full"):
        SigLIPMIExtractor("/nonexistent/model", **MAO, **setting)


def test_mao_overlap_without_mao_is_refused(tiny_model_dirs):
    with pytest.raises(SoIRError, match="mao_overlap=dice is the loss of descriptor=mao"):
        SigLIPMIExtractor(str(tiny_model_dirs["siglip"]), mao_overlap="dice", device="cpu")


@pytest.fixture(scope="module")
def demo_mao(tiny_model_dirs, demo_dir, tmp_path_factory):
    """create_index.py descriptor=mao on the demo set (tiny DINOv2, captions masks, 3 iterations)."""
    cwd = tmp_path_factory.mktemp("mao_demo")
    overrides = [
        "extractor=dinov2_mi_features",
        f"model_name={tiny_model_dirs['dinov2']}",
        "vec_dim=32",
        f"anns_file={demo_dir / 'anns.pt'}",
        f"captions_file={demo_dir / 'captions.pt'}",
        "descriptor=mao",
        "mi_iterations=3",
        "num_workers=0",
        "batch_size=5",
    ]
    proc = run_main("create_index.py", *overrides, cwd=cwd)
    return features_dir_from(proc, cwd), results_dir_from(proc), overrides


def test_create_index_writes_one_row_per_image_and_sklearns_metrics(demo_mao, demo_dir):
    """One row per gallery image (the demo's images hold 3 to 8 masks) and per query; mAP and
    Recall@1 of the search equal sklearn's on the stored vectors' cosines."""
    folder, results_dir, _ = demo_mao
    results, rankings = read_results(results_dir)
    gallery = json.loads((folder / "gallery" / "images.json").read_text())
    queries = json.loads((folder / "queries" / "images.json").read_text())
    g = load_file(next((folder / "gallery").glob("shard-*.safetensors")))
    q = load_file(next((folder / "queries").glob("shard-*.safetensors")))
    assert g["owner"].tolist() == list(range(len(gallery))) == list(range(16))
    assert q["owner"].tolist() == list(range(len(queries)))
    assert results["num_gallery_rows"] == results["num_gallery_images"] == 16
    scores = (q["features"] @ g["features"].T).double().numpy()
    relevant = np.array([[bool(set(a["ins"]) & set(b["ins"])) for b in gallery] for a in queries])
    expected = np.mean([average_precision_score(r, s) for r, s in zip(relevant, scores)])
    assert results["mAP"] == pytest.approx(expected, abs=1e-6)
    top1 = np.mean([r[np.argmax(s)] for r, s in zip(relevant, scores)])
    assert results["recall"]["1"] == pytest.approx(top1, abs=1e-9)
    assert [r["ranking"][0][0] for r in rankings] == [gallery[int(np.argmax(s))]["key"] for s in scores]


def test_demo_crops_engine_equals_reference_in_float64(tiny_model_dirs, demo_dir):
    """On a demo gallery image's real crops (8 objects), the engine's Stage B equals the plain autograd
    reference to 1e-9 in float64, and the extractor's row is the engine's on those crops."""
    _, gallery = split(load_anns(demo_dir / "anns.pt"))
    captions = load_captions(demo_dir / "captions.pt")
    ann = max(gallery, key=lambda a: len(find_masks(captions, a.key, a.file)))
    extractor = DINOv2MIExtractor(str(tiny_model_dirs["dinov2"]), descriptor="mao", mi_iterations=4, device="cpu")
    image = Image.open(ann.file).convert("RGB")
    masks = find_masks(captions, ann.key, ann.file).masks()
    views = extractor.view_maker()(image, masks).views
    assert len(views) == len(masks) == 8
    pixels, crops_masks = stack_views(views)[0], stack_masks(views)
    groups = torch.zeros(len(views), dtype=torch.long)
    row = extractor.extract(image, masks)
    torch.testing.assert_close(
        row, mask_inversion(extractor.model, pixels, crops_masks, groups=groups, iterations=4, overlap="iou")[0, 0]
    )
    model = extractor.model.double()
    ours = mask_inversion(model, pixels.double(), crops_masks, groups=groups, iterations=4, overlap="iou")
    ref = reference_mao(model, pixels.double(), crops_masks, groups, iterations=4)
    torch.testing.assert_close(ours, ref, atol=1e-9, rtol=0)


def test_config_reaches_the_extractor(tiny_model_dirs, hydra_compose):
    """descriptor / mao_overlap are config keys the MI extractors take (refused for plain extractors)."""
    cfg = hydra_compose(
        "extractor=siglip_mi_features",
        f"model_name={tiny_model_dirs['siglip']}",
        "vec_dim=32",
        "descriptor=mao",
        "mao_overlap=dice",
        "device=cpu",
    )
    extractor = extractor_from_config(cfg)
    assert extractor.mode == "mao" and extractor.mi.overlap == "dice" and extractor.mi.iterations == 80
    plain = hydra_compose(
        "extractor=siglip_features", f"model_name={tiny_model_dirs['siglip']}", "vec_dim=32", "descriptor=mao"
    )
    with pytest.raises(SoIRError, match="descriptor need a Mask Inversion extractor"):
        extractor_from_config(plain)


def test_naflex_crops_of_different_shapes_share_one_optimisation(tiny_model_dirs, scene):
    """SigLIP2 NaFlex: each crop has its own patch grid (masks on a padded canvas); two images of the
    batch give the vectors they give alone."""
    from extractors import SigLIP2MIExtractor

    image, masks = scene
    masks = np.concatenate([masks, np.zeros_like(masks[:1])])
    masks[3, 40:50, 10:110] = True  # a wide object: its crop is wider than the 64-pixel minimum
    extractor = SigLIP2MIExtractor(str(tiny_model_dirs["siglip2"]), **MAO)
    views = extractor.view_maker()(image, masks).views
    assert len({tuple(v.spatial_shape.tolist()) for v in views}) > 1  # crops of different aspect ratios
    flipped, flipped_masks = image.transpose(Image.FLIP_LEFT_RIGHT), masks[:2, :, ::-1].copy()
    together = extractor.extract_batch([image, flipped], [masks, flipped_masks])
    torch.testing.assert_close(together[0], extractor.extract(image, masks), atol=1e-6, rtol=0)
    torch.testing.assert_close(together[1], extractor.extract(flipped, flipped_masks), atol=1e-6, rtol=0)
