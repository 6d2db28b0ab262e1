"""Typed schema of ``configs/defaults.yaml``, shared by ``create_index.py`` and ``search_index.py``.

Every key is defined once, as a field of one settings group (:class:`RunSettings`, :class:`MISettings`,
:class:`SearchSettings`, ...; :data:`SETTINGS_GROUPS`) made with :func:`setting`: its type, default,
one-line help, longer doc and :class:`Role`. :class:`SoIRConfig`, the flat schema Hydra composes, inherits
every group, so each key stays a flat command-line key (``mi_alpha=0.03``). The key sets other modules
need (:data:`RUN_KEYS`, :data:`QUERY_KEYS`, :data:`MODEL_KEYS`, :data:`MI_ONLY_KEYS`, ...), ``--help``
(:func:`help_text`) and docs/configuration.md (:func:`docs_markdown`) are derived from the fields
(docs/adding-a-setting.md). Code that needs a default reads it from its group (``MISettings.mi_alpha``).

Hydra validates every override against the schema: a misspelt key or a value of the wrong type is an
error that names the key. Checks that involve several keys live in :func:`check_config`.
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
from utils.files import atomic_write_text
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


# mi_iterations=null: the published code's steps, or the paper's for its Stage B (descriptor=mao).
MI_ITERATIONS = {"mi": 100, "mao": 80}


class Role(StrEnum):
    """What a key does to a run, for the features folder's identity (utils/pipeline/create.py) and the
    ad-hoc queries' check (utils/queries/own_queries.py)."""

    FEATURES = "changes the gallery features (and so the queries')"
    QUERY = "changes the query features only"
    QUERY_INPUT = "an input path of the queries: names the run only (the queries' files are hashed)"
    RUN = "names the run, or a search setting: changes no stored feature"
    MODEL = "names the model: a run key (the extractor's identity records the weights it loads)"
    UNREAD = "a key of the original's config that its code never read: accepted at its default only"


class Plain(StrEnum):
    """What a plain (non-MI) extractor does with a Mask Inversion setting changed from its default."""

    LOGGED = "ignored, logged"
    REFUSED = "refused: it changes what a plain extractor would compute"


def setting(
    default: Any,
    help: str,
    role: Role = Role.FEATURES,
    *,
    plain: Plain | None = None,
    shown: bool = False,
    alias_of: str | None = None,
    doc: str | None = None,
    default_text: str | None = None,
) -> Any:
    """One key of the schema: its default, its one-line ``help`` (``--help``), its ``role`` and, for the
    generated docs/configuration.md, a longer ``doc`` (Markdown; default: ``help``).

    ``plain``: a Mask Inversion setting, and what a plain extractor does with it (:class:`Plain`).
    ``shown``: listed in a search report's settings of an MI features folder. ``alias_of``: the
    original code's name of another key (:func:`resolve_aliases` folds it in). ``default_text``:
    how the docs state a default that the schema's value does not say (``vec_dim``)."""
    metadata = dict(help=help, role=role, plain=plain, shown=shown, alias_of=alias_of, doc=doc or help)
    return dataclasses.field(default=default, metadata={**metadata, "default_text": default_text})


@dataclass
class RunSettings:
    """What to run, and names."""

    dataset: str = setting(
        "pe", "a name; used in output paths only (features, runs)", Role.RUN, doc="a name, used in output paths"
    )
    experiment: Optional[str] = setting(
        "default", "a name; used in run folder names only", Role.RUN, doc="a name, used in run folder names"
    )
    extractor: str = setting(
        "siglip_mi_features",
        "a name from extractors.list_extractors()",
        doc=(
            'a config group: one of the twelve extractors of "Extractors" (generated from the family table); also sets '
            "`vec_dim`"
        ),
    )
    run_type: str = setting(
        "retrieval",
        "run folder name part: <dataset>_<run_type>",
        Role.RUN,
        doc="run folder name part: `<dataset>_<run_type>-<run_name or experiment>` (the original's naming)",
    )
    run_name: Optional[str] = setting(
        None,
        "run folder name part; null = experiment",
        Role.RUN,
        doc="run folder name part (see `run_type`); `null` = `experiment`",
    )
    tag: str = setting(
        "",
        "appended to run and features folder names as _<tag>",
        Role.RUN,
        doc="appended to run and features folder names as `_<tag>`",
    )
    add_string: str = setting(
        "",
        "appended to run and features folder names as _<add_string>",
        Role.RUN,
        doc="appended to run and features folder names as `_<add_string>` (after `_<tag>`)",
    )
    debug: bool = setting(
        False, "log the MI loss of every iteration", Role.RUN, doc="log the loss of every MI iteration"
    )
    verbose: bool = setting(
        False,
        "INFO lines and known third-party warnings on the terminal too (else: the run's log file)",
        Role.RUN,
        doc=(
            "the terminal shows progress bars, warnings and the tables; INFO lines go to the run's log file (`<run "
            "folder>/<script>.log`). `true`: INFO on the terminal too, and the two known third-party warnings that "
            "SoIR filters (`utils/quiet.py`: transformers' special-token-id config warnings, torch's "
            "`torch.jit.script` deprecation)"
        ),
    )


@dataclass
class ModelSettings:
    """The model."""

    model_name: Optional[str] = setting(
        None,
        "HF hub id or local folder; null = extractor default",
        Role.MODEL,
        doc='HF hub id or local folder. `null`: the family\'s default model, base or large (table in "Extractors")',
    )
    B_model: bool = setting(
        True,
        "default model: base (true) or large (false: DINOv2-L, SigLIP so400m)",
        Role.MODEL,
        doc=(
            "the default model's size: base (`true`) or large (`false`), as the original; a family without a large "
            "model (CLIP) keeps its base one"
        ),
    )
    vec_dim: int = setting(
        768,  # the extractor group's node sets the extractor's own (extractor_group)
        "must equal the model's output size (checked); set by the extractor group",
        Role.RUN,
        default_text="set by `extractor`",
        doc=(
            'the embedding size: `extractor=` sets the default model\'s (768 for `siglip_mi_features`; "Extractors"); '
            "with another `model_name=`, set it yourself. It must equal the model's size (checked after loading)"
        ),
    )


