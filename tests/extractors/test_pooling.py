"""Pooled global descriptors (pool=gem|rmac|mean|cls|model) against plain numpy references of the
published formulas (GeM: Radenovic et al. 2018; R-MAC: Tolias et al. 2016, as cirtorch computes them)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from extractors import build_extractor, extractor_from_config
from extractors.backbones import vision_model_class
from extractors.mi.engine import global_embedding
from extractors.pooling import pooled_embedding, token_descriptors
from utils.errors import SoIRError
from utils.families import FAMILIES


def gem_reference(x: np.ndarray, p: float) -> np.ndarray:
    """GeM of feature map x [D, h, w]: f_k = ((1/|X_k|) sum_{x in X_k} x^p)^(1/p), activations clamped at 1e-6."""
    x = np.maximum(x.astype(np.float64), 1e-6)
    return np.mean(x.reshape(len(x), -1) ** p, axis=1) ** (1 / p)


def rmac_reference(x: np.ndarray, L: int) -> np.ndarray:
    """R-MAC of x [D, H, W]: sum over the whole map and the square regions of levels 1..L of each region's
    L2-normalised max. At level l the square side is floor(2 min(H, W) / (l + 1)); the long side holds
    l + extra regions, extra chosen among 1..6 so that neighbouring regions overlap closest to 40 %;
    regions are spread uniformly (cirtorch's placement)."""
    x = x.astype(np.float64)
    _, H, W = x.shape
    w = min(H, W)

    def mac(r):
        v = r.reshape(len(r), -1).max(axis=1)
        return v / (np.linalg.norm(v) + 1e-6)

    steps = np.arange(2, 8)
    overlap = (w**2 - w * (max(H, W) - w) / (steps - 1)) / w**2
    extra = int(np.argmin(np.abs(overlap - 0.4))) + 1
    extra_w, extra_h = (extra, 0) if H < W else (0, extra) if H > W else (0, 0)
    out = mac(x)
    for level in range(1, L + 1):
        side = int(np.floor(2 * w / (level + 1)))
        if side == 0:
            continue
        half = int(np.floor(side / 2 - 1))
        n_w, n_h = level + extra_w, level + extra_h
        b_w = 0 if n_w == 1 else (W - side) / (n_w - 1)
        b_h = 0 if n_h == 1 else (H - side) / (n_h - 1)
        for i in range(n_h):
            top = int(np.floor(half + i * b_h)) - half
            for j in range(n_w):
                left = int(np.floor(half + j * b_w)) - half
                out = out + mac(x[:, top : top + side, left : left + side])
    return out


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


@pytest.fixture(scope="module")
def models(tiny_model_dirs):
    return {name: vision_model_class(name).from_pretrained(tiny_model_dirs[name]).eval() for name in FAMILIES}


def _inputs(model, family: str, grid: tuple[int, int]):
    """Random pixels with a patch grid of ``grid`` (NaFlex: two images of different grids)."""
    torch.manual_seed(0)
    p = model.config.patch_size
    if FAMILIES[family].naflex:
        shapes = torch.tensor([list(grid), [grid[1], grid[0] - 1]])
        n = grid[0] * grid[1]
        return torch.randn(2, n, 3 * p * p), shapes
    if family == "siglip" or family == "clip":  # fixed position embeddings: the model's own size
        size = model.config.image_size
        return torch.randn(2, 3, size, size), None
    return torch.randn(2, 3, grid[0] * p, grid[1] * p), None  # DINO families interpolate positions


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("pool", ["mean", "gem", "rmac"])
def test_pools_equal_the_numpy_references(models, family, pool):
    model = models[family]
    pixels, shapes = _inputs(model, family, (4, 6))
    z, grids, parts, _ = token_descriptors(model, pixels, shapes)
    out = pooled_embedding(model, pixels, shapes, pool, gem_p=2.5, rmac_levels=3)
    for b in range(len(pixels)):
        h, w = grids[b].tolist()
        tokens = z[b, parts.num_prefix_tokens : parts.num_prefix_tokens + h * w].numpy()
        x = tokens.T.reshape(-1, h, w)  # row-major patches -> [D, h, w]
        ref = (
            x.mean(axis=(1, 2)) if pool == "mean" else gem_reference(x, 2.5) if pool == "gem" else rmac_reference(x, 3)
        )
        np.testing.assert_allclose(out[b].numpy(), _unit(ref), atol=1e-6)


def test_rmac_reference_regions_on_a_known_grid():
    """The reference itself on a grid small enough to count by hand: 3 x 5, L = 2. Overlaps for 2..7
    regions on the long side: (9 - 3 b) / 9 with b = 2 / (s - 1) -> 0.33, 0.78, ...: s = 2, extra = 1;
    level 1: side 3, 2 regions at columns 0 and 2; level 2: side 2, 3 x 2 regions."""
    x = np.zeros((1, 3, 5))
    x[0, 0, 4] = 1.0  # a single activation, in the top right corner
    # whole map 1; level 1: only the right region (columns 2-4) holds it; level 2: regions of side 2 at
    # rows {0, 1} x columns {0, 1.5 -> 1, 3}: only (0, 3) holds it.
    assert rmac_reference(x, 2)[0] == pytest.approx(1 + 1 + 1, abs=1e-5)
    from extractors.pooling import rmac_regions

    assert rmac_regions(3, 5, 2) == [
        (0, 0, 3),
        (0, 2, 3),
        (0, 0, 2),
        (0, 1, 2),
        (0, 3, 2),
        (1, 0, 2),
        (1, 1, 2),
        (1, 3, 2),
    ]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_pool_model_is_the_models_own_embedding_and_cls_equals_it_where_there_is_a_cls(models, family):
    model = models[family]
    pixels, shapes = _inputs(model, family, (4, 6))
    own = global_embedding(model, pixels, shapes)
    assert torch.equal(pooled_embedding(model, pixels, shapes, "model"), own)
    if FAMILIES[family].cls_token:
        torch.testing.assert_close(pooled_embedding(model, pixels, shapes, "cls"), own, atol=1e-6, rtol=0)
    else:
        with pytest.raises(ValueError, match="no CLS token"):
            pooled_embedding(model, pixels, shapes, "cls")


def test_the_extractor_pools_and_refuses_impossible_settings_before_loading(tiny_model_dirs):
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (90, 120, 3), dtype=np.uint8))
    plain = build_extractor("dinov2_features", model_name=str(tiny_model_dirs["dinov2"]), device="cpu")
    pooled = build_extractor("dinov2_features", model_name=str(tiny_model_dirs["dinov2"]), device="cpu", pool="gem")
    pixels = plain.preprocess.image(image)[None]
    assert torch.equal(pooled.extract(image), pooled_embedding(pooled.model, pixels, None, "gem")[0])
    assert not torch.allclose(pooled.extract(image), plain.extract(image))
    assert "pool" not in plain.identity() and pooled.identity()["pool"] == "gem"
    for kwargs, message in (
        ({"pool": "cls"}, "siglip has no CLS token"),
        ({"pool": "gem", "gem_p": 0.0}, "gem_p=0.0 must be positive"),
        ({"pool": "rmac", "rmac_levels": 0}, "rmac_levels=0 must be >= 1"),
    ):
        with pytest.raises(SoIRError, match=message):
            build_extractor("siglip_features", model_name="/nonexistent", device="cpu", **kwargs)


