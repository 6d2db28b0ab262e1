"""``report.html``: what each query retrieved, and which object of each retrieved image matched.

search_index.py writes it next to ``results.json`` (``report=true``, the default)::

    report.html   the metrics, the run's settings, and one section per query, worst AP first: the query
                  image with its bbox and its crop, AP, first-positive rank, and its top ``report_k``
                  gallery images framed green (positive) or red (negative); on each, the two-tone
                  (cyan + black) outline of the mask whose vector gave the image its score (the argmax
                  row of the max-collapse), that object enlarged beside it, and the file name
    thumbs/       JPEG thumbnails, longer side ``report_thumb_size`` px, written by a thread pool
    maps/         (``report_maps=true``) the LeGrad map of each matching vector over its image, linked
                  from the thumbnails

The page is plain HTML with inline CSS and a few lines of inline JS (filter, sort); it opens from
disk, without a server or network. An ad-hoc query (``query_image=`` / ``query_text=``, utils/queries/own_queries.py)
has no ground truth: no metrics, grey frames, and the page says so. A text query shows its text.
Rows with ``mask_index`` -1 (a global embedding, a union or an average of masks) belong to no single
mask and get no outline; the page says so.
"""

from __future__ import annotations

import html
import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf
from PIL import Image, ImageDraw

from datasets import ImageLoadError, annotation_masks, decode_mask, find_masks, load_anns, load_captions, load_rgb
from datasets.anns import pixel_box
from datasets.captions import ImageMasks
from datasets.fields import bbox_from_mask
from utils.config import REPORTED_MI_KEYS
from utils.errors import SoIRError
from utils.files import sha256_file
from utils.results.visualize import draw_outline, overlay

log = logging.getLogger("soir.report")

BOX_COLOR = (255, 200, 0)  # the query's bbox
ZOOM_MIN = 128  # the matched object's enlarged crop: longer side at least this many px ...
ZOOM_PAD = 0.25  # ... around its mask's box padded by this share of the box's longer side
FULL_SIZE = 960  # what a click opens: the image (longer side at most this) with all its masks outlined
OTHER_OUTLINE_COLOR = (255, 255, 255)  # ... the objects that did not match, thin
MAP_SCALE = 3  # map overlays: longer side MAP_SCALE x report_thumb_size
JPEG_QUALITY = 85


# ---------------------------------------------------------------------------------------------------
# What is shown
# ---------------------------------------------------------------------------------------------------
@dataclass
class Shown:
    """The top-k gallery images of each query, [Q, k] arrays: ``gallery`` image ids (best first),
    their ``scores``, ``positive`` (ground truth; None for ad-hoc queries, which have none) and ``rows``,
    the gallery row whose vector gave the score (set by the caller, see ``utils.retrieval.ranking.best_rows``)."""

    gallery: np.ndarray
    scores: np.ndarray
    positive: np.ndarray | None
    rows: np.ndarray | None = None

    @classmethod
    def top(cls, order: np.ndarray, scores: np.ndarray, relevant: np.ndarray) -> "Shown":
        """From one chunk's ranked gallery ids ``order`` [q, k] and its full ``scores``/``relevant`` [q, G]."""
        return cls(order, np.take_along_axis(scores, order, 1), np.take_along_axis(relevant, order, 1))

    @classmethod
    def concat(cls, parts: list["Shown"]) -> "Shown":
        return cls(*(np.concatenate([getattr(p, name) for p in parts]) for name in ("gallery", "scores", "positive")))

    def pairs(self) -> np.ndarray:
        """[Q * k, 2] (query id, gallery id), row-major."""
        queries = np.repeat(np.arange(len(self.gallery)), self.gallery.shape[1])
        return np.stack([queries, self.gallery.ravel()], axis=1)