@dataclass
class LoRASettings:
    """LoRA adapters (DINOv2, CLIP)."""

    lora_adapt: bool = setting(
        False,
        "DINOv2 / CLIP: LoRA on q/k/v, loaded from weights",
        Role.MODEL,
        doc=(
            "DINOv2 and CLIP: wrap with peft LoRA on `q_proj/k_proj/v_proj` and load `weights` (merged into the model "
            "after loading); other families refuse it"
        ),
    )
    lora_rank: int = setting(
        256,
        "LoRA rank (a rank stored with the weights must agree)",
        Role.MODEL,
        doc=(
            "LoRA rank, as the original (scaling `lora_alpha` / rank = 32/256 = 0.125). SoIR's checkpoints "
            "(`scripts/train_mao.py`) store rank, alpha, target modules and family; a peft `adapter_config.json` next "
            "to the weights is read too. A stored rank or family that differs is an error"
        ),
    )
    lora_alpha: Optional[float] = setting(
        32,
        "as the original (scaling 32/256); an alpha stored with the weights wins",
        Role.MODEL,
        doc=(
            "LoRA alpha, as the original (scaling 32/256 = 0.125 at rank 256); an alpha stored with the weights wins "
            "and is logged"
        ),
    )
    weights: Optional[str] = setting(
        None,
        "LoRA state-dict checkpoint",
        Role.MODEL,
        doc=(
            "LoRA checkpoint: a `torch.save`d state dict (bare, or under `model_state_dict` as the original saves it, "
            "`state_dict` or `model`) or a `.safetensors` file (e.g. peft's `adapter_model.safetensors`); transformers "
            "4.x names `attention.attention.query/key/value` are mapped to 5.x `q_proj/k_proj/v_proj`. A checkpoint "
            "that does not fit lists its missing / unexpected keys; a file that is not a checkpoint is one line naming "
            "it"
        ),
    )


@dataclass
class DataSettings:
    """Data."""

    anns_file: Optional[str] = setting(
        MISSING,
        "anns.pt (required by create_index.py)",
        Role.RUN,
        doc='`anns.pt` (format in the README; also the VoxDet-SoIR builder\'s files, see "Reproducing the paper")',
    )
    captions_file: Optional[str] = setting(
        None,
        "captions.pt with object masks (MI extractors)",
        Role.RUN,
        doc=(
            "`captions.pt` with object masks (format in the README; the original's `segmentation_results.pt` loads "
            "as it is); used by MI extractors"
        ),
    )
    masks_from: MasksFrom = setting(
        MasksFrom.captions,
        "MI masks: captions (captions_file, e.g. OWLv2 + SAM) | anns (the anns file's own object masks: ground truth)",
        Role.RUN,
        doc=(
            "MI masks: `captions` (`captions_file`, e.g. OWLv2 + SAM) or `anns` (the anns file's own object masks: "
            "VoxDet-SoIR query RLEs and OWID COCO segmentations, ground truth). With `anns`, `captions_file` is "
            "refused; the queries' masks are used with `mask_input=true`"
        ),
    )
    box_masks: bool = setting(
        False,
        "masks_from=anns: an object with a box and no mask gets its box rectangle (else it has no mask: missing_masks)",
        Role.RUN,
        doc=(
            "`masks_from=anns`: an object with a box but no mask (RoboTools galleries, plain `anns.pt` `bbox`) gets "
            "its box as a filled rectangle; else it has no mask and `missing_masks` applies"
        ),
    )
    galleries_dir: Optional[str] = setting(
        None,
        "root of relative gallery paths; null = anns folder",
        Role.RUN,
        doc=(
            "root of relative gallery paths; `null` = the anns file's folder. It may name webdataset tar shards, "
            "`'galleries_dir=\"/data/{000000..000099}.tar\"'` (keys = member names; see [interop.md](interop.md))"
        ),
    )
    set: Optional[str] = setting(
        None,
        "evaluate one split: the images whose anns `set` is this (VoxDet-SoIR: OWID | RoboTools); null = all",
        Role.RUN,
        doc=(
            "evaluate one split: only the images whose anns entry has this `set` (VoxDet-SoIR: `OWID` or `RoboTools`; "
            "the paper evaluates `RoboTools`); `null`: all, refused when two sets share instance ids (VoxDet-SoIR "
            "numbers OWID and RoboTools independently)"
        ),
    )
    subset: str = setting("all", "the original's name for `set` (all = every image)", Role.RUN, alias_of="set")
    ds_inds_file: Optional[str] = setting(
        None,
        "evaluate on the images at these positions of the sorted anns keys",
        Role.RUN,
        doc=(
            "evaluate on a subset: the images at the positions listed in a file (text, `.npy`, `.pt`, `.json`), "
            "positions in the anns file's sorted keys"
        ),
    )
    max_ds_index: Optional[int] = setting(
        None,
        "evaluate on the first N images of the sorted anns keys",
        Role.RUN,
        doc="evaluate on a subset: the first N images of the anns file's sorted keys",
    )
    duplicates: Duplicates = setting(
        Duplicates.error,
        "keys naming one file: error|merge (when labels agree)",
        Role.RUN,
        doc=(
            "keys of one split naming the same file (`./g/x.jpg`, `g/x.jpg`, an absolute path, a symlink): `error` "
            "(listed), or `merge` (kept once under the first key in sorted order, logged) when their annotations agree"
        ),
    )
    bad_images: BadImages = setting(
        BadImages.error,
        "unreadable image: error|skip (counted, listed)",
        Role.RUN,
        doc=(
            "an image that cannot be read: `error` (listed before any model runs), or `skip` (left out, counted, "
            "logged and listed in `bad_images.txt`; a gallery image whose pixels fail to decode during extraction gets "
            "no features and is left out of the evaluation, logged)"
        ),
    )


