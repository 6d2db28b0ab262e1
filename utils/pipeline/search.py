"""search_index.py's work: rank the whole gallery of a features folder for every query (utils/retrieval/
ranking.py) and write results.json, rankings.jsonl, per_query.csv and the report (utils/results/report.py);
:func:`run` also answers a user's own query (utils/queries/own_queries.py)."""

from __future__ import annotations

import csv
import json
import logging
import shutil
from pathlib import Path

import numpy as np
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from utils.errors import SoIRError
from utils.files import atomic_write_text, check_run_folder, read_json
from utils.queries.own_queries import own_query, text_query_rows
from utils.results.interop import LanceDBGallery, lancedb_folder
from utils.results.report import Shown, write_report
from utils.retrieval.feature_store import FeatureShards
from utils.retrieval.metrics import summarize
from utils.retrieval.ranking import rank_in_ram, rank_streamed

log = logging.getLogger("soir.search_index")


def run(cfg: DictConfig) -> None:
    """search_index.py with checked settings: a user's own query (``query_image`` / ``query_text``), or
    the evaluation of every query of ``features_dir``, written to Hydra's run folder."""
    if not cfg.features_dir:
        raise SoIRError("features_dir is required: the folder create_index.py printed")
    out = Path(HydraConfig.get().runtime.output_dir)
    if cfg.query_image is not None or cfg.query_text is not None:
        own_query(cfg, Path(cfg.features_dir), out)
        return
    search(cfg, Path(cfg.features_dir), out)


def search(cfg: DictConfig, folder: Path, out: Path) -> dict:
    """Rank the gallery of features folder ``folder`` for every query; write results to ``out``.

    Also called by create_index.py at the end of its run (unless ``only_create=true``) and by its
    ``stage=search``. The gallery is scored in RAM when its features fit ``search_block_mb``, else
    streamed from its shards; ``search=faiss`` ranks FAISS's candidates (see the module doc).
    ``out`` is claimed first (utils.files.check_run_folder): another run's or a user's files
    there are never replaced.
    """
    check_run_folder(out)
    if not (folder / "config.yaml").is_file():
        raise SoIRError(
            f"{folder} has no config.yaml: not a create_index.py output folder (or its run "
            "stopped before it began; rerun create_index.py)"
        )
    made_with = OmegaConf.load(folder / "config.yaml")
    if made_with.get("only_gallery"):
        raise SoIRError(
            f"{folder} holds a gallery only (made with only_gallery=true); run create_index.py "
            "without only_gallery to add the queries, then search"
        )
    shards = {}
    for name in ("gallery", "queries"):
        listing = folder / name / "images.json"
        if not listing.is_file():
            raise SoIRError(
                f"{listing} is missing: the extraction did not finish; rerun create_index.py with the "
                "same settings, it resumes"
            )
        records = read_json(listing, fix="rerun create_index.py with the same settings")
        shards[name] = FeatureShards(folder / name, records, made_with.shard_size)
        shards[name].check_complete()
    gallery_bytes = shards["gallery"].row_offsets()[-1] * made_with.vec_dim * 4
    texts = (lambda queries, dim: text_queries(cfg, folder, made_with, queries, dim)) if cfg.T2I else None
    if cfg.search == "lancedb":  # scores from the LanceDB table; the features are read for the report
        if gallery_bytes > cfg.search_block_mb * 2**20:
            log.warning(
                "search=lancedb reads the gallery's %.0f MiB of features into RAM (for the report and the best "
                "rows), beyond search_block_mb=%s; search=exact streams them",
                gallery_bytes / 2**20,
                cfg.search_block_mb,
            )
        lance = LanceDBGallery(lancedb_folder(cfg, folder), folder)
        ranked = rank_in_ram(cfg, folder, shards["gallery"], shards["queries"], texts, lance)
    elif cfg.search == "faiss" or gallery_bytes > cfg.search_block_mb * 2**20:
        ranked = rank_streamed(cfg, folder, shards["gallery"], shards["queries"], texts)
    else:
        ranked = rank_in_ram(cfg, folder, shards["gallery"], shards["queries"], texts)
    log.info(
        "%s: %d queries x %d gallery images (%d rows), extractor %s, %s",
        folder,
        len(ranked.queries),
        len(ranked.gallery),
        ranked.num_rows,
        made_with.extractor,
        {"faiss": "FAISS candidates", "lancedb": "LanceDB table"}.get(cfg.search)
        or ("streamed" if ranked.streamed else "in RAM"),
    )

    out.mkdir(parents=True, exist_ok=True)
    shutil.copy(folder / "config.yaml", out / "features_config.yaml")
    k = min(cfg.k_search, cfg.max_k_search, len(ranked.gallery))
    if cfg.save_knns:
        with open(out / "rankings.jsonl", "w") as rankings:
            for q, order, row in zip(ranked.queries, ranked.top[:, :k], ranked.top_scores[:, :k]):
                ranking = [[ranked.gallery[g]["key"], float(v)] for g, v in zip(order, row) if g >= 0]
                text = {"text": q["text"]} if cfg.T2I else {}
                rankings.write(json.dumps({"query": q["key"], "ins": q["ins"], **text, "ranking": ranking}) + "\n")
    results = summarize(ranked.metrics, recall_ks=cfg.recall_at, no_positive=cfg.no_positive)
    results.update(
        num_gallery_images=len(ranked.gallery),
        num_gallery_rows=ranked.num_rows,
        features_dir=str(folder),
        extractor=made_with.extractor,
        k_search=k,
        index=cfg.index,
        search=str(cfg.search),
        rerank=str(cfg.rerank),
        **({} if cfg.rerank == "none" else {"rerank_k": cfg.rerank_k, "rerank_alpha": cfg.rerank_alpha}),
        **ranked.results,
    )
    if cfg.T2I:
        results.update(T2I=True, text_prompt=cfg.text_prompt)
    # The settings that produced these numbers: the command line's overrides and the resolved config
    # (of this search; the features' own are in features_config.yaml beside it).
    overrides = list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
    results.update(overrides=overrides, settings=OmegaConf.to_container(cfg, resolve=True))
    atomic_write_text(out / "results.json", json.dumps(results, indent=1))
    write_per_query_csv(out / "per_query.csv", ranked.queries, ranked.metrics)
    print_table(results)
    if cfg.report:
        report_k = min(cfg.report_k, ranked.shown_k())
        shown = Shown(ranked.top[:, :report_k], ranked.top_scores[:, :report_k], ranked.positive[:, :report_k])
        shown.rows = ranked.best_rows(shown.pairs()).reshape(shown.gallery.shape)
        report = write_report(
            out,
            cfg,
            folder,
            results,
            ranked.metrics,
            shown,
            ranked.queries,
            ranked.gallery,
            ranked.mask_index,
            ranked.gallery_features,
        )
        print(f"report: {report}")
    print(f"results: {out}")
    return results


