"""Object masks for Mask Inversion: OWLv2 finds the objects, SAM turns each box into a mask.

The pipeline behind ``scripts/create_masked_dataset.py`` (the CLI; its docstring and
docs/object-masks.md describe the options and the output folder). :func:`run` validates every
input and the output folder before any image is read, then computes the missing shards
(:func:`process_shards`, resumable) and merges them into ``captions.pt`` with a summary.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import math
import os
import re
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from datasets.anns import AnnotationError, clip_bbox, load_anns
from datasets.captions import ImageMasks, encode_mask, save_captions
from datasets.images import IMAGE_EXTENSIONS, ImageLoadError, load_rgb
from datasets.tar_shards import is_tar_spec, unpacked_galleries
from utils.errors import SoIRError
from utils.files import (
    FolderLock,
    atomic_torch_save,
    atomic_write,
    atomic_write_json,
    atomic_write_text,
    cached_sha256,
    check_identity,
    claim_folder,
    remove_own_files,
    remove_stale_temporaries,
)
from utils.hub import model_weights_identity
from utils.masks.models import (
    SAM_ARCHITECTURES,
    DetectionOptions,
    ModelLoadError,
    Owlv2Detector,
    SamArchitecture,
    SamSegmenter,
    infer_sam_model_type,
    load_sam,
)
from utils.processes import worker_init_fn

# Pipeline order, for the summary.
STAGES = (
    "load_models",
    "load",
    "owlv2_preprocess",
    "owlv2",
    "sam_embed",
    "sam_decode",
    "sam_automatic",
    "rle",
    "preview",
    "write",
)
SHARD_FORMAT = "soir-mask-shard-v1"
_LISTED = 20  # failed images printed in the summary; all of them go to failed_images.txt


class RunError(SoIRError):
    """A problem with the inputs or the output folder, found before any image is processed."""


# What a run writes into --output_dir (and so what --overwrite may delete), by folder.
OWN_FILES = {
    ".": ("run_config.json", "captions.pt", "summary.json", "failed_images.txt", ".*.tmp"),
    "shards": ("shard_*.pt", ".shard_*.tmp"),
    "preview": ("[0-9][0-9][0-9][0-9][0-9][0-9]_*.png", ".[0-9]*.tmp"),
}


# ----------------------------------------------------------------------------------------------
# What to process
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WorkItem:
    """One image to mask: its captions key, its file and, in queries mode, its prompt box."""

    key: str
    path: Path
    box: tuple[float, float, float, float] | None = None  # x1 y1 x2 y2 pixels (queries mode)


def gallery_items(input_dir: Path, absolute_keys: bool, exclude: Path | None = None) -> list[WorkItem]:
    """Every image file under ``input_dir`` (recursive, by extension), sorted by key.

    ``exclude`` (the output folder, if it lies inside ``input_dir``) is skipped so that preview
    PNGs of a first run do not become new inputs of the rerun.
    """
    exclude = exclude.resolve() if exclude is not None else None
    items = []
    for path in input_dir.rglob("*"):
        if path.suffix.lower() not in IMAGE_EXTENSIONS or not path.is_file():
            continue
        if exclude is not None and path.resolve().is_relative_to(exclude):
            continue
        key = str(path.resolve()) if absolute_keys else path.relative_to(input_dir).as_posix()
        items.append(WorkItem(key=key, path=path))
    return sorted(items, key=lambda item: item.key)


def query_items(
    anns_file: Path, galleries_dir: Path | None, queries_dir: Path | None
) -> tuple[list[WorkItem], list[str]]:
    """The queries of ``anns.pt`` with their bboxes -> (items, keys of queries without a bbox)."""
    try:
        anns = load_anns(anns_file, galleries_dir=galleries_dir, queries_dir=queries_dir)
    except AnnotationError as err:
        raise RunError(str(err)) from err
    queries = [a for a in anns if a.is_query]
    items = [WorkItem(key=a.key, path=a.file, box=a.bbox) for a in queries if a.bbox is not None]
    return items, [a.key for a in queries if a.bbox is None]


@dataclass
class LoadedImage:
    """What a DataLoader worker hands to the GPU loop for one item."""

    index: int
    image: np.ndarray | None = None  # [H, W, 3] uint8 RGB
    pixel_values: torch.Tensor | None = None  # [3, S, S] OWLv2 input (gallery mode)
    error: str | None = None  # why the image could not be used
    seconds: dict[str, float] = field(default_factory=dict)  # load / owlv2_preprocess


class ImageItems(Dataset):
    """Decodes item ``i`` (and runs the OWLv2 preprocessing) off the main process.

    Only :class:`ImageLoadError` is caught: an unreadable file is reported, not fatal. Any
    other exception is a bug and stops the run.
    """

    def __init__(self, items: Sequence[WorkItem], preprocess: Callable[[Image.Image], torch.Tensor] | None):
        self.items = items
        self.preprocess = preprocess

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> LoadedImage:
        start = time.perf_counter()
        try:
            image = load_rgb(self.items[index].path)
        except ImageLoadError as err:
            return LoadedImage(index, error=str(err))
        loaded = LoadedImage(index, image=np.array(image), seconds={"load": time.perf_counter() - start})
        if self.preprocess is not None:
            start = time.perf_counter()
            loaded.pixel_values = self.preprocess(image)
            loaded.seconds["owlv2_preprocess"] = time.perf_counter() - start
        return loaded


def _as_list(batch: list[LoadedImage]) -> list[LoadedImage]:
    return batch  # module-level (picklable) collate_fn: keep records as they are


# ----------------------------------------------------------------------------------------------
# Output folder: run config, shards
# ----------------------------------------------------------------------------------------------


def items_digest(items: Sequence[WorkItem]) -> str:
    """sha256 of the ordered (key, file, box, sha256 of the image's bytes) list: a resumed run must
    see the same images, pixel for pixel (an image edited after its shard was written would leave a
    stale mask). Bytes are hashed through the file-facts cache (read again only when a file changed)."""
    try:
        hashes = cached_sha256([item.path for item in items])
    except OSError:  # an unreadable image is the run's to report (failed_images.txt), not the digest's
        hashes = [_sha256_or_error(item.path) for item in items]
    digest = hashlib.sha256()
    for item, sha in zip(items, hashes):
        digest.update(f"{item.key}\t{item.path}\t{item.box}\t{sha}\n".encode())
    return digest.hexdigest()


def _sha256_or_error(path: Path) -> str:
    try:
        return cached_sha256([path])[0]
    except OSError as err:
        return f"unreadable: {err.strerror}"


def model_file_sha256(path: Path, option: str) -> str:
    """sha256 of a model file (``--sam_checkpoint``): what pins a mask folder to its model, by content
    (a checkpoint replaced under the same path is another model). An unreadable file is a RunError
    now, before anything in the output folder is touched."""
    if not path.is_file():
        raise RunError(f"{option} '{path}' does not exist (or is not a file); check the path")
    try:
        return cached_sha256([path])[0]
    except OSError as err:
        raise RunError(
            f"{option} '{path}' cannot be read ({err.strerror}); check the path and its permissions"
        ) from None


def check_run_config(output_dir: Path, config: dict, overwrite: bool) -> int:
    """Compare ``config`` with the folder's ``run_config.json``; returns the number of shards kept.

    ``overwrite`` deletes what an earlier run wrote (:data:`OWN_FILES`, nothing else).

    Raises:
        RunError: the folder holds shards of a run with other settings or another image list.
    """
    config_file, shards = output_dir / "run_config.json", sorted((output_dir / "shards").glob("shard_*.pt"))
    if overwrite:
        for folder, patterns in OWN_FILES.items():
            remove_own_files(output_dir / folder, patterns, root=output_dir)
        return 0
    if not config_file.is_file():
        if shards:
            raise RunError(
                f"'{output_dir}' holds {len(shards)} shards but no run_config.json; "
                "use a new --output_dir or --overwrite"
            )
        return 0
    check_identity(
        config_file,
        config,
        "masks",
        fix="rerun with the same options to resume, or use a new --output_dir, or --overwrite to discard it",
        save=False,
    )  # written once the models have loaded and work starts
    return len(shards)


def shard_path(output_dir: Path, shard: int) -> Path:
    return output_dir / "shards" / f"shard_{shard:06d}.pt"


def read_shard(path: Path, keys: Sequence[str]) -> dict:
    """A shard's {"captions", "failed"}; raises RunError if it is damaged or does not hold exactly ``keys``."""
    try:
        shard = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated or overwritten: torch raises many types, all mean "damaged"
        raise RunError(
            f"shard '{path}' is damaged ({type(err).__name__}: {str(err).splitlines()[0][:120]}); "
            "delete it and rerun the same command, which computes it again"
        ) from None
    if not isinstance(shard, dict) or shard.get("format") != SHARD_FORMAT or shard.get("keys") != list(keys):
        raise RunError(
            f"shard '{path}' does not belong to this run (other images or format); "
            "use --overwrite or a new --output_dir"
        )
    return shard


# ----------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------


class StageTimer:
    """Seconds per stage; waits for the GPU at stage ends so the time lands on the right stage."""

    def __init__(self, device: torch.device) -> None:
        self.seconds: Counter[str] = Counter()
        self.sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.sync()
            self.seconds[name] += time.perf_counter() - start


# ----------------------------------------------------------------------------------------------
# Masks of one image
# ----------------------------------------------------------------------------------------------


def masks_for_image(
    segmenter: SamSegmenter,
    image: np.ndarray,
    boxes: torch.Tensor,
    scores: torch.Tensor,
    timer: StageTimer,
    fallback: str = "none",
) -> tuple[ImageMasks, torch.Tensor, int]:
    """SAM masks for ``boxes`` [K, 4] of ``image`` [H, W, 3] -> (ImageMasks, masks [K', H, W], dropped).

    No boxes: with ``fallback="automatic"`` SAM's automatic mask generator finds the masks (the
    original's fallback; boxes are the masks' boxes, scores SAM's predicted IoU), else no SAM call
    at all (empty entry). Masks that come out empty (possible for a box on a flat region) are
    dropped with their box and score; ``dropped`` counts them.
    """
    if len(boxes) == 0 and fallback == "automatic":
        with timer.stage("sam_automatic"):
            masks, boxes, scores = segmenter.automatic(image)
    elif len(boxes) == 0:
        return ImageMasks(), torch.zeros((0, *image.shape[:2]), dtype=torch.bool), 0
    else:
        with timer.stage("sam_embed"):
            segmenter.embed(image)
        with timer.stage("sam_decode"):
            masks, _ = segmenter.decode(boxes)
    keep = masks.flatten(1).any(dim=1)
    masks, boxes, scores = masks[keep], boxes[keep], scores[keep]
    with timer.stage("rle"):
        entry = ImageMasks(
            masks_rle=[encode_mask(m) for m in masks.numpy()],
            bboxes=[[float(v) for v in box] for box in boxes.tolist()],
            scores=[float(s) for s in scores.tolist()],
        )
    return entry, masks, int((~keep).sum())


def prompt_box(item: WorkItem, image_size: tuple[int, int]) -> torch.Tensor:
    """[1, 4] anns bbox clipped to the image (``datasets.anns.clip_bbox``: more than 1 px outside is
    an error, the box belongs to another image)."""
    height, width = image_size
    return torch.tensor([clip_bbox(item.box, width, height, str(item.path))])


# ----------------------------------------------------------------------------------------------
# Preview
# ----------------------------------------------------------------------------------------------


def write_preview(path: Path, image: np.ndarray, masks: torch.Tensor, entry: ImageMasks, max_side: int = 1024) -> None:
    """PNG of ``image`` with translucent masks, their boxes and scores, at most ``max_side`` px."""
    from torchvision.transforms.functional import resize
    from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

    height, width = image.shape[:2]
    scale = min(1.0, max_side / max(height, width))
    size = [max(1, round(height * scale)), max(1, round(width * scale))]
    canvas = resize(torch.from_numpy(image).permute(2, 0, 1), size, antialias=True)
    if len(entry):
        small = resize(masks[:, None].float(), size, antialias=False)[:, 0] > 0.5
        colors = [tuple(int(c) for c in np.random.default_rng(i).integers(64, 256, 3)) for i in range(len(entry))]
        canvas = draw_segmentation_masks(canvas, small, alpha=0.45, colors=colors)
        boxes = torch.tensor(entry.bboxes) * scale
        canvas = draw_bounding_boxes(
            canvas,
            boxes,
            labels=[f"{s:.2f}" for s in entry.scores],
            colors=colors,
            width=max(1, round(max(size) / 400)),
        )
    preview = Image.fromarray(canvas.permute(1, 2, 0).numpy())
    atomic_write(path, lambda handle: preview.save(handle, format="PNG"))


def preview_name(index: int, key: str) -> str:
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", str(Path(key).with_suffix("")))[-80:]
    return f"{index:06d}_{stem}.png"


# ----------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------


def process_shards(
    items: Sequence[WorkItem],
    pending: Sequence[int],
    args: argparse.Namespace,
    detector: Owlv2Detector | None,
    segmenter: SamSegmenter,
    timer: StageTimer,
) -> dict:
    """Compute and write the ``pending`` shards; returns this run's counters.

    Batches never cross a shard boundary, so a resumed run batches each shard exactly as an
    uninterrupted run does (same float results, same file).
    """
    out, size = args.output_dir, args.shard_size
    shard_ranges = {s: range(s * size, min((s + 1) * size, len(items))) for s in pending}
    batches = [
        (s, list(r[i : i + args.batch_size]))
        for s, r in shard_ranges.items()
        for i in range(0, len(r), args.batch_size)
    ]
    dataset = ImageItems(items, detector.preprocess if detector is not None else None)
    loader = DataLoader(
        dataset,
        batch_sampler=[b for _, b in batches],
        collate_fn=_as_list,
        num_workers=args.num_workers,
        worker_init_fn=worker_init_fn() if args.num_workers else None,
    )
    preview_dir = out / "preview"
    previews_left = max(0, args.preview - len(list(preview_dir.glob("*.png")))) if args.preview else 0
    stats = Counter()
    results: dict[str, dict] = {}
    areas: dict[str, list[float]] = {}
    failed: dict[str, str] = {}
    bar = tqdm(total=sum(len(r) for r in shard_ranges.values()), unit="img", desc="masks", dynamic_ncols=True)
    for (shard, _), batch in zip(batches, loader):
        for record in batch:
            for stage, seconds in record.seconds.items():
                timer.seconds[stage] += seconds
        good = []
        for record in batch:
            if record.error is None:
                good.append(record)
            else:
                failed[items[record.index].key] = record.error
                tqdm.write(f"skipped: {record.error}", file=sys.stderr)
        if detector is not None and good:
            with timer.stage("owlv2"):
                detections = detector.detect(
                    torch.stack([r.pixel_values for r in good]), [r.image.shape[:2] for r in good]
                )
        else:
            detections = [None] * len(good)
        for record, detection in zip(good, detections):
            item = items[record.index]
            if detection is None:  # queries mode: the annotated box, score 1 (given, not predicted)
                try:
                    detection = (prompt_box(item, record.image.shape[:2]), torch.ones(1))
                except AnnotationError as err:  # names the image
                    failed[item.key] = str(err)
                    tqdm.write(f"skipped: {failed[item.key]}", file=sys.stderr)
                    continue
            fallback = args.fallback if detector is not None else "none"
            stats["automatic_fallback"] += fallback == "automatic" and len(detection[0]) == 0
            entry, masks, dropped = masks_for_image(segmenter, record.image, *detection, timer, fallback)
            results[item.key] = entry.to_dict()
            areas[item.key] = masks.flatten(1).float().mean(dim=1).tolist()  # share of the image, per mask
            stats["objects"] += len(entry)
            stats["empty_masks_dropped"] += dropped
            if previews_left:
                with timer.stage("preview"):
                    write_preview(preview_dir / preview_name(record.index, item.key), record.image, masks, entry)
                previews_left -= 1
        bar.update(len(batch))
        bar.set_postfix(objects=stats["objects"], failed=len(failed), refresh=False)
        stats["images"] += len(batch)
        if batch[-1].index == shard_ranges[shard][-1]:  # last batch of the shard: write it
            keys = [items[i].key for i in shard_ranges[shard]]
            with timer.stage("write"):
                atomic_torch_save(
                    {
                        "format": SHARD_FORMAT,
                        "keys": keys,
                        "captions": {k: results.pop(k) for k in keys if k in results},
                        "failed": {k: failed[k] for k in keys if k in failed},
                        "mask_area": {k: areas.pop(k) for k in keys if k in areas},
                    },
                    shard_path(out, shard),
                )
            stats["shards"] += 1
    bar.close()
    return dict(stats)


def merge_shards(
    items: Sequence[WorkItem], output_dir: Path, shard_size: int
) -> tuple[dict[str, dict], dict[str, str], list[float]]:
    """All shards in item order -> (captions {key: entry}, failed {key: reason}, mask area shares)."""
    captions, failed, areas = {}, {}, []
    for shard in range(math.ceil(len(items) / shard_size)):
        keys = [item.key for item in items[shard * shard_size : (shard + 1) * shard_size]]
        content = read_shard(shard_path(output_dir, shard), keys)
        captions.update(content["captions"])
        failed.update(content["failed"])
        areas += [a for key in content["captions"] for a in content["mask_area"][key]]
    return captions, failed, areas


def summarize(
    captions: dict[str, dict],
    failed: dict[str, str],
    areas: Sequence[float],
    skipped_no_bbox: Sequence[str],
    run_stats: dict,
    timer: StageTimer,
    elapsed: float,
) -> dict:
    """Numbers a user checks in the morning (see docs/object-masks.md): counts, objects/image, mask area, time."""
    per_image = Counter(len(entry["masks_rle"]) for entry in captions.values())
    per_image_stages = {k: v for k, v in timer.seconds.items() if k != "load_models"}
    stage_total = sum(per_image_stages.values()) or 1.0
    processed = run_stats.get("images", 0)
    return {
        "images": len(captions) + len(failed),
        "images_with_masks": len(captions),
        "images_without_detections": per_image.get(0, 0),
        "failed_images": len(failed),
        "queries_without_bbox": len(skipped_no_bbox),
        "objects": int(sum(len(e["masks_rle"]) for e in captions.values())),
        "objects_per_image": {str(k): per_image[k] for k in sorted(per_image)},
        "mean_mask_area_percent": float(np.mean(areas) * 100) if len(areas) else 0.0,
        "processed_this_run": processed,
        "empty_masks_dropped_this_run": run_stats.get("empty_masks_dropped", 0),
        "automatic_fallback_this_run": run_stats.get("automatic_fallback", 0),
        "seconds_this_run": round(elapsed, 3),
        "images_per_second_this_run": round(processed / elapsed, 3) if processed and elapsed > 0 else None,
        "stage_seconds_this_run": {k: round(timer.seconds[k], 4) for k in STAGES if k in timer.seconds},
        # Share of the per-image work (model loading excluded). With --num_workers > 0, load and
        # owlv2_preprocess are summed over the workers and overlap the model stages.
        "stage_share_this_run": {
            k: round(per_image_stages[k] / stage_total, 4) for k in STAGES if k in per_image_stages
        },
    }


def print_summary(summary: dict, failed: dict[str, str], skipped_no_bbox: Sequence[str], output_dir: Path) -> None:
    lines = [
        f"images               {summary['images']} ({summary['processed_this_run']} processed in this run)",
        f"  with masks         {summary['images_with_masks']} "
        f"(of which {summary['images_without_detections']} have no detections: empty lists)",
        f"  unreadable/failed  {summary['failed_images']}"
        + (f" (all in {output_dir / 'failed_images.txt'})" if failed else ""),
    ]
    lines += [f"    {key}: {reason}" for key, reason in list(failed.items())[:_LISTED]]
    if len(failed) > _LISTED:
        lines.append(f"    ... and {len(failed) - _LISTED} more")
    if skipped_no_bbox:
        lines.append(f"  queries without bbox, not masked: {len(skipped_no_bbox)} (e.g. {list(skipped_no_bbox)[:5]})")
    histogram = " | ".join(f"{k}: {v}" for k, v in summary["objects_per_image"].items())
    lines += [
        f"objects              {summary['objects']}, mean mask area "
        f"{summary['mean_mask_area_percent']:.2f} % of the image",
        f"objects per image    {histogram or '-'}",
    ]
    if summary["automatic_fallback_this_run"]:
        lines.append(
            f"no detection, SAM automatic masks instead (--fallback automatic): "
            f"{summary['automatic_fallback_this_run']} images"
        )
    if summary["empty_masks_dropped_this_run"]:
        lines.append(f"empty SAM masks dropped (with their boxes): {summary['empty_masks_dropped_this_run']}")
    shares = " | ".join(f"{k} {100 * v:.0f}%" for k, v in summary["stage_share_this_run"].items())
    rate = summary["images_per_second_this_run"]
    lines.append(
        f"time                 {summary['seconds_this_run']:.1f} s"
        + (f", {rate:.3g} images/s" if rate else "")
        + (f" ({shares})" if shares else "")
    )
    print("\n".join(lines))


def resolve_sam_type(args: argparse.Namespace) -> tuple[str, dict]:
    """(SAM type name, architecture dict) for the run config, without loading the checkpoint."""
    if args.sam_config is not None:
        return f"custom:{args.sam_config.name}", dataclasses.asdict(SamArchitecture.from_json(args.sam_config))
    model_type = args.sam_model_type or infer_sam_model_type(args.sam_checkpoint)
    if model_type is None:
        raise ModelLoadError(
            f"cannot tell the SAM type from the file name '{args.sam_checkpoint.name}'; "
            f"pass --sam_model_type ({' | '.join(SAM_ARCHITECTURES)})"
        )
    return model_type, dataclasses.asdict(SAM_ARCHITECTURES[model_type])


def run(args: argparse.Namespace) -> dict:
    """The whole job; returns the summary. Raises RunError / ModelLoadError before any image."""
    start = time.perf_counter()
    output_dir: Path = args.output_dir
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RunError(f"--device {args.device}: CUDA is not available on this machine (use --device cpu)")
    if args.anns_file is not None:
        items, skipped_no_bbox = query_items(args.anns_file, args.galleries_dir, args.queries_dir)
        source = {
            "mode": "queries",
            "anns_file": str(args.anns_file.resolve()),
            "galleries_dir": str(args.galleries_dir),
            "queries_dir": str(args.queries_dir),
        }
    else:
        if is_tar_spec(str(args.input_dir)):  # webdataset tar shards: their images, unpacked once (resumable)
            args.input_dir = unpacked_galleries(str(args.input_dir))
        if not args.input_dir.is_dir():
            raise RunError(f"--input_dir '{args.input_dir}' is not a folder")
        if args.input_dir.resolve().is_relative_to(output_dir.resolve()):
            raise RunError(
                f"--output_dir '{output_dir}' contains --input_dir '{args.input_dir}'; choose an "
                "output folder outside the images (a new folder, or one inside --input_dir)"
            )
        items, skipped_no_bbox = gallery_items(args.input_dir, args.absolute_keys, exclude=output_dir), []
        source = {
            "mode": "detect",
            "input_dir": str(args.input_dir.resolve()),
            "absolute_keys": args.absolute_keys,
            "owlv2_model": args.owlv2_model,
            "queries": list(args.queries or []),
            "score_threshold": args.score_threshold,
            "nms_iou": args.nms_iou,
            "max_objects": args.max_objects,
            "min_box_size": args.min_box_size,
            "fallback": args.fallback,
            "automatic_thresholds": [args.automatic_pred_iou_thresh, args.automatic_stability_thresh],
            "exact_owlv2_resize": args.exact_owlv2_resize,
        }
    if not items:
        raise RunError(
            f"no images to process in {args.anns_file or args.input_dir} (extensions {sorted(IMAGE_EXTENSIONS)})"
        )
    sam_type, sam_arch = resolve_sam_type(args)
    if source["mode"] == "detect":  # the OWLv2 weights by content (a local folder) or hub snapshot
        source["owlv2_weights"] = model_weights_identity(args.owlv2_model)
    config = {
        **source,
        "sam_checkpoint": str(args.sam_checkpoint.resolve()),
        "sam_checkpoint_sha256": model_file_sha256(args.sam_checkpoint, "--sam_checkpoint"),
        "sam_model_type": sam_type,
        "sam_architecture": sam_arch,
        "shard_size": args.shard_size,
        "num_images": len(items),
        "images_sha256": items_digest(items),
    }
    config = json.loads(json.dumps(config))  # as run_config.json will read back (tuples -> lists)
    claim_folder(output_dir, "masks")
    with FolderLock(output_dir):
        return _run_locked(args, items, skipped_no_bbox, config, device, start)


def load_models(
    args: argparse.Namespace, device: torch.device, timer: StageTimer
) -> tuple[torch.nn.Module, Owlv2Detector | None]:
    """(SAM, the OWLv2 detector or None in queries mode); ModelLoadError names a file that cannot be used."""
    with timer.stage("load_models"):
        sam, _ = load_sam(
            args.sam_checkpoint, model_type=args.sam_model_type, sam_config=args.sam_config, device=device
        )
        detector = None
        if args.anns_file is None:
            options = DetectionOptions(args.score_threshold, args.nms_iou, args.max_objects, args.min_box_size)
            detector = Owlv2Detector.from_pretrained(
                args.owlv2_model,
                options,
                queries=args.queries or (),
                device=device,
                exact_resize=args.exact_owlv2_resize,
            )
    return sam, detector


def _run_locked(
    args: argparse.Namespace,
    items: list[WorkItem],
    skipped_no_bbox: list[str],
    config: dict,
    device: torch.device,
    start: float,
) -> dict:
    """The part of :func:`run` that writes, holding the output folder's lock."""
    output_dir: Path = args.output_dir
    for folder in OWN_FILES:
        remove_stale_temporaries(output_dir / folder, root=output_dir)  # of a killed run
    timer = StageTimer(device)
    # --overwrite deletes the earlier run only after every input, the models included, has loaded:
    # a checkpoint that cannot be read must not cost a complete run.
    models = load_models(args, device, timer) if args.overwrite else None
    done = check_run_config(output_dir, config, args.overwrite)
    num_shards = math.ceil(len(items) / args.shard_size)
    pending = [s for s in range(num_shards) if not shard_path(output_dir, s).is_file()]
    if done:
        print(f"resuming: {num_shards - len(pending)} of {num_shards} shards already done")
    if args.max_shards is not None:
        pending = pending[: args.max_shards]

    run_stats: dict = {}
    if pending:
        sam, detector = models or load_models(args, device, timer)
        atomic_write_json(output_dir / "run_config.json", config)
        segmenter = SamSegmenter(sam, args.automatic_pred_iou_thresh, args.automatic_stability_thresh)
        run_stats = process_shards(items, pending, args, detector, segmenter, timer)

    remaining = [s for s in range(num_shards) if not shard_path(output_dir, s).is_file()]
    if remaining:
        print(
            f"stopped after --max_shards {args.max_shards}: {num_shards - len(remaining)} of {num_shards} "
            "shards done; run the same command again to continue"
        )
        return {"shards_done": num_shards - len(remaining), "shards": num_shards, **run_stats}
    captions, failed, areas = merge_shards(items, output_dir, args.shard_size)
    save_captions(captions, output_dir / "captions.pt")
    atomic_write_text(output_dir / "failed_images.txt", "".join(f"{k}\t{v}\n" for k, v in failed.items()))
    summary = summarize(captions, failed, areas, skipped_no_bbox, run_stats, timer, time.perf_counter() - start)
    atomic_write_json(output_dir / "summary.json", summary)
    print_summary(summary, failed, skipped_no_bbox, output_dir)
    print(f"wrote {output_dir / 'captions.pt'}")
    return summary


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The settings of scripts/create_masked_dataset.py, with their one default each (the benchmark reads them too)."""
    parser = argparse.ArgumentParser(
        description="Object masks for Mask Inversion: OWLv2 finds the objects, SAM turns each box into a mask.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    io = parser.add_argument_group("input / output")
    io.add_argument("--input_dir", type=Path, help="gallery mode: folder of images (searched recursively)")
    io.add_argument("--output_dir", type=Path, required=True, help="captions.pt, shards/, previews, summary")
    io.add_argument(
        "--absolute_keys",
        action="store_true",
        help="key captions by resolved absolute path instead of the path relative to --input_dir",
    )
    io.add_argument("--anns_file", type=Path, help="queries mode: anns.pt whose query bboxes become SAM prompts")
    io.add_argument("--queries_only", action="store_true", help="required with --anns_file: mask its queries")
    io.add_argument("--galleries_dir", type=Path, help="with --anns_file: root of relative gallery paths")
    io.add_argument("--queries_dir", type=Path, help="with --anns_file: root of relative query paths")
    det = parser.add_argument_group("OWLv2 detection (gallery mode)")
    det.add_argument("--owlv2_model", default="google/owlv2-base-patch16-ensemble", help="hub id or local folder")
    det.add_argument(
        "--queries",
        nargs="+",
        metavar="TEXT",
        help='text queries ("a mug" "a toy"); default: class-agnostic objectness',
    )
    det.add_argument("--score_threshold", type=float, default=0.2, help="keep boxes scoring above this")
    det.add_argument(
        "--nms_iou", type=float, default=0.4, help="NMS IoU threshold (class-agnostic; the original's 0.4)"
    )
    det.add_argument(
        "--max_objects",
        type=int,
        default=None,
        help="at most this many boxes per image (default: no cap, as the original)",
    )
    det.add_argument(
        "--min_box_size",
        type=float,
        default=0.0,
        help="drop boxes narrower or lower (pixels; default 0, as the original)",
    )
    det.add_argument(
        "--fallback",
        choices=("automatic", "none"),
        default="automatic",
        help="an image where OWLv2 finds nothing: SAM's automatic mask generator (the original's fallback) or no masks",
    )
    det.add_argument(
        "--automatic_pred_iou_thresh",
        type=float,
        default=0.88,
        help="--fallback automatic: keep masks SAM predicts above this IoU (SAM's default)",
    )
    det.add_argument(
        "--automatic_stability_thresh",
        type=float,
        default=0.95,
        help="--fallback automatic: keep masks with a stability score above this (SAM's default)",
    )
    det.add_argument(
        "--exact_owlv2_resize",
        action="store_true",
        help="use the OWLv2 processor's Gaussian anti-aliasing on full-size images (30x slower "
        "on 12 MP photos) instead of a PIL pre-shrink to the model's input size",
    )
    seg = parser.add_argument_group("SAM segmentation")
    seg.add_argument("--sam_checkpoint", type=Path, required=True, help="e.g. sam_vit_h_4b8939.pth")
    seg.add_argument(
        "--sam_model_type", choices=sorted(SAM_ARCHITECTURES), help="default: inferred from the checkpoint file name"
    )
    seg.add_argument(
        "--sam_config",
        type=Path,
        help="JSON of SamArchitecture fields for a SAM that is not vit_h/l/b (overrides the type)",
    )
    run_group = parser.add_argument_group("run")
    run_group.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    run_group.add_argument("--batch_size", type=int, default=8, help="images per OWLv2 forward pass")
    run_group.add_argument(
        "--num_workers",
        type=int,
        default=min(4, os.cpu_count() or 1),
        help="DataLoader processes that decode and preprocess images (0: main process)",
    )
    run_group.add_argument("--shard_size", type=int, default=1000, help="images per resumable shard")
    run_group.add_argument("--max_shards", type=int, help="stop after this many new shards (e.g. job time limits)")
    run_group.add_argument(
        "--preview",
        type=int,
        default=0,
        metavar="N",
        help="write N PNGs with boxes and masks to OUTPUT_DIR/preview as soon as they are done",
    )
    run_group.add_argument("--overwrite", action="store_true", help="discard an earlier run in --output_dir")
    args = parser.parse_args(argv)
    if args.anns_file is not None and not args.queries_only:
        parser.error("--anns_file needs --queries_only (gallery images are masked from --input_dir with OWLv2)")
    if args.queries_only and args.anns_file is None:
        parser.error("--queries_only needs --anns_file")
    if (args.anns_file is None) == (args.input_dir is None):
        parser.error("give either --input_dir (gallery mode) or --anns_file --queries_only (queries mode)")
    for name in ("batch_size", "shard_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1")
    if args.num_workers < 0 or args.preview < 0 or (args.max_shards is not None and args.max_shards < 1):
        parser.error("--num_workers and --preview must be >= 0, --max_shards >= 1")
    try:
        DetectionOptions(args.score_threshold, args.nms_iou, args.max_objects, args.min_box_size)
    except ValueError as err:
        parser.error(str(err))
    return args