@dataclass
class QuerySettings:
    """Queries."""

    query_captions_file: Optional[str] = setting(
        None,
        "query masks for mask_input; null = captions_file",
        Role.QUERY_INPUT,
        doc=(
            "masks of the query images for `mask_input` / `query_mi` (e.g. from `create_masked_dataset.py "
            "--queries_only`); `null` = `captions_file`"
        ),
    )
    queries_dir: Optional[str] = setting(
        None,
        "root of relative query paths; null = anns folder",
        Role.QUERY_INPUT,
        doc="root of relative query paths; `null` = the anns file's folder",
    )
    crop: bool = setting(
        False,
        (
            "true: queries cropped tight to their bbox (default: the original's square crop of side max(w, h) around "
            "the box)"
        ),
        Role.QUERY,
        doc=(
            "queries are cropped around their `bbox` to a **square** of side max(w, h) centred on the box (image "
            "around it, zeros beyond the image border; the original's default); `true`: the tight box"
        ),
    )
    no_query_crop: bool = setting(
        False, "true: do not crop queries to their bbox", Role.QUERY, doc="`true`: queries are not cropped"
    )
    no_positive: NoPositive = setting(
        NoPositive.error,
        "query without a positive: error|skip|zero (AP 0, original)",
        Role.QUERY,
        doc=(
            "a query with no positive in the gallery: `error`, `skip` (dropped, counted, logged) or `zero` (kept: AP 0 "
            "and a miss, as the original counts it)"
        ),
    )
    mask_input: bool = setting(
        False,
        (
            "queries: MI with their mask on the query image with its pixels outside the mask(s) set to zero (the "
            "original's)"
        ),
        Role.QUERY,
        plain=Plain.REFUSED,
        shown=True,
        doc=(
            "queries: Mask Inversion with their mask(s) on the whole query image **with the pixels outside the mask(s) "
            "set to zero** (the original's meaning: nothing outside the object can change the vector)"
        ),
    )
    query_mi: bool = setting(
        False,
        "queries: MI with their mask on the unmasked query image",
        Role.QUERY,
        doc="queries: Mask Inversion with their mask(s) on the unmasked query image (the mask only guides the map)",
    )
    query_masks: QueryMasks = setting(
        QueryMasks.best,
        (
            "mask_input / query_mi: the mask best overlapping the bbox, or all of the query's masks (several rows, "
            "max-scored)"
        ),
        Role.QUERY,
        doc=(
            "`mask_input` / `query_mi`: the caption mask that best overlaps the query's bbox (or its bbox rectangle "
            "when none does, counted), or `all` of the query's masks (several query vectors, max-scored)"
        ),
    )
    query_extractor: Optional[str] = setting(
        None,
        "another registered extractor for the queries (same space)",
        Role.QUERY,
        doc=(
            "another registered extractor for the queries (e.g. `siglip_features` queries against a "
            "`siglip_mi_features` gallery), with settings of its own (`'query_extractor_args={mi_alpha: 0.1}'`); it "
            "must embed into the same space (checked: same dimension)"
        ),
    )
    query_extractor_args: Optional[dict[str, Any]] = setting(
        None,
        "settings of the query extractor that differ",
        Role.QUERY,
        doc=(
            "the query extractor's settings that differ from the gallery's, e.g. `'query_extractor_args={mi_alpha: "
            "0.1}'`"
        ),
    )
    T2I: bool = setting(
        False,
        (
            "text-to-image search: each query's obj_name in text_prompt, embedded by the checkpoint's text tower "
            "(SigLIP, CLIP)"
        ),
        Role.RUN,
        doc=(
            "text-to-image evaluation: each query's text is `text_prompt` with its `obj_name`, embedded by the text "
            'tower of the same SigLIP / CLIP checkpoint; the same metrics ("Your own queries")'
        ),
    )
    text_prompt: str = setting(
        "a photo of {obj_name}",
        "T2I: a query's text; {obj_name} is replaced by its obj_name",
        Role.RUN,
        doc="`T2I=true`: a query's text; must contain `{obj_name}`",
    )
    query_image: Optional[str] = setting(
        None,
        "an image to search with, embedded as the folder's queries were",
        Role.RUN,
        doc=(
            "`search_index.py`: an image of your own to search with, embedded as the folder's queries were (\"Your own "
            'queries"); no metrics'
        ),
    )
    query_bbox: Optional[tuple[float, ...]] = setting(
        None,
        (
            "[x1,y1,x2,y2] pixels in query_image: the object's box (crop, or the MI mask rectangle when no query_mask "
            "is given)"
        ),
        Role.RUN,
        doc=(
            "`[x1,y1,x2,y2]` pixels in `query_image`: the object's box (the crop; for MI folders its rectangle is the "
            "mask when no `query_mask` is given)"
        ),
    )
    query_mask: Optional[str] = setting(
        None,
        (
            "mask image of the object (size of query_image; 0/255 or 0/1): MI folders made with mask_input / query_mi "
            "run MI with it; folders of crops crop around its box"
        ),
        Role.RUN,
        doc=(
            "the object's mask, an image of `query_image`'s size (0/255 or 0/1): guides MI in folders made with "
            "`mask_input` / `query_mi`; elsewhere its box gives the query's crop"
        ),
    )
    query_text: Optional[str] = setting(
        None,
        "a sentence to search with (the text tower), used as given",
        Role.RUN,
        doc="`search_index.py`: a sentence to search with (SigLIP / CLIP text tower), used as given",
    )
    query_exact_max_rows: int = setting(
        1000000,
        (
            "ad-hoc queries: larger galleries are searched through the FAISS index (its candidates re-scored exactly); "
            "smaller ones exactly"
        ),
        Role.RUN,
        doc=(
            "ad-hoc queries: galleries with more rows are searched through the folder's FAISS index, candidates "
            "re-scored exactly"
        ),
    )


@dataclass
class DescriptorSettings:
    """Descriptors."""

    descriptor: Descriptor = setting(
        Descriptor.mi,
        (
            "mi: the published code's MI descriptors (per mask, mi_sum, smart_crop, ...) | mao: the paper's Stage B, "
            "one vector per image over its object crops"
        ),
        plain=Plain.REFUSED,
        shown=True,
        doc=(
            "`mi`: the published code's MI descriptors (one per mask; `mi_sum`, `smart_crop`, `avg_multiple_vecs` "
            "below); `mao`: MaO's Stage B as the paper describes it, one vector per image over its object crops (see "
            '"MaO as the paper describes it")'
        ),
    )
    mao_overlap: MaoOverlap = setting(
        MaoOverlap.iou,
        "descriptor=mao: soft IoU (the paper's) | dice",
        plain=Plain.LOGGED,
        shown=True,
        doc="`descriptor=mao`: the map-to-mask loss, soft IoU (the paper's) or `dice`",
    )
    pool: Pool = setting(
        Pool.model,
        (
            "global descriptor: model (the model's own) | cls | mean | gem | rmac over the last layer's patch tokens "
            "(extractors/pooling.py)"
        ),
        doc=(
            "the global descriptor of every extractor (extractors/pooling.py): `model`, the model's own global "
            "embedding (DINO: normed CLS; SigLIP: attention-pooling head; CLIP: `image_embeds`); or over the last "
            "layer's patch tokens, each through the family's final norm and projection (SigLIPs: post-LayerNorm, then "
            "their attention-pooling head applied to each token alone, so the vectors stay in the global embedding's "
            "space): `cls` (DINO families, CLIP; equals `model` there), `mean`, `gem` (generalised mean, cirtorch's "
            "GeM) or `rmac` (cirtorch's R-MAC, no whitening). MI extractors use it for their global rows "
            "(`global_features=false`, `missing_masks=global`); MI itself always starts from the model's own embedding"
        ),
    )
    gem_p: float = setting(
        3.0,
        "pool=gem: the generalised mean's exponent (cirtorch's p)",
        doc="`pool=gem`: the exponent p of `(mean_t max(z_t, 1e-6)^p)^(1/p)`",
    )
    rmac_levels: int = setting(
        3,
        "pool=rmac: levels of R-MAC regions (cirtorch's L)",
        doc="`pool=rmac`: levels of square regions (cirtorch's `L`; about 40 % overlap)",
    )
    global_features: bool = setting(
        True,
        "false: MI extractors compute no MI (the plain global embedding)",
        doc=(
            "`false`: the MI extractors compute no Mask Inversion, only the plain global embedding (the original's "
            "meaning; note its own defaults file has `false`)"
        ),
    )
    object_desc: ObjectDesc = setting(
        ObjectDesc.mi,
        (
            "per-object descriptor of MI extractors: mi | mask_pool (mask-weighted mean of the patch tokens) | crop "
            "(each mask's padded box embedded)"
        ),
        plain=Plain.REFUSED,
        doc=(
            "MI extractors' per-object descriptor, one vector per mask either way (so `avg_multiple_vecs`, the "
            "image-level max, reports and own queries work unchanged): `mi` (Mask Inversion); `mask_pool`, the mean of "
            "the last layer's patch tokens (after the final norm and the projection head, as `pool`) weighted by the "
            "share of each patch the mask covers, all masks of a batch from one forward pass, no optimisation; `crop`, "
            "each mask's box padded by `smart_crop_pad` cropped from the original image and embedded by the model (its "
            "`pool`), the crops of a batch in one forward pass. `mi_*` settings do nothing for `mask_pool` / `crop`; "
            "`mi_sum` is refused with them"
        ),
    )


