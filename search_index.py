"""Rank the whole gallery for every query and report mAP, Recall@K and P@k at image level.

    python search_index.py features_dir=outputs/features/pe/siglip_mi_features-1a2b3c4d5e k_search=100

Writes to the run folder (printed at the end): results.json, rankings.jsonl, per_query.csv.
"""
from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import hydra
import numpy as np
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from utils.config import register
from utils.feature_store import FeatureShards
from utils.index_io import FullRanker, load_index
from utils.metrics import max_per_image, per_query_metrics, summarize

log = logging.getLogger("soir.search_index")
register()

SCORES_PER_CHUNK = 1 << 26        # query-chunk size bound: [chunk, gallery rows] float32 = 256 MiB


@hydra.main(version_base="1.3", config_path="configs", config_name="defaults")
def main(cfg: DictConfig) -> None:
    if not cfg.features_dir:
        raise ValueError("features_dir is required: the folder create_index.py printed")
    folder = Path(cfg.features_dir)
    if not (folder / "config.yaml").is_file():
        raise FileNotFoundError(f"{folder} has no config.yaml: not a create_index.py output folder")
    made_with = OmegaConf.load(folder / "config.yaml")
    gallery = json.loads((folder / "gallery" / "images.json").read_text())
    queries = json.loads((folder / "queries" / "images.json").read_text())
    _, gallery_owner, _ = FeatureShards(folder / "gallery", gallery, made_with.shard_size).load()
    query_features, query_owner, _ = FeatureShards(folder / "queries", queries, made_with.shard_size).load()
    rank = FullRanker(load_index(folder / "index.faiss"))
    if rank.index.ntotal != len(gallery_owner):
        raise ValueError(f"{folder}/index.faiss has {rank.index.ntotal} rows, the gallery shards "
                         f"{len(gallery_owner)}; rerun create_index.py")
    log.info("%s: %d queries x %d gallery images (%d rows), extractor %s", folder, len(queries),
             len(gallery), len(gallery_owner), made_with.extractor)

    out = Path(HydraConfig.get().runtime.output_dir)
    k = min(cfg.k_search, len(gallery))
    per_query: list[dict[str, np.ndarray]] = []
    with open(out / "rankings.jsonl", "w") as rankings:
        for chunk in query_chunks(len(queries), len(gallery_owner)):
            scores = image_scores(rank, query_features.numpy(), query_owner.numpy(), chunk,
                                  gallery_owner.numpy(), len(gallery))
            relevant = relevance(queries[chunk.start:chunk.stop], gallery)
            per_query.append(per_query_metrics(scores, relevant, precision_ks=cfg.precision_at,
                                               map_at=cfg.map_at))
            top = np.argsort(-scores, axis=1, kind="stable")[:, :k]   # ties: lower gallery index first
            for q, order, row in zip(queries[chunk.start:chunk.stop], top, scores):
                ranking = [[gallery[g]["key"], float(row[g])] for g in order]
                rankings.write(json.dumps({"query": q["key"], "ins": q["ins"], "ranking": ranking}) + "\n")
    metrics = {key: np.concatenate([m[key] for m in per_query]) for key in per_query[0]}
    results = summarize(metrics, recall_ks=cfg.recall_at)
    results.update(num_gallery_images=len(gallery), num_gallery_rows=len(gallery_owner),
                   features_dir=str(folder), extractor=made_with.extractor, k_search=k)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    write_per_query_csv(out / "per_query.csv", queries, metrics)
    print_table(results)
    print(f"results: {out}")


def query_chunks(num_queries: int, num_rows: int) -> list[range]:
    size = max(1, SCORES_PER_CHUNK // max(1, num_rows))
    return [range(i, min(num_queries, i + size)) for i in range(0, num_queries, size)]


def image_scores(rank: FullRanker, query_features: np.ndarray, query_owner: np.ndarray, chunk: range,
                 gallery_owner: np.ndarray, num_gallery: int) -> np.ndarray:
    """[len(chunk), num_gallery] scores: max over the rows of each gallery image, and over the rows
    of each query (a query with several masks matches an image if any of its vectors does)."""
    rows = np.flatnonzero((query_owner >= chunk.start) & (query_owner < chunk.stop))
    per_row = max_per_image(rank(query_features[rows]), gallery_owner, num_gallery)
    return max_per_image(per_row.T, query_owner[rows] - chunk.start, len(chunk)).T


def relevance(queries: list[dict], gallery: list[dict]) -> np.ndarray:
    """[Q, G] bool: gallery image g contains the instance of query q."""
    holders: dict[int, list[int]] = {}
    for g, image in enumerate(gallery):
        for ins in image["ins"]:
            holders.setdefault(ins, []).append(g)
    relevant = np.zeros((len(queries), len(gallery)), dtype=bool)
    for q, query in enumerate(queries):
        for ins in query["ins"]:
            relevant[q, holders.get(ins, [])] = True
    return relevant


def write_per_query_csv(path: Path, queries: list[dict], metrics: dict[str, np.ndarray]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["query", "ins", "positives", "first_positive_rank", "ap"])
        for i, q in enumerate(queries):
            writer.writerow([q["key"], " ".join(map(str, q["ins"])), int(metrics["num_positives"][i]),
                             int(metrics["first_positive_rank"][i]), f"{metrics['ap'][i]:.6f}"])


def print_table(results: dict) -> None:
    cells = [("mAP", results["mAP"])] + [(f"R@{k}", v) for k, v in results["recall"].items()]
    cells += [(f"P@{k}", v) for k, v in results.get("precision", {}).items()]
    cells += [(key, value) for key, value in results.items() if key.startswith("mAP@")]
    print(" | ".join(f"{name:>7}" for name, _ in cells))
    print(" | ".join(f"{100 * value:7.2f}" for _, value in cells))
    print(f"{results['num_queries']} queries, {results['num_gallery_images']} gallery images (numbers in %)")


if __name__ == "__main__":
    main()
