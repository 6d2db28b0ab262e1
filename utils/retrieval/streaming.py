"""Evaluation that streams the gallery shards: the in-RAM ranking's numbers in memory bounded by a setting.

``utils.retrieval.ranking.rank_in_ram`` holds every gallery row in RAM and builds dense ``[queries, images]`` score and
relevance matrices. Here the gallery is read block by block from its shards (memory-mapped safetensors),
so memory is bounded by ``block_bytes``, not by the gallery size. Two modes:

**Exact** (:func:`streamed_search`): the same per-query arrays as ``utils.retrieval.metrics.per_query_metrics`` on
image-level scores (max over an image's rows and over the query's rows), and the same top-k rankings
(ties: lower gallery index first). It is a map over groups of shards and a reduce:

* pass 1, :meth:`Positives.score`: the score ``s(q, g)`` of every relevant (query, image) pair, from the
  rows of those images only (a handful of rows per query).
* pass 2, :func:`score_shards` (the map; one call per group of shards, e.g. one per worker): per block
  of rows, image scores ``[Q, n]`` by one matmul; then, for every positive ``i = (q, g, s)``, the number
  of images scoring ``>= s``, ``== s``, and ``== s`` with a gallery index below ``g``; and the block's
  top ``k``. Counts add across blocks and groups; top-k lists merge.
* :func:`merge` and :func:`finish` (the reduce): AP exactly as sklearn (tied scores form one threshold,
  normalised by all positives) from the counts, stable ranks (``#above + #tied with a lower index + 1``),
  first-positive rank, P@k, AP@k.

Why the pass-1 score wins: one dot product computed inside two differently shaped matmuls can differ in
the last bit (BLAS blocking, GPU kernels). Counting "scores >= s" with an ``s`` from another computation
would then miss or double the positive itself, so pass 2 writes the pass-1 score of each relevant pair
into its block before counting and ranking: every image score is computed exactly once. Against
``search_index.py`` (numpy BLAS) the scores agree to float32 rounding; metrics and rankings are equal
whenever no two scores of a query lie within rounding of each other (bit-equal on exactly representable
inputs, see tests/utils/retrieval/test_streaming.py).

**Candidates** (:func:`faiss_search`, ``search=faiss``): FAISS returns ``k_rows`` rows per query row,
collapsed to images; the candidates are re-scored exactly from the shards and ranked. Metrics count
positives outside the candidates as not retrieved, so AP is a lower bound of the full-gallery AP
whenever the candidates are the exact top of the ranking (exact index; an approximate index may also
miss images that outrank a retrieved positive). The result reports each query's coverage of its
positives by the candidates.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from utils.errors import SoIRError
from utils.retrieval.feature_store import FeatureShards
from utils.retrieval.metrics import _ap_from_counts  # the one rule for sklearn-style AP from counts

log = logging.getLogger("soir.streaming")

DEFAULT_BLOCK_BYTES = 256 << 20
# Working memory per (query, image) element of a block in the worst case (every score at or above a
# positive's score): the score, its position, ordered key, threshold position and bin (see _count_block).
_BYTES_PER_QUERY_IMAGE = 48
_LOW32 = 0xFFFFFFFF
_NO_RANK = np.iinfo(np.int64).max


# ----------------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------------
@dataclass
class QueryRows:
    """Query descriptors, held in memory (queries are few): ``features`` [Rq, D] float32 and ``owner``
    [Rq] int64, the query index of each row (non-decreasing; every query owns at least one row)."""

    features: torch.Tensor
    owner: torch.Tensor
    num_queries: int

    def __post_init__(self):
        owner = self.owner
        if self.features.ndim != 2 or owner.shape != (len(self.features),):
            raise ValueError(
                f"query features {tuple(self.features.shape)} and owner {tuple(owner.shape)} must be [R, D] and [R]"
            )
        if not torch.equal(torch.unique_consecutive(owner), torch.arange(self.num_queries)):
            raise ValueError(
                f"query rows must belong to queries 0..{self.num_queries - 1} in order, each with at least one row"
            )

    @classmethod
    def load(cls, shards: FeatureShards) -> QueryRows:
        features, owner, _ = shards.load()
        return cls(features.float(), owner.long(), shards.num_images)

    @property
    def lengths(self) -> torch.Tensor:
        """[Q] int64 rows per query."""
        return torch.bincount(self.owner, minlength=self.num_queries)


class ShardRows:
    """One per-row tensor of a split (``features`` [R, D], ``mask_index`` [R], ...) indexed by global row
    id and read from the shards on indexing: ``rows[ids]`` -> numpy array of shape ``ids.shape`` (+ the
    tensor's trailing dims). For the few rows a report shows, never the whole column."""

    def __init__(self, shards: FeatureShards, name: str):
        self.shards, self.name = shards, name
        self.offsets = np.asarray(shards.row_offsets())

    def __getitem__(self, ids) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64)
        flat = ids.ravel()
        if len(flat) and (flat.min() < 0 or flat.max() >= self.offsets[-1]):
            raise IndexError(f"row ids must lie in [0, {self.offsets[-1]})")
        shard_of = np.searchsorted(self.offsets, flat, side="right") - 1
        parts, order = [], []
        for shard in np.unique(shard_of):
            here = np.flatnonzero(shard_of == shard)
            parts.append(self.shards.take(self.name, int(shard), flat[here] - self.offsets[shard]).numpy())
            order.append(here)
        if not parts:
            return np.empty(ids.shape, dtype=np.float32)
        values = np.concatenate(parts)
        out = np.empty_like(values)
        out[np.concatenate(order)] = values
        return out.reshape(ids.shape + values.shape[1:])