@dataclass
class MISettings:
    """Mask Inversion."""

    mi_alpha: float = setting(
        0.03,
        "pull towards the global embedding",
        plain=Plain.LOGGED,
        shown=True,
        doc="weight of `1 - cos(e, g)`, the pull towards the global embedding",
    )
    mi_beta: float = setting(
        0.0,
        "penalty on |cos| between masks of one image",
        plain=Plain.LOGGED,
        shown=True,
        doc="weight of the mean \\|cos\\| between different masks of one image",
    )
    mi_lr: float = setting(
        0.1,
        "AdamW learning rate of Mask Inversion",
        plain=Plain.LOGGED,
        shown=True,
        doc="AdamW learning rate of Mask Inversion (weight decay 0)",
    )
    mi_iterations: Optional[int] = setting(
        None,
        f"null = {MI_ITERATIONS['mi']} (published code), {MI_ITERATIONS['mao']} with descriptor=mao (the paper's)",
        plain=Plain.LOGGED,
        shown=True,
        doc=(
            f"AdamW steps of Mask Inversion; `null`: {MI_ITERATIONS['mi']} (the published code's), "
            f"{MI_ITERATIONS['mao']} with `descriptor=mao` (the paper's)"
        ),
    )
    mi_layer_index: int = setting(
        -1,
        "hooked blocks: L + mi_layer_index + 1 .. L",
        plain=Plain.LOGGED,
        shown=True,
        doc="hooked blocks `L + mi_layer_index + 1 .. L` (-1: last block; -2: last two)",
    )
    mi_impl: MiImpl = setting(
        MiImpl.auto,
        "auto | blockwise | fused | dense: same results up to rounding",
        plain=Plain.LOGGED,
        doc=(
            "how the engine evaluates the maps: `auto` (`fused` Triton kernels on CUDA, `blockwise` on CPU), "
            "`blockwise`, `fused`, `dense` (the engine before; kept for benchmarks). Same results up to rounding"
        ),
    )
    mi_precision: MiPrecision = setting(
        MiPrecision.fp32,
        "fp32 | tf32 (CUDA) | bf16 (fused): MI's products",
        plain=Plain.LOGGED,
        doc="MI's products: `fp32`, or explicitly `tf32` (CUDA) / `bf16` (fused); report their cosine to fp32",
    )
    mi_cuda_graph: bool = setting(
        False,
        "CUDA: replay each MI iteration as a CUDA graph",
        plain=Plain.LOGGED,
        doc="CUDA: capture one MI iteration in a CUDA graph and replay it",
    )
    mi_init: MiInit = setting(
        MiInit["global"],
        "MI's start: global (the global embedding) | mask_pool (the pooled vector)",
        plain=Plain.REFUSED,
        doc=(
            "`mask_pool`: MI starts each mask's vector from its `mask_pool` vector instead of the global embedding "
            "(same loss, pulled towards the global embedding; one extra forward pass)"
        ),
    )
    mi_sum: bool = setting(
        False,
        "one vector per image, MI on the union of its masks",
        plain=Plain.REFUSED,
        shown=True,
        doc="one vector per image, optimised against the union of its masks",
    )
    full_mask: bool = setting(False, "the original's name for mi_sum", Role.RUN, plain=Plain.REFUSED, alias_of="mi_sum")
    avg_multiple_vecs: bool = setting(
        False,
        "one vector per image: mean of its mask vectors",
        plain=Plain.REFUSED,
        shown=True,
        doc="one vector per image: the renormalised mean of its mask vectors",
    )
    smart_crop: bool = setting(
        False,
        "MI inside each mask's padded box crop",
        plain=Plain.REFUSED,
        shown=True,
        doc="MI inside each mask's padded box, cropped from the original image",
    )
    smart_crop_pad: float = setting(
        0.1,
        "crop padding, share of the box's longer side",
        plain=Plain.LOGGED,
        shown=True,
        doc="padding of the smart crop, as a share of the box's longer side",
    )
    single_from_sc: bool = setting(
        True,
        "mi_sum + smart_crop: one MI vector per mask on its smart crop",
        Role.RUN,
        doc=(
            "`mi_sum` + `smart_crop`: one MI vector per mask on its smart crop (the original's rule: the same as "
            "`smart_crop` alone); `false` is refused (ill-defined in the original)"
        ),
    )
    missing_masks: MissingMasks = setting(
        MissingMasks.error,
        "gallery image with no mask: error|global|full_mask",
        shown=True,
        doc=(
            "gallery image without masks (or whose masks all vanish at the model's input size): `error`, `global` (its "
            "global embedding; counted) or `full_mask` (MI with one full-image mask, and masks that vanish are kept; "
            "the original's)"
        ),
    )