def report_captions(features_dir: Path, made_with: DictConfig) -> tuple[dict[str, ImageMasks] | None, str]:
    """The masks the gallery features were made with, or None and why not (said in the page and logged).

    ``sources.json`` (written by create_index.py) names the file the masks came from and its sha256:
    with another file the stored mask positions could point at other masks.
    """
    sources_file = features_dir / "sources.json"
    if not sources_file.is_file():
        return None, f"{sources_file} is missing (features made by an older SoIR)"
    sources = json.loads(sources_file.read_text())
    key = "anns_file" if sources.get("masks_from") == "anns" else "captions_file"
    path = sources.get(key)
    if not path:
        return None, "the features were made without a captions_file"
    if not Path(path).is_file():
        return None, f"the {key} {path} no longer exists"
    if sha256_file(path) != sources.get(key.replace("_file", "_sha256")):
        return None, f"{path} changed since the features were made (sha256 differs)"
    try:
        if key == "anns_file":
            anns = load_anns(path, made_with.galleries_dir, made_with.queries_dir, check_files=False)
            return annotation_masks([a for a in anns if not a.is_query], sources.get("box_masks", False)), ""
        return load_captions(path), ""
    except SoIRError as err:
        return None, str(err)


# ---------------------------------------------------------------------------------------------------
# Thumbnails (run in a thread pool: Pillow decodes, resizes and encodes without the GIL)
# ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ThumbJob:
    """The thumbnails of one image file, each a (file name, what) pair: ``plain`` as is, ``outlines``
    with the outline of an RLE mask, ``box`` with a bbox drawn, ``crop`` the bbox's crop."""

    file: str
    plain: str | None = None
    outlines: tuple[tuple[str, dict], ...] = ()
    box: tuple[str, tuple[float, ...]] | None = None
    crop: tuple[str, tuple[float, ...]] | None = None
    zooms: tuple[tuple[str, dict], ...] = ()  # the object of an RLE mask, enlarged (see zoom)
    fulls: tuple[tuple[str, int], ...] = ()  # (name, i): the image with every mask of ``all_masks``
    all_masks: tuple[dict, ...] = ()  # outlined and mask i highlighted (see full_view)


def zoom(image: Image.Image, mask: np.ndarray, size: int) -> Image.Image:
    """The object of ``mask`` [H, W] (the image's size) enlarged: its box padded by ``ZOOM_PAD`` of its
    longer side, cut from the full-resolution ``image`` and scaled so that its longer side is ``size``
    px (a 1-5 % object is 16-36 px in a 160-px thumbnail), with the mask's two-tone outline."""
    x1, y1, x2, y2 = bbox_from_mask(mask)
    pad = ZOOM_PAD * max(x2 - x1, y2 - y1)
    padded = (max(0, x1 - pad), max(0, y1 - pad), min(image.width, x2 + pad), min(image.height, y2 + pad))
    box = pixel_box(padded, image.width, image.height, "zoom")
    piece = image.crop(box)
    scale = size / max(piece.size)
    target = (max(1, round(piece.width * scale)), max(1, round(piece.height * scale)))
    enlarged = piece.resize(target, Image.Resampling.BICUBIC)
    return draw_outline(enlarged, mask[box[1] : box[3], box[0] : box[2]], width=2, halo=2)


def full_view(image: Image.Image, masks: list[np.ndarray], matched: int, size: int) -> Image.Image:
    """``image`` at longer side ``size`` (at most its own) with a thin outline around every object of
    ``masks`` and a thick two-tone one around ``masks[matched]``: what a click on a thumbnail opens."""
    picture = thumbnail(image, size)
    for i, mask in enumerate(masks):
        if i != matched:
            picture = draw_outline(picture, mask, OTHER_OUTLINE_COLOR, width=1)
    return draw_outline(picture, masks[matched], width=3, halo=2)


def thumbnail(image: Image.Image, size: int) -> Image.Image:
    """``image`` scaled so that its longer side is at most ``size`` px (aspect ratio kept; a new image)."""
    scale = min(1.0, size / max(image.size))
    target = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    # reducing_gap: a fast integer reduce first, then bilinear; the result is as good as plain resampling.
    return image.resize(target, Image.Resampling.BILINEAR, reducing_gap=2.0)


