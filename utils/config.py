"""Typed schema of ``configs/defaults.yaml``, shared by ``create_index.py`` and ``search_index.py``.

Hydra validates every override against this dataclass: a misspelt key or a value of the wrong type
is an error that names the key. Checks that involve several keys live in :func:`check_config`.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import logging
import math
import re
import string
import sys
import uuid
from dataclasses import dataclass
from enum import Enum, StrEnum
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import MISSING, DictConfig, OmegaConf

from utils.errors import SoIRError, exit_on_error
from utils.families import FAMILIES
from utils.sweeps import job_label


def choice(name: str, values: str) -> type[Enum]:
    """A str Enum whose members are named by their values (so "global" works as a member name):
    Hydra then refuses any other value for the key, naming the key and the allowed values."""
    return StrEnum(name, [(v, v) for v in values.split()])


NoPositive = choice("NoPositive", "error skip zero")
MissingMasks = choice("MissingMasks", "error global full_mask")
Precision = choice("Precision", "fp32 fp16 bf16")
Duplicates = choice("Duplicates", "error merge")
BadImages = choice("BadImages", "error skip")
MasksFrom = choice("MasksFrom", "captions anns")
MiImpl = choice("MiImpl", "auto blockwise fused dense")
MiPrecision = choice("MiPrecision", "fp32 tf32 bf16")
LegradNorm = choice("LegradNorm", "per_map joint")
MiSumLoss = choice("MiSumLoss", "union mean_dice")
SmartCropSource = choice("SmartCropSource", "original resized")
MiResample = choice("MiResample", "processor original")
PixelGeometry = choice("PixelGeometry", "soir original")
QueryVectors = choice("QueryVectors", "max each")
MasksRle = choice("MasksRle", "read ignore")
QueryMasks = choice("QueryMasks", "best all")
Descriptor = choice("Descriptor", "mi mao")
MaoOverlap = choice("MaoOverlap", "iou dice")
Stage = choice("Stage", "all prepare extract index search")
SearchMode = choice("SearchMode", "exact faiss lancedb")
ExportFormat = choice("ExportFormat", "embeddings lancedb")
ExportDtype = choice("ExportDtype", "float32 float16")
Pool = choice("Pool", "model cls mean gem rmac")
ObjectDesc = choice("ObjectDesc", "mi mask_pool crop")
MiInit = choice("MiInit", "global mask_pool")


@dataclass
class SoIRConfig:
    # --- what to run -------------------------------------------------------------------
    dataset: str = "pe"  # a name; used in output paths only (features, runs)
    experiment: Optional[str] = "default"  # a name; used in run folder names only
    extractor: str = "siglip_mi_features"  # a name from extractors.list_extractors()
    model_name: Optional[str] = None  # HF hub id or local folder; null = extractor default
    vec_dim: int = 768  # must equal the model's output size (checked); set by configs/extractor
    B_model: bool = True  # default model: base (true) or large (false: DINOv2-L, SigLIP so400m)
    # --- names of runs and folders (the original's keys) ---------------------------------
    run_type: str = "retrieval"  # run folder name part: <dataset>_<run_type>
    run_name: Optional[str] = None  # run folder name part; null = experiment
    tag: str = ""  # appended to run and features folder names as _<tag>
    add_string: str = ""  # appended to run and features folder names as _<add_string>
    # --- data --------------------------------------------------------------------------
    anns_file: Optional[str] = MISSING  # anns.pt (required by create_index.py)
    captions_file: Optional[str] = None  # captions.pt with object masks (MI extractors)
    query_captions_file: Optional[str] = None  # query masks for mask_input; null = captions_file
    galleries_dir: Optional[str] = None  # root of relative gallery paths; null = anns folder
    queries_dir: Optional[str] = None  # root of relative query paths; null = anns folder
    no_query_crop: bool = False  # true: do not crop queries to their bbox
    crop: bool = False  # true: queries cropped tight to their bbox (default: the
    # original's square crop of side max(w, h) around the box)
    no_positive: NoPositive = NoPositive.error  # query without a positive: error|skip|zero (AP 0, original)
    duplicates: Duplicates = Duplicates.error  # keys naming one file: error|merge (when labels agree)
    bad_images: BadImages = BadImages.error  # unreadable image: error|skip (counted, listed)
    set: Optional[str] = None  # evaluate one split: the images whose anns `set` is this
    # (VoxDet-SoIR: OWID | RoboTools); null = all
    subset: str = "all"  # the original's name for `set` (all = every image)
    ds_inds_file: Optional[str] = None  # evaluate on the images at these positions of the sorted anns keys
    max_ds_index: Optional[int] = None  # evaluate on the first N images of the sorted anns keys
    masks_from: MasksFrom = MasksFrom.captions  # MI masks: captions (captions_file, e.g. OWLv2 + SAM) |
    # anns (the anns file's own object masks: ground truth)
    box_masks: bool = False  # masks_from=anns: an object with a box and no mask gets
    # its box rectangle (else it has no mask: missing_masks)
    # --- descriptors -------------------------------------------------------------------
    descriptor: Descriptor = Descriptor.mi  # mi: the published code's MI descriptors (per mask, mi_sum,
    # smart_crop, ...) | mao: the paper's Stage B, one vector per image over its object crops
    mao_overlap: MaoOverlap = MaoOverlap.iou  # descriptor=mao: soft IoU (the paper's) | dice
    pool: Pool = Pool.model  # global descriptor: model (the model's own) | cls | mean | gem | rmac
    # over the last layer's patch tokens (extractors/pooling.py)
    gem_p: float = 3.0  # pool=gem: the generalised mean's exponent (cirtorch's p)
    rmac_levels: int = 3  # pool=rmac: levels of R-MAC regions (cirtorch's L)
    global_features: bool = True  # false: MI extractors compute no MI (the plain global embedding)
    object_desc: ObjectDesc = ObjectDesc.mi  # per-object descriptor of MI extractors: mi | mask_pool
    # (mask-weighted mean of the patch tokens) | crop (each mask's padded box embedded)
    mi_init: MiInit = MiInit["global"]  # MI's start: global (the global embedding) | mask_pool (the pooled vector)
    smart_crop: bool = False  # MI inside each mask's padded box crop
    smart_crop_pad: float = 0.1  # crop padding, share of the box's longer side
    single_from_sc: bool = True  # mi_sum + smart_crop: one MI vector per mask on its smart crop
    mi_alpha: float = 0.03  # pull towards the global embedding
    mi_beta: float = 0.0  # penalty on |cos| between masks of one image
    mi_lr: float = 0.1
    mi_iterations: Optional[int] = None  # null = 100 (published code), 80 with descriptor=mao (the paper's)
    mi_layer_index: int = -1  # hooked blocks: L + mi_layer_index + 1 .. L
    mi_impl: MiImpl = MiImpl.auto  # auto | blockwise | fused | dense: same results up to rounding
    mi_precision: MiPrecision = MiPrecision.fp32  # fp32 | tf32 (CUDA) | bf16 (fused): MI's products
    mi_cuda_graph: bool = False  # CUDA: replay each MI iteration as a CUDA graph
    mi_sum: bool = False  # one vector per image, MI on the union of its masks
    full_mask: bool = False  # the original's name for mi_sum
    avg_multiple_vecs: bool = False  # one vector per image: mean of its mask vectors
    missing_masks: MissingMasks = MissingMasks.error  # gallery image with no mask: error|global|full_mask
    mask_input: bool = False  # queries: MI with their mask on the query image with its
    # pixels outside the mask(s) set to zero (the original's)
    query_mi: bool = False  # queries: MI with their mask on the unmasked query image
    query_masks: QueryMasks = QueryMasks.best  # mask_input / query_mi: the mask best overlapping the bbox,
    # or all of the query's masks (several rows, max-scored)
    query_extractor: Optional[str] = None  # another registered extractor for the queries (same space)
    query_extractor_args: Optional[dict[str, Any]] = None  # settings of the query extractor that differ
    debug: bool = False  # log the MI loss of every iteration
    verbose: bool = False  # INFO lines and known third-party warnings on the terminal too (else: the run's log file)
    # --- compat=original switches (see configs/compat/original.yaml) -------------------
    legrad_norm: LegradNorm = LegradNorm.per_map  # joint: min-max over all masks of an image at once
    mi_sum_loss: MiSumLoss = MiSumLoss.union  # mean_dice: mi_sum fits the mean of per-mask Dice
    smart_crop_source: SmartCropSource = SmartCropSource.original  # resized: cut from the model-size copy
    mi_resample: MiResample = MiResample.processor  # original: MI-path resize LANCZOS/BILINEAR per family
    alpha_sum_full: float = 0.0  # DINOv2 mi_sum: start at the sum of the per-mask MI vectors, pulled to them
    alpha_sum: float = 0.0  # the original's smart-crop variant of alpha_sum_full: only 0 (not reproduced)
    gallery_crop: bool = False  # crop gallery images that have a bbox like queries (leaks the label)
    pixel_geometry: PixelGeometry = PixelGeometry.soir  # original: its pixel rounding (smart-crop box, PIL
    # NEAREST masks, mask_input resized then zeroed, square query crop, SigLIP maps upsampled x16)
    mi_beta_used: bool = True  # false: mi_beta is ignored (logged), as the original never passed it to MI
    query_vectors: QueryVectors = QueryVectors.max  # each: every query vector scored as a query of its own
    masks_rle: MasksRle = MasksRle.read  # ignore: a segmentation_results.pt's masks are not read (the
    # original's extractors: one full-image mask per image)
    # --- DINOv2 / CLIP LoRA --------------------------------------------------------------
    lora_adapt: bool = False
    lora_rank: int = 256
    lora_alpha: Optional[float] = 32  # as the original (scaling 32/256); an alpha stored with the weights wins
    weights: Optional[str] = None  # LoRA state-dict checkpoint
    # --- compute -------------------------------------------------------------------------
    device: str = "auto"  # auto (cuda if available) | cpu | cuda | cuda:N
    precision: Precision = Precision.fp32  # fp32 | fp16 | bf16 (autocast of global embeddings)
    batch_size: int = 16
    num_workers: int = 2
    shard_size: int = 512  # images per feature shard (resume granularity)
    gallery_chunk_size: Optional[int] = None  # the original's name for shard_size
    # --- what create_index.py does -----------------------------------------------------
    only_create: bool = False  # stop after the index (else the search runs at the end)
    only_gallery: bool = False  # extract the gallery only (no queries, no search)
    no_faiss: bool = False  # build no FAISS index (the search is exact either way)
    # --- stages, for galleries that need many processes (docs/scaling-out.md) ------------
    stage: Stage = Stage.all  # all (one process, as always) | prepare | extract | index | search
    workers: int = 1  # stage=extract: the shards are split among this many workers,
    worker: int = 0  # ... this one computing the missing shards s with s % workers == worker
    index_train_rows: Optional[int] = None  # stage=index, IVF: rows sampled to train it; null = 100 per list
    index_blocks: Optional[int] = None  # stage=index, IVF: blocks added separately (resumable); null = 1 per 10^6 rows
    # --- index and search -------------------------------------------------------------------
    features_dir: Optional[str] = None  # create: null = outputs/features/<dataset>/<extractor>-<hash>
    index: str = "Flat"  # faiss index_factory string (inner product)
    k_search: int = 100  # rankings saved per query (all images are scored)
    search: SearchMode = SearchMode.exact  # exact: every gallery image scored | faiss: FAISS candidates,
    # re-scored exactly (mAP is then a lower bound, see results.json)
    # | lancedb: every gallery image scored by the exported LanceDB table (scripts/export_features.py)
    lancedb_dir: Optional[str] = None  # search=lancedb: the format=lancedb export; null = <features_dir>/export/lancedb
    search_block_mb: float = 256  # exact search: a gallery whose features exceed this is streamed
    # from its shards in blocks of this working memory
    search_candidates: Optional[int] = None  # search=faiss: rows FAISS returns per query row; null = 10 x k_search
    search_nprobe: int = 16  # search=faiss with an IVF index: inverted lists probed
    # re-ranking after the search (utils/retrieval/rerank.py): none | aqe (alpha query expansion) | dba (database-side
    # augmentation). A string, not a choice: the original's config has rerank: False (read nowhere),
    # which resolve_aliases turns into none; check_config refuses anything else.
    rerank: str = "none"
    rerank_alpha: float = 3.0  # weight of a neighbour: max(similarity, 0) ** rerank_alpha
    rerank_k: int = 2  # neighbours (gallery images) per expanded vector
    max_k_search: int = 1000000  # cap on k_search (the original's)
    save_knns: bool = True  # write rankings.jsonl
    map_at: Optional[int] = None  # also report mAP@k
    precision_at: tuple[int, ...] = (1, 5, 10)
    recall_at: tuple[int, ...] = (1, 5, 10)
    T2I: bool = False  # text-to-image search: each query's obj_name in text_prompt,
    # embedded by the checkpoint's text tower (SigLIP, CLIP)
    text_prompt: str = "a photo of {obj_name}"  # T2I: a query's text; {obj_name} is replaced by its obj_name
    # --- your own queries: search_index.py's ad-hoc mode (nothing is written to the features folder)
    query_image: Optional[str] = None  # an image to search with, embedded as the folder's queries were
    query_bbox: Optional[tuple[float, ...]] = None  # [x1,y1,x2,y2] pixels in query_image: the object's box (crop,
    # or the MI mask rectangle when no query_mask is given)
    query_mask: Optional[str] = None  # mask image of the object (size of query_image; 0/255 or 0/1): MI
    # folders made with mask_input / query_mi run MI with it; folders of crops crop around its box
    query_text: Optional[str] = None  # a sentence to search with (the text tower), used as given
    query_exact_max_rows: int = 1000000  # ad-hoc queries: larger galleries are searched through the FAISS
    # index (its candidates re-scored exactly); smaller ones exactly
    # --- export (scripts/export_features.py): the features in other tools' formats (utils/results/interop.py)
    format: ExportFormat = ExportFormat.embeddings  # embeddings (clip-retrieval / autofaiss) | lancedb
    export_dir: Optional[str] = None  # a new or SoIR-owned folder; null = <features_dir>/export/<format>
    export_dtype: ExportDtype = ExportDtype.float32  # float32 | float16: the exported vectors
    # --- report of a search run (search_index.py) -----------------------------------------
    report: bool = True  # write report.html (+ thumbs/) next to results.json
    report_k: int = 10  # gallery images shown per query
    report_thumb_size: int = 160  # longer side of the thumbnails, pixels
    report_maps: bool = False  # link each shown gallery image to its LeGrad map (runs the model)
    # --- keys of the original's config that its code never read: accepted at its default only
    dumb_crop: bool = False
    no_center_crop: bool = False
    no_gallery_crop: bool = False
    no_resize: bool = False
    gallery: Optional[str] = None
    read_dataset: bool = True
    save_gallery_embeddings: bool = False


# Keys of the original code's config that its code never read: SoIR accepts them at the original's
# default (so its config files and commands compose) and refuses any other value.
# the re-rankings of utils/retrieval/rerank.py (rerank=)
RERANKS = ("none", "aqe", "dba")

UNREAD_ORIGINAL_KEYS = {
    "dumb_crop": False,
    "no_center_crop": False,
    "no_gallery_crop": False,
    "no_resize": False,
    "gallery": None,
    "read_dataset": True,
    "save_gallery_embeddings": False,
}

# What a key changes, for the features folder's identity (create_index.py). QUERY_KEYS change the
# query features only; RUN_KEYS change no feature: names, search settings, and the input paths,
# whose effect (which images, their bytes, boxes and masks) is hashed from the inputs themselves,
# so moving or fixing anns.pt without changing the gallery keeps the gallery. Every other key
# changes the gallery features (and so the queries').
QUERY_KEYS = frozenset(
    {
        "mask_input",
        "query_mi",
        "query_masks",
        "query_captions_file",
        "no_query_crop",
        "crop",
        "queries_dir",
        "no_positive",
        "query_extractor",
        "query_extractor_args",
    }
)
RUN_KEYS = frozenset(
    {
        "dataset",
        "experiment",
        "features_dir",
        "index",
        "k_search",
        "map_at",
        "precision_at",
        "recall_at",
        "num_workers",
        "anns_file",
        "captions_file",
        "galleries_dir",
        "duplicates",
        "bad_images",
        "vec_dim",
        "model_name",
        "B_model",
        "lora_adapt",
        "lora_rank",
        "lora_alpha",
        "weights",
        "device",
        "queries_dir",
        "query_captions_file",
        "set",
        "masks_from",
        "box_masks",
        "report",
        "report_k",
        "report_thumb_size",
        "report_maps",
        "run_type",
        "run_name",
        "tag",
        "add_string",
        "subset",
        "ds_inds_file",
        "max_ds_index",
        "full_mask",
        "gallery_chunk_size",
        "only_create",
        "only_gallery",
        "no_faiss",
        "max_k_search",
        "save_knns",
        "T2I",
        "debug",
        "verbose",
        "single_from_sc",
        "stage",
        "workers",
        "worker",
        "index_train_rows",
        "index_blocks",
        "search",
        "search_block_mb",
        "search_candidates",
        "search_nprobe",
        "lancedb_dir",
        "format",
        "export_dir",
        "export_dtype",
        "rerank",
        "rerank_alpha",
        "rerank_k",
        "text_prompt",
        "query_image",
        "query_bbox",
        "query_mask",
        "query_text",
        "query_exact_max_rows",
        "query_vectors",
        *UNREAD_ORIGINAL_KEYS,
    }
)
# model_name, B_model, the LoRA keys and device are RUN keys here because the extractor's own
# identity (extractors.base.Extractor.identity) records what they resolve to: the model's weights,
# the adapters' content and the device actually used, not the names. The original's aliases
# (full_mask, gallery_chunk_size, subset) and single_from_sc are resolved into mi_sum, shard_size,
# set and smart_crop by :func:`resolve_aliases` before anything reads them; ds_inds_file,
# max_ds_index and only_gallery act on which images are extracted, which the inputs' hash covers.


# Config groups of configs/defaults.yaml's defaults list (configs/<group>/<option>.yaml).
CONFIG_GROUPS = ("extractor", "compat")

log = logging.getLogger("soir.config")


def check_overrides(overrides: Sequence[str], schema: type, groups: Sequence[str] = (), script: str = "") -> None:
    """Refuse a command-line override whose key is neither a field of ``schema`` nor a config group.

    Hydra alone says "Could not override 'mi_alhpa'. To append to your config use +mi_alhpa=..." and
    then appends ``+mi_alhpa`` silently, so a misspelt key ran with the default of the one meant. Here
    both forms are one :class:`SoIRError` naming the closest keys (``difflib``). A ``+key`` that *is*
    in the schema is refused too (Hydra would say it cannot append an existing key): write ``key=``.
    ``hydra.*`` / ``hydra/*`` overrides are Hydra's own and pass through; so do overrides Hydra
    cannot parse (its own error names the problem). ``script`` names the command in the fix.
    """
    try:
        parsed = OverridesParser.create().parse_overrides(list(overrides))
    except Exception:  # malformed syntax: Hydra reports it, naming the override
        return
    keys = [f.name for f in dataclasses.fields(schema)]
    for override in parsed:
        key = override.key_or_group
        if key == "hydra" or key.startswith(("hydra.", "hydra/")) or key in groups:
            continue
        head = key.split(".", 1)[0]  # a dict-typed key's entries (query_extractor_args.x) are its own
        if head in keys:
            if override.is_add():
                raise SoIRError(
                    f"{override.input_line}: {key} is already a key; set it without the '+': {override.input_line[1:]}"
                )
            continue
        close = difflib.get_close_matches(head, sorted({*keys, *groups}), n=3, cutoff=0.6)
        hint = f"did you mean {' or '.join(close)}?" if close else "no key is close;"
        plus = "; '+' adds no key SoIR reads" if override.is_add() or override.is_force_add() else ""
        raise SoIRError(
            f"{override.input_line}: unknown key '{head}'; {hint} "
            f"(`python {script or 'the script'} --help` lists every key{plus})"
        )


def refuse_unknown_keys(schema: type, groups: Sequence[str], script: str) -> Callable:
    """Decorator for a ``@hydra.main`` entry point: :func:`check_overrides` on the command line's
    overrides before Hydra composes the config, as one ``error:`` line (``exit_on_error``).

    Apply it above ``@hydra.main``. A call with arguments (Hydra's ``cfg_passthrough``) is not a
    command line and is passed on unchecked."""

    def decorate(entry: Callable) -> Callable:
        @functools.wraps(entry)
        def wrapper(*args, **kwargs):
            if not args and not kwargs:
                from hydra._internal.utils import get_args_parser  # the parser hydra.main itself uses

                overrides = get_args_parser().parse_known_args(sys.argv[1:])[0].overrides
                exit_on_error(check_overrides)(overrides, schema, groups, script)
            return entry(*args, **kwargs)

        return wrapper

    return decorate


def register() -> None:
    """Register the schema (as ``soir_schema``), the ``extractor`` group and the resolvers used in run and
    job folder names."""
    ConfigStore.instance().store(name="soir_schema", node=SoIRConfig)
    register_extractor_group()
    if not OmegaConf.has_resolver("soir_uid"):
        # Seconds-resolution timestamps alone collide for runs started together.
        OmegaConf.register_new_resolver("soir_uid", lambda: uuid.uuid4().hex[:6], use_cache=True)
    if not OmegaConf.has_resolver("soir_name"):
        OmegaConf.register_new_resolver("soir_name", run_label)
    if not OmegaConf.has_resolver("soir_dataset"):
        OmegaConf.register_new_resolver("soir_dataset", run_dataset)
    if not OmegaConf.has_resolver("soir_job"):
        # Not cached: each job of a sweep gets its own label (hydra.sweep.subdir).
        OmegaConf.register_new_resolver("soir_job", job_label)
    if not OmegaConf.has_resolver("soir_console_level"):
        # hydra.job_logging's console handler: INFO lines reach the terminal with verbose=true only.
        OmegaConf.register_new_resolver("soir_console_level", lambda verbose: "INFO" if verbose else "WARNING")
    if not OmegaConf.has_resolver("soir_vec_dim"):
        OmegaConf.register_new_resolver("soir_vec_dim", default_vec_dim)


def extractor_group() -> dict[str, dict[str, str]]:
    """The ``extractor`` config group, generated from the family table (utils/families.py): per family,
    ``<family>_features`` and ``<family>_mi_features``, each setting ``extractor`` and ``vec_dim``.

    ``vec_dim`` follows the family's default model (``B_model=true``: base, ``false``: large where the
    family has one) through the ``soir_vec_dim`` resolver; with a ``model_name=`` of another size, set
    ``vec_dim=`` too (the extractor checks it). Values: ``{option: node}``, the node as Hydra merges it
    at the top level of the config (package ``_global_``)."""
    return {
        name: {"extractor": name, "vec_dim": f"${{soir_vec_dim:{family},${{B_model}}}}"}
        for family, spec in FAMILIES.items()
        for name in spec.extractors
    }


def register_extractor_group() -> None:
    """Store :func:`extractor_group` in Hydra's ConfigStore as the ``extractor`` group, which
    configs/defaults.yaml's defaults list picks from (``extractor=siglip_mi_features``)."""
    store = ConfigStore.instance()
    for name, node in extractor_group().items():
        store.store(group="extractor", name=name, node=node, package="_global_")


def run_dataset(dataset: str, features_dir: str | None = None) -> str:
    """The dataset named in run folder names: ``dataset``, or, when it is left at its default and a
    features folder is given (search_index.py, its ad-hoc queries, the stages), the dataset that folder
    was made with (its config.yaml), so a search of a VoxDet folder is not named ``pe_retrieval``."""
    made_with = Path(features_dir) / "config.yaml" if features_dir else None
    if dataset != SoIRConfig.dataset or made_with is None or not made_with.is_file():
        return dataset
    try:
        return str(OmegaConf.load(made_with).get("dataset") or dataset)
    except Exception:  # a corrupt config.yaml: the run itself reports it, naming the file; here only a name
        return dataset


def default_vec_dim(family: str, B_model: bool) -> int:
    """The embedding size of ``family``'s default model (base, or large with ``B_model=false`` where the
    family has one): the ``vec_dim`` that the ``extractor`` group's nodes set (:func:`extractor_group`)."""
    dims = FAMILIES[family].vec_dims
    return dims["base" if B_model or "large" not in dims else "large"]


def run_label(run_name: str | None, experiment: str, tag: str | None = "", add_string: str | None = "") -> str:
    """``run_name`` (or ``experiment``) with ``_<tag>`` and ``_<add_string>`` appended when they are
    set (the original's naming), for run folder names."""
    return "_".join(str(p) for p in (run_name or experiment or "run", tag, add_string) if p not in (None, ""))


def resolve_aliases(cfg: DictConfig) -> None:
    """Fold the original code's names into SoIR's, in place, before anything reads the config.

    ``full_mask`` -> ``mi_sum``; ``gallery_chunk_size`` -> ``shard_size``; ``subset`` -> ``set``;
    ``mi_sum`` + ``smart_crop`` + ``single_from_sc=true`` (the original's example command) -> one MI
    vector per mask on its smart crop, i.e. ``smart_crop`` alone (logged). Conflicting values of an
    alias and its SoIR name are refused.
    """
    default = SoIRConfig()
    if str(cfg.rerank).lower() == "false":  # the original's rerank: False (its code never read the key)
        cfg.rerank = "none"
    if cfg.full_mask:
        cfg.mi_sum = True
    if cfg.gallery_chunk_size is not None:
        if cfg.shard_size != default.shard_size and cfg.shard_size != cfg.gallery_chunk_size:
            raise SoIRError(
                f"gallery_chunk_size={cfg.gallery_chunk_size} (the original's name for shard_size) and "
                f"shard_size={cfg.shard_size} disagree; set one of them"
            )
        cfg.shard_size = cfg.gallery_chunk_size
    if cfg.subset != "all":
        if cfg.set is not None and cfg.set != cfg.subset:
            raise SoIRError(f"subset={cfg.subset} (the original's name for set) and set={cfg.set} disagree; set one")
        cfg.set = cfg.subset
    if cfg.mi_sum and cfg.smart_crop:
        if not cfg.single_from_sc:
            raise SoIRError(
                "mi_sum=true smart_crop=true single_from_sc=false is ill-defined (the original applied "
                "the crops' masks to the full image); use smart_crop=true (one vector per mask on its "
                "crop) or mi_sum=true (one vector per image)"
            )
        log.info(
            "mi_sum=true smart_crop=true single_from_sc=true: one MI vector per mask on its smart crop, as "
            "the original computes it (the same as smart_crop=true alone)"
        )
        cfg.mi_sum = False


def check_config(cfg: DictConfig) -> None:
    """Cross-key checks Hydra's schema cannot express. Raises SoIRError naming the key.

    Call :func:`resolve_aliases` first.
    """
    for field in dataclasses.fields(SoIRConfig):
        value = cfg.get(field.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise SoIRError(f"{field.name}={value} is not a finite number")
    for key, default in UNREAD_ORIGINAL_KEYS.items():
        if cfg[key] != default:
            raise SoIRError(
                f"{key}={cfg[key]} is not supported: the original code accepted this key but never read "
                f"it (so it did nothing there either); leave it at {default}"
            )
    check_own_queries(cfg)
    check_device(cfg.device)
    if cfg.rerank not in RERANKS:
        raise SoIRError(
            f"rerank={cfg.rerank} is not a re-ranking; one of {', '.join(RERANKS)}"
            + (
                " (the original code accepted rerank=true but never read it)"
                if str(cfg.rerank).lower() == "true"
                else ""
            )
        )
    if cfg.rerank != "none" and (cfg.query_image is not None or cfg.query_text is not None):
        raise SoIRError(
            f"rerank={cfg.rerank} re-ranks the evaluation of the folder's queries; an ad-hoc query "
            "(query_image / query_text) is searched without it: drop rerank"
        )
    if cfg.rerank == "dba" and cfg.search == "lancedb":
        raise SoIRError(
            "rerank=dba augments the gallery's vectors, but search=lancedb scores the exported table's "
            "vectors as stored: use search=exact with rerank=dba"
        )
    if cfg.rerank_k < 1 or cfg.rerank_alpha < 0:
        raise SoIRError(f"rerank_k={cfg.rerank_k} must be >= 1 and rerank_alpha={cfg.rerank_alpha} >= 0")
    if cfg.mi_sum and cfg.avg_multiple_vecs:
        raise SoIRError("mi_sum=true and avg_multiple_vecs=true both ask for one vector per image; pick one")
    if cfg.mi_beta and (cfg.mi_sum or cfg.smart_crop):
        raise SoIRError(
            "mi_beta acts between the masks of one image; with mi_sum or smart_crop each "
            "inversion has a single mask, so it would do nothing"
        )
    if cfg.mask_input and cfg.query_mi:
        raise SoIRError(
            "mask_input=true (MI on the query with its background zeroed) and query_mi=true (MI on the "
            "unmasked query) are two ways of describing a query; pick one"
        )
    if cfg.crop and cfg.no_query_crop:
        raise SoIRError("crop=true (tight query crop) and no_query_crop=true (no query crop) contradict; pick one")
    for key in (
        "batch_size",
        "shard_size",
        "mi_iterations",
        "k_search",
        "max_k_search",
        "vec_dim",
        "lora_rank",
        "report_k",
    ):
        if cfg[key] is not None and cfg[key] < (0 if key == "mi_iterations" else 1):
            raise SoIRError(f"{key}={cfg[key]} must be positive")
    for key in ("num_workers", "max_ds_index"):
        if cfg[key] is not None and cfg[key] < 0:
            raise SoIRError(f"{key}={cfg[key]} must be >= 0")
    if cfg.mi_layer_index >= 0:
        raise SoIRError(f"mi_layer_index={cfg.mi_layer_index} must be negative (-1 = last block)")
    if not 0 <= cfg.smart_crop_pad <= 2:
        raise SoIRError(f"smart_crop_pad={cfg.smart_crop_pad} must be in [0, 2]")
    if cfg.masks_from == "anns" and cfg.captions_file:
        raise SoIRError(
            "masks_from=anns takes the masks from anns_file, so captions_file would be ignored; "
            "drop captions_file or use masks_from=captions"
        )
    if cfg.box_masks and cfg.masks_from != "anns":
        raise SoIRError("box_masks=true turns the anns file's boxes into masks and needs masks_from=anns")
    if cfg.weights is not None and not cfg.lora_adapt:
        raise SoIRError("weights= is a LoRA checkpoint and needs lora_adapt=true")
    if not 32 <= cfg.report_thumb_size <= 1024:
        raise SoIRError(f"report_thumb_size={cfg.report_thumb_size} must be in [32, 1024] pixels")
    if not 0 <= cfg.worker < cfg.workers:
        raise SoIRError(
            f"worker={cfg.worker} must lie in [0, workers={cfg.workers}): worker w of W computes the "
            "shards s with s % W == w"
        )
    if cfg.workers > 1 and cfg.stage != "extract":
        raise SoIRError(f"workers={cfg.workers} splits stage=extract among processes; stage={cfg.stage} runs in one")
    if cfg.stage in ("extract", "index", "search") and not cfg.features_dir:
        raise SoIRError(f"stage={cfg.stage} needs features_dir=, the folder stage=prepare printed")
    for key in ("search_block_mb", "search_candidates", "search_nprobe", "index_train_rows", "index_blocks"):
        if cfg[key] is not None and cfg[key] <= 0:
            raise SoIRError(f"{key}={cfg[key]} must be positive")
    if cfg.report_maps and not cfg.report:
        raise SoIRError("report_maps=true adds maps to the report; it needs report=true")
    if cfg.gallery_crop:
        log.warning(
            "gallery_crop=true crops gallery images to their annotated bbox, as the original code does: "
            "this leaks the label into the gallery features; numbers made with it are not comparable "
            "with SoIR's default"
        )


def check_device(device: str) -> None:
    """Refuse a device name torch does not know (``device=gpu``), in one line, before any model loads.

    The names SoIR documents (auto, cpu, cuda, cuda:N) are accepted without importing torch, so that
    checking a command line stays fast (``--help``, a refused value: about a second, not six); only
    another name asks torch, the authority on device names. Whether CUDA is there is checked where the
    model is loaded (``extractors.base.resolve_device``)."""
    if re.fullmatch(r"auto|cpu|cuda(:\d+)?", device):
        return
    import torch  # an unusual name (mps, xpu:0, gpu ...): torch knows which exist

    try:
        torch.device(device)
    except RuntimeError:
        raise SoIRError(
            f"device={device} is not a device name: use auto (cuda if available), cpu, cuda or cuda:N"
        ) from None


def check_own_queries(cfg: DictConfig) -> None:
    """The text and ad-hoc query keys (T2I, text_prompt, query_*): one kind of query per run."""
    fields = {name for _, name, _, _ in string.Formatter().parse(cfg.text_prompt) if name is not None}
    if fields != {"obj_name"}:
        raise SoIRError(
            f"text_prompt={cfg.text_prompt!r} must contain {{obj_name}} and no other {{field}} "
            "(e.g. 'a photo of {obj_name}')"
        )
    if cfg.query_text is not None and not cfg.query_text.strip():
        raise SoIRError("query_text is empty; give a sentence, e.g. query_text='a red mug'")
    adhoc = [k for k in ("query_image", "query_text") if cfg[k] is not None]
    if len(adhoc) > 1:
        raise SoIRError("query_image and query_text are two ad-hoc queries; run one per search")
    if cfg.T2I and adhoc:
        raise SoIRError(
            f"T2I=true evaluates the features folder's queries as texts; {adhoc[0]} is an ad-hoc query: use one of them"
        )
    for key in ("query_bbox", "query_mask"):
        if cfg[key] is not None and cfg.query_image is None:
            raise SoIRError(f"{key} describes the object in query_image, which is not given")
    if cfg.query_bbox is not None and len(cfg.query_bbox) != 4:
        raise SoIRError(f"query_bbox={list(cfg.query_bbox)} must be [x1,y1,x2,y2] (pixels of query_image)")
    if cfg.query_exact_max_rows < 0:
        raise SoIRError(f"query_exact_max_rows={cfg.query_exact_max_rows} must be >= 0")
    if adhoc and HydraConfig.initialized() and HydraConfig.get().job.name != "search_index":
        raise SoIRError(
            f"{adhoc[0]} is search_index.py's ad-hoc mode: python search_index.py "
            f"features_dir=<features folder> {adhoc[0]}=..."
        )