@dataclass
class CompatSettings:
    """The original code's behaviour (compat=original)."""

    legrad_norm: LegradNorm = setting(
        LegradNorm.per_map,
        "joint: min-max over all masks of an image at once",
        plain=Plain.LOGGED,
        doc=(
            "`joint`: min-max normalise the LeGrad maps of all masks of an image together, and with `smart_crop` all "
            "of an image's smart crops together (they shared the original's batch); CLIP adds 1e-6 to the range (the "
            "original's accident)"
        ),
    )
    mi_sum_loss: MiSumLoss = setting(
        MiSumLoss.union,
        "mean_dice: mi_sum fits the mean of per-mask Dice",
        plain=Plain.LOGGED,
        doc=(
            "`mean_dice`: SigLIP / CLIP `mi_sum` fits one vector to the mean of the per-mask Dice terms (the "
            "original's)"
        ),
    )
    smart_crop_source: SmartCropSource = setting(
        SmartCropSource.original,
        "resized: cut from the model-size copy",
        plain=Plain.LOGGED,
        doc=(
            "`resized`: smart crops cut from the model-input-sized copy and resized back, padded by int(0.1 x longer "
            "side) (DINOv2) or 5 px (SigLIP, CLIP) (the original's)"
        ),
    )
    mi_resample: MiResample = setting(
        MiResample.processor,
        "original: MI-path resize LANCZOS/BILINEAR per family",
        plain=Plain.LOGGED,
        doc=(
            "`original`: resize for MI with LANCZOS (DINOv2) / BILINEAR (SigLIP, CLIP) instead of the processor's "
            "filter"
        ),
    )
    alpha_sum_full: float = setting(
        0.0,
        "DINOv2 mi_sum: start at the sum of the per-mask MI vectors, pulled to them",
        plain=Plain.REFUSED,
        doc=(
            "the original DINOv2 code's key (read by its extractor, absent from its config): with `mi_sum=true`, first "
            "one MI vector per mask on the whole image, then the union's vector started at the sum of their raw "
            "(un-normalised) parameters and pulled towards them, `+ alpha_sum_full x mean_p (1 - cos(e, e_p))` (its "
            "`compute_maskinversion_sum`); DINOv2 only (its other extractors pass 0, so it is refused there), refused "
            "without `mi_sum` or with `smart_crop` (where the original returns before using it)"
        ),
    )
    alpha_sum: float = setting(
        0.0,
        "the original's smart-crop variant of alpha_sum_full: only 0 (not reproduced)",
        plain=Plain.LOGGED,
        doc=(
            "the original's smart-crop variant of `alpha_sum_full` (`mi_sum smart_crop single_from_sc=false`, the "
            "per-mask vectors from the smart crops); not reproduced: any other value is refused"
        ),
    )
    gallery_crop: bool = setting(
        False,
        "crop gallery images that have a bbox like queries (leaks the label)",
        doc=(
            "crop gallery images that have a bbox like queries (the original does; it leaks the label, logged as such; "
            "refused with MI masks, which are made for the whole image)"
        ),
    )
    pixel_geometry: PixelGeometry = setting(
        PixelGeometry.soir,
        (
            "original: its pixel rounding (smart-crop box, PIL NEAREST masks, mask_input resized then zeroed, square "
            "query crop, SigLIP maps upsampled x16)"
        ),
        doc=(
            "`original`: the original's pixel rounding: its smart-crop box (1 px short at right and bottom, padding "
            "from side - 1), masks resized with PIL NEAREST, `mask_input` zeroing after the resize, the square query "
            "crop truncated with `int()`, SigLIP maps upsampled by 16 whatever the checkpoint's patch"
        ),
    )
    mi_beta_used: bool = setting(
        True,
        "false: mi_beta is ignored (logged), as the original never passed it to MI",
        doc="`false`: `mi_beta` is ignored (logged), as the original never passed it to MI",
    )
    query_vectors: QueryVectors = setting(
        QueryVectors.max,
        "each: every query vector scored as a query of its own",
        Role.RUN,
        doc=(
            "a query image with several vectors (`query_masks=all`): `max` scores each gallery image by the best pair, "
            "once per query image; `each` scores every query vector as a query of its own (the original's count)"
        ),
    )
    masks_rle: MasksRle = setting(
        MasksRle.read,
        (
            "ignore: a segmentation_results.pt's masks are not read (the original's extractors: one full-image mask "
            "per image)"
        ),
        doc=(
            "`ignore`: the masks of a `segmentation_results.pt` (the original's mask script) are not read, as the "
            "original's extractors never read `masks_rle`: one full-image mask per image (a loud warning)"
        ),
    )


@dataclass
class ComputeSettings:
    """Compute."""

    device: str = setting(
        "auto",
        "auto (cuda if available) | cpu | cuda | cuda:N",
        Role.RUN,
        doc=(
            "`auto` (CUDA when available, logged), `cpu`, `cuda`, `cuda:N`. An explicit `cuda` without CUDA is an error"
        ),
    )
    precision: Precision = setting(
        Precision.fp32,
        "fp32 | fp16 | bf16 (autocast of global embeddings)",
        doc=(
            "`fp32`, `fp16`, `bf16` autocast of the global embeddings (stored features are float32). Mask Inversion "
            "always runs the model in fp32 (it amplifies rounding); its own reduced precision is `mi_precision`"
        ),
    )
    batch_size: int = setting(
        16,
        "images per batch (part of the features' identity: MI rounding depends on the batch)",
        doc=(
            "images per batch. Part of the features' identity: in float32, MI vectors depend slightly on which images "
            "share a batch (rounding amplified by 100 optimisation steps)"
        ),
    )
    num_workers: int = setting(
        2,
        "DataLoader workers (search_index.py: report thumbnail threads, 0 = none)",
        Role.RUN,
        doc=(
            "DataLoader workers decoding and resizing images (`search_index.py`: threads that write the report's "
            "thumbnails, 0 = none)"
        ),
    )
    shard_size: int = setting(
        512, "images per feature shard (resume granularity)", doc="images per feature shard, the resume granularity"
    )
    gallery_chunk_size: Optional[int] = setting(
        None, "the original's name for shard_size", Role.RUN, alias_of="shard_size"
    )


@dataclass
class IndexSettings:
    """What create_index.py does, and the index."""

    only_create: bool = setting(
        False,
        "stop after the index (else the search runs at the end)",
        Role.RUN,
        doc=(
            "`create_index.py` runs the search at the end and prints its table (as the original); `true`: it stops "
            "after the features and the index"
        ),
    )
    only_gallery: bool = setting(False, "extract the gallery only (no queries, no search)", Role.RUN)
    no_faiss: bool = setting(
        False,
        "build no FAISS index (the search is exact either way)",
        Role.RUN,
        doc="build no FAISS index (the search scores exactly either way)",
    )
    features_dir: Optional[str] = setting(
        None,
        "create: null = outputs/features/<dataset>/<extractor>-<hash>",
        Role.RUN,
        doc=(
            "create: where features go (`null` = `outputs/features/<dataset>/<extractor>-<hash of the settings that "
            "change features>[_tag][_add_string]`); search: the folder to evaluate (required)"
        ),
    )
    index: str = setting(
        "Flat",
        "faiss index_factory string (inner product)",
        Role.RUN,
        doc=(
            "FAISS `index_factory` string, inner product, e.g. `index=HNSW32`, or with a comma "
            "`'index=\"IVF1024,Flat\"'` (Hydra needs the quotes). Checked with faiss before any model runs; saved as "
            "`index-<factory>.faiss`; search evaluates exactly either way and reports the index's neighbour recall"
        ),
    )
    stage: Stage = setting(
        Stage.all,
        "all (one process, as always) | prepare | extract | index | search",
        Role.RUN,
        doc=(
            "`all`: every step in one process, then the search (as always). `prepare` (check inputs, claim the folder, "
            "write per-shard job files), `extract` (workers), `index` (one process, after every shard), `search` (= "
            "`search_index.py`)"
        ),
    )
    workers: int = setting(
        1,
        "stage=extract: the shards are split among this many workers",
        Role.RUN,
        doc=(
            "`stage=extract`: worker `w` of `W` computes the missing shards `s` with `s % W == w`; any `W` resumes any "
            "earlier run. `worker` must lie in `[0, workers)`"
        ),
    )
    worker: int = setting(
        0,
        "stage=extract: this worker computes the missing shards s with s % workers == worker",
        Role.RUN,
        doc="`stage=extract`: this worker's number, in `[0, workers)` (see `workers`)",
    )
    index_train_rows: Optional[int] = setting(
        None,
        "stage=index, IVF: rows sampled to train it; null = 100 per list",
        Role.RUN,
        doc=(
            "`stage=index`, IVF factories: rows sampled uniformly across shards to train; `null` = 100 per inverted "
            "list, capped at 8 GiB of rows (a warning below 39 per list)"
        ),
    )
    index_blocks: Optional[int] = setting(
        None,
        "stage=index, IVF: blocks added separately (resumable); null = 1 per 10^6 rows",
        Role.RUN,
        doc=(
            "`stage=index`, IVF factories: the gallery's shards are added in this many blocks (each a file, kept by a "
            "rerun), merged on disk into `index-<factory>.faiss` + `.ivfdata`; `null` = one block per 10^6 rows"
        ),
    )


