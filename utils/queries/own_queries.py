"""Your own queries against a features folder: a photo (with a box or a mask), a sentence, T2I's texts.

search_index.py's ad-hoc mode (nothing is written to the features folder)::

    python search_index.py features_dir=F query_image=photo.jpg [query_bbox=[x1,y1,x2,y2]] \
        [query_mask=m.png] k_search=20
    python search_index.py features_dir=F query_text="a red mug"

**An image** is embedded exactly as create_index.py embedded the folder's queries: the folder's
``config.yaml`` gives the extractor (or its ``query_extractor``) and every query setting (the square crop
around ``query_bbox``, or ``query_mask``'s box, by default, ``crop=true`` tight, ``no_query_crop``;
``mask_input`` / ``query_mi``: Mask Inversion with ``query_mask``, or with the ``query_bbox`` rectangle
when no mask is given; the MI settings), and the same code runs (``datasets.extraction.query_jobs`` ->
``check_jobs`` -> ``ViewDataset`` -> ``Extractor.describe``). The model must be the one that made the
features: its identity (``Extractor.identity``: weights, preprocessing, LoRA, precision) is compared with the folder's
``identity.json``, so a changed model folder is refused; another device is allowed (logged: CPU and CUDA
round differently).

**A text** is embedded by the text tower of the features' checkpoint (``extractors/text.py``; SigLIP and
CLIP), as given. ``T2I=true`` (:func:`text_query_rows`) makes one text per query of the folder from its
``obj_name`` and ``text_prompt`` and evaluates them like image queries (utils.pipeline.search.search).

**The gallery** is scored exactly, streamed from the shards (``utils.retrieval.streaming``, memory bounded), or, with
more than ``query_exact_max_rows`` rows, through the folder's FAISS index (``index=``) whose candidates are
re-scored exactly. Image-level scores as search_index.py: the max over an image's rows.

The run folder gets ``results.json`` (the query, how it was embedded and searched, the top ``k_search``),
``rankings.jsonl`` (search_index.py's format), ``query.safetensors`` (the query's rows: ``features``
[R, D], ``mask_index`` [R]) and ``report.html`` (no metrics: an ad-hoc query has no ground truth).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from PIL import Image, UnidentifiedImageError
from safetensors.torch import save

from datasets import Annotation, ImageMasks, bbox_from_mask, encode_mask
from datasets.extraction import ViewDataset, check_jobs, query_jobs, with_crop_geometry
from datasets.images import image_facts
from utils.config import MODEL_KEYS, RUN_KEYS, SoIRConfig
from utils.errors import SoIRError
from utils.files import (
    atomic_write,
    atomic_write_json,
    atomic_write_text,
    changed_keys,
    check_run_folder,
    read_json,
)
from utils.hub import model_weights_identity
from utils.results.interop import LanceDBGallery, lancedb_folder
from utils.results.report import Shown, write_report
from utils.retrieval.feature_store import FeatureShards
from utils.retrieval.index_io import index_path, load_index
from utils.retrieval.streaming import QueryRows, faiss_search, streamed_search

log = logging.getLogger("soir.own_queries")

TEXT_BATCH = 256  # texts per forward pass of the text tower


# ---------------------------------------------------------------------------------------------------
# The features folder: its settings, its gallery, the model that made it
# ---------------------------------------------------------------------------------------------------
def folder_config(folder: Path) -> DictConfig:
    """The config the features were made with (``config.yaml``), on the current schema: a key the file
    lacks (an older SoIR) has its default, as create_index.py assumed it then."""
    if not (folder / "config.yaml").is_file():
        raise SoIRError(
            f"{folder} has no config.yaml: not a create_index.py output folder (or its run "
            "stopped before it began; rerun create_index.py)"
        )
    made_with = OmegaConf.load(folder / "config.yaml")
    schema = OmegaConf.structured(SoIRConfig)
    return OmegaConf.merge(schema, {k: v for k, v in made_with.items() if k in schema})


def same_setting(given, stored) -> bool:
    """Equal values; two spellings of one existing folder or file (relative / absolute) are equal."""
    if given == stored:
        return True
    return (
        isinstance(given, str)
        and isinstance(stored, str)
        and Path(given).exists()
        and Path(given).resolve() == Path(stored).resolve()
    )


def check_settings(cfg: DictConfig, made_with: DictConfig) -> None:
    """Ad-hoc queries are embedded with the folder's settings and model. A setting that changes features
    or names another model (``utils.config.MODEL_KEYS``: run keys for a search, but they name the
    model), given on this command line with a value other than the folder's (and than the default), is
    refused rather than silently ignored."""
    default = OmegaConf.to_container(OmegaConf.structured(SoIRConfig))
    given, folder = OmegaConf.to_container(cfg, resolve=True), OmegaConf.to_container(made_with, resolve=True)
    differ = sorted(
        k
        for k in folder
        if (k not in RUN_KEYS or k in MODEL_KEYS)
        and k in given
        and not same_setting(given[k], folder[k])
        and given[k] != default.get(k)
    )
    if differ:
        raise SoIRError(
            "ad-hoc queries are embedded as the features folder's queries were (its config.yaml); "
            f"these settings differ from it: {', '.join(f'{k}={given[k]} (folder: {folder[k]})' for k in differ)}; "
            "drop them, or make a features folder with them (create_index.py)"
        )


def gallery_shards(folder: Path, made_with: DictConfig) -> FeatureShards:
    listing = folder / "gallery" / "images.json"
    if not listing.is_file():
        raise SoIRError(
            f"{listing} is missing: the extraction did not finish; rerun create_index.py with "
            "the same settings, it resumes"
        )
    records = read_json(listing, fix="rerun create_index.py with the same settings")
    shards = FeatureShards(folder / "gallery", records, made_with.shard_size)
    if missing := shards.missing():
        raise SoIRError(
            f"{folder / 'gallery'}: {len(missing)} of {shards.num_shards} shards are missing; the "
            "extraction did not finish: rerun create_index.py with the same settings, it resumes"
        )
    return shards


def stored_identity(folder: Path, queries: bool) -> dict:
    """The identity of the extractor that made the folder's queries (``queries``) or its gallery."""
    if queries and (folder / "queries" / "identity.json").is_file():
        saved = read_json(folder / "queries" / "identity.json", fix="rerun create_index.py with the same settings")
        return saved["query_extractor_identity"]
    return read_json(folder / "identity.json", fix="rerun create_index.py with the same settings")["extractor_identity"]