def write_thumbs(job: ThumbJob, folder: Path, size: int) -> str | None:
    """Write one image's thumbnails into ``folder``; return None, or why they could not be made."""
    try:
        # Crops need the full resolution; the rest is decoded at a reduced JPEG scale (several times faster).
        image = load_rgb(job.file, min_side=None if job.crop or job.box or job.zooms or job.fulls else size)
    except ImageLoadError as err:
        return str(err)
    small = thumbnail(image, size)
    save = lambda picture, name: picture.save(folder / name, quality=JPEG_QUALITY)  # noqa: E731
    if job.plain:
        save(small, job.plain)
    for name, rle in job.outlines:
        mask = decode_mask(rle)
        if abs(mask.shape[0] / mask.shape[1] - image.height / image.width) * image.height > 1.5:
            return (
                f"{job.file}: its {mask.shape[1]}x{mask.shape[0]} masks do not fit the "
                f"{image.width}x{image.height} image"
            )
        save(draw_outline(small, mask, halo=1), name)
    for name, rle in job.zooms:
        save(zoom(image, decode_mask(rle), max(ZOOM_MIN, size)), name)
    if job.fulls:
        masks = [decode_mask(rle) for rle in job.all_masks]
        for name, matched in job.fulls:
            save(full_view(image, masks, matched, FULL_SIZE), name)
    if job.box:
        name, bbox = job.box
        boxed, scale = small.copy(), small.width / image.width
        ImageDraw.Draw(boxed).rectangle([v * scale for v in bbox], outline=BOX_COLOR, width=2)
        save(boxed, name)
    if job.crop:
        name, bbox = job.crop
        save(thumbnail(image.crop(pixel_box(bbox, image.width, image.height, job.file)), size), name)
    return None


def make_thumbs(jobs: list[ThumbJob], folder: Path, size: int, workers: int) -> dict[str, str]:
    """Run ``jobs`` with ``workers`` threads (0: in this thread); {file: problem} for those that failed."""
    folder.mkdir(parents=True, exist_ok=True)
    if workers:
        with ThreadPoolExecutor(workers) as pool:
            problems = list(pool.map(lambda job: write_thumbs(job, folder, size), jobs))
    else:
        problems = [write_thumbs(job, folder, size) for job in jobs]
    return {job.file: p for job, p in zip(jobs, problems) if p}


def gallery_name(image: int, mask: int) -> str:
    return f"g{image:06d}.jpg" if mask < 0 else f"g{image:06d}_m{mask}.jpg"


def zoom_name(image: int, mask: int) -> str:
    return f"g{image:06d}_m{mask}_zoom.jpg"


def full_name(image: int, mask: int) -> str:
    return f"g{image:06d}_m{mask}_full.jpg"


def thumb_jobs(
    queries: list[dict],
    gallery: list[dict],
    shown: Shown,
    mask_index: np.ndarray,
    captions: dict[str, ImageMasks] | None,
) -> list[ThumbJob]:
    """One job per shown image: every query (whole image with its bbox, and its crop) and every shown
    gallery image (plain, or with the outline of each mask that matched some query)."""
    jobs = []
    for i, q in enumerate(queries):
        if q["file"] is None:  # a text query: nothing to show but its text
            continue
        bbox = tuple(q["bbox"]) if q["bbox"] else None
        jobs.append(
            ThumbJob(
                q["file"],
                plain=None if bbox else f"q{i:06d}.jpg",
                box=bbox and (f"q{i:06d}.jpg", bbox),
                crop=bbox and (f"q{i:06d}_crop.jpg", bbox),
            )
        )
    needed: dict[int, set[int]] = {}
    for g, m in zip(shown.gallery.ravel().tolist(), mask_index.ravel().tolist()):
        needed.setdefault(g, set()).add(m if captions is not None else -1)
    for g, masks in sorted(needed.items()):
        record = gallery[g]
        entry = find_masks(captions, record["key"], record["file"]) if captions is not None else None
        if entry is None or not len(entry):
            # No captions entry: a full-image-mask row (missing_masks=full_mask) of a folder made before
            # such rows got mask_index -1 (issue 21); shown plain, like a global row.
            masks = {-1}
        outlines = tuple((gallery_name(g, m), entry.masks_rle[m]) for m in sorted(masks) if m >= 0)
        zooms = tuple((zoom_name(g, m), entry.masks_rle[m]) for m in sorted(masks) if m >= 0)
        fulls = tuple((full_name(g, m), m) for m in sorted(masks) if m >= 0)
        plain = gallery_name(g, -1) if -1 in masks else None
        all_masks = tuple(entry.masks_rle) if fulls else ()
        jobs.append(ThumbJob(record["file"], plain, outlines, zooms=zooms, fulls=fulls, all_masks=all_masks))
    return jobs


