"""Evaluation at gallery scale: peak memory and time of streamed exact evaluation, the FAISS candidates
path and today's in-RAM search, side by side with the pure matmul time, on synthetic SoIR shards.

    python benchmarks/scale.py                      # 10^6 rows x 768, 1000 queries
    python benchmarks/scale.py --ten-million        # 10^7 rows (30.7 GB of fp32 shards; in-RAM skipped)

The gallery is written once as SoIR shards (``FeatureShards.write``, float32 like create_index.py) under
``--dir``: unit vectors, ``--rows-per-image`` rows per image (one per object mask). Each query (one row)
has ``--positives`` gallery images whose first row is the query plus noise (cosine 0.05-0.7: some
positives rank first, some are buried), so the metrics are not trivial. Every method runs in a fresh
subprocess, so its peak RSS (``VmHWM``, includes Python + torch, see the "baseline" row) is its own.

Methods:
  baseline   import torch/faiss/SoIR, nothing else
  matmul     only the [queries, rows] matmuls of streamed evaluation's blocks (same blocks, shards read
             untimed): the floor for exact scoring
  streamed   utils.retrieval.streaming.streamed_search: pass 1 + all blocks + reduce (reading included)
  in_ram     today's search_index.py path: FeatureShards.load() + image_scores + per_query_metrics per
             query chunk + top-k argsort (skipped when the fp32 gallery exceeds --in-ram-limit-gb)
  faiss      utils.retrieval.streaming.faiss_search on an on-disk IVF built by
             utils.retrieval.index_build (build timed apart)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from utils.files import claim_folder
from utils.retrieval.feature_store import FeatureShards

DIM = 768


# ----------------------------------------------------------------------------------------------------
# Synthetic data
# ----------------------------------------------------------------------------------------------------
def folder_of(args) -> Path:
    return (
        Path(args.dir) / f"rows{args.rows}-rpi{args.rows_per_image}-q{args.queries}-p{args.positives}-seed{args.seed}"
    )


def split(folder: Path, num_images: int, shard_size: int) -> FeatureShards:
    # Records are not read by the evaluation code (only their count): one shared empty dict per image
    # keeps a 10^6-image list at 8 MB instead of ~500 MB of dicts.
    return FeatureShards(folder, [{}] * num_images, shard_size)


def planted(args) -> dict[str, np.ndarray]:
    """Queries, positive images and noise levels (small; regenerated identically from the seed)."""
    rng = np.random.default_rng(args.seed)
    num_images = args.rows // args.rows_per_image
    queries = rng.standard_normal((args.queries, DIM)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    image = np.stack([rng.choice(num_images, args.positives, replace=False) for _ in range(args.queries)])
    query = np.repeat(np.arange(args.queries), args.positives)
    pairs = np.unique(query * num_images + image.ravel())  # two queries may share an image
    return {
        "queries": queries,
        "query": pairs // num_images,
        "image": pairs % num_images,
        "noise": rng.uniform(1.0, 20.0, len(pairs)).astype(np.float32),
    }


def write_data(args) -> None:
    folder = folder_of(args)
    if (folder / "done").is_file():
        return
    claim_folder(folder, "benchmark")  # a folder of that name that SoIR did not make is refused
    plant = planted(args)
    num_images = args.rows // args.rows_per_image
    gallery = split(folder / "gallery", num_images, args.shard_size)
    queries = split(folder / "queries", args.queries, args.shard_size)
    queries.folder.mkdir(parents=True, exist_ok=True)
    for s in range(queries.num_shards):
        images = queries.image_range(s)
        queries.write(
            s,
            torch.from_numpy(plant["queries"][images.start : images.stop]),
            torch.arange(images.start, images.stop),
            {},
        )
    gallery.folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(args.seed + 1)
    t0 = time.perf_counter()
    for s in range(gallery.num_shards):
        images = gallery.image_range(s)
        rows = torch.randn(len(images) * args.rows_per_image, DIM, generator=generator)
        # Positives: the image's first row becomes the query plus noise.
        here = np.flatnonzero((plant["image"] >= images.start) & (plant["image"] < images.stop))
        for i in here:
            noisy = (
                torch.from_numpy(plant["queries"][plant["query"][i]])
                + plant["noise"][i] * torch.randn(DIM, generator=generator) / DIM**0.5
            )
            rows[(plant["image"][i] - images.start) * args.rows_per_image] = noisy
        rows /= rows.norm(dim=1, keepdim=True)
        owner = torch.arange(images.start, images.stop).repeat_interleave(args.rows_per_image)
        gallery.write(s, rows, owner, {})
        if s % 50 == 0:
            print(f"  wrote shard {s + 1}/{gallery.num_shards} ({time.perf_counter() - t0:.0f} s)", flush=True)
    (folder / "done").write_text("ok")


# ----------------------------------------------------------------------------------------------------
# Methods (each in its own process)
# ----------------------------------------------------------------------------------------------------
def run_method(args) -> dict:
    from utils.retrieval.metrics import summarize
    from utils.retrieval.streaming import QueryRows, _blocks, block_rows, faiss_search, streamed_search

    folder = folder_of(args)
    plant = planted(args)
    gallery = split(folder / "gallery", args.rows // args.rows_per_image, args.shard_size)
    queries = QueryRows.load(split(folder / "queries", args.queries, args.shard_size))
    query, image, k = plant["query"], plant["image"], args.k
    out: dict = {}
    t0, c0 = time.perf_counter(), time.process_time()
    if args.run == "matmul":
        features = queries.features
        seconds = cpu = 0.0
        for shard in range(gallery.num_shards):
            owner = gallery.read_owner(shard)
            max_rows = block_rows(queries, len(gallery.image_range(shard)) / len(owner))  # score_shards' blocks
            for _, row0, row1, _ in _blocks(owner, max_rows):
                rows = gallery.read_rows(shard, row0, row1)
                t, c = time.perf_counter(), time.process_time()
                features @ rows.T
                seconds += time.perf_counter() - t
                cpu += time.process_time() - c
        out["seconds"], out["cpu"] = seconds, cpu
    elif args.run == "streamed":
        result = streamed_search(queries, gallery, query, image, k, precision_ks=(1, 5, 10))
        out["seconds"], out["cpu"] = time.perf_counter() - t0, time.process_time() - c0
        out["summary"] = summarize(result.per_query)
        out["top"] = result.top_index[:, :10].tolist()
        out["ap"] = result.per_query["ap"].tolist()
        out["first"] = result.per_query["first_positive_rank"].tolist()
    elif args.run == "in_ram":
        out.update(in_ram(gallery, queries, query, image, k))
        out["seconds"], out["cpu"] = time.perf_counter() - t0, time.process_time() - c0
    elif args.run == "faiss":
        from utils.retrieval.index_io import load_index

        index = load_index(folder / f"index-{args.factory.replace(',', '_')}.faiss")
        import faiss

        faiss.extract_index_ivf(index).nprobe = args.nprobe
        t0, c0 = time.perf_counter(), time.process_time()
        result = faiss_search(index, queries, gallery, query, image, k, precision_ks=(1, 5, 10))
        out["seconds"], out["cpu"] = time.perf_counter() - t0, time.process_time() - c0
        out["summary"] = summarize(result.per_query)
        out["coverage"] = float(np.nanmean(result.coverage))
        out["top"] = result.top_index[:, :10].tolist()
    out["peak_rss_gb"] = peak_rss_gb()
    return out


def peak_rss_gb() -> float:
    """This process's peak resident set (VmHWM). Not ru_maxrss: Linux carries the parent's peak over
    fork + exec, so a child of a big parent would report the parent's."""
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith("VmHWM")).split()[1]) / 2**20