def stored_model(folder: Path, identity: dict) -> str:
    """The checkpoint the features were made from (absolute folder, or hub id), checked unchanged:
    its files' content (a local folder) or its cached hub revision must be the recorded ones."""
    name = identity.get("model_path") or identity["model_id"]
    now = model_weights_identity(name)
    changed = [k for k in now if identity.get(k) != now[k]]
    if changed:
        raise SoIRError(
            f"{name} is not the checkpoint {folder} was made with ({', '.join(changed)} changed): its "
            "features would not match a query embedded now; rerun create_index.py with this model, "
            "or restore the old one"
        )
    return name


def check_extractor(folder: Path, extractor, saved: dict) -> None:
    """Refuse an extractor whose identity is not the one that made the folder's queries (the device
    may differ: logged)."""
    now = json.loads(json.dumps(extractor.identity()))
    changed = [k for k in changed_keys(saved, now) if k != "device"]
    if changed:
        raise SoIRError(
            f"{folder} was made by another extractor than the one its config.yaml builds now "
            f"({', '.join(changed)} differ): rerun create_index.py"
        )
    if saved.get("device") != now["device"]:
        log.warning(
            "the features were made on %s, this query on %s: scores differ by rounding (~1e-6)",
            saved.get("device"),
            now["device"],
        )


# ---------------------------------------------------------------------------------------------------
# Embedding queries
# ---------------------------------------------------------------------------------------------------
def mask_entry(path: str) -> ImageMasks:
    """``query_mask``: a mask image (nonzero = the object; 0/255 or 0/1), as one captions entry."""
    from extractors.inputs import as_masks

    try:
        with Image.open(path) as image:
            values = np.asarray(image.convert("L"))
    except (OSError, UnidentifiedImageError) as err:
        raise SoIRError(f"query_mask={path}: not a readable image ({err})") from None
    mask = as_masks(values, where=f"query_mask={path}")[0]
    if not mask.any():
        raise SoIRError(f"query_mask={path} is empty (no nonzero pixel); it must cover the object")
    return ImageMasks(masks_rle=[encode_mask(mask)], bboxes=[bbox_from_mask(mask)], scores=[1.0])


