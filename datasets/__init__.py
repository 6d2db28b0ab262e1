"""SoIR data layer: image loading, ``captions.pt`` masks and ``anns.pt`` annotations.

This top-level package shadows HuggingFace ``datasets`` when the repo root is on sys.path;
SoIR never uses the HF library (tests/test_hf_datasets_shadowing.py checks transformers
still works).
"""

from .anns import (
    Annotation,
    AnnotationError,
    crop_box,
    drop_queries_without_positives,
    load_anns,
    parse_bbox,
    relevance,
    save_anns,
    select_indices,
    select_set,
    split,
)
from .captions import (
    CaptionsError,
    ImageMasks,
    atomic_torch_save,
    caption_files,
    decode_mask,
    encode_mask,
    encode_mask_row_major,
    find_masks,
    load_captions,
    rle_runs,
    save_captions,
)
from .fields import bbox_from_mask
from .gt_masks import annotation_masks
from .images import ImageLoadError, load_rgb, to_rgb

__all__ = [
    "Annotation",
    "AnnotationError",
    "crop_box",
    "drop_queries_without_positives",
    "load_anns",
    "parse_bbox",
    "relevance",
    "save_anns",
    "select_indices",
    "select_set",
    "split",
    "annotation_masks",
    "CaptionsError",
    "ImageMasks",
    "atomic_torch_save",
    "bbox_from_mask",
    "decode_mask",
    "encode_mask",
    "encode_mask_row_major",
    "rle_runs",
    "find_masks",
    "caption_files",
    "load_captions",
    "save_captions",
    "ImageLoadError",
    "load_rgb",
    "to_rgb",
]
