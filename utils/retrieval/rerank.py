"""Re-ranking after the exact search (``rerank=aqe|dba``): alpha query expansion and database-side
augmentation (Radenovic, Tolias, Chum, "Fine-tuning CNN image retrieval with no human annotation",
TPAMI 2018, Sec. 5: alpha-QE and alpha-DBA).

Both replace a vector v by the normalised, similarity-weighted sum of itself and its neighbours:

    v' = normalize(v + sum_{j = 1..k} max(s_j, 0)^alpha * n_j)

with ``k = rerank_k`` and ``alpha = rerank_alpha``; v itself has weight 1 = its similarity to itself
(alpha = 0 is plain average QE; negative similarities get weight 0).

    aqe  v = each query row; n_j = the top-k gallery images of the first (exact) ranking, each as its
         best row for that query (the row behind its image score: a multi-vector image's best mask),
         s_j = the image's score. The search then runs again with the expanded query rows.
    dba  v = each gallery row; n_j = the top-k OTHER gallery images for that row (image score = the max
         over their rows, as for queries), each as its best row for v, s_j = that score. Queries are
         searched as they are against the augmented gallery.

Search code (search_index.py) finds the neighbours; this module holds the arithmetic.
"""

from __future__ import annotations

import numpy as np


def expand(vectors: np.ndarray, neighbours: np.ndarray, similarities: np.ndarray, alpha: float) -> np.ndarray:
    """vectors [R, D], neighbours [R, k, D], similarities [R, k] (NaN: no neighbour, weight 0) ->
    [R, D] float32 unit vectors ``normalize(v + sum_j max(s_j, 0)^alpha n_j)``."""
    weights = np.nan_to_num(np.maximum(similarities.astype(np.float64), 0.0), nan=0.0) ** alpha
    weights[np.isnan(similarities)] = 0.0  # 0 ** 0 is 1: a missing neighbour must weigh nothing
    out = vectors.astype(np.float64) + np.einsum("rk,rkd->rd", weights, neighbours.astype(np.float64))
    return (out / np.linalg.norm(out, axis=1, keepdims=True)).astype(np.float32)
