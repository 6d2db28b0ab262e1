"""Retrieval metrics over a fully ranked gallery: AP / mAP, Recall@K, P@k, mAP@k, first-positive rank.

Inputs are dense score matrices ``scores[Q, G]`` (higher = more similar) and boolean ground truth
``relevant[Q, G]``; every query ranks the WHOLE gallery. Outputs are numpy arrays accumulated in float64.

Conventions (they decide results, so they are spelled out):

* **AP** is exact and tie-aware exactly like ``sklearn.metrics.average_precision_score``: tied scores form one
  threshold and ``AP = sum_n (R_n - R_{n-1}) * P_n`` over distinct thresholds. It is normalised by ALL
  positives of the query, so a positive ranked last still counts. A query without positives gets AP = NaN.
* **Ranks** (first-positive rank, Recall@K, P@k, AP@k) use a stable tie-break: among equal scores the lower
  gallery index ranks first. Ranks are 1-based; a query without positives gets first-positive rank 0.
* **Recall@K** is the hit rate: the share of queries with at least one positive in the top K.
  **P@k** = (#positives in the top k) / k.
  **AP@k** = sum_{i <= k} P(i) * rel(i) / min(num_positives, k)  (the common "AP@k"; mAP@k is its mean).
* Summaries refuse queries without positives (ValueError): they would silently count as misses.
* Scores may hold +-inf; NaN is refused. Integer scores are compared as float64.

Large problems (e.g. 10k queries x 100k gallery) are processed in chunks of queries. Callers that produce
scores chunk by chunk can call :func:`per_query_metrics` per chunk, concatenate the arrays and call
:func:`summarize`.

How AP is computed without sorting the gallery: only thresholds at positive scores change recall, so with
``n_ge(t) = #{gallery scores >= t}`` and ``p_ge(t) = #{positive scores >= t}``,
``AP = mean over positives i of p_ge(s_i) / n_ge(s_i)``. For few positives per query the counts come from a
handful of vectorised comparisons over the gallery (much cheaper than sorting it); a positive whose score
is shared by another item costs one more pass to apply the gallery-index tie-break to its rank. Queries
with more than MAX_POSITIVES_FOR_COUNTING positives use a stable sort of their gallery row instead.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import numpy as np
import torch

# Scores per chunk of queries (float32: 64 MiB); bounds the memory of the sort fallback (~14 bytes/score).
CHUNK_ELEMENTS = 1 << 24
# Counting costs two gallery passes per positive; a stable sort costs roughly 100 passes.
MAX_POSITIVES_FOR_COUNTING = 32
# Padding for "no such positive" in the padded [R, P] rank arrays; larger than any k a caller may ask for.
_NO_RANK = np.iinfo(np.int64).max

REQUIRED_PER_QUERY_KEYS = ("ap", "first_positive_rank", "num_positives")


# ----------------------------------------------------------------------------------------------------------
# Input checks and chunking
# ----------------------------------------------------------------------------------------------------------
def _check_inputs(scores: np.ndarray, relevant: np.ndarray) -> None:
    if not isinstance(scores, np.ndarray) or not isinstance(relevant, np.ndarray):
        raise TypeError(
            f"scores and relevant must be numpy arrays, got {type(scores).__name__} and {type(relevant).__name__}"
        )
    if scores.ndim != 2:
        raise ValueError(f"scores must have shape [num_queries, gallery_size], got shape {scores.shape}")
    if relevant.shape != scores.shape:
        raise ValueError(f"relevant has shape {relevant.shape} but scores has shape {scores.shape}")
    if relevant.dtype != np.bool_:
        raise TypeError(f"relevant must be a boolean array, got dtype {relevant.dtype}")
    if not (np.issubdtype(scores.dtype, np.floating) or np.issubdtype(scores.dtype, np.integer)):
        raise TypeError(f"scores must be a real-valued array, got dtype {scores.dtype}")
    if scores.shape[1] == 0:
        raise ValueError("the gallery is empty (scores has 0 columns)")


def query_chunks(
    num_queries: int, row_length: int, chunk_queries: int | None = None, max_elements: int = CHUNK_ELEMENTS
) -> Iterator[slice]:
    """Consecutive slices of query indices: ``chunk_queries`` queries each, or (None) as many as keep
    a [chunk, row_length] score block within ``max_elements`` entries (at least one query)."""
    if chunk_queries is None:
        chunk_queries = max(1, max_elements // max(1, row_length))
    if chunk_queries < 1:
        raise ValueError(f"chunk_queries must be >= 1, got {chunk_queries}")
    for start in range(0, num_queries, chunk_queries):
        yield slice(start, min(start + chunk_queries, num_queries))


def _prepare_chunk(scores: np.ndarray, relevant: np.ndarray, rows: slice) -> tuple[np.ndarray, np.ndarray]:
    """Contiguous score rows in a dtype that compares exactly (float16 -> float32, integers -> float64)."""
    s = scores[rows]
    if s.dtype == np.float16:
        s = s.astype(np.float32)  # exact; half-precision arithmetic on CPU is slow
    elif not np.issubdtype(s.dtype, np.floating):
        s = s.astype(np.float64)
    s = np.ascontiguousarray(s)
    if np.isnan(s.min()):  # min propagates NaN: one cheap reduction instead of a full isnan mask
        bad = rows.start + int(np.flatnonzero(np.isnan(s).any(axis=1))[0])
        raise ValueError(f"scores contain NaN (first at query {bad}); rankings would be undefined")
    return s, np.ascontiguousarray(relevant[rows])


# ----------------------------------------------------------------------------------------------------------
# Per-chunk statistics
# ----------------------------------------------------------------------------------------------------------
def _pad_rows(row_ids: np.ndarray, values: np.ndarray, num_rows: int, fill, dtype) -> np.ndarray:
    """Scatter row-major (row_id, value) pairs into a padded [num_rows, max_count] array."""
    counts = np.bincount(row_ids, minlength=num_rows)
    width = max(int(counts.max(initial=0)), 1)
    out = np.full((num_rows, width), fill, dtype=dtype)
    starts = np.cumsum(counts) - counts
    out[row_ids, np.arange(len(row_ids)) - starts[row_ids]] = values
    return out


def _nonzero_2d(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """np.nonzero of a C-contiguous 2-D mask; the flat variant is ~10x faster than 2-D np.nonzero."""
    return np.divmod(np.flatnonzero(mask), mask.shape[1])


def _positive_thresholds(s: np.ndarray, rel: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Positive scores per query in ascending order, with their gallery indices.

    Returns thr [R, P] (P = max positives in the chunk, padded with +inf; the sort is stable so padding stays
    after real +inf scores), idx [R, P] gallery index of each threshold's positive (padding: G), and
    num_positives [R].
    """
    num_rows, gallery_size = s.shape
    rows, cols = _nonzero_2d(rel)
    num_positives = np.bincount(rows, minlength=num_rows)
    thr = _pad_rows(rows, s[rows, cols], num_rows, np.inf, s.dtype)
    idx = _pad_rows(rows, cols, num_rows, gallery_size, np.int64)
    order = np.argsort(thr, axis=1, kind="stable")
    return np.take_along_axis(thr, order, axis=1), np.take_along_axis(idx, order, axis=1), num_positives