def text_queries(
    cfg: DictConfig, folder: Path, made_with: DictConfig, queries: list[dict], dim: int
) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """T2I: the queries' text vectors [Q, D], owner [Q] and records with their ``text``
    (utils/queries/own_queries.py); ``made_with``: the features folder's config.yaml, as loaded."""
    features, owner, texts = text_query_rows(cfg, folder, made_with, queries, dim)
    return features, owner, [{**q, "text": t} for q, t in zip(queries, texts)]


def write_per_query_csv(path: Path, queries: list[dict], metrics: dict[str, np.ndarray]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["query", "ins", "positives", "first_positive_rank", "ap"])
        for i, q in enumerate(queries):
            writer.writerow(
                [
                    q["key"],
                    " ".join(map(str, q["ins"])),
                    int(metrics["num_positives"][i]),
                    int(metrics["first_positive_rank"][i]),
                    f"{metrics['ap'][i]:.6f}",
                ]
            )


def print_table(results: dict) -> None:
    lower = results.get("mAP_is_lower_bound", False)
    cells = [("mAP(lb)" if lower else "mAP", results["mAP"])] + [(f"R@{k}", v) for k, v in results["recall"].items()]
    cells += [(f"P@{k}", v) for k, v in results.get("precision", {}).items()]
    cells += [(key, value) for key, value in results.items() if key.startswith("mAP@")]
    print(" | ".join(f"{name:>7}" for name, _ in cells))
    print(" | ".join(f"{100 * value:7.2f}" for _, value in cells))
    print(f"{results['num_queries']} queries, {results['num_gallery_images']} gallery images (numbers in %)")
    if lower:
        print(
            f"search=faiss: ranked among FAISS's candidates only, which hold "
            f"{100 * results['candidate_coverage']:.2f}% "
            "of the positives; mAP (lb) is a lower bound of the full-gallery mAP"
        )
