"""Typed schema of ``configs/defaults.yaml``, shared by ``create_index.py`` and ``search_index.py``.

Hydra validates every override against this dataclass: a misspelt key or a value of the wrong type
is an error that names the key. Checks that involve several keys live in :func:`check_config`.
"""
from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf


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
    # --- descriptors -------------------------------------------------------------------
    global_features: bool = True             # global-type descriptors (the only kind implemented)
    smart_crop: bool = False                 # MI inside each mask's padded box crop
    smart_crop_pad: float = 0.1              # crop padding, share of the box's longer side
    mi_alpha: float = 0.03                   # pull towards the global embedding
    mi_beta: float = 0.0                     # penalty on |cos| between masks of one image
    mi_lr: float = 0.1
    mi_iterations: int = 100
    mi_layer_index: int = -1                 # hooked blocks: L + mi_layer_index + 1 .. L
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


CHOICES = {"no_positive": ("error", "skip"), "missing_masks": ("error", "global"),
           "precision": ("fp32", "fp16", "bf16")}


def register() -> None:
    """Register the schema (as ``soir_schema``) and the ``soir_uid`` resolver used in run dirs."""
    ConfigStore.instance().store(name="soir_schema", node=SoIRConfig)
    if not OmegaConf.has_resolver("soir_uid"):
        # Seconds-resolution timestamps alone collide for runs started together.
        OmegaConf.register_new_resolver("soir_uid", lambda: uuid.uuid4().hex[:6], use_cache=True)


def check_config(cfg: DictConfig) -> None:
    """Cross-key checks Hydra's schema cannot express. Raises ValueError naming the key."""
    for key, allowed in CHOICES.items():
        if cfg[key] not in allowed:
            raise ValueError(f"{key}={cfg[key]!r} is not one of {', '.join(allowed)}")
    if not cfg.global_features:
        raise ValueError("global_features=false asks for dense/patch descriptors, which SoIR does not "
                         "implement; descriptors are global-type (whole image, or one MI vector per mask)")
    if cfg.mi_sum and cfg.avg_multiple_vecs:
        raise ValueError("mi_sum=true and avg_multiple_vecs=true both ask for one vector per image; pick one")
    if cfg.mi_beta and (cfg.mi_sum or cfg.smart_crop):
        raise ValueError("mi_beta acts between the masks of one image; with mi_sum or smart_crop each "
                         "inversion has a single mask, so it would do nothing")
    if cfg.mi_sum and cfg.smart_crop:
        raise ValueError("mi_sum=true optimises one vector over all masks; smart_crop=true crops per mask")
    for key in ("batch_size", "shard_size", "mi_iterations", "k_search", "vec_dim", "lora_rank"):
        if cfg[key] < (0 if key == "mi_iterations" else 1):
            raise ValueError(f"{key}={cfg[key]} must be positive")
    if cfg.num_workers < 0:
        raise ValueError(f"num_workers={cfg.num_workers} must be >= 0")
    if cfg.mi_layer_index >= 0:
        raise ValueError(f"mi_layer_index={cfg.mi_layer_index} must be negative (-1 = last block)")
    if not 0 <= cfg.smart_crop_pad <= 2:
        raise ValueError(f"smart_crop_pad={cfg.smart_crop_pad} must be in [0, 2]")
    if cfg.lora_adapt and not cfg.extractor.startswith(("dinov2", "clip")):
        raise ValueError(f"lora_adapt=true is for DINOv2 and CLIP extractors, not {cfg.extractor}")
    if cfg.weights is not None and not cfg.lora_adapt:
        raise ValueError("weights= is a LoRA checkpoint and needs lora_adapt=true")
