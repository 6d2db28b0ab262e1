"""Rank the whole gallery for every query and report mAP, Recall@K and P@k at image level.

Scores are exact inner products of the stored features, so the metrics do not depend on the FAISS
index type; with an approximate index (``index=HNSW32`` ...) ``index_recall@k`` reports how many of the
exact top-k rows that index finds.

    python search_index.py features_dir=outputs/features/pe/siglip_mi_features-1a2b3c4d5e k_search=100

Writes to the run folder (printed at the end): results.json, rankings.jsonl, per_query.csv, and
report.html with thumbs/ (``report=false`` turns it off; see utils/report.py).

``T2I=true``: text-to-image retrieval, each query's text is ``text_prompt`` with its ``obj_name``
(SigLIP / CLIP text tower); the same metrics. Your own query, embedded as the folder's queries were
(utils/own_queries.py; no metrics, there is no ground truth)::

    python search_index.py features_dir=... query_image=photo.jpg [query_bbox=[x1,y1,x2,y2]] k_search=20
    python search_index.py features_dir=... query_text="a red mug"
"""
from __future__ import annotations

import contextlib
import csv
import json
import logging
import shutil
from pathlib import Path

import hydra
import numpy as np
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from datasets import Annotation, drop_queries_without_positives, relevance
from utils.config import check_config, register, resolve_aliases
from utils.errors import SoIRError, exit_on_error
from utils.feature_store import FeatureShards
from utils.files import atomic_write_text, read_json
from utils.index_io import index_path, is_exact, load_index, neighbour_recall
from utils.metrics import max_per_image, per_query_metrics, summarize
from utils.own_queries import own_query, text_query_rows
from utils.report import Shown, write_report

log = logging.getLogger("soir.search_index")
register()

SCORES_PER_CHUNK = 1 << 26        # query-chunk size bound: [chunk, gallery rows] float32 = 256 MiB


@hydra.main(version_base="1.3", config_path="configs", config_name="defaults")
@exit_on_error
def main(cfg: DictConfig) -> None:
    resolve_aliases(cfg)
    check_config(cfg)
    if not cfg.features_dir:
        raise SoIRError("features_dir is required: the folder create_index.py printed")
    if cfg.query_image is not None or cfg.query_text is not None:
        own_query(cfg, Path(cfg.features_dir), Path(HydraConfig.get().runtime.output_dir))
        return
    search(cfg, Path(cfg.features_dir), Path(HydraConfig.get().runtime.output_dir))


