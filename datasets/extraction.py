"""A torch Dataset that turns annotated images into model views, for DataLoader workers."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from .anns import Annotation, crop_box, pixel_box
from .captions import ImageMasks
from .images import load_rgb


@dataclass(frozen=True)
class ImageJob:
    """How one image is read: crop it to its bbox? Which masks (None = global embedding)?"""

    annotation: Annotation
    crop_to_bbox: bool = False
    masks: ImageMasks | None = None
    bbox_as_mask: bool = False        # query with mask_input and no caption mask: its bbox rectangle
    global_fallback: bool = False     # masks were wanted but there are none (missing_masks=global)


class ViewDataset(Dataset):
    """``dataset[i]`` -> (i, views) where views = ``view_maker(image, masks)``.

    Errors name the image file, so a bad mask in a 100k-image run is found at once.

    Args:
        jobs: one per image, in output order.
        view_maker, global_view_maker: ``extractors.views.ViewMaker`` for masked and global views.
        empty_to_global: an image whose masks all vanish at the model's input size gets its global
            view (True, counted in ``Views.global_fallback``) or is an error (False).
    """

    def __init__(self, jobs: Sequence[ImageJob], view_maker: Callable, global_view_maker: Callable,
                 empty_to_global: bool = False):
        self.jobs, self.view_maker, self.global_view_maker = list(jobs), view_maker, global_view_maker
        self.empty_to_global = empty_to_global

    def __len__(self) -> int:
        return len(self.jobs)

    def __getitem__(self, i: int):
        job = self.jobs[i]
        ann = job.annotation
        image = load_rgb(ann.file)
        if job.crop_to_bbox and ann.bbox is not None:
            image = crop_box(image, ann.bbox, source=str(ann.file))
        try:
            if job.masks is not None and len(job.masks):
                views = self.view_maker(image, job.masks.masks())
            elif job.bbox_as_mask:
                views = self.view_maker(image, bbox_mask(image, ann.bbox, source=str(ann.file)))
            else:
                views = self.global_view_maker(image)
                views.global_fallback = int(job.global_fallback)
                return i, views
        except ValueError as err:
            raise ValueError(f"{ann.file}: {err}") from None
        if not views.views and ann.is_query and ann.bbox is not None and not job.bbox_as_mask:
            # A query mask that vanishes at the model's input size: its bbox still locates the object.
            views = self.view_maker(image, bbox_mask(image, ann.bbox, source=str(ann.file)))
            views.dropped_masks, views.global_fallback = 1, 0
        if not views.views:
            if not self.empty_to_global:
                raise ValueError(f"{ann.file}: all {views.dropped_masks} masks are empty at the model's "
                                 f"input size (missing_masks=global would use the global embedding)")
            fallback = self.global_view_maker(image)
            fallback.dropped_masks, fallback.global_fallback = views.dropped_masks, 1
            return i, fallback
        return i, views


def bbox_mask(image: Image.Image, bbox: Sequence[float], source: str) -> np.ndarray:
    """[1, H, W] bool rectangle covering ``bbox`` (x1, y1, x2, y2) in ``image``; the same pixels,
    rounding and checks as :func:`crop_box`."""
    left, top, right, bottom = pixel_box(bbox, image.width, image.height, source)
    mask = np.zeros((1, image.height, image.width), dtype=bool)
    mask[0, top:bottom, left:right] = True
    return mask