@dataclass
class SearchSettings:
    """Search."""

    k_search: int = setting(
        100,
        "rankings saved per query (all images are scored)",
        Role.RUN,
        doc=(
            "ranked gallery images saved per query in `rankings.jsonl` (all images are scored), capped by "
            "`max_k_search`"
        ),
    )
    max_k_search: int = setting(
        1000000, "cap on k_search (the original's)", Role.RUN, doc="cap on `k_search` (the original's)"
    )
    save_knns: bool = setting(True, "write rankings.jsonl", Role.RUN, doc="write `rankings.jsonl`")
    map_at: Optional[int] = setting(None, "also report mAP@k", Role.RUN)
    precision_at: tuple[int, ...] = setting((1, 5, 10), "the k of P@k", Role.RUN, doc="the k of P@k")
    recall_at: tuple[int, ...] = setting((1, 5, 10), "the k of Recall@K", Role.RUN)
    search: SearchMode = setting(
        SearchMode.exact,
        (
            "exact: every gallery image scored | faiss: FAISS candidates, re-scored exactly (mAP is then a lower "
            "bound, see results.json) | lancedb: every gallery image scored by the exported LanceDB table "
            "(scripts/export_features.py)"
        ),
        Role.RUN,
        doc=(
            "`exact`: every gallery image scored. `faiss`: FAISS's candidates only, re-scored exactly; mAP is then a "
            "lower bound of the full-gallery mAP (`mAP_is_lower_bound`, `candidate_coverage` in results.json). "
            "`lancedb`: every gallery image scored by the exported LanceDB table (multivector MaxSim; same metrics as "
            "`exact`, see [interop.md](interop.md))"
        ),
    )
    lancedb_dir: Optional[str] = setting(
        None,
        "search=lancedb: the format=lancedb export; null = <features_dir>/export/lancedb",
        Role.RUN,
        doc=(
            "`search=lancedb`: the `scripts/export_features.py format=lancedb` folder; `null` = "
            "`<features_dir>/export/lancedb`"
        ),
    )
    search_block_mb: float = setting(
        256,
        (
            "exact search: a gallery whose features exceed this is streamed from its shards in blocks of this working "
            "memory"
        ),
        Role.RUN,
        doc=(
            "exact search: a gallery whose features exceed this many MiB is streamed from its shards in blocks of this "
            "working memory (same numbers; `index_recall@k` is then not computed)"
        ),
    )
    search_candidates: Optional[int] = setting(
        None,
        "search=faiss: rows FAISS returns per query row; null = 10 x k_search",
        Role.RUN,
        doc="`search=faiss`: rows FAISS returns per query row; `null` = 10 x `k_search`",
    )
    search_nprobe: int = setting(
        16,
        "search=faiss with an IVF index: inverted lists probed",
        Role.RUN,
        doc="`search=faiss` with an IVF index: inverted lists probed",
    )
    # A string, not a choice: the original's config has rerank: False (read nowhere), which
    # resolve_aliases turns into none; check_config refuses anything else.
    rerank: str = setting(
        "none",
        "re-ranking after the search: none | aqe (alpha query expansion) | dba (database-side augmentation)",
        Role.RUN,
        doc=(
            "re-ranking after the search (`utils/retrieval/rerank.py`; Radenovic et al. 2018): `aqe`, alpha query "
            "expansion: each query vector becomes `normalize(q + sum_j max(s_j, 0)^alpha g_j)` over its top `rerank_k` "
            "gallery images of the first ranking (a multi-vector image: its best vector for that query), then the "
            "search runs again; `dba`, database-side augmentation: each gallery vector is expanded the same way with "
            "its top `rerank_k` other gallery images (in RAM only: refused for a streamed gallery or `search=faiss`). "
            "results.json records it (`rerank`, `rerank_k`, `rerank_alpha`). The original's `rerank=false` means `none`"
        ),
    )
    rerank_alpha: float = setting(
        3.0,
        "weight of a neighbour: max(similarity, 0) ** rerank_alpha",
        Role.RUN,
        doc="the neighbours' weight exponent: `max(similarity, 0) ** rerank_alpha`",
    )
    rerank_k: int = setting(
        2,
        "neighbours (gallery images) per expanded vector",
        Role.RUN,
        doc="neighbours (gallery images) per expanded vector",
    )


@dataclass
class ReportSettings:
    """Report of a search run (search_index.py)."""

    report: bool = setting(
        True,
        "write report.html (+ thumbs/) next to results.json",
        Role.RUN,
        doc=(
            '`search_index.py` writes `report.html` (+ `thumbs/`) next to `results.json` (see "Reports"); `false`: none'
        ),
    )
    report_k: int = setting(
        10,
        "gallery images shown per query",
        Role.RUN,
        doc="gallery images shown per query in the report (independent of `k_search`)",
    )
    report_thumb_size: int = setting(
        160,
        "longer side of the thumbnails, pixels",
        Role.RUN,
        doc="longer side of the report's thumbnails, pixels (32-1024)",
    )
    report_maps: bool = setting(
        False,
        "link each shown gallery image to its LeGrad map (runs the model)",
        Role.RUN,
        doc=(
            "link each shown gallery image to the LeGrad map of its matching vector (loads the features' model; about "
            "one forward pass per shown image)"
        ),
    )