def search(cfg: DictConfig, folder: Path, out: Path) -> dict:
    """Rank the gallery of features folder ``folder`` for every query; write results to ``out``.

    Also called by create_index.py at the end of its run (unless ``only_create=true``).
    """
    if not (folder / "config.yaml").is_file():
        raise SoIRError(f"{folder} has no config.yaml: not a create_index.py output folder (or its run "
                        "stopped before it began; rerun create_index.py)")
    made_with = OmegaConf.load(folder / "config.yaml")
    splits = {}
    if made_with.get("only_gallery"):
        raise SoIRError(f"{folder} holds a gallery only (made with only_gallery=true); run create_index.py "
                        "without only_gallery to add the queries, then search")
    for name in ("gallery", "queries"):
        listing = folder / name / "images.json"
        if not listing.is_file():
            raise SoIRError(f"{listing} is missing: the extraction did not finish; rerun create_index.py with "
                            "the same settings, it resumes")
        records = read_json(listing, fix="rerun create_index.py with the same settings")
        shards = FeatureShards(folder / name, records, made_with.shard_size)
        features, owner, _ = shards.load()
        rows = {"features": features.numpy(), "mask_index": shards.column("mask_index").numpy()}
        splits[name] = keep_images_with_rows(records, owner.numpy(), rows, name)
    (gallery, gallery_owner, gallery_rows), (queries, query_owner, query_rows) = splits.values()
    gallery_features, query_features = gallery_rows["features"], query_rows["features"]
    index = None
    if index_path(folder, cfg.index).is_file() or not made_with.get("no_faiss"):
        index = load_index(index_path(folder, cfg.index))
        if index.ntotal != len(gallery_owner):
            raise SoIRError(f"{index_path(folder, cfg.index)} has {index.ntotal} rows, the gallery shards "
                            f"{len(gallery_owner)}; rerun create_index.py")
    query_anns, gallery_anns = as_annotations(queries, True), as_annotations(gallery, False)
    kept = drop_queries_without_positives(query_anns, gallery_anns, cfg.no_positive)
    if len(kept) < len(query_anns):
        queries, query_owner, query_rows = select_images(queries, query_owner, query_rows, [q.key for q in kept])
        query_features, query_anns = query_rows["features"], kept
    if cfg.T2I:       # the queries' texts replace their image vectors; ground truth and gallery unchanged
        query_features, query_owner, texts = text_query_rows(cfg, folder, made_with, queries, gallery_features.shape[1])
        queries = [{**q, "text": t} for q, t in zip(queries, texts)]
    log.info("%s: %d queries x %d gallery images (%d rows), extractor %s", folder, len(queries),
             len(gallery), len(gallery_owner), made_with.extractor)

    out.mkdir(parents=True, exist_ok=True)
    shutil.copy(folder / "config.yaml", out / "features_config.yaml")
    k = min(cfg.k_search, cfg.max_k_search, len(gallery))
    per_query: list[dict[str, np.ndarray]] = []
    shown: list[Shown] = []
    with open(out / "rankings.jsonl", "w") if cfg.save_knns else contextlib.nullcontext() as rankings:
        for chunk in query_chunks(len(queries), len(gallery_owner)):
            scores = image_scores(query_features, query_owner, chunk, gallery_features, gallery_owner, len(gallery))
            relevant = relevance(query_anns[chunk.start:chunk.stop], gallery_anns)
            per_query.append(per_query_metrics(scores, relevant, precision_ks=cfg.precision_at,
                                               map_at=cfg.map_at))
            top = np.argsort(-scores, axis=1, kind="stable")[:, :max(k, cfg.report_k)]   # ties: lower index first
            if cfg.report:
                shown.append(Shown.top(top[:, :cfg.report_k], scores, relevant))
            for q, order, row in zip(queries[chunk.start:chunk.stop], top, scores) if cfg.save_knns else ():
                ranking = [[gallery[g]["key"], float(row[g])] for g in order[:k]]
                text = {"text": q["text"]} if cfg.T2I else {}
                rankings.write(json.dumps({"query": q["key"], "ins": q["ins"], **text, "ranking": ranking}) + "\n")
    metrics = {key: np.concatenate([m[key] for m in per_query]) for key in per_query[0]}
    results = summarize(metrics, recall_ks=cfg.recall_at, no_positive=cfg.no_positive)
    results.update(num_gallery_images=len(gallery), num_gallery_rows=len(gallery_owner),
                   features_dir=str(folder), extractor=made_with.extractor, k_search=k, index=cfg.index)
    if cfg.T2I:
        results.update(T2I=True, text_prompt=cfg.text_prompt)
    if index is not None and not is_exact(index):
        # Metrics above are exact (every gallery image scored); this says what the index would lose.
        results[f"index_recall@{k}"] = index_recall(index, query_features, gallery_features, k)
    atomic_write_text(out / "results.json", json.dumps(results, indent=1))
    write_per_query_csv(out / "per_query.csv", queries, metrics)
    print_table(results)
    if cfg.report:
        shown = Shown.concat(shown)
        shown.rows = best_rows(query_features, query_owner, gallery_features, gallery_owner,
                               shown.pairs()).reshape(shown.gallery.shape)
        report = write_report(out, cfg, folder, results, metrics, shown, queries, gallery,
                              gallery_rows["mask_index"], gallery_features)
        print(f"report: {report}")
    print(f"results: {out}")
    return results