def image_query(cfg: DictConfig, made_with: DictConfig) -> tuple[Annotation, list, str]:
    """The ad-hoc image as a query job of the folder's kind, checked against its header (no model).

    Returns (its annotation, [its ImageJob], how it is embedded, in words)."""
    file = Path(cfg.query_image)
    for key, path in (("query_image", file), ("query_mask", cfg.query_mask)):
        if path is not None and not Path(path).is_file():
            raise SoIRError(
                f"{key}={path}: no such file (a relative path starts where you launched, "
                f"{Path.cwd()}); give the path of an image"
            )
    bbox = tuple(float(v) for v in cfg.query_bbox) if cfg.query_bbox is not None else None
    use_masks = "zeroed" if made_with.mask_input else "unmasked" if made_with.query_mi else None
    crop = None if made_with.no_query_crop else "tight" if made_with.crop else "square"
    if use_masks is None and crop is None and (bbox is not None or cfg.query_mask is not None):
        given = "query_bbox" if bbox is not None else "query_mask"
        raise SoIRError(
            f"this folder's queries are whole images (no_query_crop=true), so {given} would not be "
            f"used: drop {given}, or make a features folder without no_query_crop (create_index.py)"
        )
    box_from_mask = use_masks is None and cfg.query_mask is not None
    if box_from_mask:
        # The folder's queries are crops around their box (an MI folder's too, unless mask_input /
        # query_mi): the mask's box gives the crop, as create_index.py cropped the anns queries.
        if bbox is not None:
            raise SoIRError(
                f"this folder's queries are {crop} crops around a box: give query_mask (its box is used) or "
                "query_bbox, not both"
            )
        mask = mask_entry(cfg.query_mask)
        fact = image_facts([file])[0]  # the size a person sees (EXIF rotation applied), as check_jobs
        if mask.size != (fact.height, fact.width):
            raise SoIRError(
                f"query_mask={cfg.query_mask} is {mask.size[1]}x{mask.size[0]} but query_image is "
                f"{fact.width}x{fact.height} (after EXIF rotation); a mask has its image's size"
            )
        bbox = tuple(float(v) for v in mask.bboxes[0])
    ann = Annotation(key=str(file), file=file.resolve(), ins=(), is_query=True, bbox=bbox)
    if use_masks is not None and cfg.query_mask is None and bbox is None:
        raise SoIRError(
            f"this folder's queries are Mask Inversion vectors ({'mask_input' if made_with.mask_input else 'query_mi'}"
            "=true): give query_mask=mask.png (the object's mask) or query_bbox=[x1,y1,x2,y2] (its box)"
        )
    captions = {ann.key: mask_entry(cfg.query_mask)} if cfg.query_mask is not None and not box_from_mask else None
    jobs = query_jobs([ann], captions, crop, use_masks, made_with.query_masks == "all", "query_bbox")
    jobs = with_crop_geometry(jobs, made_with.get("pixel_geometry", "soir"))
    facts = image_facts([ann.file])
    try:
        jobs, _ = check_jobs(jobs, facts, "query", "error")
    except SoIRError as err:  # check_jobs lists problems one per line; here there is one image
        problem = " ".join(line.strip() for line in str(err).splitlines()[1:])
        raise SoIRError(
            f"{problem}; query_bbox is [x1,y1,x2,y2] in pixels of the image "
            f"({facts[0].width}x{facts[0].height}), a query_mask has its size"
        ) from None
    job = jobs[0]
    if cfg.query_mask is not None and job.bbox_as_mask:  # query_jobs fell back to the box: refused here
        raise SoIRError(
            f"query_mask={cfg.query_mask} does not overlap query_bbox={list(bbox)}: give the box "
            "around the mask's object, or drop query_bbox"
        )
    if use_masks is None:
        how = "global embedding of " + (
            "the whole image"
            if job.crop is None
            else f"its {job.crop} crop around {'query_mask' + chr(39) + 's box' if box_from_mask else 'query_bbox'}"
        )
    else:
        what = "query_bbox's rectangle" if job.bbox_as_mask else "query_mask"
        how = f"Mask Inversion with {what} on the image" + (
            " with the pixels outside the mask set to zero (mask_input=true)"
            if job.zero_background
            else " (query_mi=true)"
        )
    return ann, jobs, how