# ---------------------------------------------------------------------------------------------------
# LeGrad maps of the matching vectors (report_maps=true)
# ---------------------------------------------------------------------------------------------------
def map_extractor(made_with: DictConfig, device: str):
    """The features' extractor with eager attention, for LeGrad. A plain extractor is built as its MI
    variant: the same model and weights; its stored rows are global embeddings, mapped as they are."""
    from extractors import extractor_from_config  # loads transformers: only when maps are asked for

    cfg = OmegaConf.merge(made_with, {"device": device})
    if not cfg.extractor.endswith("_mi_features"):
        cfg.extractor = cfg.extractor.removesuffix("_features") + "_mi_features"
    return extractor_from_config(cfg)


def write_maps(
    folder: Path,
    extractor,
    gallery: list[dict],
    shown: Shown,
    mask_index: np.ndarray,
    gallery_features: np.ndarray,
    captions: dict[str, ImageMasks] | None,
    size: int,
    unreadable: dict[str, str] | None = None,
) -> dict[int, str]:
    """One overlay per shown (gallery image, matching row): the row's LeGrad map over the image, with
    its mask's outline. One LeGrad evaluation per image for all its whole-image rows; a smart-crop
    row is mapped on its crop. Files in ``unreadable`` are skipped. Returns {gallery row: file name}."""
    import torch

    from datasets.views import padded_box

    folder.mkdir(parents=True, exist_ok=True)
    rows_of: dict[int, dict[int, int]] = {}
    for g, row, m in zip(shown.gallery.ravel().tolist(), shown.rows.ravel().tolist(), mask_index.ravel().tolist()):
        rows_of.setdefault(g, {})[row] = m
    names = {}
    for g, rows in sorted(rows_of.items()):
        record = gallery[g]
        if record["file"] in (unreadable or {}):
            continue
        image = load_rgb(record["file"])
        picture = thumbnail(image, size)
        entry = find_masks(captions, record["key"], record["file"]) if captions is not None else None
        masks = {row: decode_mask(entry.masks_rle[m]) for row, m in rows.items() if m >= 0 and entry is not None}
        crop = {
            row: padded_box(torch.from_numpy(masks[row]), extractor.smart_crop_pad)
            for row in masks
            if extractor.mode == "smart_crop"
        }
        whole = [row for row in rows if row not in crop]
        maps = {}
        if whole:
            values = extractor.legrad(image, torch.from_numpy(gallery_features[whole]), size=picture.size[::-1])
            maps.update(zip(whole, values))
        for row, box in crop.items():
            maps[row] = extractor.legrad(image, torch.from_numpy(gallery_features[[row]]), box, picture.size[::-1])[0]
        for row, values in maps.items():
            names[row] = f"g{g:06d}_r{row}.jpg"
            overlay(picture, values, masks.get(row)).save(folder / names[row], quality=JPEG_QUALITY)
    return names


# ---------------------------------------------------------------------------------------------------
# The page
# ---------------------------------------------------------------------------------------------------
@dataclass
class Page:
    """Everything the page shows, in display order where it matters."""

    title: str
    metrics: list[tuple[str, str]]
    settings: list[tuple[str, str]]
    notes: list[str]
    sections: list[str] = field(default_factory=list)


