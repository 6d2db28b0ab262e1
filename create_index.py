"""Extract gallery and query descriptors to disk (resumable shards) and build a FAISS index.

    python create_index.py extractor=siglip_mi_features anns_file=anns.pt captions_file=captions.pt

Every key is documented in README.md; ``--help`` lists them, ``--cfg job`` prints the config.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import socket
import time
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from torchvision.ops import box_iou

from datasets import ImageMasks, drop_queries_without_positives, find_masks, load_anns, load_captions, split
from datasets.extraction import ImageJob, ViewDataset
from extractors import extractor_from_config
from utils.config import check_config, register
from utils.feature_store import FeatureShards, atomic_write_text
from utils.index_io import build_index, index_path, save_index

log = logging.getLogger("soir.create_index")
register()

# Settings that change only the query descriptors: changing them recomputes the queries, not the gallery.
QUERY_ONLY_KEYS = {"mask_input", "query_captions_file", "no_query_crop", "queries_dir", "no_positive"}
# Keys that do not change the descriptors; every other key is part of the features' identity.
NOT_FEATURE_KEYS = {"experiment", "features_dir", "index", "k_search", "map_at", "precision_at",
                    "recall_at", "num_workers", "report", "report_k", "report_thumb_size", "report_maps"}


@hydra.main(version_base="1.3", config_path="configs", config_name="defaults")
def main(cfg: DictConfig) -> None:
    check_config(cfg)
    started = time.time()
    anns = load_anns(cfg.anns_file, cfg.galleries_dir, cfg.queries_dir)
    queries, gallery = split(anns)
    queries = drop_queries_without_positives(queries, gallery, cfg.no_positive)
    if not queries or not gallery:
        raise ValueError(f"{cfg.anns_file}: {len(queries)} queries (with a positive) and {len(gallery)} "
                         f"gallery images; both are needed")
    captions = load_captions(cfg.captions_file) if cfg.captions_file else None
    query_captions = load_captions(cfg.query_captions_file) if cfg.query_captions_file else captions
    extractor = extractor_from_config(cfg)
    log.info("%s (%s, %d-d) on %s: %d queries, %d gallery images", cfg.extractor, extractor.model_name,
             extractor.dim, extractor.device, len(queries), len(gallery))

    identity = feature_identity(cfg, extractor)
    gallery_identity = {k: v for k, v in identity.items() if k.removesuffix("_sha256") not in QUERY_ONLY_KEYS}
    out = Path(cfg.features_dir) if cfg.features_dir else default_features_dir(cfg, gallery_identity)
    with run_lock(out):
        check_or_save_identity(cfg, gallery_identity, out)
        refresh_queries(out / "queries", identity)
        splits = {}
        for name, jobs in (("gallery", gallery_jobs(gallery, captions, extractor, cfg)),
                           ("queries", query_jobs(queries, query_captions, cfg))):
            splits[name] = FeatureShards(out / name, [record(job.annotation) for job in jobs], cfg.shard_size)
            extract_split(name, splits[name], jobs, extractor, cfg)
        features, _, gallery_stats = splits["gallery"].load()
        save_index(build_index(features.numpy(), cfg.index), index_path(out, cfg.index))
    _, _, query_stats = splits["queries"].load()
    summary = dict(features_dir=str(out), gallery_images=len(gallery), gallery_rows=len(features),
                   queries=len(queries), seconds=round(time.time() - started, 1),
                   gallery_counts=gallery_stats, query_counts=query_stats)
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
        example = f"; captions keys look like {next(iter(captions))!r}" if captions else ""
        raise ValueError(f"{len(missing)} of {len(gallery)} gallery images have no masks in {source} "
                         f"(first: {missing[:5]}{example}); set missing_masks=global to use their "
                         f"global embedding")
    if missing:
        log.warning("missing_masks=global: %d of %d gallery images have no masks and get their global "
                    "embedding", len(missing), len(gallery))
    return [ImageJob(ann, masks=m) if m else ImageJob(ann, global_fallback=True) for ann, m in zip(gallery, masks)]


def query_jobs(queries, captions, cfg: DictConfig) -> list[ImageJob]:
    """Queries: the global embedding of their bbox crop, or MI with their mask (``mask_input``).

    With mask_input the query is not cropped: its mask locates the object in the full image. The
    mask comes from ``query_captions_file`` (else ``captions_file``): the one whose box best overlaps
    the query's bbox, or the only one when the query has no bbox; without a mask, the bbox rectangle
    (counted and logged).
    """
    if not cfg.mask_input:
        no_box = sum(ann.bbox is None for ann in queries)
        if no_box and not cfg.no_query_crop:
            log.warning("%d of %d queries have no bbox and are used uncropped", no_box, len(queries))
        return [ImageJob(ann, crop_to_bbox=not cfg.no_query_crop) for ann in queries]
    jobs, rectangles = [], 0
    for ann in queries:
        masks = find_masks(captions, ann.key, ann.file) if captions else None
        masks = query_mask(masks, ann) if masks else None
        if masks:
            jobs.append(ImageJob(ann, masks=masks))
        elif ann.bbox is not None:
            jobs.append(ImageJob(ann, bbox_as_mask=True))
            rectangles += 1
        else:
            raise ValueError(f"mask_input=true: query {ann.file} has neither a mask in the captions "
                             f"nor a bbox in {cfg.anns_file}")
    if rectangles:
        log.warning("mask_input=true: %d of %d queries have no mask overlapping their bbox and use the "
                    "bbox rectangle", rectangles, len(queries))
    return jobs


def query_mask(masks: ImageMasks, ann) -> ImageMasks | None:
    """The query's object mask: the best overlap with its bbox (None if none overlaps it), or its
    only mask when the query has no bbox."""
    if ann.bbox is None:
        if len(masks) != 1:
            raise ValueError(f"query {ann.file} has {len(masks)} masks and no bbox to choose one")
        return masks
    iou = box_iou(torch.tensor([ann.bbox], dtype=torch.float), torch.tensor(masks.bboxes, dtype=torch.float))[0]
    best = int(iou.argmax())
    if iou[best] == 0:
        return None
    return ImageMasks([masks.masks_rle[best]], [masks.bboxes[best]], [masks.scores[best]])


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
                            num_workers=cfg.num_workers, collate_fn=list)
        features, owner, mask_index = [], [], []
        stats = {"dropped_masks": 0, "global_fallback": 0}
        for batch in loader:
            indices, views = zip(*batch)
            for i, v, rows in zip(indices, views, extractor.describe(list(views))):
                features.append(rows.vectors)
                mask_index.append(rows.mask_index)
                owner.append(torch.full((len(rows),), i, dtype=torch.long))  # image index in the split
                stats["dropped_masks"] += v.dropped_masks
                stats["global_fallback"] += v.global_fallback
            progress.update(len(batch))
        shards.write(shard, torch.cat(features), torch.cat(owner), stats, torch.cat(mask_index))
    progress.close()


def record(ann) -> dict:
    return {"key": ann.key, "file": str(Path(ann.file).resolve()), "ins": list(ann.ins),
            "bbox": ann.bbox and list(ann.bbox), "obj_name": ann.obj_name}


def feature_identity(cfg: DictConfig, extractor) -> dict:
    """Everything that determines the descriptors: the settings (paths resolved, the device as
    resolved) and the content hash of every input file, so a resume never mixes features."""
    identity = {k: v for k, v in OmegaConf.to_container(cfg, resolve=True).items() if k not in NOT_FEATURE_KEYS}
    identity["model_name"] = extractor.model_name
    identity["device"] = str(extractor.device)
    for key in ("anns_file", "captions_file", "query_captions_file", "galleries_dir", "queries_dir",
                "weights", "model_name"):
        if identity.get(key) and Path(identity[key]).exists():
            identity[key] = str(Path(identity[key]).resolve())
            if Path(identity[key]).is_file():
                identity[f"{key}_sha256"] = sha256(Path(identity[key]))
    return identity


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def default_features_dir(cfg: DictConfig, identity: dict) -> Path:
    """outputs/features/<dataset>/<extractor>-<hash of the gallery features' identity>.

    Rerunning the same command therefore resumes in the same folder; any change that alters the
    gallery features (model, MI settings, data files) gets a folder of its own.
    """
    digest = hashlib.sha1(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:10]
    return Path("outputs/features") / cfg.dataset / f"{cfg.extractor}-{digest}"


def changed_keys(old: dict, new: dict) -> list[str]:
    return sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))


def refresh_queries(folder: Path, identity: dict) -> None:
    """Keep the query features only if they were made with this identity; else recompute them.

    Queries are few next to the gallery, so a query-only change (``mask_input``, ``no_query_crop``,
    ...) replaces them in place instead of asking for a new folder and hours of gallery MI.
    """
    saved = folder / "identity.json"
    if saved.exists():
        changed = changed_keys(json.loads(saved.read_text()), identity)
        if not changed:
            return
        log.warning("query settings changed (%s): recomputing the query features", ", ".join(changed))
        shutil.rmtree(folder)
    elif folder.exists():
        shutil.rmtree(folder)          # made before its identity was saved: cannot be trusted
    folder.mkdir(parents=True)
    atomic_write_text(saved, json.dumps(identity, indent=1, sort_keys=True))


def check_or_save_identity(cfg: DictConfig, identity: dict, out: Path) -> None:
    """Save config and identity next to the features; refuse to mix features of different identities."""
    out.mkdir(parents=True, exist_ok=True)
    saved = out / "identity.json"
    if saved.exists():
        changed = changed_keys(json.loads(saved.read_text()), identity)
        if changed:
            raise ValueError(f"{out} holds features made with other settings or inputs ({', '.join(changed)}); "
                             f"use another features_dir")
    atomic_write_text(saved, json.dumps(identity, indent=1, sort_keys=True))
    atomic_write_text(out / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))


class run_lock:
    """Refuse two live runs writing the same features folder; take over the lock of a dead one.

    The lock holds "<host> <pid>". A lock from another host is never taken over (its process cannot
    be checked from here); one from this host is stale when its process is gone, or when it is our
    own pid (containers restart jobs under the same pid).
    """

    def __init__(self, folder: Path):
        self.path = Path(folder) / ".lock"
        self.owner = f"{socket.gethostname()} {os.getpid()}"

    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".lock.{os.getpid()}")
        tmp.write_text(self.owner)
        try:
            while True:
                try:
                    os.link(tmp, self.path)          # atomic, and the lock is never seen empty
                    return self
                except FileExistsError:
                    self._take_over_if_stale()
        finally:
            tmp.unlink(missing_ok=True)

    def _take_over_if_stale(self) -> None:
        host, _, pid = self.path.read_text().partition(" ")
        live = host != socket.gethostname() or (pid.isdigit() and int(pid) != os.getpid() and _alive(int(pid)))
        if live:
            raise RuntimeError(f"{self.path.parent} is being written by process {pid} on {host} "
                               f"(if it is not, delete {self.path})")
        log.warning("taking over the lock of a run that stopped (pid %s)", pid)
        self.path.unlink(missing_ok=True)

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
