"""Extract gallery and query descriptors to disk (resumable shards) and build a FAISS index.

    python create_index.py extractor=siglip_mi_features anns_file=anns.pt captions_file=captions.pt

Every key is documented in README.md; ``--help`` lists them, ``--cfg job`` prints the config.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from datasets import drop_queries_without_positives, find_masks, load_anns, load_captions, split
from datasets.extraction import ImageJob, ViewDataset
from extractors import extractor_from_config
from utils.config import check_config, register
from utils.feature_store import FeatureShards, atomic_write_text
from utils.index_io import build_index, save_index

log = logging.getLogger("soir.create_index")
register()

# Keys that do not change the descriptors; every other key is part of the features' identity.
NOT_FEATURE_KEYS = {"experiment", "features_dir", "index", "k_search", "map_at", "precision_at",
                    "recall_at", "num_workers"}


@hydra.main(version_base="1.3", config_path="configs", config_name="defaults")
def main(cfg: DictConfig) -> None:
    check_config(cfg)
    started = time.time()
    anns = load_anns(cfg.anns_file, cfg.galleries_dir, cfg.queries_dir)
    queries, gallery = split(anns)
    queries = drop_queries_without_positives(queries, gallery, cfg.no_positive)
    captions = load_captions(cfg.captions_file) if cfg.captions_file else None
    extractor = extractor_from_config(cfg)
    log.info("%s (%s, %d-d) on %s: %d queries, %d gallery images", cfg.extractor, extractor.model_name,
             extractor.dim, extractor.device, len(queries), len(gallery))

    out = Path(cfg.features_dir) if cfg.features_dir else default_features_dir(cfg)
    with run_lock(out):
        check_or_save_config(cfg, out)
        splits = {}
        for name, jobs in (("gallery", gallery_jobs(gallery, captions, extractor, cfg)),
                           ("queries", query_jobs(queries, captions, extractor, cfg))):
            splits[name] = FeatureShards(out / name, [record(job.annotation) for job in jobs], cfg.shard_size)
            extract_split(name, splits[name], jobs, extractor, cfg)
        features, _, gallery_stats = splits["gallery"].load()
        save_index(build_index(features.numpy(), cfg.index), out / "index.faiss")
    _, _, query_stats = splits["queries"].load()
    summary = dict(features_dir=str(out), gallery_images=len(gallery), gallery_rows=len(features),
                   queries=len(queries), seconds=round(time.time() - started, 1),
                   gallery=gallery_stats, queries_stats=query_stats)
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=1))
    log.info("done: %s", json.dumps(summary))
    print(f"features and index: {out}\nsearch: python search_index.py features_dir={out}")


def gallery_jobs(gallery, captions, extractor, cfg: DictConfig) -> list[ImageJob]:
    """Gallery images are never cropped (cropping to a ground-truth box would leak the label)."""
    if not extractor.uses_masks:
        if captions is not None:
            log.warning("captions_file is not used by %s (whole-image embeddings)", cfg.extractor)
        return [ImageJob(ann) for ann in gallery]
    masks = [find_masks(captions, ann.key, ann.file) if captions else None for ann in gallery]
    missing = [ann.key for ann, m in zip(gallery, masks) if m is None or len(m) == 0]
    if missing and cfg.missing_masks == "error":
        source = cfg.captions_file or "no captions_file given"
        raise ValueError(f"{len(missing)} of {len(gallery)} gallery images have no masks in {source} "
                         f"(first: {missing[:5]}); set missing_masks=global to use their global embedding")
    if missing:
        log.warning("missing_masks=global: %d of %d gallery images have no masks and get their global "
                    "embedding", len(missing), len(gallery))
    return [ImageJob(ann, masks=m) for ann, m in zip(gallery, masks)]


def query_jobs(queries, captions, extractor, cfg: DictConfig) -> list[ImageJob]:
    """Queries: the global embedding of their bbox crop, or MI with their mask (``mask_input``).

    With mask_input the query is not cropped: the mask (from captions_file, else the bbox as a
    rectangle) locates the object in its full image.
    """
    if not cfg.mask_input:
        return [ImageJob(ann, crop_to_bbox=not cfg.no_query_crop) for ann in queries]
    jobs = []
    for ann in queries:
        masks = find_masks(captions, ann.key, ann.file) if captions else None
        if (masks is None or len(masks) == 0) and ann.bbox is None:
            raise ValueError(f"mask_input=true: query {ann.file} has neither a mask in captions_file "
                             f"nor a bbox in {cfg.anns_file}")
        jobs.append(ImageJob(ann, masks=masks if masks else None, bbox_as_mask=not masks))
    return jobs


def extract_split(name: str, shards: FeatureShards, jobs: list[ImageJob], extractor, cfg: DictConfig) -> None:
    """Compute the missing shards of one split; each shard is written atomically when complete."""
    shards.prepare()
    todo = shards.missing()
    if len(todo) < shards.num_shards:
        log.info("%s: resuming, %d of %d shards already on disk", name, shards.num_shards - len(todo),
                 shards.num_shards)
    global_maker = getattr(extractor, "global_view_maker", extractor.view_maker)()
    dataset = ViewDataset(jobs, extractor.view_maker(), global_maker, cfg.missing_masks == "global")
    progress = tqdm(total=sum(len(shards.image_range(s)) for s in todo), desc=name, unit="img")
    for shard in todo:
        loader = DataLoader(Subset(dataset, shards.image_range(shard)), batch_size=cfg.batch_size,
                            num_workers=cfg.num_workers, collate_fn=list)
        features, owner, stats = [], [], {"dropped_masks": 0, "global_fallback": 0}
        for batch in loader:
            indices, views = zip(*batch)
            for i, v, rows in zip(indices, views, extractor.describe(list(views))):
                features.append(rows)
                owner.append(torch.full((len(rows),), i, dtype=torch.long))  # image index in the split
                stats["dropped_masks"] += v.dropped_masks
                stats["global_fallback"] += v.global_fallback
            progress.update(len(batch))
        shards.write(shard, torch.cat(features), torch.cat(owner), stats)
    progress.close()


def record(ann) -> dict:
    return {"key": ann.key, "file": str(ann.file), "ins": list(ann.ins), "bbox": ann.bbox and list(ann.bbox),
            "obj_name": ann.obj_name}


def default_features_dir(cfg: DictConfig) -> Path:
    """outputs/features/<dataset>/<extractor>-<hash of every key that changes the descriptors>.

    Rerunning the same command therefore resumes in the same folder; any change that alters the
    features (model, MI settings, data files) gets a folder of its own.
    """
    identity = {k: v for k, v in OmegaConf.to_container(cfg, resolve=True).items() if k not in NOT_FEATURE_KEYS}
    for key in ("anns_file", "captions_file", "galleries_dir", "queries_dir", "weights"):
        if identity.get(key):
            identity[key] = str(Path(identity[key]).resolve())
    digest = hashlib.sha1(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:10]
    return Path("outputs/features") / cfg.dataset / f"{cfg.extractor}-{digest}"


def check_or_save_config(cfg: DictConfig, out: Path) -> None:
    """Save the resolved config next to the features; refuse to mix features of different configs."""
    out.mkdir(parents=True, exist_ok=True)
    saved = out / "config.yaml"
    if saved.exists():
        old = OmegaConf.to_container(OmegaConf.load(saved))
        new = OmegaConf.to_container(cfg, resolve=True)
        changed = sorted(k for k in set(old) | set(new) if k not in NOT_FEATURE_KEYS and old.get(k) != new.get(k))
        if changed:
            raise ValueError(f"{out} holds features made with other settings ({', '.join(changed)}); "
                             f"use another features_dir")
    atomic_write_text(saved, OmegaConf.to_yaml(cfg, resolve=True))


class run_lock:
    """Refuse two live runs writing the same features folder; take over the lock of a dead one."""

    def __init__(self, folder: Path):
        self.path = Path(folder) / ".lock"

    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            pid = int(self.path.read_text() or 0)
            if pid and _alive(pid) and pid != os.getpid():
                raise RuntimeError(f"{self.path.parent} is being written by process {pid}")
            log.warning("taking over the lock of a run that stopped (pid %s)", pid)
        self.path.write_text(str(os.getpid()))

    def __exit__(self, *exc):
        self.path.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


if __name__ == "__main__":
    main()
