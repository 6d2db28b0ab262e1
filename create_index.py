"""Extract gallery and query descriptors to disk (resumable shards) and build a FAISS index.

    python create_index.py extractor=siglip_mi_features anns_file=anns.pt captions_file=captions.pt

Every key is documented in README.md; ``--help`` lists them, ``--cfg job`` prints the config.

Order of work, so that mistakes cost seconds, not hours: (1) read and check every input that
needs no model (annotations, masks, image headers, boxes, the index string); (2) load the model;
(3) claim and lock the features folder, which must hold nothing made with another identity;
(4) extract the missing shards; (5) build the index.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from datasets import (annotation_masks, drop_queries_without_positives, load_anns, load_captions, select_indices,
                      select_set, split)
from datasets.extraction import ImageJob, ViewDataset, check_jobs, gallery_jobs, jobs_digest, query_jobs
from datasets.images import image_facts
from extractors import capabilities, extractor_from_config
from search_index import search
from utils.config import QUERY_KEYS, RUN_KEYS, check_config, register, resolve_aliases, run_label
from utils.errors import SoIRError, exit_on_error
from utils.families import lora_families
from utils.feature_store import FeatureShards, FeaturesFolder, write_bad_images
from utils.files import atomic_write_json, cached_sha256
from utils.index_io import build_index, check_factory, index_path, save_index
from utils.processes import worker_init_fn

log = logging.getLogger("soir.create_index")
register()


@hydra.main(version_base="1.3", config_path="configs", config_name="defaults")
@exit_on_error
def main(cfg: DictConfig) -> None:
    resolve_aliases(cfg)
    check_config(cfg)
    started = time.time()
    jobs, facts, skipped = plan(cfg)
    extractor = extractor_from_config(cfg)
    extractors = {"gallery": extractor, "queries": query_extractor(cfg, extractor)}
    log.info("%s (%s, %d-d) on %s: %d queries, %d gallery images", cfg.extractor, extractor.model_name,
             extractor.dim, extractor.device, len(jobs.get("queries", [])), len(jobs["gallery"]))

    gallery_identity = feature_identity(cfg, extractor, jobs["gallery"], facts, queries=False)
    query_identity = {**gallery_identity, **feature_identity(cfg, extractors["queries"], jobs.get("queries", []),
                                                             facts, queries=True)}
    out = Path(cfg.features_dir) if cfg.features_dir else default_features_dir(cfg, gallery_identity)
    with FeaturesFolder(out).open(gallery_identity, query_identity, OmegaConf.to_yaml(cfg, resolve=True)):
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
        summary = dict(features_dir=str(out), gallery_images=len(jobs["gallery"]), gallery_rows=rows["gallery"],
                       queries=len(jobs.get("queries", [])), skipped_bad_images=len(skipped),
                       seconds=round(time.time() - started, 1), gallery_counts=stats["gallery"],
                       query_counts=stats.get("queries", {}))
        atomic_write_json(out / "summary.json", summary)
    log.info("done: %s", json.dumps(summary))
    print(f"features{'' if cfg.no_faiss else ' and index'}: {out}\nsearch: python search_index.py features_dir={out}")
    if cfg.only_create or cfg.only_gallery:
        return
    # As the original: the search runs at the end of create_index.py unless only_create=true.
    search(cfg, out, Path(HydraConfig.get().runtime.output_dir))


def query_extractor(cfg: DictConfig, gallery_extractor):
    """The gallery's extractor, or ``query_extractor`` (with ``query_extractor_args``): another
    registered extractor for the queries, which must embed into the same space (checked: same dim)."""
    if not cfg.query_extractor or cfg.only_gallery:
        return gallery_extractor
    args = OmegaConf.to_container(cfg.query_extractor_args) if cfg.query_extractor_args else {}
    extractor = extractor_from_config(cfg, cfg.query_extractor, args)
    if extractor.dim != gallery_extractor.dim:
        raise SoIRError(f"query_extractor={cfg.query_extractor} embeds into {extractor.dim}-d, the gallery's "
                        f"{cfg.extractor} into {gallery_extractor.dim}-d: they cannot be compared")
    log.info("queries: %s (%s), gallery: %s", cfg.query_extractor, extractor.model_name, cfg.extractor)
    return extractor


def plan(cfg: DictConfig) -> tuple[dict[str, list[ImageJob]], dict, list[tuple[str, str, str]]]:
    """Every input that needs no model, read and checked: the jobs of each split, the images' facts
    (sha256, size) by key, and the images left out under bad_images=skip."""
    for name in {cfg.extractor, cfg.query_extractor or cfg.extractor}:
        if cfg.lora_adapt and not capabilities(name)["supports_lora"]:
            raise SoIRError(f"lora_adapt=true: {name} has no LoRA support; LoRA adapters exist for the families "
                            f"{', '.join(lora_families())} (their _features / _mi_features extractors)")
    if not cfg.anns_file:
        raise SoIRError("anns_file= is required: the anns.pt that lists the queries and the gallery")
    anns = load_anns(cfg.anns_file, cfg.galleries_dir, cfg.queries_dir, duplicates=cfg.duplicates)
    anns = select_indices(select_set(anns, cfg.set), cfg.ds_inds_file, cfg.max_ds_index)
    queries, gallery = split(anns)
    query_crop = None if cfg.no_query_crop else "tight" if cfg.crop else "square"
    query_masks = "zeroed" if cfg.mask_input else "unmasked" if cfg.query_mi else None
    if cfg.masks_from == "anns":   # the annotations' own masks (queries' only when they use masks)
        captions = annotation_masks(gallery + (queries if query_masks else []), cfg.box_masks)
        source = f"{cfg.anns_file} (masks_from=anns{'' if cfg.box_masks else '; box_masks=true uses boxes'})"
    else:
        captions = load_captions(cfg.captions_file) if cfg.captions_file else None
        source = cfg.captions_file or "no captions_file given"
    query_captions = load_captions(cfg.query_captions_file) if cfg.query_captions_file else captions
    uses_masks = capabilities(cfg.extractor)["uses_masks"] and cfg.global_features
    if not uses_masks and captions is not None:
        log.warning("the masks (%s) are not used by %s (whole-image embeddings)", source, cfg.extractor)
    if query_masks and not capabilities(cfg.query_extractor or cfg.extractor)["uses_masks"]:
        raise SoIRError(f"mask_input / query_mi describe queries by Mask Inversion; "
                        f"{cfg.query_extractor or cfg.extractor} is not an MI extractor")
    facts = dict(zip((a.key for a in anns), image_facts([a.file for a in anns])))
    jobs, skipped = {}, []
    wanted = gallery_jobs(gallery, captions, uses_masks, cfg.missing_masks, source,
                          crop=query_crop if cfg.gallery_crop else None)
    jobs["gallery"], bad = check_jobs(wanted, [facts[a.key] for a in gallery], "gallery", cfg.bad_images)
    skipped += bad
    if not cfg.only_gallery:
        # A skipped gallery image may have been a query's only positive: the positive policy comes after.
        kept_gallery = [job.annotation for job in jobs["gallery"]]
        queries = drop_queries_without_positives(queries, kept_gallery, cfg.no_positive)
        wanted = query_jobs(queries, query_captions, query_crop, query_masks, cfg.query_masks == "all", cfg.anns_file)
        jobs["queries"], bad = check_jobs(wanted, [facts[j.annotation.key] for j in wanted], "queries", cfg.bad_images)
        skipped += bad
    if not jobs["gallery"] or not (cfg.only_gallery or jobs["queries"]):
        raise SoIRError(f"{cfg.anns_file}: {len(jobs.get('queries', []))} usable queries (with a positive) and "
                        f"{len(jobs['gallery'])} gallery images; both are needed (only_gallery=true: the gallery)")
    if not cfg.no_faiss:
        expected_rows = sum(len(job.masks) if job.masks is not None else 1 for job in jobs["gallery"])
        check_factory(cfg.index, cfg.vec_dim, expected_rows if uses_masks else len(jobs["gallery"]))
    return jobs, facts, skipped


def extract_split(name: str, shards: FeatureShards, jobs: list[ImageJob], extractor, cfg: DictConfig) -> None:
    """Compute the missing shards of one split; each shard is written atomically when complete."""
    shards.prepare()
    todo = shards.missing()
    if len(todo) < shards.num_shards:
        log.info("%s: resuming, %d of %d shards already on disk", name, shards.num_shards - len(todo),
                 shards.num_shards)
    dataset = ViewDataset(jobs, extractor.view_maker(), extractor.global_view_maker(),
                          empty_to_global=cfg.missing_masks == "global")
    progress = tqdm(total=sum(len(shards.image_range(s)) for s in todo), desc=name, unit="img")
    for shard in todo:
        loader = DataLoader(Subset(dataset, shards.image_range(shard)), batch_size=cfg.batch_size,
                            num_workers=cfg.num_workers, collate_fn=list,
                            worker_init_fn=worker_init_fn() if cfg.num_workers else None)
        features, owner, mask_index, failed = [], [], [], []
        stats = {"dropped_masks": 0, "global_fallback": 0, "bad_images": 0}
        for batch in loader:
            indices, views = zip(*batch)
            for i, v in zip(indices, views):
                if v.error is not None:            # header fine, pixels not: bad_images decides
                    if cfg.bad_images == "error":
                        raise SoIRError(f"{v.error}; fix or remove the image, or set bad_images=skip")
                    log.warning("bad_images=skip: %s", v.error)
                    failed.append(i)
                    stats["bad_images"] += 1
            good = [(i, v) for i, v in zip(indices, views) if v.error is None]
            for (i, v), rows in zip(good, extractor.describe([v for _, v in good]) if good else []):
                features.append(rows.vectors)
                mask_index.append(rows.mask_index)
                owner.append(torch.full((len(rows),), i, dtype=torch.long))  # image index in the split
                stats["dropped_masks"] += v.dropped_masks
                stats["global_fallback"] += v.global_fallback
            progress.update(len(batch))
        empty = torch.empty(0, dtype=torch.long)
        shards.write(shard, torch.cat(features) if features else torch.empty(0, extractor.dim),
                     torch.cat(owner) if owner else empty, stats,
                     torch.cat(mask_index) if mask_index else empty, torch.tensor(failed, dtype=torch.long))
    progress.close()


def record(ann) -> dict:
    return {"key": ann.key, "file": str(Path(ann.file).resolve()), "ins": list(ann.ins),
            "bbox": ann.bbox and list(ann.bbox), "obj_name": ann.obj_name}


def feature_identity(cfg: DictConfig, extractor, jobs: list[ImageJob], facts: dict, queries: bool) -> dict:
    """What one split's features depend on, as JSON-able values.

    Gallery: the settings that change features (see ``utils.config.RUN_KEYS``), the extractor's
    identity (weights content or hub commit, preprocessing, LoRA content, device) and the digest of
    its jobs (keys, image bytes, masks). Queries: the query-only settings and the query jobs' digest
    (stored together with the gallery identity).
    """
    settings = OmegaConf.to_container(cfg, resolve=True)
    if queries:
        identity = {k: settings[k] for k in sorted(QUERY_KEYS - RUN_KEYS)}
        identity["queries_sha256"] = jobs_digest(jobs, facts)
        identity["query_extractor_identity"] = extractor.identity()
        return json.loads(json.dumps(identity))
    identity = {k: v for k, v in settings.items() if k not in RUN_KEYS and k not in QUERY_KEYS}
    identity["extractor_identity"] = extractor.identity()
    identity["gallery_sha256"] = jobs_digest(jobs, facts)
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


if __name__ == "__main__":
    main()