def relevant_pairs(
    query_instances: Sequence[int], gallery_instances: Iterable[Sequence[int]]
) -> tuple[np.ndarray, np.ndarray]:
    """(query [N], image [N]) int64 of every relevant pair, sorted by query then image.

    Query ``q`` is relevant to gallery image ``g`` iff q's instance is among g's instances: the rule of
    ``datasets.relevance`` without its dense ``[Q, G]`` matrix (10^10 booleans at 10^7 images).
    """
    queries_of: dict[int, list[int]] = {}
    for q, instance in enumerate(query_instances):
        queries_of.setdefault(int(instance), []).append(q)
    query, image = [], []
    for g, instances in enumerate(gallery_instances):
        for instance in set(instances):
            hits = queries_of.get(int(instance), ())
            query.extend(hits)
            image.extend([g] * len(hits))
    query, image = np.asarray(query, dtype=np.int64), np.asarray(image, dtype=np.int64)
    order = np.lexsort((image, query))
    return query[order], image[order]


# ----------------------------------------------------------------------------------------------------
# Scores
# ----------------------------------------------------------------------------------------------------
def _ordered(scores: torch.Tensor) -> torch.Tensor:
    """float32 -> int64 with the same order (-0.0 and +0.0 both map to 0), so that a score and a tie-breaking
    index can share one integer key. NaN is refused before."""
    bits = scores.contiguous().view(torch.int32).long()
    return torch.where(bits < 0, -(bits & 0x7FFFFFFF), bits)