def write_report(
    out: Path,
    cfg: DictConfig,
    features_dir: Path,
    results: dict,
    metrics: dict[str, np.ndarray] | None,
    shown: Shown,
    queries: list[dict],
    gallery: list[dict],
    gallery_mask_index: np.ndarray,
    gallery_features: np.ndarray | None = None,
) -> Path:
    """Write ``report.html``, ``thumbs/`` (and ``maps/``) into the run folder ``out``.

    Args:
        cfg: the search run's config (``report_thumb_size``, ``report_maps``, ``num_workers``, ``device``).
        features_dir: the evaluated create_index.py folder.
        results: what results.json holds.
        metrics: per-query arrays ``ap``, ``first_positive_rank``, ``num_positives`` (query order); None for
            ad-hoc queries (no ground truth: no metrics, ``shown.positive`` None).
        shown: the top-k of every query, with ``rows`` set.
        queries, gallery: the evaluated images' ``images.json`` records (query / gallery ids of ``shown``).
        gallery_mask_index: [R] the ``mask_index`` of every evaluated gallery row (row ids of ``shown.rows``).
        gallery_features: [R, D] gallery rows; needed for ``report_maps``.
    """
    started, cpu_started = time.time(), time.process_time()
    made_with = OmegaConf.load(features_dir / "config.yaml")
    mask_index = gallery_mask_index[shown.rows]
    captions, why_not = (None, "") if not (mask_index >= 0).any() else report_captions(features_dir, made_with)
    if why_not:
        log.warning("report: no mask outlines: %s", why_not)
    problems = make_thumbs(
        thumb_jobs(queries, gallery, shown, mask_index, captions),
        out / "thumbs",
        cfg.report_thumb_size,
        cfg.num_workers,
    )
    for file, problem in problems.items():
        log.warning("report: no thumbnail for %s: %s", file, problem)
    maps = {}
    if cfg.report_maps:
        maps = write_maps(
            out / "maps",
            map_extractor(made_with, cfg.device),
            gallery,
            shown,
            mask_index,
            gallery_features,
            captions,
            MAP_SCALE * cfg.report_thumb_size,
            problems,
        )
    page = Page(
        title=f"SoIR report: {made_with.dataset} / {made_with.extractor}",
        metrics=metric_cells(results) if metrics is not None else [],
        settings=setting_cells(features_dir, made_with, cfg),
        notes=[LEGEND]
        + ([NO_GROUND_TRUTH] if metrics is None else [])
        + notes(captions, why_not, mask_index, problems),
    )
    order = (
        np.lexsort((-metrics["first_positive_rank"], metrics["ap"])) if metrics is not None else np.arange(len(queries))
    )  # worst AP first
    page.sections = [
        query_section(int(q), queries, gallery, metrics, shown, mask_index, captions is not None, maps, problems)
        for q in order
    ]
    path = out / "report.html"
    path.write_text(render(page))
    log.info(
        "report: %d queries x %d images, %d thumbnails, %d maps in %.1f s (CPU %.1f s, all threads)",
        len(queries),
        shown.gallery.shape[1],
        len(list((out / "thumbs").iterdir())),
        len(maps),
        time.time() - started,
        time.process_time() - cpu_started,
    )
    return path


NO_GROUND_TRUTH = (
    "No metrics: an ad-hoc query has no ground truth (nothing says which gallery images show its "
    "object), so the frames are grey. The ranking and the matching masks are the search's own."
)


def metric_cells(results: dict) -> list[tuple[str, str]]:
    cells = [("mAP", results["mAP"])] + [(f"R@{k}", v) for k, v in results["recall"].items()]
    cells += [(f"P@{k}", v) for k, v in results.get("precision", {}).items()]
    cells += [(key, v) for key, v in results.items() if key.startswith(("mAP@", "index_recall@"))]
    return [(name, f"{100 * value:.2f}") for name, value in cells] + [
        ("queries", str(results["num_queries"])),
        ("gallery images", str(results["num_gallery_images"])),
        ("gallery rows", str(results["num_gallery_rows"])),
    ]


def setting_cells(features_dir: Path, made_with: DictConfig, cfg: DictConfig) -> list[tuple[str, str]]:
    keys = ["extractor", "model_name", "vec_dim", "anns_file", "captions_file"]
    keys += list(REPORTED_MI_KEYS) if made_with.extractor.endswith("_mi_features") else []
    return (
        [("features folder", str(features_dir.resolve()))]
        + [(k, str(made_with.get(k))) for k in keys]
        + [("index", cfg.index), ("k_search", str(cfg.k_search))]
    )


LEGEND = (
    "How to read it: each query (its picture, and the crop around its object) is followed by the gallery "
    "images it retrieved, best first. Green frame: the image shows the query's object; red: it does not. "
    "The cyan-and-black outline marks the object that matched, enlarged on the right; click a picture "
    "to open it large, every object outlined in white and the matched one in cyan."
)