def _valid(thr: np.ndarray, num_positives: np.ndarray) -> np.ndarray:
    """[R, P] mask of real (non-padding) thresholds."""
    return np.arange(thr.shape[1])[None, :] < num_positives[:, None]


def _ap_from_counts(thr: np.ndarray, num_positives: np.ndarray, num_at_least: np.ndarray) -> np.ndarray:
    """sklearn-style AP from ascending positive thresholds thr [R, P] and n_ge [R, P] = #gallery scores >= thr.

    Each positive contributes the precision at its own threshold, p_ge / n_ge, where p_ge counts the positives
    scoring >= it (its whole tie group included): this is sum_n (R_n - R_{n-1}) P_n over distinct thresholds.
    """
    index = np.broadcast_to(np.arange(thr.shape[1]), thr.shape)
    new_group = np.ones(thr.shape, dtype=bool)
    new_group[:, 1:] = thr[:, 1:] != thr[:, :-1]
    group_start = np.maximum.accumulate(np.where(new_group, index, 0), axis=1)
    positives_at_least = num_positives[:, None] - group_start  # positives at index >= group start in thr
    valid = _valid(thr, num_positives)
    precision = np.divide(positives_at_least, num_at_least, out=np.zeros(thr.shape), where=valid)
    ap = np.full(len(num_positives), np.nan)
    has_positive = num_positives > 0
    ap[has_positive] = precision[has_positive].sum(axis=1) / num_positives[has_positive]
    return ap


