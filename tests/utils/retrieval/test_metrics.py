"""Retrieval metrics against sklearn, an independent stable-sort reference, and hand-computed values."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import average_precision_score

from utils.retrieval import metrics
from utils.retrieval.metrics import (
    average_precision,
    first_positive_rank,
    max_per_image,
    per_query_metrics,
    retrieval_metrics,
    summarize,
)


def _random_problem(seed: int, num_queries: int, gallery: int, positive_rate: float, decimals: int | None):
    """Random scores (optionally rounded to create heavy ties) and relevance with >= 1 positive per query."""
    rng = np.random.default_rng(seed)
    scores = rng.random((num_queries, gallery))
    if decimals is not None:
        scores = np.round(scores, decimals)
    relevant = rng.random((num_queries, gallery)) < positive_rate
    relevant[np.arange(num_queries), rng.integers(0, gallery, num_queries)] = True
    return scores, relevant


def _reference_ranks(scores: np.ndarray, relevant: np.ndarray) -> list[np.ndarray]:
    """1-based ranks of the positives per query: descending score, ties by gallery index (stable sort)."""
    ranks = []
    for s, rel in zip(scores, relevant):
        order = np.argsort(-s, kind="stable")
        ranks.append(np.flatnonzero(rel[order]) + 1)
    return ranks


def _reference_ap_at(ranks: np.ndarray, k: int) -> float:
    top = ranks[ranks <= k]
    return sum((i + 1) / r for i, r in enumerate(top)) / min(len(ranks), k)


@pytest.mark.parametrize(
    ("gallery", "positive_rate", "decimals"),
    [
        (60, 0.08, 1),  # few positives, heavy ties: counting path with the gallery-index tie-break pass
        (60, 0.08, None),  # few positives, no ties: counting path only
        (120, 0.5, 1),  # > MAX_POSITIVES_FOR_COUNTING positives: sort path
        (40, 0.9, 2),  # almost all positives
    ],
)
def test_ap_matches_sklearn_including_ties(gallery, positive_rate, decimals):
    scores, relevant = _random_problem(0, 50, gallery, positive_rate, decimals)
    expected = [average_precision_score(rel, s) for s, rel in zip(scores, relevant)]
    np.testing.assert_allclose(average_precision(scores, relevant, chunk_queries=7), expected, rtol=1e-12)
    per_query = per_query_metrics(scores, relevant, chunk_queries=7)
    np.testing.assert_allclose(per_query["ap"], expected, rtol=1e-12)


def test_float32_scores_with_ties_match_sklearn():
    scores, relevant = _random_problem(1, 30, 80, 0.05, 1)
    scores = scores.astype(np.float32)
    expected = [average_precision_score(rel, s) for s, rel in zip(scores, relevant)]
    np.testing.assert_allclose(average_precision(scores, relevant), expected, rtol=1e-6)


@pytest.mark.parametrize(("gallery", "positive_rate", "decimals"), [(60, 0.08, 1), (60, 0.08, None), (120, 0.5, 1)])
def test_rank_metrics_match_stable_sort_reference(gallery, positive_rate, decimals):
    scores, relevant = _random_problem(2, 40, gallery, positive_rate, decimals)
    ranks = _reference_ranks(scores, relevant)
    per_query = per_query_metrics(scores, relevant, precision_ks=(1, 5, 200), map_at=(3, 10), chunk_queries=9)
    np.testing.assert_array_equal(per_query["first_positive_rank"], [r[0] for r in ranks])
    np.testing.assert_array_equal(per_query["num_positives"], relevant.sum(axis=1))
    for k in (1, 5, 200):
        np.testing.assert_allclose(per_query[f"precision@{k}"], [np.sum(r <= k) / k for r in ranks])
    for k in (3, 10):
        np.testing.assert_allclose(per_query[f"ap@{k}"], [_reference_ap_at(r, k) for r in ranks])
    np.testing.assert_array_equal(first_positive_rank(scores, relevant), [r[0] for r in ranks])


def test_counting_and_sorting_paths_agree(monkeypatch):
    scores, relevant = _random_problem(3, 25, 50, 0.1, 1)
    counted = per_query_metrics(scores, relevant, precision_ks=(5,), map_at=5)
    monkeypatch.setattr(metrics, "MAX_POSITIVES_FOR_COUNTING", 0)  # every query goes through the sort
    sorted_ = per_query_metrics(scores, relevant, precision_ks=(5,), map_at=5)
    for key in counted:
        np.testing.assert_allclose(counted[key], sorted_[key], rtol=1e-12, err_msg=key)


def test_hand_computed_average_precision():
    # Positives at ranks 1 and 3 of 5.
    scores = np.array([[0.9, 0.8, 0.7, 0.6, 0.5]])
    relevant = np.array([[True, False, True, False, False]])
    np.testing.assert_allclose(average_precision(scores, relevant), [(1 + 2 / 3) / 2])
    # A positive ranked last still counts: normalisation by all positives of the query.
    relevant_last = np.array([[True, False, False, False, True]])
    np.testing.assert_allclose(average_precision(scores, relevant_last), [(1 + 2 / 5) / 2])
    # Ties form one threshold: {0.5, 0.5} holds one positive -> P = 1/3 at recall 1/2, then P = 2/4 at recall 1.
    tied = np.array([[0.9, 0.5, 0.5, 0.1]])
    tied_relevant = np.array([[False, True, False, True]])
    np.testing.assert_allclose(average_precision(tied, tied_relevant), [0.5 * (1 / 3) + 0.5 * (2 / 4)])
    # The positive comes first among the tied pair (lower gallery index) -> rank 2; swapped -> rank 3.
    np.testing.assert_array_equal(first_positive_rank(tied, tied_relevant), [2])
    np.testing.assert_array_equal(first_positive_rank(tied, np.array([[False, False, True, True]])), [3])


def test_recall_precision_and_map_at_k_by_hand():
    scores = np.array(
        [
            [0.9, 0.8, 0.7, 0.6, 0.5, 0.4],  # positives at ranks 2, 5
            [0.1, 0.2, 0.3, 0.4, 0.5, 0.6],  # positives at ranks 1, 2, 3
            [0.6, 0.5, 0.4, 0.3, 0.2, 0.1],  # positive at rank 6
        ]
    )
    relevant = np.array(
        [
            [False, True, False, False, True, False],
            [False, False, False, True, True, True],
            [False, False, False, False, False, True],
        ]
    )
    result = retrieval_metrics(scores, relevant, recall_ks=(1, 2, 5), precision_ks=(2, 5), map_at=2)
    assert result["num_queries"] == 3
    assert result["recall"] == {"1": pytest.approx(1 / 3), "2": pytest.approx(2 / 3), "5": pytest.approx(2 / 3)}
    assert result["precision"]["2"] == pytest.approx((1 / 2 + 2 / 2 + 0) / 3)
    assert result["precision"]["5"] == pytest.approx((2 / 5 + 3 / 5 + 0) / 3)
    # AP@2: q0 = (1/2) / min(2, 2); q1 = (1 + 1) / 2; q2 = 0.
    assert result["mAP@2"] == pytest.approx((0.25 + 1.0 + 0.0) / 3)
    expected_ap = [(1 / 2 + 2 / 5) / 2, 1.0, 1 / 6]
    assert result["mAP"] == pytest.approx(np.mean(expected_ap))
    per_query = per_query_metrics(scores, relevant)
    np.testing.assert_array_equal(per_query["first_positive_rank"], [2, 1, 6])
    np.testing.assert_allclose(per_query["ap"], expected_ap)


def test_infinite_scores_are_ranked():
    scores = np.array([[np.inf, 1.0, -np.inf, np.inf, 0.0], [-np.inf, -np.inf, 2.0, -np.inf, 1.0]])
    relevant = np.array([[False, True, False, True, False], [True, False, False, True, False]])
    expected = [average_precision_score(rel, s) for s, rel in zip(np.nan_to_num(scores), relevant)]
    np.testing.assert_allclose(average_precision(scores, relevant), expected)
    # Query 0: +inf tie between index 0 (negative) and 3 (positive) -> positive at rank 2.
    # Query 1: -inf ties at indices 0, 1, 3 ranked 3, 4, 5 -> first positive at rank 3.
    np.testing.assert_array_equal(first_positive_rank(scores, relevant), [2, 3])


def test_chunks_concatenate_to_the_full_result():
    scores, relevant = _random_problem(4, 30, 70, 0.05, 1)
    kwargs = dict(precision_ks=(5,), map_at=10)
    parts = [per_query_metrics(scores[rows], relevant[rows], **kwargs) for rows in (slice(0, 11), slice(11, 30))]
    joined = {key: np.concatenate([part[key] for part in parts]) for key in parts[0]}
    assert summarize(joined) == retrieval_metrics(scores, relevant, **kwargs)


def test_queries_without_positives_are_refused():
    scores, relevant = _random_problem(5, 6, 20, 0.1, None)
    relevant[[2, 4]] = False
    with pytest.raises(ValueError, match=r"2 of 6 queries have no relevant gallery item \(query indices \[2, 4\]"):
        retrieval_metrics(scores, relevant)
    per_query = per_query_metrics(scores, relevant, map_at=5)
    for key in ("ap", "ap@5"):
        assert np.isnan(per_query[key][[2, 4]]).all() and np.isfinite(np.delete(per_query[key], [2, 4])).all()
    np.testing.assert_array_equal(per_query["first_positive_rank"][[2, 4]], [0, 0])
    with pytest.raises(ValueError, match="no relevant gallery item"):
        summarize(per_query)


def test_bad_inputs_are_refused():
    scores = np.zeros((2, 3))
    with pytest.raises(TypeError, match="boolean"):
        average_precision(scores, np.ones((2, 3), dtype=int))
    with pytest.raises(ValueError, match=r"relevant has shape \(2, 4\)"):
        average_precision(scores, np.ones((2, 4), dtype=bool))
    with pytest.raises(ValueError, match="NaN"):
        average_precision(np.array([[0.1, np.nan, 0.3]]), np.array([[True, False, False]]))
    with pytest.raises(ValueError, match="recall_ks"):
        retrieval_metrics(scores, np.ones((2, 3), dtype=bool), recall_ks=(0,))


def test_max_per_image():
    scores = np.array([[0.1, 0.7, 0.3, 0.9, 0.2], [0.5, 0.4, 0.8, 0.0, 0.6]], dtype=np.float32)
    owner = np.array([2, 0, 2, 1, 0])  # unsorted: image 0 owns columns 1, 4; image 1 owns 3; image 2 owns 0, 2
    out = max_per_image(scores, owner, num_images=3)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, np.array([[0.7, 0.9, 0.3], [0.6, 0.0, 0.8]], dtype=np.float32))
    owner_sorted = np.array([0, 0, 1, 2, 2])
    np.testing.assert_array_equal(
        max_per_image(scores, owner_sorted, 3), np.array([[0.7, 0.3, 0.9], [0.5, 0.8, 0.6]], dtype=np.float32)
    )
    with pytest.raises(ValueError, match=r"1 of 4 images own no vector \(ids \[3\]"):
        max_per_image(scores, owner, num_images=4)
    with pytest.raises(ValueError, match=r"owner ids must lie in \[0, 2\)"):
        max_per_image(scores, owner, num_images=2)


def test_no_positive_zero_counts_such_queries_as_ap_0_and_misses():
    """The original's rule (compat=original): a query without a positive is an AP-0 miss."""
    rng = np.random.default_rng(7)
    scores = rng.normal(size=(5, 40))
    relevant = rng.random((5, 40)) < 0.1
    relevant[2] = False
    relevant[[0, 1, 3, 4], 0] = True
    per_query = per_query_metrics(scores, relevant, precision_ks=(5,), map_at=5)
    with pytest.raises(ValueError, match="no relevant gallery item"):
        summarize(per_query, recall_ks=(1, 5))
    out = summarize(per_query, recall_ks=(1, 5), no_positive="zero")
    expected_ap = [average_precision_score(r, s) if r.any() else 0.0 for r, s in zip(relevant, scores)]
    assert out["mAP"] == pytest.approx(np.mean(expected_ap)) and out["queries_without_positives"] == 1
    hits = [bool(r[np.argsort(-s, kind="stable")[:5]].any()) for r, s in zip(relevant, scores)]
    assert out["recall"]["5"] == pytest.approx(np.mean(hits))