def notes(captions, why_not: str, mask_index: np.ndarray, problems: dict[str, str]) -> list[str]:
    said = [
        f"The outline is the object whose description gave the gallery image its score (its best-matching "
        f"vector). {int((mask_index < 0).sum())} of {mask_index.size} shown images matched as a whole (a "
        f"description of the whole image, or of all its objects together, mask index -1) and have no "
        f"outline."
    ]
    if why_not:
        said.append(f"No outlines at all: {why_not}.")
    if problems:
        said.append(
            f"{len(problems)} image(s) could not be shown (see the log): "
            + "; ".join(f"{f}: {p}" for f, p in list(problems.items())[:3])
        )
    return said


def query_section(
    q: int,
    queries: list[dict],
    gallery: list[dict],
    metrics: dict[str, np.ndarray] | None,
    shown: Shown,
    mask_index: np.ndarray,
    outlines: bool,
    maps: dict[int, str],
    problems: dict[str, str],
) -> str:
    record = queries[q]
    name = record.get("obj_name") or ""
    if metrics is None:
        ap, rank, hit, scored = 0.0, 0, 0, "ad-hoc query: no ground truth, no metrics"
    else:
        ap, rank, positives = (
            metrics["ap"][q],
            int(metrics["first_positive_rank"][q]),
            int(metrics["num_positives"][q]),
        )
        hit, scored = (
            int(shown.positive[q].any()),
            f"average precision {100 * ap:.1f} % &middot; first correct image at rank {rank} &middot; "
            f"{positives} gallery image(s) show this object",
        )
    text = f"<br>text: &ldquo;{html.escape(record['text'])}&rdquo;" if record.get("text") else ""
    pictures = (
        []
        if record["file"] is None
        else [("query", f"q{q:06d}.jpg")] + ([("crop", f"q{q:06d}_crop.jpg")] if record["bbox"] else [])
    )
    head = "".join(
        f'<figure class="q">{image_tag(n, label, record["file"], problems)}<figcaption>{label}</figcaption></figure>'
        for label, n in pictures
    )
    positive = shown.positive[q] if shown.positive is not None else [None] * shown.gallery.shape[1]
    hits = "".join(
        hit_figure(i, int(g), float(s), p, int(row), int(m), gallery, outlines, maps, problems)
        for i, (g, s, p, row, m) in enumerate(
            zip(shown.gallery[q], shown.scores[q], positive, shown.rows[q], mask_index[q])
        )
    )
    search = html.escape(f"{record['key']} {name} {record.get('text') or ''}".lower(), quote=True)
    return (
        f'<section class="query" data-ap="{ap:.6f}" data-rank="{rank}" data-hit="{hit}" '
        f'data-search="{search}"><div class="head">{head}<div class="info"><b>{html.escape(record["key"])}</b>'
        f"{' &middot; ' + html.escape(name) if name else ''}"
        f"{' &middot; object id ' + html.escape(', '.join(map(str, record['ins']))) if record['ins'] else ''}"
        f"{text}<br>{scored}</div></div>"
        f'<div class="hits">{hits}</div></section>'
    )


def hit_figure(
    i: int,
    g: int,
    score: float,
    positive: bool | None,
    row: int,
    mask: int,
    gallery: list[dict],
    outlines: bool,
    maps: dict[int, str],
    problems: dict[str, str],
) -> str:
    record = gallery[g]
    name = gallery_name(g, mask if outlines else -1)
    picture = image_tag(name, record["key"], record["file"], problems)
    if record["file"] not in problems:
        # click: the image large with every object outlined and the matched one highlighted, or (no
        # single matched object) the image file itself
        target = f"thumbs/{full_name(g, mask)}" if outlines and mask >= 0 else Path(record["file"]).resolve().as_uri()
        picture = (
            f'<a class="full" href="{html.escape(target, quote=True)}" target="_blank" '
            f'title="open {html.escape(record["key"], quote=True)}">{picture}</a>'
        )
    if outlines and mask >= 0 and record["file"] not in problems:
        picture += f'<img class="zoom" src="thumbs/{zoom_name(g, mask)}" alt="the matched object, enlarged">'
    if row in maps:
        picture += f'<a class="map" href="maps/{maps[row]}">map</a>'
    matched = f"matched object {mask}" if mask >= 0 else "matched as a whole"
    frame = "unknown" if positive is None else "pos" if positive else "neg"
    return (
        f'<figure class="hit {frame}" data-gallery="{html.escape(record["key"], quote=True)}" '
        f'data-mask-index="{mask}" data-row="{row}"><div class="pics">{picture}</div>'
        f"<figcaption>#{i + 1} &middot; score {score:.3f} &middot; {matched}<br>"
        f'<span class="file">{html.escape(Path(record["key"]).name)}</span></figcaption></figure>'
    )