def in_ram(gallery: FeatureShards, queries, query: np.ndarray, image: np.ndarray, k: int) -> dict:
    """ranking.rank_in_ram's loop: all gallery rows in RAM, dense scores and relevance per query chunk."""
    from utils.retrieval import ranking
    from utils.retrieval.metrics import per_query_metrics, query_chunks, summarize

    features, owner, _ = gallery.load()
    features, owner = features.numpy(), owner.numpy()
    q_features, q_owner = queries.features.numpy(), queries.owner.numpy()
    parts, tops = [], []
    for chunk in query_chunks(queries.num_queries, len(owner), max_elements=ranking.SCORES_PER_CHUNK):
        scores = ranking.image_scores(q_features, q_owner, chunk, features, owner, gallery.num_images)
        relevant = np.zeros(scores.shape, dtype=bool)
        mine = (query >= chunk.start) & (query < chunk.stop)
        relevant[query[mine] - chunk.start, image[mine]] = True
        parts.append(per_query_metrics(scores, relevant, precision_ks=(1, 5, 10)))
        tops.append(np.argsort(-scores, axis=1, kind="stable")[:, :k])
    per_query = {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}
    return {
        "summary": summarize(per_query),
        "top": np.concatenate(tops)[:, :10].tolist(),
        "ap": per_query["ap"].tolist(),
        "first": per_query["first_positive_rank"].tolist(),
    }