def _count_tied_before(s: np.ndarray, thr: np.ndarray, idx: np.ndarray, tied: np.ndarray) -> np.ndarray:
    """[R, P] number of gallery items scoring exactly thr[r, j] with a gallery index below idx[r, j].

    Only evaluated where tied[r, j] (another item shares the score); elsewhere the count is 0.
    """
    out = np.zeros(thr.shape, dtype=np.int64)
    rows = np.flatnonzero(tied.any(axis=1))
    if len(rows) == 0:
        return out
    s_tied = s[rows]
    gallery_index = np.arange(s.shape[1])[None, :]
    for j in np.flatnonzero(tied[rows].any(axis=0)):
        equal_before = (s_tied == thr[rows, j : j + 1]) & (gallery_index < idx[rows, j : j + 1])
        out[rows, j] = np.where(tied[rows, j], equal_before.sum(axis=1), 0)
    return out


def _counting_stats(s: np.ndarray, thr: np.ndarray, idx: np.ndarray, num_positives: np.ndarray, need_ranks: bool):
    """AP [R] and stable ranks [R, P] (ascending, padded with _NO_RANK; None unless need_ranks) by comparing
    the gallery with each positive score: two passes over the gallery per positive, O(G * P) per query."""
    num_at_least = np.zeros(thr.shape, dtype=np.int64)
    num_above = np.zeros(thr.shape, dtype=np.int64)
    mask = np.empty(s.shape, dtype=bool)  # reused buffer for the comparisons
    # Row sums of the mask viewed as uint8 into int32 are ~2x faster than np.count_nonzero(axis=1).
    count_dtype = np.int32 if s.shape[1] < 2**31 else np.int64
    for j in range(thr.shape[1]):
        column = thr[:, j : j + 1]
        np.greater_equal(s, column, out=mask)
        num_at_least[:, j] = mask.view(np.uint8).sum(axis=1, dtype=count_dtype)
        if need_ranks:
            np.greater(s, column, out=mask)
            num_above[:, j] = mask.view(np.uint8).sum(axis=1, dtype=count_dtype)
    ap = _ap_from_counts(thr, num_positives, num_at_least)
    if not need_ranks:
        return ap, None

    # Stable rank: every higher score comes first, then the equal scores with a lower gallery index. The
    # latter needs an extra pass, only for positives whose score is shared by another item (rare for floats).
    valid = _valid(thr, num_positives)
    tied = valid & (num_at_least - num_above > 1)
    ranks = num_above + _count_tied_before(s, thr, idx, tied) + 1
    return ap, np.sort(np.where(valid, ranks, _NO_RANK), axis=1)


def _sorting_stats(s: np.ndarray, rel: np.ndarray, thr: np.ndarray, num_positives: np.ndarray, need_ranks: bool):
    """Same outputs as _counting_stats from a full stable sort of each gallery row: O(G log G) per query,
    cheaper than counting for queries with many positives."""
    # Ascending stable sort of -score == descending score with ties in gallery order.
    sorted_key, order = torch.sort(torch.from_numpy(np.negative(s)), dim=1, stable=True)
    num_at_least = torch.searchsorted(sorted_key, torch.from_numpy(np.negative(thr)), right=True).numpy()
    ap = _ap_from_counts(thr, num_positives, num_at_least)
    if not need_ranks:
        return ap, None
    rows, positions = _nonzero_2d(np.take_along_axis(rel, order.numpy(), axis=1))
    return ap, _pad_rows(rows, positions + 1, s.shape[0], _NO_RANK, np.int64)


