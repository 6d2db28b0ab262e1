"""What create_index.py extracts, checked before any model runs, and the Dataset that reads it.

* :class:`ImageJob`: how one image is read (crop to its bbox? which masks?).
* :func:`gallery_jobs`, :func:`query_jobs`: the jobs of each split from the annotations and masks.
* :func:`check_jobs`: every job against its image's header (:func:`datasets.images.image_facts`):
  readable, query boxes inside the image, masks of the image's size. All of it runs before the
  model is loaded, so a bad box or mask is found in seconds, not after hours of gallery work.
* :func:`jobs_digest`: the hash of exactly what a split's features depend on (keys, image bytes,
  boxes used, masks), the inputs part of the features folder's identity.
* :func:`job_to_dict`, :func:`job_from_dict`: a job as JSON, for the per-shard job files that
  ``create_index.py stage=prepare`` writes and its workers read (``utils.retrieval.feature_store``).
* :class:`ViewDataset`: ``dataset[i]`` -> (i, views), decoded in DataLoader workers.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.ops import box_iou

from datasets.views import NO_MASK, Views, zero_outside
from utils.errors import SoIRError

from .anns import Annotation, AnnotationError, crop_box, pixel_box
from .captions import ImageMasks, find_masks
from .images import ImageFacts, ImageLoadError, load_rgb

log = logging.getLogger("soir.datasets")
_LISTED = 10


CROPS = ("square", "tight")


@dataclass(frozen=True)
class ImageJob:
    """How one image is read: crop it to its bbox? Which masks (None = global embedding)?"""

    annotation: Annotation
    crop: str | None = None  # "square" (the original's query crop) | "tight" | None: no crop
    masks: ImageMasks | None = None
    bbox_as_mask: bool = False  # query with mask_input and no caption mask: its bbox rectangle
    full_mask: bool = False  # no masks, missing_masks=full_mask: MI with one full-image mask
    zero_background: bool = False  # mask_input: pixels outside the mask(s) set to zero before MI
    global_fallback: bool = False  # masks were wanted but there are none (missing_masks=global)
    crop_geometry: str = "soir"  # "original": the crop box rounded as the original (pixel_geometry)

    def __post_init__(self):
        if self.crop not in (None, *CROPS):
            raise ValueError(f"crop={self.crop!r}; one of {CROPS} or None")
        if self.crop_geometry not in ("soir", "original"):
            raise ValueError(f"crop_geometry={self.crop_geometry!r}; one of soir, original")


# ---------------------------------------------------------------------------------- building jobs
def gallery_jobs(
    gallery: Sequence[Annotation],
    captions: dict[str, ImageMasks] | None,
    uses_masks: bool,
    missing_masks: str,
    source: str,
    crop: str | None = None,
) -> list[ImageJob]:
    """Gallery images are not cropped: cropping to a ground-truth box would leak the label. ``crop``
    ("square" / "tight") crops those that have a bbox anyway, as the original code does
    (``gallery_crop=true``, for comparable numbers only).

    With an MI extractor every image needs masks: an image without (no entry, no detections, or a
    failed entry of the original mask script) is an error naming ``source`` (where masks were looked
    for); with ``missing_masks="global"`` it gets its global embedding, with ``"full_mask"`` MI with
    one full-image mask (counted and logged).
    """

    def job(ann: Annotation, **kwargs) -> ImageJob:
        return ImageJob(ann, crop=crop if ann.bbox is not None else None, **kwargs)

    if not uses_masks:
        return [job(ann) for ann in gallery]
    masks = [find_masks(captions, ann.key, ann.file) if captions else None for ann in gallery]
    missing = [ann.key for ann, m in zip(gallery, masks) if m is None or len(m) == 0]
    if missing and missing_masks == "error":
        example = f"; captions keys look like {next(iter(captions))!r}" if captions else ""
        raise SoIRError(
            f"{len(missing)} of {len(gallery)} gallery images have no masks in {source} "
            f"(first: {missing[:5]}{example}); set missing_masks=global to use their "
            f"global embedding"
        )
    if crop is not None and any(ann.bbox is not None and m for ann, m in zip(gallery, masks)):
        raise SoIRError(
            "gallery_crop=true with masks: the captions' masks are made for the whole gallery image, "
            "not for its bbox crop (the original misaligned them); use gallery_crop with a plain "
            "extractor or without masks"
        )
    if missing:
        what = "their global embedding" if missing_masks == "global" else "MI with one full-image mask"
        log.warning(
            "missing_masks=%s: %d of %d gallery images have no masks and get %s",
            missing_masks,
            len(missing),
            len(gallery),
            what,
        )
    fallback = {"global_fallback": True} if missing_masks == "global" else {"full_mask": True}
    return [job(ann, masks=m) if m else job(ann, **fallback) for ann, m in zip(gallery, masks)]


def query_jobs(
    queries: Sequence[Annotation],
    captions: dict[str, ImageMasks] | None,
    crop: str | None,
    use_masks: str | None = None,
    all_masks: bool = False,
    anns_file: str = "anns.pt",
) -> list[ImageJob]:
    """Queries: the global embedding of their bbox crop (``crop``: "square" / "tight" / None), or
    Mask Inversion with their mask(s) on the whole query image (``use_masks``):

    * ``"zeroed"`` (``mask_input=true``, the original's meaning): the pixels outside the mask(s) are
      set to zero first, so nothing outside the object can change the query vector;
    * ``"unmasked"`` (``query_mi=true``): MI on the unmasked image, the mask only guides the map.

    The mask comes from the query captions: the one whose box best overlaps the query's bbox (or the
    only one when the query has no bbox), or with ``all_masks`` all of them (several query vectors,
    max-scored); without a mask, the bbox rectangle (counted and logged).
    """
    if use_masks is None:
        no_box = sum(ann.bbox is None for ann in queries)
        if no_box and crop is not None:
            log.warning("%d of %d queries have no bbox and are used uncropped", no_box, len(queries))
        return [ImageJob(ann, crop=crop if ann.bbox is not None else None) for ann in queries]
    jobs, rectangles = [], 0
    zero = use_masks == "zeroed"
    for ann in queries:
        masks = find_masks(captions, ann.key, ann.file) if captions else None
        if masks and not all_masks:
            masks = query_mask(masks, ann)
        if masks:
            jobs.append(ImageJob(ann, masks=masks, zero_background=zero))
        elif ann.bbox is not None:
            jobs.append(ImageJob(ann, bbox_as_mask=True, zero_background=zero))
            rectangles += 1
        else:
            raise SoIRError(
                f"{ann.file}: query without a mask in the captions and without a bbox in {anns_file}; "
                "mask_input / query_mi need one of them"
            )
    if rectangles:
        log.warning(
            "%d of %d queries have no mask overlapping their bbox and use the bbox rectangle", rectangles, len(queries)
        )
    return jobs


def query_mask(masks: ImageMasks, ann: Annotation) -> ImageMasks | None:
    """The query's object mask: the best overlap with its bbox (None if none overlaps it), or its
    only mask when the query has no bbox."""
    if ann.bbox is None:
        if len(masks) != 1:
            raise SoIRError(f"query {ann.file} has {len(masks)} masks and no bbox to choose one")
        return masks
    iou = box_iou(torch.tensor([ann.bbox], dtype=torch.float), torch.tensor(masks.bboxes, dtype=torch.float))[0]
    best = int(iou.argmax())
    if iou[best] == 0:
        return None
    return masks.select([best])


# ------------------------------------------------------------------------------ checks, identity
def with_crop_geometry(jobs: list[ImageJob], geometry: str) -> list[ImageJob]:
    """``jobs`` whose crops are rounded with ``geometry`` ("soir" | "original", ``pixel_geometry``)."""
    return [replace(job, crop_geometry=geometry) if job.crop else job for job in jobs]


def check_jobs(
    jobs: Sequence[ImageJob], facts: Sequence[ImageFacts], split: str, bad_images: str
) -> tuple[list[ImageJob], list[tuple[str, str, str]]]:
    """Check every job against its image's header, before any model runs.

    * an image whose header cannot be read: an error (``bad_images="error"``) or, with ``"skip"``,
      left out and returned in ``skipped`` as (split, key, reason);
    * a box the job uses (query crop, bbox rectangle) must lie inside the image (``pixel_box``);
    * masks must have the image's upright size. Masks of the original code's format were made on
      the stored pixels, before EXIF rotation: they get the image's EXIF orientation (logged).

    All problems are collected and reported together (the first 10, with the count).

    Returns:
        (jobs to extract, skipped images).
    """
    kept, skipped, problems, turned = [], [], [], 0
    for job, fact in zip(jobs, facts):
        ann = job.annotation
        if fact.error is not None:
            if bad_images == "skip":
                skipped.append((split, ann.key, fact.error))
                continue
            problems.append(f"{ann.file}: unreadable image ({fact.error})")
            continue
        try:
            if ann.bbox is not None and (job.crop or job.bbox_as_mask):
                pixel_box(ann.bbox, fact.width, fact.height, f"{split} image {ann.file}")
            if job.masks is not None and len(job.masks):
                masks = job.masks
                if masks.made_before_exif and fact.exif_orientation != 1:
                    masks, turned = replace(masks, exif_orientation=fact.exif_orientation), turned + 1
                    job = replace(job, masks=masks)
                if masks.upright_size != (fact.height, fact.width):
                    problems.append(
                        f"{ann.file}: its masks are {masks.upright_size[0]}x{masks.upright_size[1]} "
                        f"(H x W) but the image is {fact.height}x{fact.width} (after EXIF rotation)"
                    )
        except AnnotationError as err:
            problems.append(str(err))
        kept.append(job)
    if problems:
        more = f"\n  ... and {len(problems) - _LISTED} more" if len(problems) > _LISTED else ""
        fix = "; set bad_images=skip to leave unreadable images out" if any("unreadable" in p for p in problems) else ""
        raise SoIRError(
            f"{len(problems)} {split} images cannot be used{fix}:\n  " + "\n  ".join(problems[:_LISTED]) + more
        )
    if turned:
        log.warning(
            "%s: the masks of %d images were made before EXIF rotation (original code's format) "
            "and are turned like their images",
            split,
            turned,
        )
    if skipped:
        log.warning(
            "bad_images=skip: %d %s images cannot be read and are left out: %s",
            len(skipped),
            split,
            [k for _, k, _ in skipped[:_LISTED]],
        )
    return kept, skipped


def jobs_digest(jobs: Sequence[ImageJob], facts: dict[str, ImageFacts]) -> str:
    """sha256 of what a split's features depend on: per job its key, image bytes (sha256), the box
    it uses, its masks and how they are used. Labels are not in it, nor the anns file's bytes, so
    fixing a label or a query box keeps the gallery."""
    digest = hashlib.sha256()
    for job in jobs:
        ann = job.annotation
        box = list(ann.bbox) if ann.bbox is not None and (job.crop or job.bbox_as_mask) else None
        masks = None if job.masks is None else {**job.masks.to_dict(), "exif": job.masks.exif_orientation}
        digest.update(
            json.dumps(
                [
                    ann.key,
                    facts[ann.key].sha256,
                    box,
                    job.crop,
                    masks,
                    job.bbox_as_mask,
                    job.full_mask,
                    job.zero_background,
                    job.global_fallback,
                ],
                sort_keys=True,
            ).encode()
        )
    return digest.hexdigest()


# ------------------------------------------------------------------------------------ job files
def job_to_dict(job: ImageJob) -> dict:
    """What of ``job`` decides how its image is read, as JSON-able values (the annotation travels as
    its ``images.json`` record, see :func:`job_from_dict`)."""
    masks = None
    if job.masks is not None:
        masks = {
            **job.masks.to_dict(),
            "error": job.masks.error,
            "made_before_exif": job.masks.made_before_exif,
            "exif_orientation": job.masks.exif_orientation,
        }
    return {
        "crop": job.crop,
        "masks": masks,
        "bbox_as_mask": job.bbox_as_mask,
        "full_mask": job.full_mask,
        "zero_background": job.zero_background,
        "global_fallback": job.global_fallback,
        "crop_geometry": job.crop_geometry,
    }


def job_from_dict(record: dict, job: dict, is_query: bool) -> ImageJob:
    """The :class:`ImageJob` of :func:`job_to_dict`'s ``job`` for the image of ``record`` (key, file,
    ins, bbox, obj_name: ``utils.pipeline.create.record``). Annotation fields that no view uses (``set``,
    ``boxes``, the anns' own masks, already turned into ``job.masks``) are not restored."""
    annotation = Annotation(
        key=record["key"],
        file=Path(record["file"]),
        ins=tuple(record["ins"]),
        is_query=is_query,
        bbox=tuple(record["bbox"]) if record["bbox"] is not None else None,
        obj_name=record["obj_name"],
    )
    masks = None if job["masks"] is None else ImageMasks(**job["masks"])
    return ImageJob(
        annotation,
        crop=job["crop"],
        masks=masks,
        bbox_as_mask=job["bbox_as_mask"],
        full_mask=job["full_mask"],
        zero_background=job["zero_background"],
        global_fallback=job["global_fallback"],
        crop_geometry=job.get("crop_geometry", "soir"),  # job files written before it existed
    )


# --------------------------------------------------------------------------------------- reading
class ViewDataset(Dataset):
    """``dataset[i]`` -> (i, views) where views = ``view_maker(image, masks)``.

    Errors name the image file, so a bad mask in a 100k-image run is found at once. An image whose
    pixels cannot be decoded (a truncated file with a good header) comes back as views with
    ``error`` set; the caller applies the ``bad_images`` policy.

    Args:
        jobs: one per image, in output order.
        view_maker, global_view_maker: ``datasets.views.ViewMaker`` for masked and global views.
        empty_to_global: an image whose masks all vanish at the model's input size gets its global
            view (True, counted in ``Views.global_fallback``) or is an error (False).
    """

    def __init__(
        self, jobs: Sequence[ImageJob], view_maker: Callable, global_view_maker: Callable, empty_to_global: bool = False
    ):
        self.jobs, self.view_maker, self.global_view_maker = list(jobs), view_maker, global_view_maker
        self.empty_to_global = empty_to_global

    def __len__(self) -> int:
        return len(self.jobs)

    def __getitem__(self, i: int):
        job = self.jobs[i]
        ann = job.annotation
        try:
            image = load_rgb(ann.file)
        except ImageLoadError as err:
            return i, Views([], error=str(err))
        if job.crop and ann.bbox is not None:
            image = crop_box(
                image, ann.bbox, source=str(ann.file), square=job.crop == "square", geometry=job.crop_geometry
            )
        try:
            masks = None
            if job.masks is not None and len(job.masks):
                masks = job.masks.masks()
            elif job.bbox_as_mask:
                masks = bbox_mask(image, ann.bbox, source=str(ann.file))
            elif job.full_mask:
                masks = np.ones((1, image.height, image.width), dtype=bool)
            if masks is not None:
                views = self.view_maker(image, masks, zero_background=job.zero_background)
                if job.masks is None or not len(job.masks):
                    without_source(views)
            else:
                views = self.global_view_maker(image)
                views.global_fallback = int(job.global_fallback)
                return i, views
        except ValueError as err:
            raise SoIRError(f"{ann.file}: {err}") from None
        if not views.views and job.zero_background:
            image = zero_outside(image, masks)  # the fallbacks below see the query as mask_input made it
        if not views.views and ann.is_query and ann.bbox is not None and not job.bbox_as_mask:
            # A query mask that vanishes at the model's input size: its bbox still locates the object.
            views = without_source(self.view_maker(image, bbox_mask(image, ann.bbox, source=str(ann.file))))
            views.dropped_masks, views.global_fallback = 1, 0
        if not views.views:
            if not self.empty_to_global:
                raise SoIRError(
                    f"{ann.file}: all {views.dropped_masks} masks are empty at the model's "
                    f"input size (missing_masks=global would use the global embedding)"
                )
            fallback = self.global_view_maker(image)
            fallback.dropped_masks, fallback.global_fallback = views.dropped_masks, 1
            return i, fallback
        return i, views


def without_source(views: Views) -> Views:
    """``views`` whose masks are no entry of the captions file (a bbox rectangle, the full-image mask of
    ``missing_masks=full_mask``): their rows get ``mask_index`` ``NO_MASK``, so nothing (the report's
    outlines, the LeGrad maps) looks a mask up in a captions entry the image does not have."""
    for view in views.views:
        if view.mask_index is not None:
            view.mask_index = torch.full_like(view.mask_index, NO_MASK)
    return views


def bbox_mask(image: Image.Image, bbox: Sequence[float], source: str) -> np.ndarray:
    """[1, H, W] bool rectangle covering ``bbox`` (x1, y1, x2, y2) in ``image``; the same pixels,
    rounding and checks as :func:`crop_box`."""
    left, top, right, bottom = pixel_box(bbox, image.width, image.height, source)
    mask = np.zeros((1, image.height, image.width), dtype=bool)
    mask[0, top:bottom, left:right] = True
    return mask
