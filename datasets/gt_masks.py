"""The annotations' own object masks as a captions-like dict (config ``masks_from=anns``).

``create_index.py`` takes the Mask Inversion masks from ``captions_file`` (``masks_from=captions``,
e.g. OWLv2 + SAM detections) or from the annotation file itself (``masks_from=anns``: the
ground-truth setting of the paper's VoxDet column). :func:`annotation_masks` builds the second
source with the same type as :func:`datasets.captions.load_captions`, so everything downstream is
unchanged.
"""

from __future__ import annotations

import logging
from typing import Sequence

import numpy as np

from .anns import Annotation, AnnotationError, pixel_box
from .captions import ImageMasks, encode_mask
from .fields import bbox_from_mask
from .images import upright_size
from .voxdet import decode_annotated_mask

logger = logging.getLogger("soir.datasets")

_MAX_LISTED = 5


def annotation_masks(annotations: Sequence[Annotation], box_masks: bool = False) -> dict[str, ImageMasks]:
    """{key: ImageMasks} of the annotations' own masks, at each image's upright size.

    Per annotated object (``Annotation.boxes``, or the single ``bbox`` of a plain anns entry): its
    mask (``Annotation.masks``) decoded; without a mask, its box as a filled rectangle when
    ``box_masks`` (e.g. RoboTools galleries, which have boxes only), else nothing. Images left with
    no mask are not in the result (``create_index.py`` then applies ``missing_masks``). A VoxDet
    query mask read inverted by its builder's decoder is complemented (logged and counted, see
    :mod:`datasets.rle`). ``bboxes`` are the masks' tight boxes, ``scores`` 1.0.

    Raises:
        AnnotationError: a mask whose size is not its image's, or that fits neither its box nor
            as complement (names the image).
        ImageLoadError: an image whose size cannot be read.
    """
    out: dict[str, ImageMasks] = {}
    counts = {"masks": 0, "box_rectangles": 0, "objects_without_mask": 0, "empty_masks": 0}
    complemented: list[str] = []
    for ann in annotations:
        boxes = ann.boxes or ((ann.bbox,) if ann.bbox is not None else ())
        masks = ann.masks or (None,) * len(boxes)
        if not boxes and not masks:
            continue
        height, width = upright_size(ann.file)
        image_masks = ImageMasks()
        for box, mask in zip(boxes, masks):
            if mask is not None:
                try:
                    decoded, flipped = decode_annotated_mask(mask, height, width)
                except ValueError as err:
                    raise AnnotationError(f"{ann.file} (anns key {ann.key!r}): {err}") from None
                if flipped:
                    complemented.append(ann.key)
                counts["masks"] += 1
            elif box_masks:
                left, top, right, bottom = pixel_box(box, width, height, source=f"{ann.file} (anns key {ann.key!r})")
                decoded = np.zeros((height, width), dtype=bool)
                decoded[top:bottom, left:right] = True
                counts["box_rectangles"] += 1
            else:
                counts["objects_without_mask"] += 1
                continue
            if not decoded.any():
                counts["empty_masks"] += 1
                continue
            image_masks.masks_rle.append(encode_mask(decoded))
            image_masks.bboxes.append(bbox_from_mask(decoded))
            image_masks.scores.append(1.0)
        if len(image_masks):
            out[ann.key] = image_masks
    logger.info(
        "masks_from=anns: %d of %d images have masks (%s)",
        len(out),
        len(annotations),
        ", ".join(f"{k} {v}" for k, v in counts.items()),
    )
    if complemented:
        logger.warning(
            "masks_from=anns: %d VoxDet masks start with a 1-pixel and were read inverted by the "
            "RLE.py decoder convention; using their complement, which fits the annotated box "
            "(e.g. %s)",
            len(complemented),
            complemented[:_MAX_LISTED],
        )
    return out
