"""Typed schema of ``configs/defaults.yaml``, shared by ``create_index.py`` and ``search_index.py``.

Hydra validates every override against this dataclass: a misspelt key or a value of the wrong type
is an error that names the key. Checks that involve several keys live in :func:`check_config`.
"""
from __future__ import annotations

import dataclasses
import math
import uuid
from dataclasses import dataclass
from typing import Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from utils.errors import SoIRError


@dataclass
class SoIRConfig:
    # --- what to run -------------------------------------------------------------------
    dataset: str = "pe"                      # a name; used in output paths only (features, runs)
    experiment: str = "default"              # a name; used in run folder names only
    extractor: str = "siglip_mi_features"    # a name from extractors.list_extractors()
    model_name: Optional[str] = None         # HF hub id or local folder; null = extractor default
    vec_dim: int = 768                       # must equal the model's output size (checked)
    B_model: bool = True                     # DINOv2 default model: base (true) or large (false)
    # --- data --------------------------------------------------------------------------
    anns_file: str = MISSING                 # anns.pt (required by create_index.py)
    captions_file: Optional[str] = None      # captions.pt with object masks (MI extractors)
    query_captions_file: Optional[str] = None  # query masks for mask_input; null = captions_file
    galleries_dir: Optional[str] = None      # root of relative gallery paths; null = anns folder
    queries_dir: Optional[str] = None        # root of relative query paths; null = anns folder
    no_query_crop: bool = False              # true: do not crop queries to their bbox
    no_positive: str = "error"               # query without a positive in the gallery: error|skip
    duplicates: str = "error"                # keys naming one file: error|merge (when labels agree)
    bad_images: str = "error"                # unreadable image: error|skip (counted, listed)
    set: Optional[str] = None                # evaluate one split: the images whose anns `set` is this
                                             # (VoxDet-SoIR: OWID | RoboTools); null = all
    masks_from: str = "captions"             # MI masks: captions (captions_file, e.g. OWLv2 + SAM) |
                                             # anns (the anns file's own object masks: ground truth)
    box_masks: bool = False                  # masks_from=anns: an object with a box and no mask gets
                                             # its box rectangle (else it has no mask: missing_masks)
    # --- descriptors -------------------------------------------------------------------
    global_features: bool = True             # global-type descriptors (the only kind implemented)
    smart_crop: bool = False                 # MI inside each mask's padded box crop
    smart_crop_pad: float = 0.1              # crop padding, share of the box's longer side
    mi_alpha: float = 0.03                   # pull towards the global embedding
    mi_beta: float = 0.0                     # penalty on |cos| between masks of one image
    mi_lr: float = 0.1
    mi_iterations: int = 100
    mi_layer_index: int = -1                 # hooked blocks: L + mi_layer_index + 1 .. L
    mi_impl: str = "auto"                    # auto | blockwise | fused | dense: same results up to rounding
    mi_precision: str = "fp32"               # fp32 | tf32 (CUDA) | bf16 (fused): MI's products, explicit only
    mi_cuda_graph: bool = False              # CUDA: replay each MI iteration as a CUDA graph
    mi_sum: bool = False                     # one vector per image, MI on the union of its masks
    avg_multiple_vecs: bool = False          # one vector per image: mean of its mask vectors
    missing_masks: str = "error"             # gallery image with no mask: error|global
    mask_input: bool = False                 # MI on queries with their mask (else global crop)
    # --- DINOv2 / CLIP LoRA --------------------------------------------------------------
    lora_adapt: bool = False
    lora_rank: int = 256
    lora_alpha: Optional[float] = 32         # as the original (scaling 32/256); an alpha stored with the weights wins
    weights: Optional[str] = None            # LoRA state-dict checkpoint
    # --- compute -------------------------------------------------------------------------
    device: str = "auto"                     # auto (cuda if available) | cpu | cuda | cuda:N
    precision: str = "fp32"                  # fp32 | fp16 | bf16 (autocast; features stored fp32)
    batch_size: int = 16
    num_workers: int = 2
    shard_size: int = 512                    # images per feature shard (resume granularity)
    # --- index and search -------------------------------------------------------------------
    features_dir: Optional[str] = None       # create: null = outputs/features/<dataset>/<extractor>-<hash>
    index: str = "Flat"                      # faiss index_factory string (inner product)
    k_search: int = 100                      # rankings saved per query (all images are scored)
    map_at: Optional[int] = None             # also report mAP@k
    precision_at: tuple[int, ...] = (1, 5, 10)
    recall_at: tuple[int, ...] = (1, 5, 10)
    # --- report of a search run (search_index.py) -----------------------------------------
    report: bool = True                      # write report.html (+ thumbs/) next to results.json
    report_k: int = 10                       # gallery images shown per query
    report_thumb_size: int = 160             # longer side of the thumbnails, pixels
    report_maps: bool = False                # link each shown gallery image to its LeGrad map (runs the model)