def _chunk_stats(s: np.ndarray, rel: np.ndarray, need_ranks: bool):
    """AP [R], stable positive ranks [R, P] ascending (None unless need_ranks) and num_positives [R]."""
    thr, idx, num_positives = _positive_thresholds(s, rel)
    ap = np.empty(s.shape[0])
    ranks = np.full(thr.shape, _NO_RANK, dtype=np.int64) if need_ranks else None
    counting = num_positives <= MAX_POSITIVES_FOR_COUNTING
    for rows, use_counting in ((counting, True), (~counting, False)):
        if not rows.any():
            continue
        if rows.all():
            rows = slice(None)  # a view: avoids copying the chunk in the common case
        width = max(int(num_positives[rows].max()), 1)  # thresholds beyond it are padding for these rows
        sub_thr, sub_positives = thr[rows, :width], num_positives[rows]
        if use_counting:
            sub_ap, sub_ranks = _counting_stats(s[rows], sub_thr, idx[rows, :width], sub_positives, need_ranks)
        else:
            sub_ap, sub_ranks = _sorting_stats(s[rows], rel[rows], sub_thr, sub_positives, need_ranks)
        ap[rows] = sub_ap
        if need_ranks:
            ranks[rows, :width] = sub_ranks
    return ap, ranks, num_positives


# ----------------------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------------------
def _as_ks(ks: int | Sequence[int] | None, name: str) -> tuple[int, ...]:
    if ks is None:
        return ()
    ks = (ks,) if isinstance(ks, (int, np.integer)) else tuple(ks)
    for k in ks:
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"{name} must contain positive integers, got {ks!r}")
    return tuple(int(k) for k in ks)


def average_precision(scores: np.ndarray, relevant: np.ndarray, *, chunk_queries: int | None = None) -> np.ndarray:
    """Exact, sklearn-tie-aware AP of every query over the whole gallery.

    scores: [Q, G] similarities (higher = better); relevant: [Q, G] bool.
    Returns [Q] float64; NaN for queries without positives. chunk_queries: rows per internal chunk
    (default: ~16M scores per chunk).
    """
    _check_inputs(scores, relevant)
    ap = np.empty(scores.shape[0])
    for rows in query_chunks(scores.shape[0], scores.shape[1], chunk_queries):
        s, rel = _prepare_chunk(scores, relevant, rows)
        ap[rows] = _chunk_stats(s, rel, need_ranks=False)[0]
    return ap


def per_query_metrics(
    scores: np.ndarray,
    relevant: np.ndarray,
    *,
    precision_ks: int | Sequence[int] = (),
    map_at: int | Sequence[int] | None = None,
    chunk_queries: int | None = None,
) -> dict[str, np.ndarray]:
    """Per-query arrays that :func:`summarize` turns into dataset numbers; concatenable across query chunks.

    scores: [Q, G]; relevant: [Q, G] bool. Returns
      "ap" [Q] float64 (NaN without positives), "first_positive_rank" [Q] int64 (1-based, stable tie-break,
      0 without positives), "num_positives" [Q] int64, and for each requested k
      "precision@{k}" [Q] float64 and "ap@{k}" [Q] float64 (NaN without positives).
    """
    _check_inputs(scores, relevant)
    precision_ks = _as_ks(precision_ks, "precision_ks")
    map_ks = _as_ks(map_at, "map_at")
    num_queries = scores.shape[0]
    out = {
        "ap": np.empty(num_queries),
        "first_positive_rank": np.empty(num_queries, dtype=np.int64),
        "num_positives": np.empty(num_queries, dtype=np.int64),
    }
    out.update({f"precision@{k}": np.empty(num_queries) for k in precision_ks})
    out.update({f"ap@{k}": np.empty(num_queries) for k in map_ks})

    for rows in query_chunks(num_queries, scores.shape[1], chunk_queries):
        s, rel = _prepare_chunk(scores, relevant, rows)
        ap, ranks, num_positives = _chunk_stats(s, rel, need_ranks=True)
        out["ap"][rows] = ap
        out["num_positives"][rows] = num_positives
        out["first_positive_rank"][rows] = np.where(num_positives > 0, ranks[:, 0], 0)
        for k in precision_ks:
            out[f"precision@{k}"][rows] = (ranks <= k).sum(axis=1) / k
        # ranks are ascending, so the j-th (0-based) positive sits at rank ranks[:, j] with precision (j+1)/rank.
        hits_so_far = np.arange(1, ranks.shape[1] + 1)[None, :]
        for k in map_ks:
            in_top_k = ranks <= k
            precision = np.divide(hits_so_far, ranks, out=np.zeros(ranks.shape), where=in_top_k)
            with np.errstate(invalid="ignore"):  # 0 / 0 -> NaN for queries without positives, like "ap"
                out[f"ap@{k}"][rows] = precision.sum(axis=1) / np.minimum(num_positives, k)
    return out