@dataclass
class ExportSettings:
    """Export (scripts/export_features.py)."""

    format: ExportFormat = setting(
        ExportFormat.embeddings,
        "embeddings (clip-retrieval / autofaiss) | lancedb",
        Role.RUN,
        doc=(
            "`embeddings`: clip-retrieval / autofaiss layout (`img_emb/*.npy` + `metadata/*.parquet`, read by "
            "embedding-reader); `lancedb`: an embedded LanceDB table, one row per gallery image with a multivector "
            "column"
        ),
    )
    export_dir: Optional[str] = setting(
        None,
        "a new or SoIR-owned folder; null = <features_dir>/export/<format>",
        Role.RUN,
        doc=(
            "where the export goes, a new or SoIR-owned folder (resumed by rerunning); `null` = "
            "`<features_dir>/export/<format>`"
        ),
    )
    export_dtype: ExportDtype = setting(
        ExportDtype.float32,
        "float32 | float16: the exported vectors",
        Role.RUN,
        doc="`float32` or `float16`: the exported vectors",
    )


@dataclass
class UnreadOriginalSettings:
    """Keys of the original's config that its code never read."""

    dumb_crop: bool = setting(
        False, "the original's key, never read by its code: accepted at this default only", Role.UNREAD
    )
    no_center_crop: bool = setting(
        False, "the original's key, never read by its code: accepted at this default only", Role.UNREAD
    )
    no_gallery_crop: bool = setting(
        False, "the original's key, never read by its code: accepted at this default only", Role.UNREAD
    )
    no_resize: bool = setting(
        False, "the original's key, never read by its code: accepted at this default only", Role.UNREAD
    )
    gallery: Optional[str] = setting(
        None, "the original's key, never read by its code: accepted at this default only", Role.UNREAD
    )
    read_dataset: bool = setting(
        True, "the original's key, never read by its code: accepted at this default only", Role.UNREAD
    )
    save_gallery_embeddings: bool = setting(
        False, "the original's key, never read by its code: accepted at this default only", Role.UNREAD
    )


# SoIRConfig is the flat Hydra schema: every key is set on the command line as ``key=value``, as the
# original code's were. Its fields are the groups' fields; dataclasses collect base classes' fields
# from the last base to the first, so the groups are listed last-shown first.
SETTINGS_GROUPS: tuple[type, ...] = (
    RunSettings,
    ModelSettings,
    LoRASettings,
    DataSettings,
    QuerySettings,
    DescriptorSettings,
    MISettings,
    CompatSettings,
    ComputeSettings,
    IndexSettings,
    SearchSettings,
    ReportSettings,
    ExportSettings,
    UnreadOriginalSettings,
)


@dataclass
class SoIRConfig(
    UnreadOriginalSettings,
    ExportSettings,
    ReportSettings,
    SearchSettings,
    IndexSettings,
    ComputeSettings,
    CompatSettings,
    MISettings,
    DescriptorSettings,
    QuerySettings,
    DataSettings,
    LoRASettings,
    ModelSettings,
    RunSettings,
):
    """The schema of configs/defaults.yaml: all settings groups, flat."""


def keys_where(test: Callable[[dict], bool]) -> frozenset[str]:
    """The schema keys whose field metadata passes ``test``."""
    return frozenset(f.name for f in dataclasses.fields(SoIRConfig) if test(f.metadata))


def group_keys(group: type) -> tuple[str, ...]:
    """The keys of one settings group, in schema order."""
    return tuple(f.name for f in dataclasses.fields(group))


# The roles' key sets, derived from the fields' metadata. QUERY_KEYS change the query features only;
# RUN_KEYS change no feature: names, search settings, and the input paths, whose effect (which
# images, their bytes, boxes and masks) is hashed from the inputs themselves, so moving or fixing
# anns.pt without changing the gallery keeps the gallery. Every other key changes the gallery
# features (and so the queries'). MODEL_KEYS are run keys because the extractor's own identity
# (extractors.base.Extractor.identity) records what they resolve to (the weights, the adapters'
# content), not the names. The original's aliases (full_mask, gallery_chunk_size, subset) and
# single_from_sc are resolved into mi_sum, shard_size, set and smart_crop by resolve_aliases before
# anything reads them; ds_inds_file, max_ds_index and only_gallery act on which images are
# extracted, which the inputs' hash covers.
UNREAD_ORIGINAL_KEYS = {f.name: f.default for f in dataclasses.fields(SoIRConfig) if f.metadata["role"] is Role.UNREAD}
QUERY_KEYS = keys_where(lambda m: m["role"] in (Role.QUERY, Role.QUERY_INPUT))
RUN_KEYS = keys_where(lambda m: m["role"] in (Role.RUN, Role.QUERY_INPUT, Role.MODEL, Role.UNREAD))
MODEL_KEYS = keys_where(lambda m: m["role"] is Role.MODEL)
# Mask Inversion settings: a plain extractor ignores them (logged) or refuses them (extractor_from_config).
MI_ONLY_KEYS = keys_where(lambda m: m["plain"] is not None)
NEEDS_MI_KEYS = keys_where(lambda m: m["plain"] is Plain.REFUSED)
# The settings a search report lists for a features folder made by an MI extractor, in schema order.
REPORTED_MI_KEYS = tuple(f.name for f in dataclasses.fields(SoIRConfig) if f.metadata["shown"])

# the re-rankings of utils/retrieval/rerank.py (rerank=)
RERANKS = ("none", "aqe", "dba")


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
    if not OmegaConf.has_resolver("soir_help"):
        # hydra.help.template (configs/defaults.yaml): the keys by group with default and help.
        OmegaConf.register_new_resolver("soir_help", hydra_help_keys)
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


def mi_iterations(iterations: int | None, descriptor: str) -> int:
    """The Mask Inversion steps ``mi_iterations`` asks for: itself, or null's default for ``descriptor``."""
    return MI_ITERATIONS[str(descriptor)] if iterations is None else iterations


def sums_masks(mi_sum: bool, smart_crop: bool, single_from_sc: bool) -> bool:
    """Whether MI runs on the union of an image's masks (``mi_sum``), with the original's rule for
    ``mi_sum`` + ``smart_crop``: with ``single_from_sc=true`` (the original's example command) it is one
    MI vector per mask on its smart crop, i.e. ``smart_crop`` alone (False, logged); with
    ``single_from_sc=false`` it is ill-defined (refused)."""
    if not (mi_sum and smart_crop):
        return mi_sum
    if not single_from_sc:
        raise SoIRError(
            "mi_sum=true smart_crop=true single_from_sc=false is ill-defined (the original applied "
            "the crops' masks to the full image); use smart_crop=true (one vector per mask on its "
            "crop) or mi_sum=true (one vector per image)"
        )
    log.info(
        "mi_sum=true smart_crop=true single_from_sc=true: one MI vector per mask on its smart crop, as "
        "the original computes it (the same as smart_crop=true alone)"
    )
    return False


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
    cfg.mi_sum = sums_masks(cfg.mi_sum, cfg.smart_crop, cfg.single_from_sc)


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


