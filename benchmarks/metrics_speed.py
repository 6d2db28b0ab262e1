"""Time utils.retrieval.metrics on random scores: default 10k queries x 100k gallery, ~5 positives per query.

Scores are generated chunk by chunk (the full float32 matrix would be 4 GB) and each chunk is passed to the
metric functions, the way an evaluation loop over query batches uses them; only metric calls are timed.

    python benchmarks/metrics_speed.py [--queries 10000] [--gallery 100000] [--positives 5]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from utils.retrieval import metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--queries", type=int, default=10_000)
    parser.add_argument("--gallery", type=int, default=100_000)
    parser.add_argument("--positives", type=int, default=5, help="positives drawn per query (duplicates merge)")
    parser.add_argument("--batch", type=int, default=1_000, help="queries generated and scored per call")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    generator = torch.Generator().manual_seed(args.seed)
    timings = {"average_precision": 0.0, "per_query_metrics (AP + first rank)": 0.0, "summarize": 0.0}
    parts = []
    for start in range(0, args.queries, args.batch):
        rows = min(args.batch, args.queries - start)
        scores = torch.rand(rows, args.gallery, generator=generator).numpy()
        relevant = np.zeros((rows, args.gallery), dtype=bool)
        picks = torch.randint(args.gallery, (rows, args.positives), generator=generator).numpy()
        relevant[np.arange(rows)[:, None], picks] = True

        t0 = time.perf_counter()
        metrics.average_precision(scores, relevant)
        t1 = time.perf_counter()
        parts.append(metrics.per_query_metrics(scores, relevant))
        t2 = time.perf_counter()
        timings["average_precision"] += t1 - t0
        timings["per_query_metrics (AP + first rank)"] += t2 - t1

    t0 = time.perf_counter()
    per_query = {key: np.concatenate([part[key] for part in parts]) for key in parts[0]}
    result = metrics.summarize(per_query, recall_ks=(1, 5, 10))
    timings["summarize"] = time.perf_counter() - t0

    # The stable-sort fallback (many positives or negatives tied with positives), timed on one batch of
    # `--batch` queries with counting disabled and extrapolated linearly to all queries.
    rows = min(args.batch, args.queries)
    scores = torch.rand(rows, args.gallery, generator=generator).numpy()
    relevant = np.zeros((rows, args.gallery), dtype=bool)
    relevant[np.arange(rows)[:, None], torch.randint(args.gallery, (rows, args.positives)).numpy()] = True
    default_limit = metrics.MAX_POSITIVES_FOR_COUNTING
    metrics.MAX_POSITIVES_FOR_COUNTING = 0
    t0 = time.perf_counter()
    metrics.per_query_metrics(scores, relevant)
    sort_seconds = (time.perf_counter() - t0) * args.queries / rows
    metrics.MAX_POSITIVES_FOR_COUNTING = default_limit

    print(
        f"{args.queries} queries x {args.gallery} gallery, {per_query['num_positives'].mean():.2f} positives/query, "
        f"float32 scores, torch threads {torch.get_num_threads()}"
    )
    print(f"{'step':<44}{'seconds':>10}{'queries/s':>12}")
    for name, seconds in timings.items():
        rate = f"{args.queries / seconds:>12.0f}" if name != "summarize" else f"{'':>12}"
        print(f"{name:<44}{seconds:>10.2f}{rate}")
    sort_name = "sort fallback (extrapolated from one batch)"
    print(f"{sort_name:<44}{sort_seconds:>10.2f}{args.queries / sort_seconds:>12.0f}")
    print(f"mAP {result['mAP']:.5f}  recall {result['recall']}")


if __name__ == "__main__":
    main()