def first_positive_rank(scores: np.ndarray, relevant: np.ndarray, *, chunk_queries: int | None = None) -> np.ndarray:
    """1-based rank of the best-ranked positive per query, ties broken by gallery index; 0 without positives.

    scores: [Q, G]; relevant: [Q, G] bool. Returns [Q] int64.
    """
    return per_query_metrics(scores, relevant, chunk_queries=chunk_queries)["first_positive_rank"]


def summarize(
    per_query: Mapping[str, np.ndarray], recall_ks: int | Sequence[int] = (1, 5, 10), no_positive: str = "error"
) -> dict:
    """Dataset numbers from (possibly concatenated) :func:`per_query_metrics` arrays.

    Returns {"num_queries": Q, "mAP": float, "recall": {"K": hit rate}} plus "precision": {"k": mean P@k} and
    "mAP@k": float for every "precision@k" / "ap@k" array present. All values are fractions in [0, 1].
    A query without positives raises ValueError (it would silently count as a miss), unless
    ``no_positive="zero"``: it then counts, knowingly, as AP 0, AP@k 0 and a miss (the original code's rule;
    the count is returned as "queries_without_positives").
    """
    recall_ks = _as_ks(recall_ks, "recall_ks")
    missing = [key for key in REQUIRED_PER_QUERY_KEYS if key not in per_query]
    if missing:
        raise KeyError(f"per_query lacks {missing}; build it with per_query_metrics()")
    num_positives = np.asarray(per_query["num_positives"])
    num_queries = len(num_positives)
    if num_queries == 0:
        raise ValueError("no queries to summarize")
    for key, values in per_query.items():
        if len(values) != num_queries:
            raise ValueError(f"per_query[{key!r}] has {len(values)} entries, num_positives has {num_queries}")
    empty = np.flatnonzero(num_positives == 0)
    if len(empty) and no_positive != "zero":
        raise ValueError(
            f"{len(empty)} of {num_queries} queries have no relevant gallery item (query indices "
            f"{empty[:10].tolist()}{' ...' if len(empty) > 10 else ''}); they would silently count as misses. "
            "Drop them or fix the ground truth."
        )
    zero = {
        key: np.nan_to_num(np.asarray(values, dtype=np.float64), nan=0.0)
        for key, values in per_query.items()
        if key == "ap" or key.startswith("ap@")
    }
    per_query = {**per_query, **zero}

    first_rank = np.asarray(per_query["first_positive_rank"])
    hit = first_rank > 0  # 0: the query has no positive
    result: dict = {
        "num_queries": num_queries,
        "mAP": float(np.mean(per_query["ap"], dtype=np.float64)),
        "recall": {str(k): float(np.mean(hit & (first_rank <= k))) for k in recall_ks},
    }
    if no_positive == "zero":
        result["queries_without_positives"] = int(len(empty))
    precision = {
        key.split("@")[1]: float(np.mean(values, dtype=np.float64))
        for key, values in per_query.items()
        if key.startswith("precision@")
    }
    if precision:
        result["precision"] = dict(sorted(precision.items(), key=lambda item: int(item[0])))
    for key in sorted((key for key in per_query if key.startswith("ap@")), key=lambda key: int(key[3:])):
        result[f"mAP@{key[3:]}"] = float(np.mean(per_query[key], dtype=np.float64))
    return result