# ---------------------------------------------------------------------------------------------------
# The reference, generated from the fields: `--help` (Hydra's help template) and docs/configuration.md
# ---------------------------------------------------------------------------------------------------
# The config group that is not also a key (extractor is both: its row is the key's).
COMPAT_GROUP_DOC = (
    "`compat=original`: the original code's numbers where its code differs from SoIR's defaults by accident "
    '(a config group, `configs/compat/original.yaml`; see "Coming from the original code" in the README)'
)
# How the docs name a role, in the "changes" column.
ROLE_NAMES = {
    Role.FEATURES: "gallery features",
    Role.QUERY: "query features",
    Role.QUERY_INPUT: "run only (query inputs: hashed)",
    Role.RUN: "run only",
    Role.MODEL: "run only (names the model)",
    Role.UNREAD: "nothing (refused if changed)",
}
DOCS_PATH = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"
# The line that marks the page as written by --write-docs: a page without it is someone's, never overwritten.
DOCS_MARK = "<!-- Generated from utils/config.py by `python -m utils.config --write-docs`; edit the settings there. -->"


def group_title(group: type) -> str:
    """A settings group's heading: its docstring's first line, without the final full stop."""
    return (group.__doc__ or group.__name__).strip().splitlines()[0].rstrip(".")


def default_text(field: dataclasses.Field) -> str:
    """A key's default as written on the command line (``null``, ``true``, ``[1,5,10]``, ``''``); a
    required key's is ``required``."""
    value = field.default
    if field.metadata.get("default_text"):
        return field.metadata["default_text"]
    if value is MISSING:
        return "required"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, Enum):
        return str(value.value)
    if isinstance(value, tuple):
        return "[" + ",".join(str(v) for v in value) + "]"
    return str(value) if value != "" else "''"


def help_text() -> str:
    """``--help``'s list of keys: each group's keys, ``key=default`` and the one-line help."""
    lines = [
        "Config groups: extractor=<name> (made from the family table, also sets vec_dim); compat=none|original "
        "(configs/compat/: the original code's numbers)",
    ]
    for group in SETTINGS_GROUPS:
        lines += ["", f"{group_title(group)}:"]
        for field in dataclasses.fields(group):
            default = default_text(field).replace("`", "")
            if " " in default and not field.metadata["default_text"]:
                default = repr(default)  # as typed on the command line: text_prompt='a photo of {obj_name}'
            key = f"{field.name}={default}"
            # key=default in a column of 36; a longer one gets its own line
            lines += (
                [f"  {key:<36} {field.metadata['help']}"]
                if len(key) <= 36
                else [f"  {key}", " " * 39 + field.metadata["help"]]
            )
    return "\n".join(lines) + "\n"


def hydra_help_keys() -> str:
    """:func:`help_text` for Hydra's ``hydra.help.template`` (configs/defaults.yaml inserts it with the
    ``soir_help`` resolver): ``$`` doubled, as Hydra fills the template with ``string.Template``."""
    return help_text().replace("$", "$$")


def markdown_cell(text: str) -> str:
    """``text`` in a Markdown table cell: a bare ``|`` escaped (an escaped one kept)."""
    return re.sub(r"(?<!\\)\|", r"\\|", text)


def docs_markdown() -> str:
    """docs/configuration.md: every key by group, with its default, its description and what it changes."""
    aliases = {f.metadata["alias_of"]: f.name for f in dataclasses.fields(SoIRConfig) if f.metadata["alias_of"]}
    out = [
        "# Configuration reference",
        "",
        DOCS_MARK,
        "",
        "All keys live in `configs/defaults.yaml` and are typed by `utils/config.py:SoIRConfig`, whose settings groups",
        "(`RunSettings`, `MISettings`, ...) define each key once: its type, default, help and role. A misspelt key is",
        "refused in one line naming the closest keys (`mi_alhpa=0.03: unknown key 'mi_alhpa'; did you mean mi_alpha",
        "or mi_lr?`), with or without Hydra's `+`; a value of the wrong type or a choice that does not exist is an",
        "error naming the key (and the allowed choices); inconsistent combinations are refused with a message",
        "(`check_config`). Relative paths resolve from the folder you launch in (no `chdir`). Every key of the",
        "original code's `configs/defaults.yaml` is accepted (docs/coming-from-original.md).",
        "`python create_index.py --help` prints the same keys with their one-line help.",
        "",
        "The last column says what changing the key changes: the gallery features (a new features folder), the",
        "query features only, or nothing stored (run names, search and report settings, input paths whose",
        "content is hashed instead, the model's name whose weights are hashed instead).",
    ]
    for group in SETTINGS_GROUPS:
        if group is UnreadOriginalSettings:
            continue
        out += ["", f"## {group_title(group)}", "", "| key | default | meaning | changes |", "|---|---|---|---|"]
        if group is RunSettings:
            out.append(f"| `compat` | `none` | {COMPAT_GROUP_DOC} | gallery and query features |")
        for field in dataclasses.fields(group):
            if field.metadata["alias_of"]:
                continue  # on its SoIR name's row
            key = f"`{field.name}`"
            if field.name in aliases:
                key += f" (or the original's `{aliases[field.name]}`)"
            default = default_text(field)
            default = default if default in ("required",) or "`" in default else f"`{default}`"
            doc, role = markdown_cell(field.metadata["doc"]), ROLE_NAMES[field.metadata["role"]]
            out.append(f"| {key} | {default} | {doc} | {role} |")
    unread = dataclasses.fields(UnreadOriginalSettings)
    out += [
        "",
        "## Keys of the original's config that its code never read",
        "",
        f"Keys of the original's config that its code never read ({', '.join(f'`{f.name}`' for f in unread)})",
        "are accepted at the original's defaults ("
        + ", ".join(f"`{f.name}={default_text(f)}`" for f in unread)
        + "), so its config files and commands compose; any other value is refused with a message saying the",
        "original ignored it too. The original's `rerank` (`False`, also read nowhere) is accepted as `rerank=none`.",
    ]
    return "\n".join(out) + "\n"


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m utils.config --write-docs``: write docs/configuration.md from the schema."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args != ["--write-docs"]:
        raise SystemExit("usage: python -m utils.config --write-docs (writes docs/configuration.md)")
    if DOCS_PATH.exists() and DOCS_MARK not in DOCS_PATH.read_text():
        raise SystemExit(
            f"error: {DOCS_PATH} was not written by --write-docs (it lacks the generated-page line); "
            "move it away, then run again"
        )
    atomic_write_text(DOCS_PATH, docs_markdown())
    print(f"wrote {DOCS_PATH.name}: {len(dataclasses.fields(SoIRConfig))} keys")


if __name__ == "__main__":
    main()
