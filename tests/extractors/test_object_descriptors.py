"""Per-object descriptors without optimisation (object_desc=mask_pool|crop) and mi_init=mask_pool: against
plain references, batching equal to one-by-one, and end to end on the demo set with metrics = sklearn's."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from sklearn.metrics import average_precision_score

from datasets.views import ViewMaker, padded_box, stack_masks, stack_views
from extractors import CLIPExtractor, CLIPMIExtractor, DINOv2MIExtractor, SigLIP2MIExtractor, SigLIPMIExtractor
from extractors.pooling import mask_pooled, token_descriptors
from tests.pipeline import features_dir_from, read_results, results_dir_from, run_main
from utils.errors import SoIRError


@pytest.fixture(scope="module")
def scene():
    """A 96 x 128 noisy image with three masks: two rectangles and a blob smaller than a patch."""
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (96, 128, 3), dtype=np.uint8))
    masks = np.zeros((3, 96, 128), dtype=bool)
    masks[0, 10:40, 20:60] = True
    masks[1, 60:90, 90:120] = True
    masks[2, 50:53, 10:14] = True
    return image, masks


def mask_pool_reference(z: np.ndarray, masks: np.ndarray, patch: int, h: int, w: int) -> np.ndarray:
    """Plain loops: a mask's vector = sum over patches (i, j) of (share of the patch's pixels in the mask)
    x that patch's token, divided by the sum of the shares; then L2-normalised. z: [h w, D] row-major."""
    out = []
    for mask in masks:
        total, weight = np.zeros(z.shape[1]), 0.0
        for i in range(h):
            for j in range(w):
                share = mask[i * patch : (i + 1) * patch, j * patch : (j + 1) * patch].mean()
                total += share * z[i * w + j]
                weight += share
        v = total / weight
        out.append(v / np.linalg.norm(v))
    return np.stack(out)


@pytest.mark.parametrize(
    "cls,family", [(DINOv2MIExtractor, "dinov2"), (CLIPMIExtractor, "clip"), (SigLIP2MIExtractor, "siglip2")]
)
def test_mask_pool_equals_the_reference(tiny_model_dirs, scene, cls, family):
    image, masks = scene
    extractor = cls(str(tiny_model_dirs[family]), device="cpu", object_desc="mask_pool")
    vectors = extractor.extract(image, masks)
    assert vectors.shape == (3, extractor.dim)
    views = extractor.view_maker()(image, masks).views
    pixels, shapes = stack_views(views)
    z, grids, parts, _ = token_descriptors(extractor.model, pixels, shapes)
    h, w = grids[0].tolist()
    patch_tokens = z[0, parts.num_prefix_tokens : parts.num_prefix_tokens + h * w].double().numpy()
    reference = mask_pool_reference(patch_tokens, views[0].masks.numpy(), parts.patch_size, h, w)
    np.testing.assert_allclose(vectors.numpy(), reference, atol=1e-6)


def test_mask_pool_runs_one_forward_pass_per_batch(tiny_model_dirs, scene):
    image, masks = scene
    extractor = SigLIPMIExtractor(str(tiny_model_dirs["siglip"]), device="cpu", object_desc="mask_pool", batch_size=2)
    calls = []
    hook = extractor.model.register_forward_hook(lambda *_: calls.append(1))
    try:
        both = extractor.extract_batch(
            [image, image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)], [masks, masks[:2, :, ::-1].copy()]
        )
    finally:
        hook.remove()
    assert len(calls) == 1 and [len(v) for v in both] == [3, 2]
    # and the same vectors one image at a time (images with different mask counts padded in one batch)
    torch.testing.assert_close(both[0], extractor.extract(image, masks), atol=1e-6, rtol=0)


def test_crop_is_the_embedding_of_each_padded_box_and_batching_equals_one_by_one(tiny_model_dirs, scene):
    image, masks = scene
    extractor = CLIPMIExtractor(str(tiny_model_dirs["clip"]), device="cpu", object_desc="crop", smart_crop_pad=0.1)
    plain = CLIPExtractor(str(tiny_model_dirs["clip"]), device="cpu")
    calls = []
    hook = extractor.model.register_forward_hook(lambda *_: calls.append(1))
    try:
        vectors = extractor.extract(image, masks)
    finally:
        hook.remove()
    assert len(calls) == 1 and vectors.shape == (3, extractor.dim)  # the three crops in one forward pass
    for vector, mask in zip(vectors, masks):
        crop = image.crop(padded_box(torch.from_numpy(mask), 0.1))
        torch.testing.assert_close(vector, plain.extract(crop), atol=1e-5, rtol=0)
        torch.testing.assert_close(vector, extractor.extract(crop), atol=1e-5, rtol=0)  # one by one