def retrieval_metrics(
    scores: np.ndarray,
    relevant: np.ndarray,
    recall_ks: int | Sequence[int] = (1, 5, 10),
    precision_ks: int | Sequence[int] = (),
    map_at: int | Sequence[int] | None = None,
    *,
    chunk_queries: int | None = None,
) -> dict:
    """mAP, Recall@K (hit rate) and optional P@k / mAP@k of scores [Q, G] against relevant [Q, G] bool.

    See :func:`summarize` for the returned dict. Raises ValueError if any query has no positive.
    """
    _check_inputs(scores, relevant)
    empty = np.flatnonzero(~relevant.any(axis=1))  # fail before the expensive part
    if len(empty):
        raise ValueError(
            f"{len(empty)} of {scores.shape[0]} queries have no relevant gallery item (query indices "
            f"{empty[:10].tolist()}{' ...' if len(empty) > 10 else ''}); they would silently count as misses. "
            "Drop them or fix the ground truth."
        )
    per_query = per_query_metrics(
        scores, relevant, precision_ks=precision_ks, map_at=map_at, chunk_queries=chunk_queries
    )
    return summarize(per_query, recall_ks)


def max_per_image(scores: np.ndarray, owner: np.ndarray, num_images: int) -> np.ndarray:
    """Collapse several vectors per gallery image to one score per image: the max over its vectors.

    scores: [Q, N_vectors]; owner: [N_vectors] int, image id in [0, num_images) of each vector.
    Returns [Q, num_images] in the dtype of scores. Raises ValueError if an image owns no vector (it would
    otherwise need an arbitrary score such as -inf and silently rank last).
    """
    scores = np.asarray(scores)
    owner = np.asarray(owner)
    if scores.ndim != 2:
        raise ValueError(f"scores must have shape [num_queries, num_vectors], got {scores.shape}")
    if owner.ndim != 1 or len(owner) != scores.shape[1]:
        raise ValueError(f"owner must have shape [{scores.shape[1]}] (one image id per vector), got {owner.shape}")
    if not np.issubdtype(owner.dtype, np.integer):
        raise TypeError(f"owner must hold integer image ids, got dtype {owner.dtype}")
    if num_images < 1:
        raise ValueError(f"num_images must be >= 1, got {num_images}")
    if len(owner) and (owner.min() < 0 or owner.max() >= num_images):
        raise ValueError(f"owner ids must lie in [0, {num_images}), got range [{owner.min()}, {owner.max()}]")
    vectors_per_image = np.bincount(owner, minlength=num_images)
    no_vector = np.flatnonzero(vectors_per_image == 0)
    if len(no_vector):
        raise ValueError(
            f"{len(no_vector)} of {num_images} images own no vector (ids {no_vector[:10].tolist()}"
            f"{' ...' if len(no_vector) > 10 else ''}); they cannot be scored"
        )

    starts = np.concatenate(([0], np.cumsum(vectors_per_image)[:-1]))
    if np.all(owner[1:] >= owner[:-1]):
        return np.maximum.reduceat(scores, starts, axis=1)
    order = np.argsort(owner, kind="stable")
    out = np.empty((scores.shape[0], num_images), dtype=scores.dtype)
    # Gathering the columns copies the scores: do it per chunk of queries to bound memory.
    for rows in query_chunks(scores.shape[0], scores.shape[1], None):
        out[rows] = np.maximum.reduceat(scores[rows][:, order], starts, axis=1)
    return out