def keep_images_with_rows(records: list[dict], owner: np.ndarray, rows: dict[str, np.ndarray],
                          split: str) -> tuple[list[dict], np.ndarray, dict[str, np.ndarray]]:
    """Leave out the images that own no rows (their pixels could not be decoded, bad_images=skip;
    logged with the count), renumbering ``owner``; ``rows`` holds per-row arrays (features, ...)."""
    has_rows = np.bincount(owner, minlength=len(records)) > 0
    if has_rows.all():
        return records, owner, rows
    log.warning("%d %s images have no features (unreadable, bad_images=skip) and are left out of the "
                "evaluation: %s", int((~has_rows).sum()), split,
                [r["key"] for r, ok in zip(records, has_rows) if not ok][:10])
    return select_images(records, owner, rows, [r["key"] for r, ok in zip(records, has_rows) if ok])


def select_images(records: list[dict], owner: np.ndarray, rows: dict[str, np.ndarray],
                  keys: list[str]) -> tuple[list[dict], np.ndarray, dict[str, np.ndarray]]:
    """The images named by ``keys`` (in record order) and their rows, with ``owner`` renumbered."""
    wanted = set(keys)
    keep = np.array([r["key"] in wanted for r in records], dtype=bool)
    new_index = np.cumsum(keep) - 1
    kept_rows = keep[owner]
    return ([r for r, k in zip(records, keep) if k], new_index[owner[kept_rows]],
            {name: values[kept_rows] for name, values in rows.items()})


def index_recall(index, query_features: np.ndarray, gallery_features: np.ndarray, k: int) -> float:
    """Neighbour recall@k of ``index`` over all query rows, against exact top-k rows (in chunks)."""
    hits = 0.0
    for chunk in query_chunks(len(query_features), len(gallery_features)):
        queries = query_features[chunk.start:chunk.stop]
        exact_top = np.argpartition(-(queries @ gallery_features.T), k - 1, axis=1)[:, :k]
        hits += neighbour_recall(index, queries, exact_top) * len(queries)
    return hits / len(query_features)


def query_chunks(num_queries: int, num_rows: int) -> list[range]:
    size = max(1, SCORES_PER_CHUNK // max(1, num_rows))
    return [range(i, min(num_queries, i + size)) for i in range(0, num_queries, size)]


def image_scores(query_features: np.ndarray, query_owner: np.ndarray, chunk: range,
                 gallery_features: np.ndarray, gallery_owner: np.ndarray, num_gallery: int) -> np.ndarray:
    """Exact [len(chunk), num_gallery] scores (inner products of unit vectors): max over the rows of
    each gallery image, and over the rows of each query (a query with several masks matches an image
    if any of its vectors does)."""
    rows = np.flatnonzero((query_owner >= chunk.start) & (query_owner < chunk.stop))
    per_row = max_per_image(query_features[rows] @ gallery_features.T, gallery_owner, num_gallery)
    return max_per_image(per_row.T, query_owner[rows] - chunk.start, len(chunk)).T


def best_rows(query_features: np.ndarray, query_owner: np.ndarray, gallery_features: np.ndarray,
              gallery_owner: np.ndarray, pairs: np.ndarray) -> np.ndarray:
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


def rows_by_owner(owner: np.ndarray) -> list[np.ndarray]:
    """Row ids of each image, in row order: ``[rows of image 0, rows of image 1, ...]``."""
    order = np.argsort(owner, kind="stable")
    return np.split(order, np.cumsum(np.bincount(owner))[:-1])


def as_annotations(records: list[dict], is_query: bool) -> list[Annotation]:
    """The ``images.json`` records written by create_index.py, back as annotations."""
    return [Annotation(key=r["key"], file=Path(r["file"]), ins=tuple(r["ins"]), is_query=is_query,
                       bbox=r["bbox"] and tuple(r["bbox"]), obj_name=r["obj_name"]) for r in records]


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
