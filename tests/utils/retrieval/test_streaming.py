"""utils/retrieval/streaming.py: streamed exact evaluation equals the in-RAM path; checked with sklearn."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from sklearn.metrics import average_precision_score

from datasets import relevance
from tests.utils.retrieval.synthetic_shards import dyadic_rows, unit_rows, write_split
from utils.errors import SoIRError
from utils.retrieval import ranking
from utils.retrieval.feature_store import FeatureShards
from utils.retrieval.index_io import build_index
from utils.retrieval.metrics import per_query_metrics
from utils.retrieval.streaming import (
    Positives,
    QueryRows,
    _blocks,
    _ordered,
    _unordered,
    faiss_search,
    finish,
    merge,
    relevant_pairs,
    score_shards,
    streamed_search,
)

PRECISION_KS, MAP_AT, K = (1, 3, 5), 4, 12


def make_folder(tmp_path, rng, make_rows, num_gallery=37, num_queries=9, shard_size=5, num_instances=4):
    """Gallery images with 1-3 rows and 0-2 instances; queries with 1-2 rows; the last query matches nothing."""
    gallery_ins = [
        sorted(map(int, rng.choice(num_instances, rng.integers(0, 3), replace=False))) for _ in range(num_gallery)
    ]
    query_ins = [[int(rng.integers(0, num_instances))] for _ in range(num_queries - 1)] + [[num_instances]]
    gallery, gallery_features, gallery_owner = write_split(
        tmp_path / "gallery", gallery_ins, shard_size, rng.integers(1, 4, num_gallery), make_rows
    )
    queries, query_features, query_owner = write_split(
        tmp_path / "queries", query_ins, shard_size, rng.integers(1, 3, num_queries), make_rows
    )
    return gallery, queries, (gallery_features, gallery_owner, query_features, query_owner)


def in_ram(gallery: FeatureShards, queries: FeatureShards, rows):
    """Today's path: ranking.image_scores + datasets.relevance + utils.retrieval.metrics.per_query_metrics."""
    gallery_features, gallery_owner, query_features, query_owner = (r.numpy() for r in rows)
    scores = ranking.image_scores(
        query_features, query_owner, range(queries.num_images), gallery_features, gallery_owner, gallery.num_images
    )
    relevant = relevance(ranking.as_annotations(queries.records, True), ranking.as_annotations(gallery.records, False))
    metrics = per_query_metrics(scores, relevant, precision_ks=PRECISION_KS, map_at=MAP_AT)
    top = np.argsort(-scores, axis=1, kind="stable")[:, :K]
    return scores, relevant, metrics, top


def streamed(gallery: FeatureShards, queries: FeatureShards, **kwargs):
    query, image = relevant_pairs([r["ins"][0] for r in queries.records], [r["ins"] for r in gallery.records])
    return streamed_search(
        QueryRows.load(queries), gallery, query, image, K, precision_ks=PRECISION_KS, map_at=MAP_AT, **kwargs
    )


def assert_same_metrics(got: dict, expected: dict) -> None:
    assert got.keys() == expected.keys()
    for key in expected:
        assert got[key].dtype == expected[key].dtype, key
        np.testing.assert_array_equal(got[key], expected[key], err_msg=key)  # NaN (no positive) == NaN