def build_query_extractor(made_with: DictConfig, device: str, model_name: str):
    """The extractor create_index.py used for the queries (its ``query_extractor`` if one was set), on
    ``model_name`` (the stored checkpoint) and ``device``."""
    from extractors import extractor_from_config  # loads transformers: only when needed

    cfg = OmegaConf.merge(made_with, {"device": device})
    if not made_with.query_extractor or made_with.only_gallery:
        cfg.model_name = model_name
        return extractor_from_config(cfg)
    args = OmegaConf.to_container(made_with.query_extractor_args) if made_with.query_extractor_args else {}
    return extractor_from_config(cfg, made_with.query_extractor, {**args, "model_name": model_name})


def embed_image(cfg: DictConfig, folder: Path, made_with: DictConfig, jobs: list) -> tuple[torch.Tensor, torch.Tensor]:
    """The query's rows as create_index.py computes them: (features [R, D] unit float32, mask_index [R])."""
    saved = stored_identity(folder, queries=not made_with.only_gallery)
    extractor = build_query_extractor(made_with, cfg.device, stored_model(folder, saved))
    check_extractor(folder, extractor, saved)
    dataset = ViewDataset(
        jobs, extractor.view_maker(), extractor.global_view_maker(), empty_to_global=made_with.missing_masks == "global"
    )
    _, views = dataset[0]
    if views.error is not None:
        raise SoIRError(views.error)
    if views.dropped_masks or views.global_fallback:
        log.warning(
            "query_image: %d mask(s) vanished at the model's input size%s",
            views.dropped_masks,
            "; the global embedding is used" if views.global_fallback else "",
        )
    rows = extractor.describe([views])[0]
    return rows.vectors, rows.mask_index


def text_encoder(folder: Path, made_with: DictConfig, device: str):
    """The text tower of the checkpoint the gallery features were made from."""
    from extractors import TextEncoder, capabilities
    from extractors.base import resolve_device

    family = capabilities(made_with.extractor)["family"]
    if not capabilities(made_with.extractor)["has_text_tower"]:
        raise SoIRError(
            f"{folder} holds {made_with.extractor} features: {family} checkpoints have no text tower SoIR can use "
            "(DINOv2 / DINOv3 have none; SigLIP2's is not wired yet); text queries need a features folder made "
            "by a SigLIP or CLIP extractor (siglip_*, clip_*)"
        )
    saved = stored_identity(folder, queries=False)
    if saved.get("lora"):
        log.warning(
            "the gallery's vision tower carries LoRA adapters (%s) and the text tower none: text and image "
            "embeddings may no longer share one space",
            saved["lora"].get("weights_sha256", "")[:12],
        )
    return TextEncoder(stored_model(folder, saved), family, resolve_device(device))


def embed_texts(encoder, texts: list[str], dim: int) -> torch.Tensor:
    """[N, D] unit vectors of ``texts`` (each distinct text embedded once), checked against the gallery's ``dim``."""
    unique = sorted(set(texts))
    vectors = torch.cat([encoder.embed(unique[i : i + TEXT_BATCH]) for i in range(0, len(unique), TEXT_BATCH)])
    if vectors.shape[1] != dim:
        raise SoIRError(
            f"the text tower of {encoder.model_name} embeds into {vectors.shape[1]}-d, the gallery "
            f"features are {dim}-d: they cannot be compared"
        )
    position = {t: i for i, t in enumerate(unique)}
    return vectors[[position[t] for t in texts]]


