"""Ranking the gallery for every query, exactly: in RAM (:func:`rank_in_ram`) or streamed from the shards
(:func:`rank_streamed`, also over FAISS's candidates with ``search=faiss``), with the re-rankings (AQE, DBA)
and what the report needs (:class:`Ranked`). Knows no model: text queries and a LanceDB table come in as
arguments (utils/pipeline/search.py passes them).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import faiss
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from datasets import Annotation, drop_queries_without_positives, relevance
from utils.errors import SoIRError
from utils.retrieval.feature_store import FeatureShards
from utils.retrieval.index_io import index_path, is_exact, load_index, neighbour_recall
from utils.retrieval.metrics import max_per_image, per_query_metrics, query_chunks
from utils.retrieval.rerank import expand
from utils.retrieval.streaming import QueryRows, ShardRows, faiss_search, relevant_pairs, streamed_search

log = logging.getLogger("soir.ranking")

SCORES_PER_CHUNK = 1 << 26  # query-chunk size bound: [chunk, gallery rows] float32 = 256 MiB


@dataclass
class Ranked:
    """An evaluation, before it is written: the evaluated ``queries`` and ``gallery`` (records),
    ``metrics`` (``utils.retrieval.metrics.per_query_metrics``' arrays), and per query its best gallery images
    ``top`` [Q, K] (ids into ``gallery``, best first, ties: lower id first; -1 pads a shorter list),
    ``top_scores``, ``positive`` [Q, K]. For the report: ``best_rows(pairs)`` (the gallery row behind each
    (query, image) score), ``mask_index`` and ``gallery_features`` indexable by gallery row id. ``results``:
    extra entries for results.json."""

    queries: list[dict]
    gallery: list[dict]
    num_rows: int
    metrics: dict[str, np.ndarray]
    top: np.ndarray
    top_scores: np.ndarray
    positive: np.ndarray
    best_rows: object
    mask_index: object
    gallery_features: object
    results: dict
    streamed: bool = False

    def shown_k(self) -> int:
        """Columns of ``top`` that every query fills (search=faiss may find fewer candidates than k)."""
        return int((self.top >= 0).sum(1).min(initial=self.top.shape[1]))


# T2I: (query records, embedding size) -> the queries' text vectors [Q, D], owner [Q], records with their text
TextQueries = Callable[[list[dict], int], tuple[np.ndarray, np.ndarray, list[dict]]]


def rank_in_ram(
    cfg: DictConfig,
    folder: Path,
    gallery_shards: FeatureShards,
    query_shards: FeatureShards,
    text_queries: TextQueries | None = None,
    lance=None,
) -> Ranked:
    """Every gallery row in RAM, scores in query chunks of bounded size. ``text_queries`` (``T2I=true``)
    embeds the queries' texts; ``lance`` (``search=lancedb``): an object whose ``image_scores`` replaces
    the exact image scores (utils/results/interop.py's LanceDBGallery)."""
    if cfg.T2I and text_queries is None:
        raise SoIRError("T2I=true needs text_queries: the queries' text vectors (utils/pipeline/search.py passes them)")
    splits = {}
    for name, shards in (("gallery", gallery_shards), ("queries", query_shards)):
        features, owner, _ = shards.load()
        rows = {"features": features.numpy(), "mask_index": shards.column("mask_index").numpy()}
        splits[name] = keep_images_with_rows(list(shards.records), owner.numpy(), rows, name)
    (gallery, gallery_owner, gallery_rows), (queries, query_owner, query_rows) = splits.values()
    gallery_features, query_features = gallery_rows["features"], query_rows["features"]
    index = None
    if index_path(folder, cfg.index).is_file() or not OmegaConf.load(folder / "config.yaml").get("no_faiss"):
        index = load_index(index_path(folder, cfg.index))
        if index.ntotal != len(gallery_owner):
            raise SoIRError(
                f"{index_path(folder, cfg.index)} has {index.ntotal} rows, the gallery shards "
                f"{len(gallery_owner)}; rerun create_index.py"
            )
    query_anns, gallery_anns = as_annotations(queries, True), as_annotations(gallery, False)
    kept = drop_queries_without_positives(query_anns, gallery_anns, cfg.no_positive)
    if len(kept) < len(query_anns):
        queries, query_owner, query_rows = select_images(queries, query_owner, query_rows, [q.key for q in kept])
        query_features, query_anns = query_rows["features"], kept
    if cfg.query_vectors == "each" and not cfg.T2I:
        queries, query_owner = each_vector_a_query(queries, query_owner)
        query_anns = as_annotations(queries, True)
    if cfg.T2I:  # the queries' texts replace their image vectors; ground truth and gallery unchanged
        query_features, query_owner, queries = text_queries(queries, gallery_features.shape[1])
    stored_gallery = gallery_features  # what the report shows; the search may score augmented rows
    if cfg.rerank == "dba":
        gallery_features = database_augmentation(
            gallery_features, gallery_owner, len(gallery), cfg.rerank_k, cfg.rerank_alpha
        )
    elif cfg.rerank == "aqe":
        query_features = query_expansion(
            query_features, query_owner, len(queries), gallery_features, gallery_owner, cfg.rerank_k, cfg.rerank_alpha
        )
    k = min(max(cfg.k_search, cfg.report_k if cfg.report else 0), cfg.max_k_search, len(gallery))
    lance_seconds = 0.0
    per_query, top, top_scores, positive = [], [], [], []
    for chunk in query_chunks(len(queries), len(gallery_owner), max_elements=SCORES_PER_CHUNK):
        if lance is None:
            scores = image_scores(query_features, query_owner, chunk, gallery_features, gallery_owner, len(gallery))
        else:
            started = time.perf_counter()
            rows = np.flatnonzero((query_owner >= chunk.start) & (query_owner < chunk.stop))
            scores = lance.image_scores(
                query_features[rows],
                query_owner[rows] - chunk.start,
                chunk.stop - chunk.start,
                [g["key"] for g in gallery],
            )
            lance_seconds += time.perf_counter() - started
        relevant = relevance(query_anns[chunk.start : chunk.stop], gallery_anns)
        per_query.append(per_query_metrics(scores, relevant, precision_ks=cfg.precision_at, map_at=cfg.map_at))
        order = np.argsort(-scores, axis=1, kind="stable")[:, :k]  # ties: lower index first
        top.append(order)
        top_scores.append(np.take_along_axis(scores, order, 1))
        positive.append(np.take_along_axis(relevant, order, 1))
    results = {}
    if lance is not None:
        results.update(lancedb_dir=str(lance.folder), lancedb_seconds_per_query=lance_seconds / max(1, len(queries)))
    if index is not None and not is_exact(index) and cfg.rerank == "none":
        # Metrics above are exact (every gallery image scored); this says what the index would lose.
        results[f"index_recall@{min(cfg.k_search, cfg.max_k_search, len(gallery))}"] = index_recall(
            index, query_features, gallery_features, min(cfg.k_search, cfg.max_k_search, len(gallery))
        )
    return Ranked(
        queries,
        gallery,
        len(gallery_owner),
        {key: np.concatenate([m[key] for m in per_query]) for key in per_query[0]},
        np.concatenate(top),
        np.concatenate(top_scores),
        np.concatenate(positive),
        lambda pairs: best_rows(query_features, query_owner, gallery_features, gallery_owner, pairs),
        gallery_rows["mask_index"],
        stored_gallery,
        results,
    )


def rank_streamed(
    cfg: DictConfig,
    folder: Path,
    gallery_shards: FeatureShards,
    query_shards: FeatureShards,
    text_queries: TextQueries | None = None,
) -> Ranked:
    """The gallery streamed from its shards in blocks of ``search_block_mb`` (utils/retrieval/streaming.py): exact,
    or (``search=faiss``) over FAISS's candidates. Queries are held in RAM."""
    if cfg.T2I and text_queries is None:
        raise SoIRError("T2I=true needs text_queries: the queries' text vectors (utils/pipeline/search.py passes them)")
    gallery, has_rows = images_with_rows(gallery_shards)
    features, owner, _ = query_shards.load()
    queries, query_owner, query_rows = keep_images_with_rows(
        list(query_shards.records), owner.numpy(), {"features": features.numpy()}, "queries"
    )
    kept = drop_queries_without_positives(
        as_annotations(queries, True), as_annotations(gallery, False), cfg.no_positive
    )
    if len(kept) < len(queries):
        queries, query_owner, query_rows = select_images(queries, query_owner, query_rows, [q.key for q in kept])
    if cfg.query_vectors == "each" and not cfg.T2I:
        queries, query_owner = each_vector_a_query(queries, query_owner)
    if cfg.T2I:
        query_rows["features"], query_owner, queries = text_queries(queries, features.shape[1])
    query_rows = QueryRows(torch.from_numpy(query_rows["features"]), torch.from_numpy(query_owner), len(queries))
    # Relevant pairs over the original image ids; images without rows have no pairs (and are never scored).
    query, image = relevant_pairs(
        [q["ins"][0] for q in queries], (r["ins"] if ok else () for r, ok in zip(gallery_shards.records, has_rows))
    )
    k = min(max(cfg.k_search, cfg.report_k if cfg.report else 0), cfg.max_k_search, len(gallery))
    device = (
        "cuda" if cfg.device == "auto" and torch.cuda.is_available() else "cpu" if cfg.device == "auto" else cfg.device
    )
    block_bytes = int(cfg.search_block_mb * 2**20)
    results = {}
    if cfg.rerank == "dba":
        raise SoIRError(
            f"rerank=dba needs every gallery row's neighbours, so the gallery in RAM; this one is "
            f"{'searched through FAISS (search=faiss)' if cfg.search == 'faiss' else 'streamed'}: use search=exact "
            f"with search_block_mb above its size ({gallery_shards.row_offsets()[-1]} rows), or rerank=aqe"
        )
    if cfg.search == "faiss":
        index = load_index(index_path(folder, cfg.index), mmap=True)
        if (num_rows := gallery_shards.row_offsets()[-1]) != index.ntotal:
            raise SoIRError(
                f"{index_path(folder, cfg.index)} has {index.ntotal} rows, the gallery shards "
                f"{num_rows}; rerun create_index.py stage=index"
            )
        if _has_nprobe(index):
            faiss.ParameterSpace().set_index_parameter(index, "nprobe", cfg.search_nprobe)

        def run(rows: QueryRows, k: int):
            return faiss_search(
                index,
                rows,
                gallery_shards,
                query,
                image,
                k,
                cfg.search_candidates,
                precision_ks=cfg.precision_at,
                map_at=cfg.map_at,
                device=device,
                block_bytes=block_bytes,
            )
    else:

        def run(rows: QueryRows, k: int):
            return streamed_search(
                rows,
                gallery_shards,
                query,
                image,
                k,
                precision_ks=cfg.precision_at,
                map_at=cfg.map_at,
                device=device,
                block_bytes=block_bytes,
            )

    if cfg.rerank == "aqe":
        query_rows = streamed_query_expansion(
            query_rows, gallery_shards, run(query_rows, cfg.rerank_k), cfg.rerank_alpha
        )
    found = run(query_rows, k)
    if cfg.search == "faiss":
        results = {
            "mAP_is_lower_bound": True,
            "candidate_coverage": float(np.nanmean(found.coverage)),
            "search_candidates": cfg.search_candidates or 10 * k,
        }
    else:
        log.info("index_recall@k is not computed for a streamed gallery (it needs every row in RAM)")
    renumber = np.cumsum(has_rows) - 1
    top = np.where(found.top_index >= 0, renumber[found.top_index], -1)
    rows_of = np.arange(len(queries))[:, None] * len(has_rows) + found.top_index
    positive = (found.top_index >= 0) & np.isin(rows_of, query * len(has_rows) + image)
    kept_ids = np.flatnonzero(has_rows)
    return Ranked(
        queries,
        gallery,
        gallery_shards.row_offsets()[-1],
        found.per_query,
        top,
        found.top_score,
        positive,
        lambda pairs: streamed_best_rows(
            query_rows, gallery_shards, np.stack([pairs[:, 0], kept_ids[pairs[:, 1]]], axis=1)
        ),
        ShardRows(gallery_shards, "mask_index"),
        ShardRows(gallery_shards, "features"),
        results,
        True,
    )


def _has_nprobe(index) -> bool:
    try:
        faiss.extract_index_ivf(index)
    except RuntimeError:
        return False
    return True


def images_with_rows(shards: FeatureShards) -> tuple[list[dict], np.ndarray]:
    """The records of the images that own rows, and has_rows [N] bool, from the shards' owners (an
    image whose pixels could not be decoded owns none; logged as :func:`keep_images_with_rows` does)."""
    has_rows = np.zeros(shards.num_images, dtype=bool)
    for shard in range(shards.num_shards):
        has_rows[shards.read_owner(shard).numpy()] = True
    records = list(shards.records)
    log_images_without_rows(records, has_rows, shards.folder.name)
    return [r for r, ok in zip(records, has_rows) if ok], has_rows


def keep_images_with_rows(
    records: list[dict], owner: np.ndarray, rows: dict[str, np.ndarray], split: str
) -> tuple[list[dict], np.ndarray, dict[str, np.ndarray]]:
    """Leave out the images that own no rows (their pixels could not be decoded, bad_images=skip;
    logged with the count), renumbering ``owner``; ``rows`` holds per-row arrays (features, ...)."""
    has_rows = np.bincount(owner, minlength=len(records)) > 0
    if has_rows.all():
        return records, owner, rows
    log_images_without_rows(records, has_rows, split)
    return select_images(records, owner, rows, [r["key"] for r, ok in zip(records, has_rows) if ok])


def log_images_without_rows(records: list[dict], has_rows: np.ndarray, split: str) -> None:
    """Warn (count and the first ten keys) about the images of ``split`` that own no rows: their pixels
    could not be decoded (bad_images=skip), so they are left out of the evaluation."""
    if has_rows.all():
        return
    log.warning(
        "%d %s images have no features (unreadable, bad_images=skip) and are left out of the evaluation: %s",
        int((~has_rows).sum()),
        split,
        [r["key"] for r, ok in zip(records, has_rows) if not ok][:10],
    )


def each_vector_a_query(queries: list[dict], owner: np.ndarray) -> tuple[list[dict], np.ndarray]:
    """``query_vectors=each``: every query row [R] becomes a query of its own (its image's record
    repeated; owner 0..R-1), so a query image with several vectors counts several times in the
    metrics, as the original scored them (original ``search_index.py:209-213``). SoIR's default scores
    a query image by the max over its vectors, once."""
    if len(owner) > len(queries):
        log.warning(
            "query_vectors=each: %d query vectors of %d query images are scored as %d queries (the original's "
            "rule); query_vectors=max scores each image once",
            len(owner),
            len(queries),
            len(owner),
        )
    return [queries[o] for o in owner], np.arange(len(owner))


def select_images(
    records: list[dict], owner: np.ndarray, rows: dict[str, np.ndarray], keys: list[str]
) -> tuple[list[dict], np.ndarray, dict[str, np.ndarray]]:
    """The images named by ``keys`` (in record order) and their rows, with ``owner`` renumbered."""
    wanted = set(keys)
    keep = np.array([r["key"] in wanted for r in records], dtype=bool)
    new_index = np.cumsum(keep) - 1
    kept_rows = keep[owner]
    return (
        [r for r, k in zip(records, keep) if k],
        new_index[owner[kept_rows]],
        {name: values[kept_rows] for name, values in rows.items()},
    )


def index_recall(index, query_features: np.ndarray, gallery_features: np.ndarray, k: int) -> float:
    """Neighbour recall@k of ``index`` over all query rows, against exact top-k rows (in chunks)."""
    hits = 0.0
    for chunk in query_chunks(len(query_features), len(gallery_features), max_elements=SCORES_PER_CHUNK):
        queries = query_features[chunk.start : chunk.stop]
        exact_top = np.argpartition(-(queries @ gallery_features.T), k - 1, axis=1)[:, :k]
        hits += neighbour_recall(index, queries, exact_top) * len(queries)
    return hits / len(query_features)


def image_scores(
    query_features: np.ndarray,
    query_owner: np.ndarray,
    chunk: slice | range,
    gallery_features: np.ndarray,
    gallery_owner: np.ndarray,
    num_gallery: int,
) -> np.ndarray:
    """Exact [chunk size, num_gallery] scores (inner products of unit vectors): max over the rows of
    each gallery image, and over the rows of each query (a query with several masks matches an image
    if any of its vectors does)."""
    rows = np.flatnonzero((query_owner >= chunk.start) & (query_owner < chunk.stop))
    per_row = max_per_image(query_features[rows] @ gallery_features.T, gallery_owner, num_gallery)
    return max_per_image(per_row.T, query_owner[rows] - chunk.start, chunk.stop - chunk.start).T


def best_rows(
    query_features: np.ndarray,
    query_owner: np.ndarray,
    gallery_features: np.ndarray,
    gallery_owner: np.ndarray,
    pairs: np.ndarray,
) -> np.ndarray:
    """The gallery row that gives each (query image, gallery image) pair its :func:`image_scores`
    score: the row of the pair's best (query row, gallery row) inner product, the first one on ties.

    pairs: [N, 2] int (query image, gallery image). Returns [N] int64 gallery row ids.
    """
    query_rows, gallery_rows = rows_by_owner(query_owner), rows_by_owner(gallery_owner)
    best = np.empty(len(pairs), dtype=np.int64)
    for i, (q, g) in enumerate(pairs.tolist()):
        rows = gallery_rows[g]
        best[i] = rows[np.argmax((query_features[query_rows[q]] @ gallery_features[rows].T).max(0))]
    return best


def streamed_best_rows(queries: QueryRows, gallery: FeatureShards, pairs: np.ndarray) -> np.ndarray:
    """:func:`best_rows` for a gallery on disk: reads only the rows of the pairs' images. ``pairs`` [N, 2]
    (query, gallery image id in ``gallery``). Returns [N] int64 global gallery row ids."""
    images = np.unique(pairs[:, 1])
    offsets = gallery.row_offsets()
    features, owner, row_ids = [], [], []
    for shard in np.unique(images // gallery.shard_size):
        wanted = images[images // gallery.shard_size == shard]
        shard_owner = gallery.read_owner(int(shard)).numpy()
        starts, stops = np.searchsorted(shard_owner, wanted, "left"), np.searchsorted(shard_owner, wanted, "right")
        ids = np.concatenate([np.arange(a, b) for a, b in zip(starts, stops)])
        features.append(gallery.read_ranges(int(shard), starts, stops).numpy())
        owner.append(np.searchsorted(images, shard_owner[ids]))  # compact ids: position in images
        row_ids.append(offsets[shard] + ids)
    local = best_rows(
        queries.features.numpy(),
        queries.owner.numpy(),
        np.concatenate(features),
        np.concatenate(owner),
        np.stack([pairs[:, 0], np.searchsorted(images, pairs[:, 1])], axis=1),
    )
    return np.concatenate(row_ids)[local]


def query_expansion(
    query_features: np.ndarray,
    query_owner: np.ndarray,
    num_queries: int,
    gallery_features: np.ndarray,
    gallery_owner: np.ndarray,
    k: int,
    alpha: float,
) -> np.ndarray:
    """``rerank=aqe`` in RAM (utils/retrieval/rerank.py): every query row expanded with its query's top-``k``
    gallery images of the exact ranking (ties: lower id first), each as its best row. [Rq, D]."""
    num_gallery = int(gallery_owner.max()) + 1
    k = min(k, num_gallery)
    out = np.empty_like(query_features)
    for chunk in query_chunks(num_queries, len(gallery_owner), max_elements=SCORES_PER_CHUNK):
        scores = image_scores(query_features, query_owner, chunk, gallery_features, gallery_owner, num_gallery)
        top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        pairs = np.stack([np.repeat(np.arange(chunk.start, chunk.stop), k), top.ravel()], axis=1)
        best = best_rows(query_features, query_owner, gallery_features, gallery_owner, pairs).reshape(-1, k)
        rows = np.flatnonzero((query_owner >= chunk.start) & (query_owner < chunk.stop))
        local = query_owner[rows] - chunk.start
        out[rows] = expand(
            query_features[rows], gallery_features[best[local]], np.take_along_axis(scores, top, 1)[local], alpha
        )
    return out


def streamed_query_expansion(queries: QueryRows, gallery: FeatureShards, first, alpha: float) -> QueryRows:
    """``rerank=aqe`` for a streamed gallery: the query rows expanded with the top images of the ``first``
    ranking (a :class:`utils.retrieval.streaming.StreamedResult` with ``top_index`` [Q, k] ids into ``gallery``, -1
    for none, and ``top_score``), each read from the shards as its best row (:func:`streamed_best_rows`)."""
    top, scores = first.top_index, first.top_score.astype(np.float64)
    found = top >= 0
    pairs = np.stack([np.nonzero(found)[0], top[found]], axis=1)
    neighbours = np.zeros((*top.shape, queries.features.shape[1]), dtype=np.float32)
    if len(pairs):
        neighbours[found] = ShardRows(gallery, "features")[streamed_best_rows(queries, gallery, pairs)]
    owner = queries.owner.numpy()
    similarities = np.where(found, scores, np.nan)[owner]
    features = expand(queries.features.numpy(), neighbours[owner], similarities, alpha)
    return QueryRows(torch.from_numpy(features), queries.owner, queries.num_queries)


def database_augmentation(
    gallery_features: np.ndarray, gallery_owner: np.ndarray, num_gallery: int, k: int, alpha: float
) -> np.ndarray:
    """``rerank=dba`` (utils/retrieval/rerank.py): every gallery row expanded with its top-``k`` OTHER gallery images
    (image score: the max over their rows; ties: lower id first), each as its best row for it. [R, D]."""
    k = min(k, num_gallery - 1)
    if k == 0:
        return gallery_features
    out = np.empty_like(gallery_features)
    row_ids = np.arange(len(gallery_owner))
    for chunk in query_chunks(len(gallery_owner), len(gallery_owner), max_elements=SCORES_PER_CHUNK):
        # Each row is a query of its own (owner = its row id); its own image is never its neighbour.
        scores = image_scores(gallery_features, row_ids, chunk, gallery_features, gallery_owner, num_gallery)
        scores[np.arange(len(scores)), gallery_owner[chunk]] = -np.inf
        top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        pairs = np.stack([np.repeat(row_ids[chunk], k), top.ravel()], axis=1)
        best = best_rows(gallery_features, row_ids, gallery_features, gallery_owner, pairs).reshape(-1, k)
        out[chunk] = expand(gallery_features[chunk], gallery_features[best], np.take_along_axis(scores, top, 1), alpha)
    return out


def rows_by_owner(owner: np.ndarray) -> list[np.ndarray]:
    """Row ids of each image, in row order: ``[rows of image 0, rows of image 1, ...]``."""
    order = np.argsort(owner, kind="stable")
    return np.split(order, np.cumsum(np.bincount(owner))[:-1])


def as_annotations(records: list[dict], is_query: bool) -> list[Annotation]:
    """The ``images.json`` records written by create_index.py, back as annotations."""
    return [
        Annotation(
            key=r["key"],
            file=Path(r["file"]),
            ins=tuple(r["ins"]),
            is_query=is_query,
            bbox=r["bbox"] and tuple(r["bbox"]),
            obj_name=r["obj_name"],
        )
        for r in records
    ]