@pytest.mark.parametrize("block_bytes", [1, 3000, None])  # 1: one image per block
@pytest.mark.parametrize("groups", [None, [[6, 0], [3, 1], [7, 5, 2, 4]]])
def test_streamed_equals_in_ram_bit_for_bit_with_ties(tmp_path, block_bytes, groups):
    rng = np.random.default_rng(0)
    gallery, queries, rows = make_folder(tmp_path, rng, dyadic_rows(rng, 6))
    scores, relevant, expected, top = in_ram(gallery, queries, rows)
    # The data exercise what the counting must get right: positives tied with images of other shards,
    # several positives per query, a query without positives.
    tied_across = [
        (q, g)
        for q, g in zip(*np.nonzero(relevant))
        if any(scores[q, h] == scores[q, g] and h // 5 != g // 5 for h in range(gallery.num_images))
    ]
    assert len(tied_across) > 10 and relevant.sum(1).max() >= 5 and relevant.sum(1).min() == 0

    kwargs = {} if block_bytes is None else {"block_bytes": block_bytes}
    result = streamed(gallery, queries, groups=groups, **kwargs)
    assert_same_metrics(result.per_query, expected)
    np.testing.assert_array_equal(result.top_index, top)
    np.testing.assert_array_equal(result.top_score, np.take_along_axis(scores, top, axis=1))


@pytest.mark.parametrize("block_bytes", [60_000, None])
def test_ties_at_the_top_k_cut_keep_the_lower_gallery_index(tmp_path, block_bytes):
    """Blocks wider than k, scores from 3-d dyadic rows (few distinct values): torch.topk's arbitrary
    choice among tied scores at the cut must not leak into the rankings."""
    rng = np.random.default_rng(6)
    gallery, queries, rows = make_folder(tmp_path, rng, dyadic_rows(rng, 3), num_gallery=150, shard_size=60)
    scores, _, expected, top = in_ram(gallery, queries, rows)
    ordered = -np.sort(-scores, axis=1)
    assert (ordered[:, K - 1] == ordered[:, K]).all()  # every query has a tie at the cut
    kwargs = {} if block_bytes is None else {"block_bytes": block_bytes}
    result = streamed(gallery, queries, **kwargs)
    assert_same_metrics(result.per_query, expected)
    np.testing.assert_array_equal(result.top_index, top)


def test_streamed_ap_equals_sklearn(tmp_path):
    rng = np.random.default_rng(1)
    gallery, queries, rows = make_folder(tmp_path, rng, dyadic_rows(rng, 5), num_gallery=60)
    scores, relevant, _, _ = in_ram(gallery, queries, rows)
    result = streamed(gallery, queries, block_bytes=5000)
    has = relevant.any(1)
    expected = [average_precision_score(r, s) for r, s in zip(relevant[has], scores[has])]
    np.testing.assert_allclose(result.per_query["ap"][has], expected, rtol=0, atol=1e-12)
    assert np.isnan(result.per_query["ap"][~has]).all() and (result.per_query["first_positive_rank"][~has] == 0).all()


def test_float_unit_vectors_give_the_same_metrics_and_rankings(tmp_path):
    """Real-valued features: the two paths' matmuls round differently in the last bit; ranks and AP agree."""
    rng = np.random.default_rng(2)
    gallery, queries, rows = make_folder(
        tmp_path, rng, unit_rows(rng, 48), num_gallery=300, num_queries=20, shard_size=32, num_instances=6
    )
    scores, _, expected, top = in_ram(gallery, queries, rows)
    result = streamed(gallery, queries, block_bytes=40_000)
    assert_same_metrics(result.per_query, expected)
    np.testing.assert_array_equal(result.top_index, top)
    np.testing.assert_allclose(result.top_score, np.take_along_axis(scores, top, axis=1), rtol=0, atol=1e-6)


@pytest.fixture(scope="module")
def demo_features(clip_demo_features):
    return clip_demo_features[1]


def test_demo_set_streamed_equals_search_index_path(demo_features):
    folder = demo_features
    shard_size = 5
    gallery = FeatureShards(
        folder / "gallery", json.loads((folder / "gallery" / "images.json").read_text()), shard_size
    )
    queries = FeatureShards(
        folder / "queries", json.loads((folder / "queries" / "images.json").read_text()), shard_size
    )
    assert gallery.num_shards > 2
    gallery_features, gallery_owner, _ = gallery.load()
    query_features, query_owner, _ = queries.load()
    scores, relevant, expected, top = in_ram(
        gallery, queries, (gallery_features, gallery_owner, query_features, query_owner)
    )
    assert relevant.sum(1).min() >= 2  # multi-positive queries
    result = streamed(gallery, queries, block_bytes=2000, groups=[[1], [0, 2], range(3, gallery.num_shards)])
    assert_same_metrics(result.per_query, expected)
    np.testing.assert_array_equal(result.top_index, top)
    np.testing.assert_allclose(result.top_score, np.take_along_axis(scores, top, axis=1), rtol=0, atol=1e-6)


def test_relevant_pairs_follow_datasets_relevance():
    query_ins, gallery_ins = [2, 0, 2, 5], [[0, 2], [], [2, 2], [1], [0]]
    query, image = relevant_pairs(query_ins, gallery_ins)
    dense = np.zeros((4, 5), dtype=bool)
    dense[query, image] = True
    assert len(query) == dense.sum()  # no duplicate pair
    assert dense.tolist() == [
        [True, False, True, False, False],
        [True, False, False, False, True],
        [True, False, True, False, False],
        [False] * 5,
    ]


def test_blocks_hold_whole_images_within_the_row_budget():
    owner = torch.tensor([10, 11, 11, 11, 12, 12, 13, 13, 13, 13, 13, 15])  # image 14 owns no row
    blocks = [(images.tolist(), r0, r1, lengths.tolist()) for images, r0, r1, lengths in _blocks(owner, 4)]
    # image 13 alone exceeds the budget: it gets a block of its own
    assert blocks == [([10, 11], 0, 4, [1, 3]), ([12], 4, 6, [2]), ([13], 6, 11, [5]), ([15], 11, 12, [1])]


def test_images_without_rows_are_left_out_like_search_index_does(tmp_path):
    """Unreadable images (bad_images=skip) own no rows: they are not in the evaluated gallery, the
    other images keep their order (ties: lower index first)."""
    rng = np.random.default_rng(9)
    num_gallery = 40
    rows_per_image = rng.integers(1, 4, num_gallery)
    rows_per_image[[0, 7, 8, 23, 39]] = 0
    gallery_ins = [sorted(map(int, rng.choice(4, rng.integers(0, 3), replace=False))) for _ in range(num_gallery)]
    gallery, gallery_features, gallery_owner = write_split(
        tmp_path / "gallery", gallery_ins, 8, rows_per_image, dyadic_rows(rng, 5)
    )
    queries, query_features, query_owner = write_split(
        tmp_path / "queries", [[i % 4] for i in range(6)], 8, np.ones(6, dtype=int), dyadic_rows(rng, 5)
    )
    kept = np.flatnonzero(rows_per_image > 0)
    renumber = np.cumsum(rows_per_image > 0) - 1
    scores = ranking.image_scores(
        query_features.numpy(),
        query_owner.numpy(),
        range(6),
        gallery_features.numpy(),
        renumber[gallery_owner.numpy()],
        len(kept),
    )
    relevant = relevance(
        ranking.as_annotations(queries.records, True),
        ranking.as_annotations([gallery.records[g] for g in kept], False),
    )
    expected = per_query_metrics(scores, relevant, precision_ks=PRECISION_KS, map_at=MAP_AT)
    top = kept[np.argsort(-scores, axis=1, kind="stable")[:, :K]]

    query, image = relevant_pairs([r["ins"][0] for r in queries.records], [r["ins"] for r in gallery.records])
    has_rows = rows_per_image[image] > 0
    with pytest.raises(ValueError, match=r"gallery images \[.*\] own no rows"):
        streamed_search(QueryRows.load(queries), gallery, query, image, K)
    result = streamed_search(
        QueryRows.load(queries),
        gallery,
        query[has_rows],
        image[has_rows],
        K,
        precision_ks=PRECISION_KS,
        map_at=MAP_AT,
        block_bytes=300,
    )
    assert_same_metrics(result.per_query, expected)
    np.testing.assert_array_equal(result.top_index, top)


def test_ordered_keys_keep_float_order_and_round_trip():
    values = torch.tensor([-np.inf, -2.5, -1e-40, -0.0, 0.0, 1e-45, 0.75, 3e38, np.inf], dtype=torch.float32)
    keys = _ordered(values)
    assert keys.tolist() == sorted(keys.tolist()) and keys[3] == keys[4]  # -0.0 ties with 0.0, as in numpy
    assert len(set(keys.tolist())) == len(values) - 1
    assert torch.equal(_unordered(keys), values.abs().where(values == 0, values))


def test_partials_must_cover_every_shard_once(tmp_path):
    rng = np.random.default_rng(3)
    gallery, queries_shards, _ = make_folder(tmp_path, rng, dyadic_rows(rng, 4), num_gallery=12)
    queries = QueryRows.load(queries_shards)
    query, image = relevant_pairs([r["ins"][0] for r in queries_shards.records], [r["ins"] for r in gallery.records])
    positives = Positives.score_pairs(queries, gallery, query, image)
    a = score_shards(queries, gallery, [0, 1], positives, K)
    b = score_shards(queries, gallery, [1, 2], positives, K)
    with pytest.raises(ValueError, match="shard was scored twice"):
        merge([a, b], K)
    with pytest.raises(ValueError, match="1 gallery shards were not scored"):
        finish(merge([a], K), positives, gallery)


def test_missing_shard_and_nan_features_are_clear_errors(tmp_path):
    rng = np.random.default_rng(4)
    gallery, queries, _ = make_folder(tmp_path, rng, dyadic_rows(rng, 4), num_gallery=12)
    bad = gallery.shard_path(1).read_bytes()
    gallery.shard_path(1).unlink()
    with pytest.raises(SoIRError, match="shard-00001.safetensors is missing"):
        streamed(gallery, queries)
    gallery.shard_path(1).write_bytes(bad)
    tensors = load_file(gallery.shard_path(2))
    tensors["features"][0, 0] = float("nan")  # FeatureShards.write refuses this; a damaged file
    save_file(tensors, gallery.shard_path(2))
    with pytest.raises(ValueError, match="NaN"):
        streamed(gallery, queries)


def test_reduced_precision_matmul_is_refused(tmp_path):
    rng = np.random.default_rng(5)
    gallery, queries, _ = make_folder(tmp_path, rng, dyadic_rows(rng, 4), num_gallery=8)
    torch.set_float32_matmul_precision("high")
    try:
        with pytest.raises(ValueError, match="reduced precision"):
            streamed(gallery, queries)
    finally:
        torch.set_float32_matmul_precision("highest")


# ----------------------------------------------------------------------------------------------------
# Candidates mode (search=faiss)
# ----------------------------------------------------------------------------------------------------
def fast(index, gallery, queries, k, k_rows):
    query, image = relevant_pairs([r["ins"][0] for r in queries.records], [r["ins"] for r in gallery.records])
    return faiss_search(
        index,
        QueryRows.load(queries),
        gallery,
        query,
        image,
        k,
        k_rows=k_rows,
        precision_ks=PRECISION_KS,
        map_at=MAP_AT,
        block_bytes=3000,
    )


def test_candidates_covering_the_gallery_give_the_exact_numbers(tmp_path):
    rng = np.random.default_rng(7)
    gallery, queries, rows = make_folder(tmp_path, rng, unit_rows(rng, 32), num_gallery=80, shard_size=16)
    scores, relevant, expected, top = in_ram(gallery, queries, rows)
    index = build_index(rows[0].numpy(), "Flat")
    result = fast(index, gallery, queries, K, k_rows=index.ntotal)
    assert_same_metrics(result.per_query, expected)
    np.testing.assert_array_equal(result.top_index, top)
    np.testing.assert_allclose(result.top_score, np.take_along_axis(scores, top, axis=1), rtol=0, atol=1e-6)
    has = relevant.any(1)
    assert (result.coverage[has] == 1).all() and np.isnan(result.coverage[~has]).all()


@pytest.mark.parametrize("factory", ["Flat", "IVF8,Flat"])
def test_candidates_ap_counts_missed_positives_as_not_retrieved(tmp_path, factory):
    rng = np.random.default_rng(8)
    gallery, queries, rows = make_folder(
        tmp_path, rng, unit_rows(rng, 32), num_gallery=200, shard_size=16, num_instances=3
    )
    gallery_features, gallery_owner, query_features, query_owner = (r.numpy() for r in rows)
    scores, relevant, exact, _ = in_ram(gallery, queries, rows)
    index = build_index(gallery_features, factory)
    k, k_rows = 4, 12
    result = fast(index, gallery, queries, k, k_rows)

    # Independently: the images of FAISS's rows, scored exactly in RAM, ranked; sklearn AP on them.
    _, found_rows = index.search(query_features, k_rows)
    for q in range(queries.num_images):
        candidates = np.unique(gallery_owner[found_rows[query_owner == q].ravel()])
        order = candidates[np.lexsort((candidates, -scores[q, candidates]))]
        assert result.top_index[q].tolist() == order[:k].tolist()
        positives = relevant[q].sum()
        hits = relevant[q, candidates]
        assert (
            result.coverage[q] == pytest.approx(hits.sum() / positives) if positives else np.isnan(result.coverage[q])
        )
        if not positives:
            continue
        ap = average_precision_score(hits, scores[q, candidates]) * hits.sum() / positives if hits.any() else 0.0
        assert result.per_query["ap"][q] == pytest.approx(ap, abs=1e-12)
        first = np.flatnonzero(relevant[q, order])
        assert result.per_query["first_positive_rank"][q] == (first[0] + 1 if len(first) else gallery.num_images + 1)
        if factory == "Flat":  # exact candidates are the top of the exact ranking: AP is a lower bound
            assert result.per_query["ap"][q] <= exact["ap"][q] + 1e-12
    assert result.ap_is_lower_bound
    assert (result.coverage[relevant.any(1)] < 1).any()  # the test misses some positives