def image_tag(name: str, label: str, file: str, problems: dict[str, str]) -> str:
    if file in problems:
        return f'<div class="missing" title="{html.escape(problems[file], quote=True)}">image unavailable</div>'
    return f'<img src="thumbs/{name}" alt="{html.escape(label, quote=True)}" loading="lazy">'


STYLE = """
body { font: 14px system-ui, sans-serif; margin: 1em 2em; color: #222; }
table { border-collapse: collapse; margin: .5em 0 1em; } td, th { border: 1px solid #ccc; padding: 2px 8px; }
th { background: #f3f3f3; text-align: left; } .note { color: #555; max-width: 70em; }
.controls { position: sticky; top: 0; background: #fff; padding: .5em 0; border-bottom: 1px solid #ccc; }
.controls label { margin-right: 1.5em; }
.query { border-bottom: 1px solid #ddd; padding: .6em 0; }
.head { display: flex; gap: 1em; align-items: flex-start; margin-bottom: .4em; }
.hits { display: flex; flex-wrap: wrap; gap: 6px; align-items: flex-start; }
figure { margin: 0; font-size: 12px; text-align: center; }
figure img { display: block; } .pics { display: flex; gap: 3px; align-items: flex-start; }
.file { color: #555; word-break: break-all; }
.hit { border: 4px solid; padding: 1px; } .pos { border-color: #1a9641; } .neg { border-color: #d7191c; }
.unknown { border-color: #999; }
.missing { width: 120px; height: 90px; background: #eee; color: #888; display: flex; align-items: center;
           justify-content: center; }
"""

SCRIPT = """
const list = document.getElementById("queries"), items = Array.from(list.children);
const filter = document.getElementById("filter"), sort = document.getElementById("sort");
const misses = document.getElementById("misses");
function value(el) {
  const by = sort.value;
  if (by === "key") return el.dataset.search;
  if (by === "rank") return -Number(el.dataset.rank);
  return by === "best" ? -Number(el.dataset.ap) : Number(el.dataset.ap);
}
function update() {
  const text = filter.value.toLowerCase();
  items.sort((a, b) => (value(a) > value(b)) - (value(a) < value(b)));
  let count = 0;
  for (const el of items) {
    el.hidden = !el.dataset.search.includes(text) || (misses.checked && el.dataset.hit === "1");
    count += !el.hidden;
    list.appendChild(el);
  }
  document.getElementById("count").textContent = count + " of " + items.length + " queries";
}
for (const el of [filter, sort, misses]) el.addEventListener("input", update);
update();
"""


def render(page: Page) -> str:
    table = lambda cells: (
        "<table>"
        + "".join(  # noqa: E731
            f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in cells
        )
        + "</table>"
    )
    metrics = (
        "<table><tr>"
        + "".join(f"<th>{html.escape(k)}</th>" for k, _ in page.metrics)
        + "</tr><tr>"
        + "".join(f"<td>{html.escape(v)}</td>" for _, v in page.metrics)
        + "</tr></table>"
    )
    metrics = "<h2>Metrics (%)</h2>" + metrics if page.metrics else ""
    notes = "".join(f'<p class="note">{html.escape(n)}</p>' for n in page.notes)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(page.title)}</title><style>{STYLE}</style></head>
<body><h1>{html.escape(page.title)}</h1>
{metrics}
<details><summary>Settings</summary>{table(page.settings)}</details>
{notes}
<div class="controls"><label>filter <input id="filter" type="search" placeholder="query key or object name"></label>
<label>sort <select id="sort"><option value="ap">AP, worst first</option><option value="best">AP, best first</option>
<option value="rank">first positive rank, worst first</option><option value="key">query key</option></select></label>
<label><input id="misses" type="checkbox"> only queries without a positive shown</label> <span id="count"></span></div>
<div id="queries">
{chr(10).join(page.sections)}
</div>
<script>{SCRIPT}</script>
</body></html>
"""