def _unordered(ordered: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`_ordered` (int64 -> float32)."""
    bits = torch.where(ordered < 0, (-ordered) | 0x80000000, ordered)  # the uint32 bit pattern
    return torch.where(bits >= 2**31, bits - 2**32, bits).to(torch.int32).view(torch.float32)


def _check_precision(device: torch.device) -> None:
    if torch.get_float32_matmul_precision() != "highest" or (
        device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32
    ):
        raise ValueError(
            "float32 matmuls are set to reduced precision (TF32 / "
            "torch.set_float32_matmul_precision); scores would not be exact: set it to 'highest'"
        )


def _max_over_segments(x: torch.Tensor, lengths: torch.Tensor, dim: int) -> torch.Tensor:
    """Max of ``x`` over consecutive segments of ``lengths`` along ``dim`` (0 or 1 of a 2-D tensor):
    the rows of one image (dim 1) or of one query (dim 0)."""
    if len(lengths) == x.shape[dim]:
        return x  # one row per segment
    if int(lengths.min()) == int(lengths.max()):  # equal segments: ~4x faster than segment_reduce
        r = int(lengths[0])
        if dim == 0:
            return x.view(-1, r, x.shape[1]).amax(1)
        # max_pool1d beats amax over a short innermost axis (7 ms -> 1.9 ms for [1000, 5120], r = 10);
        # both propagate NaN, which score_shards refuses.
        return torch.nn.functional.max_pool1d(x.unsqueeze(1), r, r).squeeze(1)
    if dim == 0:
        return torch.segment_reduce(x, "max", lengths=lengths, axis=0)
    return torch.segment_reduce(x, "max", lengths=lengths.expand(x.shape[0], -1), axis=1)


def _image_scores(
    queries: torch.Tensor, query_lengths: torch.Tensor, rows: torch.Tensor, image_lengths: torch.Tensor
) -> torch.Tensor:
    """[Q, n] image-level scores: inner products of query rows [Rq, D] with gallery rows [R, D], max over
    each image's rows (``image_lengths`` [n]) and each query's rows (``query_lengths`` [Q])."""
    per_row = queries @ rows.T
    return _max_over_segments(_max_over_segments(per_row, image_lengths, 1), query_lengths, 0)


def _image_row_ranges(owner: torch.Tensor, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Row ranges [start, stop) of ``images`` (sorted, all in this shard) given the shard's owner [R]."""
    owner = owner.numpy()
    return np.searchsorted(owner, images, "left"), np.searchsorted(owner, images, "right")


def _read_images(
    gallery: FeatureShards, images: np.ndarray, max_rows: int
) -> Iterator[tuple[np.ndarray, torch.Tensor, torch.Tensor]]:
    """Rows of the sorted unique gallery ``images``, in batches of about ``max_rows`` rows (whole shards'
    worth of images): yields (images of the batch [n], their rows [R, D], rows per image [n]). Only those
    rows are read, each shard opened once."""
    batch_images, batch_rows, batch_lengths, count = [], [], [], 0
    shard_of = images // gallery.shard_size
    for shard in np.unique(shard_of):
        wanted = images[shard_of == shard]
        starts, stops = _image_row_ranges(gallery.read_owner(int(shard)), wanted)
        if (empty := wanted[starts == stops]).size:
            raise SoIRError(
                f"gallery images {empty[:5].tolist()} own no rows (unreadable at extraction); "
                "leave their pairs out (they are not in the evaluated gallery)"
            )
        # Neighbouring images are one contiguous range of rows: read them with one slice.
        runs = np.flatnonzero(np.r_[True, starts[1:] != stops[:-1]])
        run_stops = np.r_[stops[runs[1:] - 1], stops[-1]]
        batch_rows.append(gallery.read_ranges(int(shard), starts[runs], run_stops))
        batch_images.append(wanted)
        batch_lengths.append(stops - starts)
        count += int((stops - starts).sum())
        if count >= max_rows:
            yield np.concatenate(batch_images), torch.cat(batch_rows), torch.from_numpy(np.concatenate(batch_lengths))
            batch_images, batch_rows, batch_lengths, count = [], [], [], 0
    if batch_images:
        yield np.concatenate(batch_images), torch.cat(batch_rows), torch.from_numpy(np.concatenate(batch_lengths))


def pair_scores(
    queries: QueryRows,
    gallery: FeatureShards,
    query: np.ndarray,
    image: np.ndarray,
    device: str | torch.device = "cpu",
    block_bytes: int = DEFAULT_BLOCK_BYTES,
) -> np.ndarray:
    """Exact image-level scores [N] float32 of the pairs (``query[i]``, ``image[i]``): the max inner
    product over the query's rows and the image's rows. Reads only those images' rows, at most about
    ``block_bytes`` of them at a time; each query is scored against its own images only."""
    device = torch.device(device)
    _check_precision(device)
    query, image = np.asarray(query, dtype=np.int64), np.asarray(image, dtype=np.int64)
    out = np.empty(len(query), dtype=np.float32)
    if len(query) == 0:
        return out
    if image.min() < 0 or image.max() >= gallery.num_images:
        raise ValueError(f"gallery image ids must lie in [0, {gallery.num_images}), got [{image.min()}, {image.max()}]")
    features = queries.features.to(device)
    query_start = np.concatenate(([0], np.cumsum(queries.lengths.numpy())))
    max_rows = max(1, block_bytes // (2 * 4 * features.shape[1]))  # a batch's pieces + their concatenation
    buffer = torch.empty((0, features.shape[1]), device=device)
    for images, rows, lengths in _read_images(gallery, np.unique(image), max_rows):
        rows = rows.to(device)
        row_start = np.concatenate(([0], np.cumsum(lengths.numpy())))
        in_batch = np.flatnonzero((image >= images[0]) & (image <= images[-1]))
        in_batch = in_batch[np.argsort(query[in_batch], kind="stable")]
        position = np.searchsorted(images, image[in_batch])  # of each pair's image in the batch
        queries_here, first = np.unique(query[in_batch], return_index=True)
        for q, pairs, mine in zip(queries_here, np.split(in_batch, first[1:]), np.split(position, first[1:])):
            starts, counts = row_start[mine], lengths.numpy()[mine]
            row_ids = np.repeat(starts - np.cumsum(counts) + counts, counts) + np.arange(counts.sum())
            if len(buffer) < len(row_ids):
                buffer = rows.new_empty((len(row_ids), rows.shape[1]))
            # Gather into a reused buffer: a fresh tensor per query costs ~2x (page faults).
            mine_rows = torch.index_select(rows, 0, torch.from_numpy(row_ids).to(device), out=buffer[: len(row_ids)])
            per_row = features[query_start[q] : query_start[q + 1]] @ mine_rows.T
            scores = _max_over_segments(per_row.amax(0, keepdim=True), torch.from_numpy(counts).to(device), 1)
            out[pairs] = scores[0].cpu().numpy()
    return out


# ----------------------------------------------------------------------------------------------------
# Pass 1: the relevant pairs and their scores
# ----------------------------------------------------------------------------------------------------
@dataclass
class Positives:
    """The relevant (query, image) pairs with their scores, sorted by query, then score ascending, then
    image (the order ``utils.retrieval.metrics`` gives a query's positive thresholds). ``ptr`` [Q + 1]: the pairs of
    query q are ``ptr[q]:ptr[q + 1]``. Tensors on the CPU."""

    query: torch.Tensor  # [N] int64
    image: torch.Tensor  # [N] int64
    score: torch.Tensor  # [N] float32
    ptr: torch.Tensor  # [Q + 1] int64

    @classmethod
    def score_pairs(
        cls,
        queries: QueryRows,
        gallery: FeatureShards,
        query: np.ndarray,
        image: np.ndarray,
        device: str | torch.device = "cpu",
        block_bytes: int = DEFAULT_BLOCK_BYTES,
    ) -> Positives:
        """Pass 1: score the relevant pairs (:func:`relevant_pairs`) from the rows of their images."""
        score = pair_scores(queries, gallery, query, image, device, block_bytes)
        if np.isnan(score).any():
            raise ValueError("features hold NaN (a relevant pair scores NaN); rankings would be undefined")
        order = np.lexsort((image, score, query))
        ptr = np.searchsorted(query[order], np.arange(queries.num_queries + 1))
        return cls(
            torch.from_numpy(query[order]),
            torch.from_numpy(image[order]),
            torch.from_numpy(score[order]),
            torch.from_numpy(ptr),
        )

    @property
    def num_queries(self) -> int:
        return len(self.ptr) - 1

    def keys(self) -> torch.Tensor:
        """[N] int64 sort keys (query, score): ascending, equal for tied positives of one query."""
        return (self.query << 32) + _ordered(self.score) + 2**31


# ----------------------------------------------------------------------------------------------------
# Pass 2: the map over shards
# ----------------------------------------------------------------------------------------------------
@dataclass
class Partial:
    """What a group of shards contributes; partials of disjoint groups add up (:func:`merge`).

    Per positive i (``Positives`` order): ``at_least`` images scoring >= its score, ``equal`` images scoring
    exactly its score (itself included), ``tied_before`` of those with a lower gallery index.
    ``top_key`` [Q, <=k] int64: the best images, as (ordered score << 32) | (2^32 - 1 - image), descending.
    """

    shards: list[int]
    at_least: torch.Tensor
    equal: torch.Tensor
    tied_before: torch.Tensor
    top_key: torch.Tensor


def _blocks(owner: torch.Tensor, max_rows: int) -> Iterator[tuple[torch.Tensor, int, int, torch.Tensor]]:
    """Split one shard into blocks of whole images of about ``max_rows`` rows (at least one image):
    yields (the block's images [n], global ids ascending, first row, end row, rows per image [n]).
    Images without rows (unreadable, skipped at extraction) are in no block."""
    images, lengths = torch.unique_consecutive(owner, return_counts=True)
    ends = torch.cumsum(lengths, 0)
    start = 0
    while start < len(lengths):
        row0 = int(ends[start - 1]) if start else 0
        stop = max(start + 1, int(torch.searchsorted(ends, row0 + max_rows, right=True)))
        yield images[start:stop], row0, int(ends[stop - 1]), lengths[start:stop]
        start = stop


def _block_top(scores: torch.Tensor, images: torch.Tensor, k: int) -> torch.Tensor:
    """Top-k keys [Q, min(k, n)] of an image-score block (columns: gallery ``images`` [n], ascending):
    descending score, ties by lower gallery index."""
    n = scores.shape[1]
    k = min(k, n)
    values, where = torch.topk(scores, min(k + 1, n), dim=1)
    keys = (_ordered(values[:, :k]) << 32) | (_LOW32 - images[where[:, :k]])
    if k < n:
        # torch.topk picks arbitrarily among equal scores: where the k-th score also occurs beyond the
        # selection, redo those rows with keys that order the tied images by index.
        tied = torch.nonzero(values[:, k] == values[:, k - 1]).flatten()
        if len(tied):
            full = (_ordered(scores[tied]) << 32) | (_LOW32 - images)
            keys[tied] = torch.topk(full, k, dim=1).values
    return torch.sort(keys, dim=1, descending=True).values


def _merge_top(a: torch.Tensor, b: torch.Tensor, k: int) -> torch.Tensor:
    both = torch.cat([a, b], dim=1)
    return torch.topk(both, min(k, both.shape[1]), dim=1).values


def _update_top(top: torch.Tensor, scores: torch.Tensor, images: torch.Tensor, k: int) -> torch.Tensor:
    """Merge a block's images into the running top-k keys. Once a query holds k images only scores >= its
    k-th can enter (ties included: a lower index wins), few deep into a large gallery: those are merged
    as a sparse list instead of a top-k of every row."""
    if top.shape[1] < k:
        return _merge_top(top, _block_top(scores, images, k), k)
    kth = _unordered(top[:, -1] >> 32)
    q, g = torch.nonzero(scores >= kth[:, None], as_tuple=True)
    if not len(q):
        return top
    keys = (_ordered(scores[q, g]) << 32) | (_LOW32 - images[g])
    rows, counts = torch.unique_consecutive(q, return_counts=True)  # nonzero is row-major
    start = torch.cumsum(counts, 0) - counts
    slot = torch.arange(len(q), device=q.device) - torch.repeat_interleave(start, counts)
    new = torch.full((len(rows), int(counts.max())), torch.iinfo(torch.long).min, device=top.device)
    new[torch.repeat_interleave(torch.arange(len(rows), device=q.device), counts), slot] = keys
    top[rows] = _merge_top(top[rows], new, k)
    return top


class _Counter:
    """Accumulates ``Partial``'s counts over image-score blocks (see module doc)."""

    def __init__(self, positives: Positives, device: torch.device):
        self.num_queries = positives.num_queries
        self.query = positives.query.to(device)
        self.image = positives.image.to(device)
        self.score = positives.score.to(device)
        self.keys = positives.keys().to(device)
        ptr = positives.ptr.to(device)
        # Bin of a score v of query q: b = q + #(keys <= (q, v)), one of the q's len+1 bins [ptr[q] + q,
        # ptr[q + 1] + q]. Positive i's own bin (scores in [s_i, next threshold)) is q + end_i.
        self.own_bin = self.query + torch.searchsorted(self.keys, self.keys, right=True)
        self.last_bin = self.query + ptr[1:][self.query]
        num = len(self.keys)
        # Each query's lowest positive score (its first, scores ascending); +inf without positives.
        self.lowest = torch.full((self.num_queries,), float("inf"), device=device)
        has_positive = ptr[1:] > ptr[:-1]
        self.lowest[has_positive] = self.score[ptr[:-1][has_positive]]
        self.by_image = torch.argsort(self.image)
        self.image_sorted = self.image[self.by_image]
        self.at_least = torch.zeros(num, dtype=torch.long, device=device)
        self.equal = torch.zeros_like(self.at_least)
        self.tied_before = torch.zeros_like(self.at_least)

    def in_block(self, first_image: int, end_image: int) -> torch.Tensor:
        """Positives (indices) whose image lies in [first_image, end_image)."""
        lo, hi = torch.searchsorted(
            self.image_sorted, torch.tensor([first_image, end_image], device=self.image_sorted.device)
        )
        return self.by_image[lo:hi]

    def add(self, scores: torch.Tensor, images: torch.Tensor, inside: torch.Tensor) -> None:
        """Count one block of image scores [Q, n] (columns: gallery ``images`` [n], ascending);
        ``inside``: the positives whose image is in the block."""
        num_bins = len(self.keys) + self.num_queries
        # Scores below a query's lowest positive score change no count: skip them (most, when positives
        # score high).
        q, g = torch.nonzero(scores >= self.lowest[:, None], as_tuple=True)
        if len(q):
            key = (q << 32) + _ordered(scores[q, g]) + 2**31
            position = torch.searchsorted(self.keys, key, right=True)
            equal = self.keys[(position - 1).clamp_(min=0)] == key
            bins = torch.bincount(2 * (q + position) + equal, minlength=2 * num_bins).view(num_bins, 2)
            per_bin = bins.sum(1)
            above = torch.flip(torch.cumsum(torch.flip(per_bin, (0,)), 0), (0,))  # scores in bins >= b
            above = torch.cat([above, above.new_zeros(1)])
            equal_own = bins[self.own_bin, 1]
            self.at_least += above[self.own_bin] - above[self.last_bin + 1]
            self.equal += equal_own
            # Ties with a lower gallery index: whole block before the positive's image ...
            self.tied_before += torch.where(self.image > images[-1], equal_own, 0)
        if len(inside):
            # ... and, in the positive's own block, the equal scores left of it.
            rows = scores[self.query[inside]]
            left = images[None, :] < self.image[inside, None]
            self.tied_before[inside] += ((rows == self.score[inside, None]) & left).sum(1)


def block_rows(queries: QueryRows, images_per_row: float, block_bytes: int = DEFAULT_BLOCK_BYTES) -> int:
    """Gallery rows per block so that its working memory, the row scores [Rq, rows] float32 and the
    counting over [Q, images], stays near ``block_bytes``."""
    per_row = 4 * len(queries.features) + _BYTES_PER_QUERY_IMAGE * queries.num_queries * images_per_row
    return max(1, int(block_bytes / per_row))


def score_shards(
    queries: QueryRows,
    gallery: FeatureShards,
    shards: Iterable[int],
    positives: Positives,
    k: int,
    device: str | torch.device = "cpu",
    block_bytes: int = DEFAULT_BLOCK_BYTES,
) -> Partial:
    """Pass 2 over one group of shards (the map step: e.g. the shards of one worker).

    Reads each shard in blocks of whole images sized so the block's working memory stays near
    ``block_bytes``; each block costs one [Rq, rows] matmul on ``device``.
    """
    device = torch.device(device)
    _check_precision(device)
    shards = [int(s) for s in shards]
    features = queries.features.to(device)
    query_lengths = queries.lengths.to(device)
    counter = _Counter(positives, device)
    top = torch.empty((queries.num_queries, 0), dtype=torch.long, device=device)
    for shard in shards:
        owner = gallery.read_owner(shard)
        max_rows = block_rows(queries, len(gallery.image_range(shard)) / max(1, len(owner)), block_bytes)
        with gallery.mapped(shard) as shard_rows:  # no copy on the CPU
            for images, row0, row1, lengths in _blocks(owner, max_rows):
                images = images.to(device)
                rows = shard_rows[row0:row1].to(device)
                scores = _image_scores(features, query_lengths, rows, lengths.to(device))
                del rows
                if bool(torch.isnan(scores).any()):
                    raise SoIRError(
                        f"{gallery.shard_path(shard)}: scores are NaN (NaN in the features); "
                        "rankings would be undefined; recompute this shard"
                    )
                inside = counter.in_block(int(images[0]), int(images[-1]) + 1)
                # The relevant pairs keep their pass-1 scores (module doc: one score per pair).
                column = torch.searchsorted(images, counter.image[inside])
                scores[counter.query[inside], column] = counter.score[inside]
                counter.add(scores, images, inside)
                top = _update_top(top, scores, images, k)
    return Partial(shards, counter.at_least.cpu(), counter.equal.cpu(), counter.tied_before.cpu(), top.cpu())


# ----------------------------------------------------------------------------------------------------
# The reduce
# ----------------------------------------------------------------------------------------------------
def merge(partials: Sequence[Partial], k: int) -> Partial:
    """Sum the counts and merge the top-k lists of partials from disjoint groups of shards."""
    shards = [s for p in partials for s in p.shards]
    if len(set(shards)) != len(shards):
        raise ValueError("partials overlap: a shard was scored twice (check the worker split)")
    top = partials[0].top_key
    for p in partials[1:]:
        top = _merge_top(top, p.top_key, k)
    return Partial(
        sorted(shards),
        sum(p.at_least for p in partials),
        sum(p.equal for p in partials),
        sum(p.tied_before for p in partials),
        top,
    )


@dataclass
class StreamedResult:
    """``per_query``: the arrays of ``utils.retrieval.metrics.per_query_metrics`` (feed them to ``summarize``);
    ``top_index`` [Q, k] int64 gallery images best first (ties: lower index first); ``top_score`` [Q, k]."""

    per_query: dict[str, np.ndarray]
    top_index: np.ndarray
    top_score: np.ndarray


def _padded(values: np.ndarray, ptr: np.ndarray, fill) -> np.ndarray:
    """Flat per-query values (query q: ptr[q]:ptr[q+1]) -> [Q, max count] padded with ``fill``."""
    counts = np.diff(ptr)
    out = np.full((len(counts), max(1, int(counts.max(initial=0)))), fill, dtype=np.asarray(values).dtype)
    query = np.repeat(np.arange(len(counts)), counts)
    out[query, np.arange(len(query)) - ptr[:-1][query]] = values
    return out


def _per_query(
    thr: np.ndarray,
    at_least: np.ndarray,
    ranks: np.ndarray,
    num_positives: np.ndarray,
    num_found: np.ndarray,
    precision_ks: Sequence[int],
    map_at: Sequence[int],
) -> dict[str, np.ndarray]:
    """``per_query_metrics``' arrays from counts at the found positives' thresholds (thr, at_least: [Q, P]
    ascending, padded) and their ranks [Q, P] (ascending, padded with _NO_RANK); positives not found
    (candidates mode) contribute precision 0 and have no rank."""
    ap = _ap_from_counts(thr, num_found, at_least)
    if not np.array_equal(num_found, num_positives):  # candidates mode; untouched when all are found
        with np.errstate(invalid="ignore", divide="ignore"):
            partial = np.nan_to_num(ap) * num_found / num_positives
        ap = np.where(num_found == num_positives, ap, np.where(num_positives > 0, partial, np.nan))
    out = {
        "ap": ap,
        "first_positive_rank": np.where(num_found > 0, ranks[:, 0], 0).astype(np.int64),
        "num_positives": num_positives.astype(np.int64),
    }
    for k in precision_ks:
        out[f"precision@{k}"] = (ranks <= k).sum(axis=1) / k
    hits_so_far = np.arange(1, ranks.shape[1] + 1)[None, :]  # the j-th positive sits at rank ranks[:, j]
    for k in map_at:
        precision = np.divide(hits_so_far, ranks, out=np.zeros(ranks.shape), where=ranks <= k)
        with np.errstate(invalid="ignore"):
            out[f"ap@{k}"] = precision.sum(axis=1) / np.minimum(num_positives, k)
    return out


def _ks(ks) -> tuple[int, ...]:
    return () if ks is None else (int(ks),) if isinstance(ks, (int, np.integer)) else tuple(int(k) for k in ks)


def _decode(top_key: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    index = (_LOW32 - (top_key & _LOW32)).numpy()
    score = _unordered(top_key >> 32).numpy()
    return index, score


def finish(
    partial: Partial,
    positives: Positives,
    gallery: FeatureShards,
    precision_ks: int | Sequence[int] = (),
    map_at: int | Sequence[int] | None = None,
) -> StreamedResult:
    """The reduce's last step: per-query metrics and rankings from the merged partial of ALL shards."""
    missing = sorted(set(range(gallery.num_shards)) - set(partial.shards))
    if missing:
        raise SoIRError(
            f"{len(missing)} gallery shards were not scored (e.g. {missing[:5]}); the metrics need every shard"
        )
    ptr = positives.ptr.numpy()
    num_positives = np.diff(ptr)
    thr = _padded(positives.score.numpy(), ptr, np.float32(np.inf))
    at_least = _padded(partial.at_least.numpy(), ptr, 0)
    ranks = (partial.at_least - partial.equal + partial.tied_before + 1).numpy()
    ranks = np.sort(_padded(ranks, ptr, _NO_RANK), axis=1)
    per_query = _per_query(thr, at_least, ranks, num_positives, num_positives, _ks(precision_ks), _ks(map_at))
    top_index, top_score = _decode(partial.top_key)
    return StreamedResult(per_query, top_index, top_score)


def streamed_search(
    queries: QueryRows,
    gallery: FeatureShards,
    query: np.ndarray,
    image: np.ndarray,
    k: int,
    precision_ks: int | Sequence[int] = (),
    map_at: int | Sequence[int] | None = None,
    device: str | torch.device = "cpu",
    block_bytes: int = DEFAULT_BLOCK_BYTES,
    groups: Sequence[Sequence[int]] | None = None,
) -> StreamedResult:
    """Exact evaluation of ``queries`` against the whole gallery, streamed: pass 1, the map over
    ``groups`` of shards (default: one group, all shards), the reduce. ``query``, ``image``: the
    relevant pairs (:func:`relevant_pairs`). ``k``: rankings kept per query (capped at the gallery size)."""
    k = min(k, gallery.num_images)
    positives = Positives.score_pairs(queries, gallery, query, image, device, block_bytes)
    groups = groups if groups is not None else [range(gallery.num_shards)]
    partials = [score_shards(queries, gallery, group, positives, k, device, block_bytes) for group in groups]
    return finish(merge(partials, k), positives, gallery, precision_ks, map_at)


# ----------------------------------------------------------------------------------------------------
# Candidates mode: FAISS proposes, the shards re-score exactly
# ----------------------------------------------------------------------------------------------------
@dataclass
class CandidateResult(StreamedResult):
    """A :class:`StreamedResult` over FAISS candidates. ``coverage`` [Q]: share of each query's positives
    among its candidates (NaN without positives). Positives outside the candidates count as not retrieved
    (precision 0, no rank; ``first_positive_rank`` = gallery size + 1 when none was retrieved), so
    ``ap`` is a lower bound of the full-gallery AP when the candidates are the exact top of the ranking
    (``ap_is_lower_bound``); with an approximate index an image FAISS missed may also outrank a retrieved
    positive. Rankings shorter than k are padded with index -1 and score -inf."""

    coverage: np.ndarray
    ap_is_lower_bound: bool = True


def row_images(gallery: FeatureShards, offsets: Sequence[int], rows: np.ndarray) -> np.ndarray:
    """Gallery image [N] of each global row id in ``rows`` (``offsets``: ``gallery.row_offsets()``)."""
    offsets = np.asarray(offsets)
    shard_of = np.searchsorted(offsets, rows, side="right") - 1
    images = np.empty(len(rows), dtype=np.int64)
    for shard in np.unique(shard_of):
        here = shard_of == shard
        images[here] = gallery.read_owner(int(shard)).numpy()[rows[here] - offsets[shard]]
    return images


def faiss_candidates(
    index, queries: QueryRows, gallery: FeatureShards, offsets: Sequence[int], k_rows: int
) -> tuple[np.ndarray, np.ndarray]:
    """(query [M], image [M]) unique candidate pairs, sorted: the images of the ``k_rows`` rows FAISS
    returns for each query row (``index`` ids: global gallery row ids)."""
    _, rows = index.search(np.ascontiguousarray(queries.features.numpy(), dtype=np.float32), k_rows)
    query = np.repeat(queries.owner.numpy(), rows.shape[1])
    rows = rows.ravel()
    found = rows >= 0  # -1: FAISS had fewer than k_rows rows in the probed lists
    pairs = np.unique(query[found] * gallery.num_images + row_images(gallery, offsets, rows[found]))
    return pairs // gallery.num_images, pairs % gallery.num_images


def faiss_search(
    index,
    queries: QueryRows,
    gallery: FeatureShards,
    query: np.ndarray,
    image: np.ndarray,
    k: int,
    k_rows: int | None = None,
    precision_ks: int | Sequence[int] = (),
    map_at: int | Sequence[int] | None = None,
    device: str | torch.device = "cpu",
    block_bytes: int = DEFAULT_BLOCK_BYTES,
) -> CandidateResult:
    """Fast mode: FAISS's top ``k_rows`` rows per query row (default 10 k), collapsed to images, re-scored
    exactly from the shards and ranked (ties: lower gallery index first). ``query``, ``image``: the
    relevant pairs. See :class:`CandidateResult` for what the metrics mean."""
    num_images = gallery.num_images
    k = min(k, num_images)
    cand_query, cand_image = faiss_candidates(index, queries, gallery, gallery.row_offsets(), k_rows or 10 * k)
    cand_score = pair_scores(queries, gallery, cand_query, cand_image, device, block_bytes)
    # Each query's candidates best first: score descending, then gallery index.
    order = np.lexsort((cand_image, -cand_score, cand_query))
    cand_query, cand_image, cand_score = cand_query[order], cand_image[order], cand_score[order]
    start = np.searchsorted(cand_query, np.arange(queries.num_queries + 1))
    position = np.arange(len(cand_query)) - start[cand_query]  # 0-based rank among candidates
    # Candidates scoring >= each candidate: the end of its tie run. Keys ascend with (query, -score).
    run_key = (torch.from_numpy(cand_query) << 32) + (2**31 - 1) - _ordered(torch.from_numpy(cand_score))
    at_least = torch.searchsorted(run_key, run_key, right=True).numpy() - start[cand_query]

    top_index = np.full((queries.num_queries, k), -1, dtype=np.int64)
    top_score = np.full((queries.num_queries, k), -np.inf, dtype=np.float32)
    best = position < k
    top_index[cand_query[best], position[best]] = cand_image[best]
    top_score[cand_query[best], position[best]] = cand_score[best]

    # The positives among the candidates, ascending by score per query (utils.retrieval.metrics' threshold order).
    is_positive = np.isin(cand_query * num_images + cand_image, query * num_images + image)
    found = np.flatnonzero(is_positive)[::-1]  # descending -> ascending score
    found = found[np.argsort(cand_query[found], kind="stable")]
    num_found = np.bincount(cand_query[found], minlength=queries.num_queries)
    num_positives = np.bincount(query, minlength=queries.num_queries)
    ptr = np.concatenate(([0], np.cumsum(num_found)))
    thr = _padded(cand_score[found], ptr, np.float32(np.inf))
    ranks = np.sort(_padded(position[found] + 1, ptr, _NO_RANK), axis=1)
    per_query = _per_query(
        thr, _padded(at_least[found], ptr, 0), ranks, num_positives, num_found, _ks(precision_ks), _ks(map_at)
    )
    missed = (num_positives > 0) & (num_found == 0)
    per_query["first_positive_rank"][missed] = num_images + 1
    with np.errstate(invalid="ignore", divide="ignore"):
        coverage = num_found / num_positives
    log.info(
        "FAISS candidates: %.1f per query, %.4f of the positives (AP is a lower bound)",
        len(cand_query) / queries.num_queries,
        num_found.sum() / max(1, num_positives.sum()),
    )
    return CandidateResult(per_query, top_index, top_score, coverage)