CHOICES = {"no_positive": ("error", "skip"), "missing_masks": ("error", "global"),
           "precision": ("fp32", "fp16", "bf16"), "duplicates": ("error", "merge"),
           "bad_images": ("error", "skip"), "masks_from": ("captions", "anns"),
           "mi_impl": ("auto", "blockwise", "fused", "dense"), "mi_precision": ("fp32", "tf32", "bf16")}

# What a key changes, for the features folder's identity (create_index.py). QUERY_KEYS change the
# query features only; RUN_KEYS change no feature: names, search settings, and the input paths,
# whose effect (which images, their bytes, boxes and masks) is hashed from the inputs themselves,
# so moving or fixing anns.pt without changing the gallery keeps the gallery. Every other key
# changes the gallery features (and so the queries').
QUERY_KEYS = frozenset({"mask_input", "query_captions_file", "no_query_crop", "queries_dir", "no_positive"})
RUN_KEYS = frozenset({"dataset", "experiment", "features_dir", "index", "k_search", "map_at", "precision_at",
                      "recall_at", "num_workers", "anns_file", "captions_file", "galleries_dir", "duplicates",
                      "bad_images", "vec_dim", "model_name", "B_model", "lora_adapt", "lora_rank",
                      "lora_alpha", "weights", "device", "queries_dir", "query_captions_file", "set",
                      "masks_from", "box_masks", "report", "report_k", "report_thumb_size", "report_maps"})
# model_name, B_model, the LoRA keys and device are RUN keys here because the extractor's own
# identity (extractors.base.Extractor.identity) records what they resolve to: the model's weights,
# the adapters' content and the device actually used, not the names.


def register() -> None:
    """Register the schema (as ``soir_schema``) and the ``soir_uid`` resolver used in run dirs."""
    ConfigStore.instance().store(name="soir_schema", node=SoIRConfig)
    if not OmegaConf.has_resolver("soir_uid"):
        # Seconds-resolution timestamps alone collide for runs started together.
        OmegaConf.register_new_resolver("soir_uid", lambda: uuid.uuid4().hex[:6], use_cache=True)


def check_config(cfg: DictConfig) -> None:
    """Cross-key checks Hydra's schema cannot express. Raises SoIRError naming the key."""
    for key, allowed in CHOICES.items():
        if cfg[key] not in allowed:
            raise SoIRError(f"{key}={cfg[key]!r} is not one of {', '.join(allowed)}")
    for field in dataclasses.fields(SoIRConfig):
        value = cfg.get(field.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise SoIRError(f"{field.name}={value} is not a finite number")
    if not cfg.global_features:
        raise SoIRError("global_features=false asks for dense/patch descriptors, which SoIR does not "
                         "implement; descriptors are global-type (whole image, or one MI vector per mask)")
    if cfg.mi_sum and cfg.avg_multiple_vecs:
        raise SoIRError("mi_sum=true and avg_multiple_vecs=true both ask for one vector per image; pick one")
    if cfg.mi_beta and (cfg.mi_sum or cfg.smart_crop):
        raise SoIRError("mi_beta acts between the masks of one image; with mi_sum or smart_crop each "
                         "inversion has a single mask, so it would do nothing")
    if cfg.mi_sum and cfg.smart_crop:
        raise SoIRError("mi_sum=true optimises one vector over all masks; smart_crop=true crops per mask")
    for key in ("batch_size", "shard_size", "mi_iterations", "k_search", "vec_dim", "lora_rank", "report_k"):
        if cfg[key] < (0 if key == "mi_iterations" else 1):
            raise SoIRError(f"{key}={cfg[key]} must be positive")
    if cfg.num_workers < 0:
        raise SoIRError(f"num_workers={cfg.num_workers} must be >= 0")
    if cfg.mi_layer_index >= 0:
        raise SoIRError(f"mi_layer_index={cfg.mi_layer_index} must be negative (-1 = last block)")
    if not 0 <= cfg.smart_crop_pad <= 2:
        raise SoIRError(f"smart_crop_pad={cfg.smart_crop_pad} must be in [0, 2]")
    if cfg.lora_adapt and not cfg.extractor.startswith(("dinov2", "clip")):
        raise SoIRError(f"lora_adapt=true is for DINOv2 and CLIP extractors, not {cfg.extractor}")
    if cfg.masks_from == "anns" and cfg.captions_file:
        raise SoIRError("masks_from=anns takes the masks from anns_file, so captions_file would be ignored; "
                        "drop captions_file or use masks_from=captions")
    if cfg.box_masks and cfg.masks_from != "anns":
        raise SoIRError("box_masks=true turns the anns file's boxes into masks and needs masks_from=anns")
    if cfg.weights is not None and not cfg.lora_adapt:
        raise SoIRError("weights= is a LoRA checkpoint and needs lora_adapt=true")
    if not 32 <= cfg.report_thumb_size <= 1024:
        raise SoIRError(f"report_thumb_size={cfg.report_thumb_size} must be in [32, 1024] pixels")
    if cfg.report_maps and not cfg.report:
        raise SoIRError("report_maps=true adds maps to the report; it needs report=true")