def text_query_rows(
    cfg: DictConfig, folder: Path, made_with: DictConfig, queries: list[dict], dim: int
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """T2I: each query's text ``text_prompt.format(obj_name=...)`` and its text-tower vector.

    Returns (features [Q, D] float32, owner [Q] = 0..Q-1, texts). A query without ``obj_name`` is an
    error listing them, before any model is loaded."""
    missing = [q["key"] for q in queries if not q.get("obj_name")]
    if missing:
        more = f" ... and {len(missing) - 10} more" if len(missing) > 10 else ""
        raise SoIRError(
            f"T2I=true needs each query's obj_name (its text); {len(missing)} of {len(queries)} queries "
            f"of {folder} have none: {missing[:10]}{more}; add obj_name to them in the anns file and "
            "rerun create_index.py (labels only: the features are kept)"
        )
    texts = [cfg.text_prompt.format(obj_name=q["obj_name"]) for q in queries]
    features = embed_texts(text_encoder(folder, made_with, cfg.device), texts, dim)
    log.info("T2I: %d queries, %d distinct texts (e.g. %r)", len(texts), len(set(texts)), texts[0])
    return features.numpy(), np.arange(len(queries)), texts


# ---------------------------------------------------------------------------------------------------
# Searching the gallery with one query
# ---------------------------------------------------------------------------------------------------
def feature_dim(shards: FeatureShards) -> int:
    with shards.mapped(0) as features:
        return int(features.shape[1])


def search_gallery(
    cfg: DictConfig, folder: Path, shards: FeatureShards, features: torch.Tensor, k: int
) -> tuple[np.ndarray, np.ndarray, str]:
    """The query's top-``k`` gallery images: (image ids [n], scores [n], how they were found)."""
    queries = QueryRows(features.float(), torch.zeros(len(features), dtype=torch.long), 1)
    none = np.empty(0, dtype=np.int64)  # no relevant pairs: nothing to evaluate, only to rank
    rows = shards.row_offsets()[-1]
    path = index_path(folder, cfg.index)
    if cfg.search == "lancedb":  # the exported LanceDB table ranks (utils/results/interop.py)
        lance = LanceDBGallery(lancedb_folder(cfg, folder), folder)
        keys, scores = lance.top_images(features.float().numpy(), k)
        image_id = {record["key"]: i for i, record in enumerate(shards.records)}
        how = f"LanceDB table {lance.folder} (exact multivector search, {lance.num_images} images)"
        return np.array([image_id[key] for key in keys], dtype=np.int64), scores, how
    if rows > cfg.query_exact_max_rows and path.is_file():
        index = load_index(path, mmap=True)
        if index.ntotal != rows:
            raise SoIRError(f"{path} has {index.ntotal} rows, the gallery shards {rows}; rerun create_index.py")
        result = faiss_search(index, queries, shards, none, none, k)
        how = (
            f"FAISS {cfg.index} candidates ({10 * k} rows per query row) re-scored exactly "
            f"({rows} gallery rows > query_exact_max_rows={cfg.query_exact_max_rows})"
        )
    else:
        if rows > cfg.query_exact_max_rows:
            log.warning("no FAISS index %s: scoring all %d gallery rows exactly", path, rows)
        result = streamed_search(queries, shards, none, none, k)
        how = f"exact: every gallery row scored ({rows} rows)"
    found = result.top_index[0] >= 0
    return result.top_index[0][found], result.top_score[0][found], how


def matching_rows(shards: FeatureShards, images: np.ndarray, features: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """For each image of ``images``: its row with the best inner product with any query row (the first
    on ties, as ``utils.retrieval.ranking.best_rows``). Returns (those rows' features [n, D], mask_index [n])."""
    mask_index = shards.column("mask_index").numpy()
    offsets = shards.row_offsets()
    owners: dict[int, np.ndarray] = {}
    best_features, best_masks = [], []
    for g in images.tolist():
        shard = g // shards.shard_size
        owner = owners.setdefault(shard, shards.read_owner(shard).numpy())
        start, stop = np.searchsorted(owner, g, "left"), np.searchsorted(owner, g, "right")
        rows = shards.read_rows(shard, int(start), int(stop))
        best = int(np.argmax((features @ rows.T).amax(0).numpy()))
        best_features.append(rows[best].numpy())
        best_masks.append(mask_index[offsets[shard] + start + best])
    return np.stack(best_features), np.asarray(best_masks, dtype=np.int64)


def own_query(cfg: DictConfig, folder: Path, out: Path) -> dict:
    """search_index.py's ad-hoc mode: embed ``query_image`` / ``query_text`` as above, rank the gallery of
    ``folder``, print the top ``k_search`` and write results.json, rankings.jsonl, query.safetensors and
    report.html to ``out``. Returns what results.json holds."""
    check_run_folder(out)
    made_with = folder_config(folder)
    check_settings(cfg, made_with)
    shards = gallery_shards(folder, made_with)
    dim = feature_dim(shards)
    if cfg.query_text is not None:
        record = {"key": "text query", "file": None, "ins": [], "bbox": None, "obj_name": None, "text": cfg.query_text}
        encoder = text_encoder(folder, made_with, cfg.device)
        features = embed_texts(encoder, [cfg.query_text], dim)
        mask_index = torch.tensor([-1])
        how = f"text tower of {encoder.model_name} ({encoder.tower.model_class.__name__}), the text as given"
        query = {"text": cfg.query_text}
    else:
        ann, jobs, how = image_query(cfg, made_with)
        record = {
            "key": ann.key,
            "file": str(ann.file),
            "ins": [],
            "bbox": ann.bbox and list(ann.bbox),
            "obj_name": None,
        }
        features, mask_index = embed_image(cfg, folder, made_with, jobs)
        query = {
            "image": str(ann.file),
            "bbox": record["bbox"],
            "mask": str(Path(cfg.query_mask).resolve()) if cfg.query_mask is not None else None,
        }
        if features.shape[1] != dim:
            raise SoIRError(f"the query is {features.shape[1]}-d, the gallery features {dim}-d: rerun create_index.py")
    log.info("query embedded: %s (%d row(s))", how, len(features))

    k = min(cfg.k_search, cfg.max_k_search, shards.num_images)
    shown_k = min(cfg.report_k, shards.num_images) if cfg.report else 0
    top_images, top_scores, searched = search_gallery(cfg, folder, shards, features, max(k, shown_k))
    images, scores = top_images[:k], top_scores[:k]
    gallery = shards.records
    results = {
        "mode": "text" if cfg.query_text is not None else "image",
        "query": query,
        "embedded_as": how,
        "search": searched,
        "features_dir": str(folder),
        "extractor": made_with.extractor,
        "k_search": k,
        "num_gallery_images": shards.num_images,
        "num_gallery_rows": shards.row_offsets()[-1],
        "metrics": None,
        "note": "ad-hoc query: no ground truth, so no metrics",
        "ranking": [
            {"rank": r + 1, "key": gallery[g]["key"], "file": gallery[g]["file"], "score": float(s)}
            for r, (g, s) in enumerate(zip(images.tolist(), scores.tolist()))
        ],
    }
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "results.json", results)
    ranking = [[gallery[g]["key"], float(s)] for g, s in zip(images.tolist(), scores.tolist())]
    atomic_write_text(
        out / "rankings.jsonl",
        json.dumps({"query": record.get("text") or record["key"], "ins": [], "ranking": ranking}) + "\n",
    )
    tensors = {"features": features.float().contiguous(), "mask_index": mask_index.long().contiguous()}
    atomic_write(out / "query.safetensors", lambda handle: handle.write(save(tensors)))
    print_ranking(results)
    if cfg.report:
        shown_images = top_images[:shown_k]
        rows, masks = matching_rows(shards, shown_images, features)
        shown = Shown(shown_images[None], top_scores[:shown_k][None], None, np.arange(len(shown_images))[None])
        report = write_report(out, cfg, folder, results, None, shown, [record], gallery, masks, rows)
        print(f"report: {report}")
    print(f"results: {out}")
    return results


def print_ranking(results: dict) -> None:
    query = results["query"]
    print(f"query: {query.get('text') or query['image']} ({results['embedded_as']})")
    print(f"search: {results['search']}; no ground truth, so no metrics")
    print(f"{'rank':>4}  {'score':>8}  gallery image")
    for hit in results["ranking"]:
        print(f"{hit['rank']:>4}  {hit['score']:8.4f}  {hit['key']}")