def test_mi_init_mask_pool_starts_from_the_pooled_vectors(tiny_model_dirs, scene):
    image, masks = scene
    folder = str(tiny_model_dirs["siglip"])
    pooled = SigLIPMIExtractor(folder, device="cpu", object_desc="mask_pool").extract(image, masks)
    start = SigLIPMIExtractor(folder, device="cpu", mi_init="mask_pool", mi_iterations=0).extract(image, masks)
    torch.testing.assert_close(start, pooled, atol=1e-6, rtol=0)
    views = ViewMaker(SigLIPMIExtractor(folder, device="cpu").preprocess, "per_mask")(image, masks).views
    assert torch.allclose(
        mask_pooled(SigLIPMIExtractor(folder, device="cpu").model, stack_views(views)[0], stack_masks(views)),
        pooled[None],
        atol=1e-6,
    )
    from_global = SigLIPMIExtractor(folder, device="cpu", mi_iterations=3).extract(image, masks)
    from_pool = SigLIPMIExtractor(folder, device="cpu", mi_iterations=3, mi_init="mask_pool").extract(image, masks)
    assert not torch.allclose(from_global, from_pool, atol=1e-4)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"object_desc": "mask_pool", "mi_sum": True}, "mi_sum and mi_init are Mask Inversion's settings"),
        ({"object_desc": "crop", "mi_init": "mask_pool"}, "mi_sum and mi_init are Mask Inversion's settings"),
        ({"object_desc": "pooled"}, "object_desc=pooled"),
    ],
)
def test_settings_that_contradict_are_refused_before_the_model_loads(kwargs, message):
    with pytest.raises(SoIRError, match=message):
        SigLIPMIExtractor("/nonexistent", device="cpu", **kwargs)


def test_object_descriptors_are_part_of_the_features_identity(tiny_model_dirs, hydra_compose):
    from extractors import extractor_from_config
    from utils.pipeline.create import default_features_dir, settings_identity

    dirs = set()
    for extra in ([], ["object_desc=mask_pool"], ["object_desc=crop"], ["mi_init=mask_pool"]):
        cfg = hydra_compose(
            "anns_file=a.pt",
            "extractor=clip_mi_features",
            f"model_name={tiny_model_dirs['clip']}",
            "vec_dim=24",
            "device=cpu",
            *extra,
        )
        dirs.add(default_features_dir(cfg, settings_identity(cfg, extractor_from_config(cfg), queries=False)))
    plain = hydra_compose("anns_file=a.pt", "extractor=clip_features", "object_desc=crop")
    assert len(dirs) == 4
    with pytest.raises(SoIRError, match="object_desc need a Mask Inversion extractor"):
        extractor_from_config(plain)


@pytest.mark.parametrize("descriptor", [["object_desc=mask_pool"], ["object_desc=crop"], ["mi_init=mask_pool"]])
def test_each_descriptor_end_to_end_on_the_demo_with_metrics_equal_to_sklearn(
    tiny_model_dirs, demo_dir, tmp_path, descriptor
):
    proc = run_main(
        "create_index.py",
        "extractor=clip_mi_features",
        f"model_name={tiny_model_dirs['clip']}",
        "vec_dim=24",
        f"anns_file={demo_dir / 'anns.pt'}",
        f"captions_file={demo_dir / 'captions.pt'}",
        "mi_iterations=3",
        "num_workers=0",
        "mask_input=true",
        "k_search=100",
        "report=false",
        *descriptor,
        cwd=tmp_path,
    )
    folder = features_dir_from(proc, tmp_path)
    results, rankings = read_results(results_dir_from(proc))
    assert results["num_gallery_rows"] > results["num_gallery_images"]  # one vector per mask
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
    assert results["mAP"] == pytest.approx(
        np.mean([average_precision_score(r, s) for r, s in zip(relevant, scores)]), abs=1e-6
    )