def build_faiss(args) -> float:
    from utils.retrieval.index_build import build_ondisk

    folder = folder_of(args)
    out = folder / f"index-{args.factory.replace(',', '_')}.faiss"
    if out.is_file():
        return float("nan")
    t0 = time.perf_counter()
    gallery = split(folder / "gallery", args.rows // args.rows_per_image, args.shard_size)
    build_ondisk(
        gallery,
        args.factory,
        out,
        folder / f"build-{args.factory.replace(',', '_')}",
        num_blocks=args.blocks,
        train_rows=args.train_rows,
    )
    return time.perf_counter() - t0


# ----------------------------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--ten-million", action="store_true", help="--rows 10000000")
    parser.add_argument("--rows-per-image", type=int, default=10)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--positives", type=int, default=5)
    parser.add_argument("--shard-size", type=int, default=512, help="images per shard (create_index default)")
    parser.add_argument("--k", type=int, default=100, help="k_search: rankings kept per query")
    parser.add_argument("--factory", default="IVF1024,PQ64np", help="FAISS index (np: no polysemous training)")
    parser.add_argument("--train-rows", type=int, default=51_200)
    parser.add_argument("--blocks", type=int, default=4)
    parser.add_argument("--nprobe", type=int, default=16)
    parser.add_argument("--in-ram-limit-gb", type=float, default=8.0)
    parser.add_argument("--methods", default="baseline,matmul,streamed,in_ram,faiss")
    parser.add_argument("--dir", default="/tmp/soir-scale")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch and FAISS threads (default: torch's)")
    parser.add_argument("--run", help=argparse.SUPPRESS)  # internal: one method, JSON on stdout
    args = parser.parse_args()
    if args.ten_million:
        args.rows = 10_000_000
    if args.threads:
        import faiss

        torch.set_num_threads(args.threads)
        faiss.omp_set_num_threads(args.threads)
    if args.run:
        print(
            json.dumps(
                run_method(args)
                if args.run != "baseline"
                else {"seconds": 0.0, "cpu": 0.0, "peak_rss_gb": peak_rss_gb()}
            )
        )
        return

    print(f"data: {folder_of(args)}", flush=True)
    write_data(args)
    methods = args.methods.split(",")
    gallery_gb = args.rows * DIM * 4 / 2**30
    if "in_ram" in methods and gallery_gb > args.in_ram_limit_gb:
        print(f"in_ram skipped: the fp32 gallery is {gallery_gb:.1f} GB (> --in-ram-limit-gb)")
        methods.remove("in_ram")
    if "faiss" in methods:
        seconds = build_faiss(args)
        print(
            f"faiss index {args.factory}: built in {seconds:.0f} s (train {args.train_rows} rows, "
            f"{args.blocks} blocks, merge_ondisk)"
            if seconds == seconds
            else f"faiss index {args.factory}: reused"
        )
    results = {}
    passthrough = [a for a in sys.argv[1:]]
    for method in methods:
        env = dict(
            os.environ,
            **(
                {"OMP_NUM_THREADS": str(args.threads), "OPENBLAS_NUM_THREADS": str(args.threads)}
                if args.threads
                else {}
            ),
        )
        proc = subprocess.run(
            [sys.executable, __file__, *passthrough, "--run", method], capture_output=True, text=True, env=env
        )
        if proc.returncode:
            print(f"{method} failed:\n{proc.stderr[-3000:]}")
            continue
        results[method] = json.loads(proc.stdout.strip().splitlines()[-1])
        r = results[method]
        print(
            f"  {method}: {r['seconds']:.1f} s ({r['cpu']:.1f} s CPU), peak RSS {r['peak_rss_gb']:.2f} GB", flush=True
        )

    print(
        f"\n{args.rows} rows x {DIM} ({args.rows // args.rows_per_image} images, {args.rows_per_image} rows each), "
        f"{args.queries} queries, {args.positives} positives each; torch threads {torch.get_num_threads()}"
    )
    # CPU seconds are the fairer ratio on a shared machine: waiting for a core does not count.
    matmul = results.get("matmul", {}).get("cpu")
    print(
        f"{'method':<10}{'wall s':>8}{'CPU s':>8}{'x matmul (CPU)':>16}{'peak RSS GB':>13}"
        f"{'mAP':>9}{'R@1':>8}{'R@10':>8}  notes"
    )
    for method, r in results.items():
        ratio = f"{r['cpu'] / matmul:>16.2f}" if matmul and method != "baseline" else f"{'':>16}"
        s = r.get("summary")
        cells = f"{s['mAP']:>9.4f}{s['recall']['1']:>8.3f}{s['recall']['10']:>8.3f}" if s else f"{'':>25}"
        note = ""
        if method == "faiss":
            note = f"coverage of positives {r['coverage']:.3f}; AP is a lower bound"
        if method == "in_ram" and "streamed" in results:
            other = results["streamed"]
            # Different BLAS calls round the last bit differently: a buried positive may swap with a
            # negative scoring within ~1e-8 of it. Report how far apart the two are, per query.
            delta = np.abs(np.subtract(r["ap"], other["ap"])).max()
            ranks = int(np.sum(np.not_equal(r["first"], other["first"])))
            tops = int(np.sum(np.any(np.not_equal(r["top"], other["top"]), axis=1)))
            note = f"vs streamed: max |dAP| {delta:.1e}, first-rank diffs {ranks}, top-10 diffs {tops}"
        print(f"{method:<10}{r['seconds']:>8.1f}{r['cpu']:>8.1f}{ratio}{r['peak_rss_gb']:>13.2f}{cells}  {note}")


if __name__ == "__main__":
    main()