def test_pool_settings_are_part_of_the_features_identity(tiny_model_dirs, hydra_compose):
    """Two pools never share a features folder: the settings identity differs."""

    from utils.pipeline.create import default_features_dir, settings_identity

    dirs = set()
    for extra in ([], ["pool=gem"], ["pool=gem", "gem_p=4"], ["pool=rmac"], ["pool=rmac", "rmac_levels=2"]):
        cfg = hydra_compose(
            "anns_file=a.pt",
            "extractor=dinov2_features",
            f"model_name={tiny_model_dirs['dinov2']}",
            "vec_dim=32",
            "device=cpu",
            *extra,
        )
        extractor = extractor_from_config(cfg)
        dirs.add(default_features_dir(cfg, settings_identity(cfg, extractor, queries=False)))
    assert len(dirs) == 5


@pytest.mark.parametrize("family", [name for name, spec in FAMILIES.items() if not spec.cls_token])
def test_siglip_tokens_go_through_the_attention_pooling_head_one_at_a_time(models, family):
    """With one token as its only key, the model's own head gives that token's z: the pooled vectors live in
    the space of the global embedding (and the text tower), not in the post-LayerNorm token space."""
    from extractors.pooling import token_head

    model = models[family]
    tokens = torch.randn(2, 5, model.config.hidden_size)
    with torch.no_grad():
        alone = torch.stack([model.head(tokens[:, t : t + 1]) for t in range(5)], dim=1)
        torch.testing.assert_close(token_head(model, tokens), alone, atol=1e-6, rtol=0)
    assert torch.equal(token_head(models["dinov2"], tokens), tokens)  # no such head: unchanged
