"""create_index.py's work: extract gallery and query descriptors to disk (resumable shards) and build a
FAISS index (the CLI, ``create_index.py``, parses the settings and calls :data:`STAGES`).

Order of work, so that mistakes cost seconds, not hours: (1) :func:`plan` reads and checks every input that
needs no model (annotations, masks, image headers, boxes, the index string); (2) :func:`plan_and_load` loads
the model and computes the identities (:func:`feature_identity`); (3) the features folder is claimed and
locked, and must hold nothing made with another identity; (4) :func:`extract_split` /
:func:`extract_shard` extract the missing shards; (5) the index is built (``build_index`` + ``save_index``
with ``stage=all``; :func:`build_gallery_index`, in blocks on disk, with ``stage=index``).

``stage=all`` (:func:`run_all`) does all of it in one process, then searches (utils/pipeline/search.py).
For galleries that need many processes the same work is split into :func:`prepare`, :func:`extract`
(``workers=W worker=w``), :func:`build` and :func:`search_stage` (docs/scaling-out.md).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path

import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader
from tqdm import tqdm

from datasets import (
    annotation_masks,
    drop_queries_without_positives,
    load_anns,
    load_captions,
    select_indices,
    select_set,
    split,
)
from datasets.captions import without_original_masks
from datasets.extraction import (
    ImageJob,
    ViewDataset,
    check_jobs,
    gallery_jobs,
    job_from_dict,
    job_to_dict,
    jobs_digest,
    query_jobs,
    with_crop_geometry,
)
from datasets.images import image_facts
from datasets.tar_shards import is_tar_spec, unpacked_galleries
from extractors import capabilities, extractor_from_config
from utils.config import (
    QUERY_KEYS,
    RUN_KEYS,
    run_label,
)
from utils.errors import SoIRError
from utils.families import lora_families
from utils.files import (
    FolderLock,
    atomic_write_json,
    cached_sha256,
    check_identity,
    check_run_folder,
    folder_kind,
    read_json,
    remove_stale_temporaries,
)
from utils.pipeline.search import search
from utils.processes import worker_init_fn
from utils.retrieval.feature_store import FeaturesFolder, FeatureShards, write_bad_images
from utils.retrieval.index_build import build_ondisk, shard_blocks
from utils.retrieval.index_io import build_index, check_factory, index_path, is_ivf, save_index

log = logging.getLogger("soir.create_index")


def run_all(cfg: DictConfig) -> None:
    """``stage=all``: every step in this process, then the search (unless only_create / only_gallery)."""
    started = time.time()
    if not (cfg.only_create or cfg.only_gallery):  # refused now, not after the extraction
        check_run_folder(Path(HydraConfig.get().runtime.output_dir))
    jobs, facts, skipped, extractors, out, identities = plan_and_load(cfg)
    with FeaturesFolder(out).open(*identities, OmegaConf.to_yaml(cfg, resolve=True)):
        write_bad_images(out, skipped)
        atomic_write_json(out / "sources.json", sources(cfg))
        stats, rows = {}, {}
        for name, split_jobs in jobs.items():
            shards = FeatureShards(out / name, [record(job.annotation) for job in split_jobs], cfg.shard_size)
            extract_split(name, shards, split_jobs, extractors[name], cfg)
            features, _, stats[name] = shards.load()
            rows[name] = len(features)
            if name == "gallery" and not cfg.no_faiss:
                save_index(build_index(features.numpy(), cfg.index), index_path(out, cfg.index))
        summary = dict(
            features_dir=str(out),
            gallery_images=len(jobs["gallery"]),
            gallery_rows=rows["gallery"],
            queries=len(jobs.get("queries", [])),
            skipped_bad_images=len(skipped),
            gallery_counts=stats["gallery"],
            query_counts=stats.get("queries", {}),
        )
        summary = write_summary(out, summary, "all", time.time() - started)
    log.info("done: %s", json.dumps(summary))
    print(f"features{'' if cfg.no_faiss else ' and index'}: {out}\nsearch: python search_index.py features_dir={out}")
    if cfg.only_create or cfg.only_gallery:
        return
    # As the original: the search runs at the end of create_index.py unless only_create=true.
    search(cfg, out, Path(HydraConfig.get().runtime.output_dir))


def write_summary(out: Path, summary: dict, stage: str, seconds: float) -> dict:
    """Write ``out/summary.json``: ``summary`` (the folder's counts, as of this run) and ``runs``, one
    entry per run that wrote it (stage, finish time UTC, seconds), this one appended to those of the
    summary already there; ``seconds`` is their sum. A resumed run so adds its time to the killed
    one's instead of replacing it (a summary written before ``runs`` existed counts as one run).
    Call under the folder's lock. Returns what was written."""
    previous = (
        read_json(out / "summary.json", fix="delete it; the next run writes it again")
        if (out / "summary.json").is_file()
        else {}
    )
    runs = previous.get("runs") or ([{"seconds": previous["seconds"]}] if "seconds" in previous else [])
    finished = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    runs = [*runs, {"stage": stage, "finished": finished, "seconds": round(seconds, 1)}]
    summary = {**summary, "seconds": round(sum(run["seconds"] for run in runs), 1), "runs": runs}
    atomic_write_json(out / "summary.json", summary)
    return summary


def plan_and_load(cfg: DictConfig) -> tuple[dict[str, list[ImageJob]], dict, list, dict, Path, tuple[dict, dict]]:
    """:func:`plan`, then the extractors (gallery, queries), the features folder and its two identities
    (gallery, queries)."""
    jobs, facts, skipped = plan(cfg)
    extractor = extractor_from_config(cfg)
    extractors = {"gallery": extractor, "queries": query_extractor(cfg, extractor)}
    log.info(
        "%s (%s, %d-d) on %s: %d queries, %d gallery images",
        cfg.extractor,
        extractor.model_name,
        extractor.dim,
        extractor.device,
        len(jobs.get("queries", [])),
        len(jobs["gallery"]),
    )
    gallery_identity = feature_identity(cfg, extractor, jobs["gallery"], facts, queries=False)
    query_identity = {
        **gallery_identity,
        **feature_identity(cfg, extractors["queries"], jobs.get("queries", []), facts, queries=True),
    }
    out = Path(cfg.features_dir) if cfg.features_dir else default_features_dir(cfg, gallery_identity)
    return jobs, facts, skipped, extractors, out, (gallery_identity, query_identity)


# ---------------------------------------------------------------------------------------------------
# Stages for many processes
# ---------------------------------------------------------------------------------------------------
def prepare(cfg: DictConfig) -> None:
    """``stage=prepare``: every input checked and hashed (once, here), the folder claimed under its
    lock, its identity, ``images.json`` and the per-shard job files written. Loads the model for its
    identity (weights, preprocessing, device): run it with the workers' settings and device type."""
    jobs, facts, skipped, extractors, out, identities = plan_and_load(cfg)
    with FeaturesFolder(out).open(*identities, OmegaConf.to_yaml(cfg, resolve=True)):
        write_bad_images(out, skipped)
        atomic_write_json(out / "sources.json", sources(cfg))
        for name, split_jobs in jobs.items():
            shards = FeatureShards(out / name, [record(job.annotation) for job in split_jobs], cfg.shard_size)
            shards.prepare()
            # Each job carries its image's sha256 as hashed here: the later stages check it (see
            # verify_prepared_images), so an image edited after prepare never gets features under the
            # folder's gallery_sha256.
            shards.write_jobs([{**job_to_dict(job), "sha256": facts[job.annotation.key].sha256} for job in split_jobs])
            log.info(
                "%s: %d images in %d shards, %d missing",
                name,
                shards.num_images,
                shards.num_shards,
                len(shards.missing()),
            )
    print(
        f"prepared: {out}\nnext: python create_index.py <the same settings> stage=extract features_dir={out} "
        f"[-m workers=W 'worker=range(0,W)' hydra/launcher=submitit_slurm ...], then stage=index, stage=search"
    )


def extract(cfg: DictConfig) -> None:
    """``stage=extract``: worker ``worker`` of ``workers`` computes the missing shards ``s`` with
    ``s % workers == worker`` of each split that ``stage=prepare`` wrote. Takes no lock (many workers
    write one folder; each shard file is written atomically under a host+pid temporary name) and checks
    the folder's identity read-only: the same settings, model and device as ``stage=prepare``.

    An image whose pixels cannot be decoded is recorded in its shard (``failed``, ``stat.bad_images``)
    and the worker goes on, whatever ``bad_images`` says: a dead array task would cost the rest of its
    shards. ``stage=index`` refuses such a gallery under ``bad_images=error``."""
    out = Path(cfg.features_dir)
    extractor = extractor_from_config(cfg)
    extractors = {"gallery": extractor, "queries": query_extractor(cfg, extractor)}
    splits = prepared_splits(out)
    check_prepared_identity(out, cfg, extractors, splits)
    for name, shards in splits.items():
        todo = [s for s in shards.missing() if s % cfg.workers == cfg.worker]
        log.info(
            "%s: worker %d of %d: %d shards to compute (%d of %d missing in all)",
            name,
            cfg.worker,
            cfg.workers,
            len(todo),
            len(shards.missing()),
            shards.num_shards,
        )
        progress = tqdm(total=sum(len(shards.image_range(s)) for s in todo), desc=name, unit="img")
        for shard in todo:
            lines = shards.read_jobs(shard)
            verify_prepared_images(lines)
            jobs = [job_from_dict(line["record"], line["job"], is_query=name == "queries") for line in lines]
            extract_shard(shards, shard, jobs, extractors[name], cfg, progress, record_bad_pixels=True)
        progress.close()
    left = {name: len(shards.missing()) for name, shards in splits.items()}
    print(f"worker {cfg.worker} of {cfg.workers} done; shards still missing (other workers): {left}")


def prepared_splits(out: Path) -> dict[str, FeatureShards]:
    """The splits ``stage=prepare`` wrote into ``out`` (gallery, and queries unless only_gallery)."""
    if folder_kind(out) != "features" or not (out / "identity.json").is_file():
        raise SoIRError(
            f"{out} is not a prepared features folder; run create_index.py stage=prepare with the same "
            "settings first (it prints the features_dir)"
        )
    return {
        name: FeatureShards.prepared(out / name)
        for name in ("gallery", "queries")
        if name == "gallery" or (out / name / "jobs.json").is_file()
    }


def verify_prepared_images(lines: list[dict]) -> None:
    """The images of one shard's job lines (``stage=prepare``'s ``jobs-<shard>.jsonl``) still have the
    bytes prepare hashed (through the file-facts cache: a stat per unchanged image).

    Raises:
        SoIRError: naming the first changed image; its features would not match the folder's identity.
    """
    files = [Path(line["record"]["file"]) for line in lines]
    try:
        now = cached_sha256(files)
    except OSError as err:
        raise SoIRError(
            f"{err.filename}: cannot be read since stage=prepare ({err.strerror}); restore it, or run every "
            "stage again with a new features_dir"
        ) from None
    for file, line, sha in zip(files, lines, now):
        if "sha256" not in line["job"]:
            raise SoIRError(
                f"the job files of {file} hold no image hashes (prepared by an older SoIR); rerun "
                "create_index.py stage=prepare with the same settings"
            )
        if line["job"]["sha256"] != sha:
            raise SoIRError(
                f"{file} changed since stage=prepare (its sha256 differs from the one in the folder's identity); "
                "restore it, or run every stage again with a new features_dir"
            )


def verify_all_prepared_images(splits: dict[str, FeatureShards]) -> None:
    """:func:`verify_prepared_images` for every shard of every split (stage=index, stage=search)."""
    for shards in splits.values():
        for shard in range(shards.num_shards):
            verify_prepared_images(shards.read_jobs(shard))


def check_prepared_identity(out: Path, cfg: DictConfig, extractors: dict, splits: dict[str, FeatureShards]) -> None:
    """Refuse a worker whose settings or model differ from the folder's (what ``stage=prepare`` saved);
    the inputs' digests, hashed by prepare, are taken from the saved identities (a worker hashes nothing)."""
    fix = "run every stage with the settings (and model, device type) of stage=prepare"
    saved = read_json(out / "identity.json", fix="rerun stage=prepare")
    gallery = {
        **settings_identity(cfg, extractors["gallery"], queries=False),
        "gallery_sha256": saved.get("gallery_sha256"),
    }
    check_identity(out / "identity.json", gallery, "features", fix=fix, save=False)
    if "queries" in splits:
        saved = read_json(out / "queries" / "identity.json", fix="rerun stage=prepare")
        queries = {
            **gallery,
            **settings_identity(cfg, extractors["queries"], queries=True),
            "queries_sha256": saved.get("queries_sha256"),
        }
        check_identity(out / "queries" / "identity.json", queries, "query features", fix=fix, save=False)


def build(cfg: DictConfig) -> None:
    """``stage=index``: after every shard is extracted, one process (under the folder's lock) builds
    the FAISS index and writes ``summary.json``. IVF indexes are built without holding the gallery in RAM
    (utils/retrieval/index_build.py: trained on ``index_train_rows`` sampled rows, added in ``index_blocks``
    resumable blocks, merged on disk); other factories (Flat, HNSW) are built in RAM, as stage=all does."""
    started = time.time()
    out = Path(cfg.features_dir)
    splits = prepared_splits(out)
    with FolderLock(out):
        remove_stale_temporaries(out)  # of a killed stage=index (an index written half)
        verify_all_prepared_images(splits)
        stats = {name: shards.stats() for name, shards in splits.items()}  # every shard must exist
        refuse_undecodable(cfg, splits, stats)
        gallery = splits["gallery"]
        offsets = gallery.row_offsets()
        if not cfg.no_faiss:
            build_gallery_index(cfg, gallery, out)
        skipped = (out / "bad_images.txt").read_text().splitlines() if (out / "bad_images.txt").is_file() else []
        summary = dict(
            features_dir=str(out),
            gallery_images=gallery.num_images,
            gallery_rows=offsets[-1],
            queries=splits["queries"].num_images if "queries" in splits else 0,
            skipped_bad_images=len(skipped),
            gallery_counts=stats["gallery"],
            query_counts=stats.get("queries", {}),
        )
        summary = write_summary(out, summary, "index", time.time() - started)
    log.info("done: %s", json.dumps(summary))
    print(f"features{'' if cfg.no_faiss else ' and index'}: {out}\nsearch: python search_index.py features_dir={out}")


def refuse_undecodable(cfg: DictConfig, splits: dict[str, FeatureShards], stats: dict[str, dict]) -> None:
    """Under ``bad_images=error``, images whose pixels the workers could not decode are an error here."""
    if cfg.bad_images != "error" or not any(s.get("bad_images") for s in stats.values()):
        return
    keys = [
        f"{name}/{shards.records[i]['key']}"
        for name, shards in splits.items()
        if stats[name].get("bad_images")
        for i in shards.failed_images()
    ]
    raise SoIRError(
        f"{len(keys)} images could not be decoded at extraction (first: {keys[:5]}); fix or remove them, "
        "delete their shards and rerun stage=prepare and stage=extract, or set bad_images=skip"
    )


def build_gallery_index(cfg: DictConfig, gallery: FeatureShards, out: Path) -> None:
    """The index of ``cfg.index`` over the gallery rows, at ``utils.retrieval.index_io.index_path``
    (see :func:`build`)."""
    path = index_path(out, cfg.index)
    if not is_ivf(cfg.index, cfg.vec_dim):
        log.info("index=%s is not an IVF: built in RAM from all gallery rows (an IVF is built in blocks)", cfg.index)
        save_index(build_index(gallery.load()[0].numpy(), cfg.index), path)
        return
    rows = gallery.row_offsets()[-1]
    blocks = len(shard_blocks(gallery.num_shards, cfg.index_blocks or -(-rows // 1_000_000)))
    work = path.with_name(path.stem + "-blocks")
    # The trained index and the blocks are reused by a rerun: only with the settings they were made with.
    check_identity(
        work / "identity.json",
        {"index": cfg.index, "index_train_rows": cfg.index_train_rows, "blocks": blocks},
        "index blocks",
        fix=f"delete {work}",
    )
    build_ondisk(gallery, cfg.index, path, work, blocks, cfg.index_train_rows)
    log.info(
        "%s: %d rows in %d blocks, merged on disk (%s)", path.name, rows, blocks, path.with_suffix(".ivfdata").name
    )


def search_stage(cfg: DictConfig) -> None:
    """``stage=search``: what search_index.py does, after checking that no image changed since stage=prepare."""
    verify_all_prepared_images(prepared_splits(Path(cfg.features_dir)))
    search(cfg, Path(cfg.features_dir), Path(HydraConfig.get().runtime.output_dir))


def query_extractor(cfg: DictConfig, gallery_extractor):
    """The gallery's extractor, or ``query_extractor`` (with ``query_extractor_args``): another
    registered extractor for the queries, which must embed into the same space (checked: same dim)."""
    if not cfg.query_extractor or cfg.only_gallery:
        return gallery_extractor
    args = OmegaConf.to_container(cfg.query_extractor_args) if cfg.query_extractor_args else {}
    extractor = extractor_from_config(cfg, cfg.query_extractor, args)
    if extractor.dim != gallery_extractor.dim:
        raise SoIRError(
            f"query_extractor={cfg.query_extractor} embeds into {extractor.dim}-d, the gallery's "
            f"{cfg.extractor} into {gallery_extractor.dim}-d: they cannot be compared"
        )
    log.info("queries: %s (%s), gallery: %s", cfg.query_extractor, extractor.model_name, cfg.extractor)
    return extractor


def refuse_queries_in_gallery(queries: list, gallery: list, facts: dict, anns_file: str) -> None:
    """A query whose image bytes are also a gallery image's (the same file under two keys, a symlink, a
    copy) would retrieve itself and inflate every metric: an error, naming the pairs."""
    gallery_by_sha = {facts[a.key].sha256: a.key for a in gallery if facts[a.key].sha256}
    pairs = [(q.key, gallery_by_sha[facts[q.key].sha256]) for q in queries if facts[q.key].sha256 in gallery_by_sha]
    if pairs:
        listed = "; ".join(f"query {q} = gallery {g}" for q, g in pairs[:5])
        raise SoIRError(
            f"{anns_file}: {len(pairs)} queries are also gallery images (the same bytes), so they would "
            f"retrieve themselves: {listed}; remove one of each pair from the anns file"
        )


def plan(cfg: DictConfig) -> tuple[dict[str, list[ImageJob]], dict, list[tuple[str, str, str]]]:
    """Every input that needs no model, read and checked: the jobs of each split, the images' facts
    (sha256, size) by key, and the images left out under bad_images=skip."""
    for name in {cfg.extractor, cfg.query_extractor or cfg.extractor}:
        if cfg.lora_adapt and not capabilities(name)["supports_lora"]:
            raise SoIRError(
                f"lora_adapt=true: {name} has no LoRA support; LoRA adapters exist for the families "
                f"{', '.join(lora_families())} (their _features / _mi_features extractors)"
            )
    if OmegaConf.is_missing(cfg, "anns_file") or not cfg.anns_file:
        raise SoIRError("anns_file= is required: the anns.pt that lists the queries and the gallery")
    # webdataset tar shards: unpacked once (resumable) into a SoIR-owned folder that then acts as the images folder
    galleries_dir = unpacked_galleries(cfg.galleries_dir) if is_tar_spec(cfg.galleries_dir) else cfg.galleries_dir
    anns = load_anns(cfg.anns_file, galleries_dir, cfg.queries_dir, duplicates=cfg.duplicates)
    anns = select_indices(select_set(anns, cfg.set), cfg.ds_inds_file, cfg.max_ds_index)
    queries, gallery = split(anns)
    query_crop = None if cfg.no_query_crop else "tight" if cfg.crop else "square"
    query_masks = "zeroed" if cfg.mask_input else "unmasked" if cfg.query_mi else None
    if cfg.masks_from == "anns":  # the annotations' own masks (queries' only when they use masks)
        captions = annotation_masks(gallery + (queries if query_masks else []), cfg.box_masks)
        source = f"{cfg.anns_file} (masks_from=anns{'' if cfg.box_masks else '; box_masks=true uses boxes'})"
    else:
        captions = load_captions(cfg.captions_file) if cfg.captions_file else None
        source = cfg.captions_file or "no captions_file given"
    query_captions = load_captions(cfg.query_captions_file) if cfg.query_captions_file else captions
    if cfg.masks_rle == "ignore":
        captions = captions and without_original_masks(captions, source)
        query_captions = query_captions and without_original_masks(query_captions, cfg.query_captions_file or source)
    uses_masks = capabilities(cfg.extractor)["uses_masks"] and cfg.global_features
    if not uses_masks and captions is not None:
        log.warning("the masks (%s) are not used by %s (whole-image embeddings)", source, cfg.extractor)
    if query_masks and not capabilities(cfg.query_extractor or cfg.extractor)["uses_masks"]:
        raise SoIRError(
            f"mask_input / query_mi describe queries by Mask Inversion; "
            f"{cfg.query_extractor or cfg.extractor} is not an MI extractor"
        )
    facts = dict(zip((a.key for a in anns), image_facts([a.file for a in anns])))
    if not cfg.only_gallery:
        refuse_queries_in_gallery(queries, gallery, facts, cfg.anns_file)
    jobs, skipped = {}, []
    wanted = gallery_jobs(
        gallery, captions, uses_masks, cfg.missing_masks, source, crop=query_crop if cfg.gallery_crop else None
    )
    wanted = with_crop_geometry(wanted, cfg.pixel_geometry)
    jobs["gallery"], bad = check_jobs(wanted, [facts[a.key] for a in gallery], "gallery", cfg.bad_images)
    skipped += bad
    if not cfg.only_gallery:
        # A skipped gallery image may have been a query's only positive: the positive policy comes after.
        kept_gallery = [job.annotation for job in jobs["gallery"]]
        queries = drop_queries_without_positives(queries, kept_gallery, cfg.no_positive)
        wanted = query_jobs(queries, query_captions, query_crop, query_masks, cfg.query_masks == "all", cfg.anns_file)
        wanted = with_crop_geometry(wanted, cfg.pixel_geometry)
        jobs["queries"], bad = check_jobs(wanted, [facts[j.annotation.key] for j in wanted], "queries", cfg.bad_images)
        skipped += bad
    if not jobs["gallery"] or not (cfg.only_gallery or jobs["queries"]):
        raise SoIRError(
            f"{cfg.anns_file}: {len(jobs.get('queries', []))} usable queries (with a positive) and "
            f"{len(jobs['gallery'])} gallery images; both are needed (only_gallery=true: the gallery)"
        )
    if not cfg.no_faiss:
        expected_rows = sum(len(job.masks) if job.masks is not None else 1 for job in jobs["gallery"])
        check_factory(cfg.index, cfg.vec_dim, expected_rows if uses_masks else len(jobs["gallery"]))
    return jobs, facts, skipped


def extract_split(name: str, shards: FeatureShards, jobs: list[ImageJob], extractor, cfg: DictConfig) -> None:
    """Compute the missing shards of one split; each shard is written atomically when complete."""
    shards.prepare()
    todo = shards.missing()
    if len(todo) < shards.num_shards:
        log.info(
            "%s: resuming, %d of %d shards already on disk", name, shards.num_shards - len(todo), shards.num_shards
        )
    progress = tqdm(total=sum(len(shards.image_range(s)) for s in todo), desc=name, unit="img")
    for shard in todo:
        images = shards.image_range(shard)
        extract_shard(shards, shard, jobs[images.start : images.stop], extractor, cfg, progress)
    progress.close()


def extract_shard(
    shards: FeatureShards,
    shard: int,
    jobs: list[ImageJob],
    extractor,
    cfg: DictConfig,
    progress: tqdm,
    record_bad_pixels: bool = False,
) -> None:
    """Compute and write one shard from its ``jobs`` (the images of ``shards.image_range(shard)``).

    An image whose pixels cannot be decoded is an error under ``bad_images=error``, unless
    ``record_bad_pixels`` (stage=extract workers); it is left out, listed in the shard's ``failed`` and
    counted in ``stat.bad_images`` otherwise."""
    first = shards.image_range(shard).start
    dataset = ViewDataset(
        jobs, extractor.view_maker(), extractor.global_view_maker(), empty_to_global=cfg.missing_masks == "global"
    )
    loader = DataLoader(
        dataset,
        batch_size=cfg.batch_size,
        num_workers=cfg.num_workers,
        collate_fn=list,
        worker_init_fn=worker_init_fn() if cfg.num_workers else None,
    )
    features, owner, mask_index, failed = [], [], [], []
    stats = {"dropped_masks": 0, "global_fallback": 0, "bad_images": 0}
    for batch in loader:
        indices, views = zip(*batch)
        indices = [first + i for i in indices]  # image index in the split
        for i, v in zip(indices, views):
            if v.error is not None:  # header fine, pixels not: bad_images decides
                if cfg.bad_images == "error" and not record_bad_pixels:
                    raise SoIRError(f"{v.error}; fix or remove the image, or set bad_images=skip")
                log.warning(
                    "%s: %s", "recorded in its shard" if cfg.bad_images == "error" else "bad_images=skip", v.error
                )
                failed.append(i)
                stats["bad_images"] += 1
        good = [(i, v) for i, v in zip(indices, views) if v.error is None]
        for (i, v), rows in zip(good, extractor.describe([v for _, v in good]) if good else []):
            features.append(rows.vectors)
            mask_index.append(rows.mask_index)
            owner.append(torch.full((len(rows),), i, dtype=torch.long))
            stats["dropped_masks"] += v.dropped_masks
            stats["global_fallback"] += v.global_fallback
        progress.update(len(batch))
    empty = torch.empty(0, dtype=torch.long)
    features = torch.cat(features) if features else torch.empty(0, extractor.dim)
    owner = torch.cat(owner) if owner else empty
    check_unit_norm(shards, features, owner)
    shards.write(
        shard,
        features,
        owner,
        stats,
        torch.cat(mask_index) if mask_index else empty,
        torch.tensor(failed, dtype=torch.long),
    )


def check_unit_norm(
    shards: FeatureShards, features: torch.Tensor, owner: torch.Tensor, tolerance: float = 1e-3
) -> None:
    """Every stored vector [R, D] has norm 1 +- ``tolerance``: scores are cosines only then (an MI that
    diverged, e.g. mi_lr=1e30, gives rows of norm 0 that would be searched as features). Non-finite
    rows are left to ``FeatureShards.write``, which names them as such.

    Raises:
        SoIRError: naming the split, the count, the norms seen and the first images.
    """
    norms = features.double().norm(dim=1)
    off = torch.isfinite(norms) & ((norms - 1).abs() > tolerance)
    if off.any():
        keys = [shards.records[int(i)]["key"] for i in owner[off].unique()[:5]]
        raise SoIRError(
            f"{shards.folder.name}: {int(off.sum())} of {len(norms)} feature vectors are not unit-norm (norms "
            f"{norms[off].min():.3g}..{norms[off].max():.3g}), images {keys}; check the MI settings "
            "(mi_lr, mi_alpha) and these images"
        )


def record(ann) -> dict:
    return {
        "key": ann.key,
        "file": str(Path(ann.file).resolve()),
        "ins": list(ann.ins),
        "bbox": ann.bbox and list(ann.bbox),
        "obj_name": ann.obj_name,
    }


def feature_identity(cfg: DictConfig, extractor, jobs: list[ImageJob], facts: dict, queries: bool) -> dict:
    """What one split's features depend on, as JSON-able values.

    Gallery: the settings that change features (see ``utils.config.RUN_KEYS``), the extractor's
    identity (weights content or hub commit, preprocessing, LoRA content, device) and the digest of
    its jobs (keys, image bytes, masks). Queries: the query-only settings and the query jobs' digest
    (stored together with the gallery identity).
    """
    identity = settings_identity(cfg, extractor, queries)
    identity["queries_sha256" if queries else "gallery_sha256"] = jobs_digest(jobs, facts)
    return json.loads(json.dumps(identity))


def settings_identity(cfg: DictConfig, extractor, queries: bool) -> dict:
    """:func:`feature_identity` without the inputs' digest: the settings and the extractor's identity."""
    settings = OmegaConf.to_container(cfg, resolve=True)
    if queries:
        identity = {k: settings[k] for k in sorted(QUERY_KEYS - RUN_KEYS)}
        identity["query_extractor_identity"] = extractor.identity()
    else:
        identity = {k: v for k, v in settings.items() if k not in RUN_KEYS and k not in QUERY_KEYS}
        identity["extractor_identity"] = extractor.identity()
    return json.loads(json.dumps(identity))


def sources(cfg: DictConfig) -> dict:
    """``sources.json``: the input files of the run (resolved paths) with their sha256, so later readers
    (the search report's mask outlines) can check they still hold what the features were made from."""
    out = {"masks_from": cfg.masks_from, "box_masks": cfg.box_masks}
    for key in ("anns_file", "captions_file", "query_captions_file"):
        if cfg[key]:
            path = Path(cfg[key]).resolve()
            out[key], out[key.replace("_file", "_sha256")] = str(path), cached_sha256([path])[0]
    return out


def default_features_dir(cfg: DictConfig, identity: dict) -> Path:
    """outputs/features/<dataset>/<extractor>-<hash of the gallery features' identity>.

    Rerunning the same command therefore resumes in the same folder; any change that alters the
    gallery features (model, MI settings, images, masks) gets a folder of its own.
    """
    digest = hashlib.sha1(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:10]
    return Path("outputs/features") / cfg.dataset / run_label(f"{cfg.extractor}-{digest}", "", cfg.tag, cfg.add_string)


STAGES = {"all": run_all, "prepare": prepare, "extract": extract, "index": build, "search": search_stage}
