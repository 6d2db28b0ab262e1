"""Generate a small synthetic instance-retrieval set: small objects in cluttered scenes.

    python scripts/make_demo_dataset.py --out demo_data [--num_objects 6 --gallery_per_object 4
                                         --distractors 8 --image_size 320 --seed 0]

Each object instance is a procedurally drawn shape (polygon / star / ellipse / blob) with its
own colours, surface pattern (stripes / rings / checker / dots), dark outline and a
barcode-like label, so instances are unique and recognisable but share parts with the clutter.

* ``queries/q_XXX.jpg``: one per object, large (its box covers 40-70 % of the image) on a
  light background, slightly rotated; ``anns.pt`` stores the box.
* ``gallery/g_XXX.jpg``: ``gallery_per_object`` scenes per object on a textured background
  with 14-24 clutter shapes; the object covers 1.5-4 % of the image at a random position,
  scale, rotation and brightness. About a quarter of the scenes also show a second object.
  ``distractors`` scenes show no object (``ins: []``). Scene order is shuffled.
* ``captions.pt`` (:mod:`datasets.captions` format, keys as in ``anns.pt``): ground-truth
  masks; per gallery image the instance masks (score 1.0) and 3-6 visible clutter masks
  (scores 0.5-0.95), per query the object mask (score 1.0).

Everything is drawn from one ``numpy.random.Generator(seed)``, so output is byte-identical
for a given seed (and Pillow version).
"""

from __future__ import annotations

import argparse
import colorsys
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as `python scripts/make_demo_dataset.py`
    sys.path.insert(0, str(ROOT))

from datasets.anns import save_anns
from datasets.captions import ImageMasks, encode_mask, save_captions
from datasets.fields import bbox_from_mask
from utils.errors import SoIRError
from utils.files import claim_folder, remove_own_files

SPRITE_SIZE = 256  # canonical object rendering, px; downscaled for the gallery
GALLERY_AREA_SHARE = (0.015, 0.04)  # object mask area / image area in gallery scenes
QUERY_BOX_SHARE = (0.4, 0.7)  # query box area / image area
SECOND_INSTANCE_PROB = 0.25
JPEG_QUALITY = 92
SHAPES = ("polygon", "star", "ellipse", "blob")
PATTERNS = ("stripes", "rings", "checker", "dots")


@dataclass(frozen=True)
class ObjectSpec:
    """One object instance: its name and its canonical RGBA rendering (SPRITE_SIZE^2)."""

    name: str
    sprite: Image.Image


# ---------------------------------------------------------------------------------------------
# Shapes and sprites
# ---------------------------------------------------------------------------------------------


def _outline(kind: str, rng: np.random.Generator) -> np.ndarray:
    """Closed outline of a shape, [N, 2] (x, y) in unit coords, max radius 1, min radius >= 0.5
    (so a label of half-size 0.32 x 0.13 around the centre always lies inside)."""
    if kind == "rect":
        half_w, half_h = rng.uniform(0.5, 1.0), rng.uniform(0.5, 1.0)
        return np.array([[-half_w, -half_h], [half_w, -half_h], [half_w, half_h], [-half_w, half_h]])
    if kind == "polygon":
        n = int(rng.integers(5, 9))
        angles = np.linspace(0, 2 * np.pi, n, endpoint=False) + rng.uniform(-0.25, 0.25, n) * 2 * np.pi / n
        radii = rng.uniform(0.65, 1.0, n)
    elif kind == "star":
        n = int(rng.integers(5, 8))
        angles = np.linspace(0, 2 * np.pi, 2 * n, endpoint=False)
        radii = np.where(np.arange(2 * n) % 2 == 0, 1.0, rng.uniform(0.5, 0.65))
    elif kind == "ellipse":
        angles = np.linspace(0, 2 * np.pi, 72, endpoint=False)
        aspect = rng.uniform(0.55, 0.85)
        radii = aspect / np.sqrt((aspect * np.cos(angles)) ** 2 + np.sin(angles) ** 2)
    elif kind == "blob":
        angles = np.linspace(0, 2 * np.pi, 72, endpoint=False)
        radii = np.ones_like(angles)
        for k in (2, 3, 5):
            radii += rng.uniform(0.05, 0.15) * np.cos(k * angles + rng.uniform(0, 2 * np.pi))
        radii = 0.5 + 0.5 * (radii - radii.min()) / (radii.max() - radii.min())
    else:
        raise ValueError(f"unknown shape {kind!r}")
    rotation = rng.uniform(0, 2 * np.pi)
    return np.stack([radii * np.cos(angles + rotation), radii * np.sin(angles + rotation)], axis=1)


def _hsv(hue: float, sat: float, val: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(hue % 1.0, sat, val), dtype=np.float32) * 255


def _pattern(kind: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """[size, size] bool surface pattern."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    period = rng.uniform(0.09, 0.2) * size
    theta = rng.uniform(0, np.pi)
    if kind == "stripes":
        return ((xx * np.cos(theta) + yy * np.sin(theta)) / period) % 1.0 < rng.uniform(0.35, 0.6)
    if kind == "rings":
        radius = np.hypot(xx - size / 2, yy - size / 2)
        return (radius / period) % 1.0 < 0.5
    u, v = xx * np.cos(theta) + yy * np.sin(theta), -xx * np.sin(theta) + yy * np.cos(theta)
    if kind == "checker":
        return (np.floor(u / period) + np.floor(v / period)) % 2 == 0
    if kind == "dots":
        du, dv = (u / period) % 1.0 - 0.5, (v / period) % 1.0 - 0.5
        return np.hypot(du, dv) < 0.3
    raise ValueError(f"unknown pattern {kind!r}")


def _polygon_alpha(outline: np.ndarray, width: int, height: int, scale: float) -> Image.Image:
    """Mode-"L" image of the filled outline (0/255), centred, unit radius -> ``scale`` px."""
    points = [(width / 2 + x * scale, height / 2 + y * scale) for x, y in outline]
    alpha = Image.new("L", (width, height), 0)
    ImageDraw.Draw(alpha).polygon(points, fill=255)
    return alpha


def make_object(index: int, num_objects: int, rng: np.random.Generator) -> ObjectSpec:
    """Object ``index``: hues are spread over the colour wheel so instances differ in colour too."""
    shape, pattern = SHAPES[int(rng.integers(len(SHAPES)))], PATTERNS[int(rng.integers(len(PATTERNS)))]
    outline = _outline(shape, rng)
    size, radius = SPRITE_SIZE, SPRITE_SIZE * 0.47
    hue = index / num_objects + rng.uniform(-0.03, 0.03)
    base = _hsv(hue, rng.uniform(0.65, 1.0), rng.uniform(0.7, 1.0))
    second = _hsv(hue + rng.uniform(0.3, 0.7), rng.uniform(0.5, 1.0), rng.uniform(0.25, 0.95))
    rgb = np.where(_pattern(pattern, size, rng)[..., None], second, base).astype(np.uint8)

    image = Image.fromarray(rgb)
    draw = ImageDraw.Draw(image)
    # Barcode-like label in the middle: a light plate with 5-8 dark bars of random widths.
    c = size / 2
    plate = (c - 0.32 * radius, c - 0.13 * radius, c + 0.32 * radius, c + 0.13 * radius)
    draw.rectangle(plate, fill=tuple(int(v) for v in _hsv(rng.uniform(), 0.1, 0.97)))
    widths = rng.uniform(0.5, 2.0, int(rng.integers(5, 9)))
    edges = plate[0] + 4 + np.cumsum(np.concatenate([[0], widths])) / widths.sum() * (plate[2] - plate[0] - 8)
    for left, right in zip(edges[:-1], edges[1:]):
        draw.rectangle((left, plate[1] + 4, left + (right - left) * 0.55, plate[3] - 4), fill=(20, 20, 20))
    points = [(c + x * radius, c + y * radius) for x, y in outline]
    draw.line(points + points[:1], fill=tuple(int(v * 0.35) for v in base), width=6, joint="curve")
    image.putalpha(_polygon_alpha(outline, size, size, radius))
    return ObjectSpec(name=f"object_{index:02d}_{shape}_{pattern}", sprite=image)


def _clutter_sprite(diameter: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A plain or patterned random shape: rgb [d, d, 3] float32, alpha [d, d] float32 in {0, 1}."""
    kind = ("rect",) + SHAPES
    outline = _outline(kind[int(rng.integers(len(kind)))], rng)
    alpha = np.asarray(_polygon_alpha(outline, diameter, diameter, diameter * 0.48), np.float32) / 255
    color = _hsv(rng.uniform(), rng.uniform(0.2, 1.0), rng.uniform(0.2, 1.0))
    rgb = np.broadcast_to(color, (diameter, diameter, 3))
    if rng.random() < 0.35:
        other = _hsv(rng.uniform(), rng.uniform(0.2, 1.0), rng.uniform(0.2, 1.0))
        pattern = PATTERNS[int(rng.integers(len(PATTERNS)))]
        rgb = np.where(_pattern(pattern, diameter, rng)[..., None], other, color)
    return np.ascontiguousarray(rgb, dtype=np.float32), alpha


# ---------------------------------------------------------------------------------------------
# Compositing
# ---------------------------------------------------------------------------------------------


def _composite(canvas: np.ndarray, rgb: np.ndarray, alpha: np.ndarray, x: int, y: int) -> np.ndarray:
    """Alpha-blend a sprite with top-left corner (x, y) into ``canvas`` [H, W, 3] in place,
    clipping at the border; returns the sprite's [H, W] bool mask (alpha >= 0.5)."""
    height, width = canvas.shape[:2]
    h, w = alpha.shape
    x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, width), min(y + h, height)
    mask = np.zeros((height, width), dtype=bool)
    if x1 <= x0 or y1 <= y0:
        return mask
    a = alpha[y0 - y : y1 - y, x0 - x : x1 - x, None]
    region = canvas[y0:y1, x0:x1]
    region *= 1 - a
    region += rgb[y0 - y : y1 - y, x0 - x : x1 - x] * a
    mask[y0:y1, x0:x1] = a[..., 0] >= 0.5
    return mask


def _transform_object(
    obj: ObjectSpec, angle: float, target_px: float, measure: str, brightness: float
) -> tuple[np.ndarray, np.ndarray]:
    """Rotate the sprite by ``angle`` degrees, then scale it so that its mask area
    (``measure="mask"``) or its box area (``measure="box"``) is ``target_px`` pixels.

    Returns rgb [h, w, 3] float32 (times ``brightness``) and alpha [h, w] float32 in 0..1.
    """
    rotated = obj.sprite.rotate(angle, resample=Image.Resampling.BICUBIC, expand=True)
    alpha = np.asarray(rotated.getchannel("A")) >= 128
    if measure == "mask":
        current = alpha.sum()
    else:
        x1, y1, x2, y2 = bbox_from_mask(alpha)
        current = (x2 - x1) * (y2 - y1)
    scale = math.sqrt(target_px / current)
    size = (max(1, round(rotated.width * scale)), max(1, round(rotated.height * scale)))
    resized = np.asarray(rotated.resize(size, resample=Image.Resampling.LANCZOS), np.float32)
    return resized[..., :3] * brightness, resized[..., 3] / 255


def _background(height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """Textured scene background: smooth colour blobs + finer texture + random lines, float32."""

    def smooth(cells: int, lo: float, hi: float) -> np.ndarray:
        grid = rng.uniform(lo, hi, (cells, cells, 3)).astype(np.uint8)
        return np.asarray(Image.fromarray(grid).resize((width, height), Image.Resampling.BICUBIC), np.float32)

    canvas = 0.7 * smooth(5, 40, 220) + 0.3 * smooth(24, 40, 220)
    image = Image.fromarray(canvas.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(5, 11))):
        ends = rng.uniform(0, 1, 4) * [width, height, width, height]
        color = tuple(int(v) for v in rng.integers(0, 256, 3))
        draw.line(list(ends), fill=color, width=int(rng.integers(1, 4)))
    return np.asarray(image, np.float32).copy()


def _finish(canvas: np.ndarray, rng: np.random.Generator, noise: float) -> Image.Image:
    canvas = canvas + rng.normal(0, noise, canvas.shape).astype(np.float32)
    return Image.fromarray(np.rint(canvas).clip(0, 255).astype(np.uint8))


PLACEMENT_ATTEMPTS = 10


def _free_position(
    rng: np.random.Generator, size: tuple[int, int], canvas: tuple[int, int], taken: list[tuple[int, int, int, int]]
) -> tuple[int, int]:
    """Random top-left so a (w, h) box lies inside the canvas and overlaps no ``taken`` box."""
    (w, h), (width, height) = size, canvas
    for _ in range(200):
        x, y = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
        if all(x + w <= a or a + c <= x or y + h <= b or b + d <= y for a, b, c, d in taken):
            return x, y
    raise RuntimeError(f"no free place for a {w}x{h} object in a {width}x{height} scene")


def render_gallery_scene(
    objects: list[ObjectSpec], instance_ids: list[int], height: int, width: int, rng: np.random.Generator
) -> tuple[Image.Image, ImageMasks]:
    """Cluttered scene with the given objects (possibly none) and its ground-truth masks."""
    canvas = _background(height, width, rng)
    layers: list[np.ndarray] = []  # masks in drawing order; later ones occlude earlier ones
    for _ in range(int(rng.integers(14, 25))):
        diameter = int(math.sqrt(rng.uniform(0.003, 0.03) * height * width) * 1.3)
        rgb, alpha = _clutter_sprite(diameter, rng)
        x = int(rng.integers(-diameter // 3, width - 2 * diameter // 3))
        y = int(rng.integers(-diameter // 3, height - 2 * diameter // 3))
        layers.append(_composite(canvas, rgb, alpha, x, y))
    num_clutter = len(layers)

    taken: list[tuple[int, int, int, int]] = []
    for instance in instance_ids:
        for attempt in range(PLACEMENT_ATTEMPTS):  # another size and angle when a small scene is full
            target = rng.uniform(*GALLERY_AREA_SHARE) * height * width
            rgb, alpha = _transform_object(
                objects[instance], rng.uniform(0, 360), target, "mask", brightness=rng.uniform(0.8, 1.15)
            )
            try:
                x, y = _free_position(rng, (alpha.shape[1], alpha.shape[0]), (width, height), taken)
                break
            except RuntimeError as err:
                if attempt == PLACEMENT_ATTEMPTS - 1:
                    raise SoIRError(f"{err} after {PLACEMENT_ATTEMPTS} attempts; use a larger --image_size") from None
        taken.append((x, y, alpha.shape[1], alpha.shape[0]))
        layers.append(_composite(canvas, rgb, alpha, x, y))

    visible, covered = [None] * len(layers), np.zeros((height, width), dtype=bool)
    for i in reversed(range(len(layers))):
        visible[i] = layers[i] & ~covered
        covered |= layers[i]
    instance_masks = visible[num_clutter:]
    candidates = [m for m in visible[:num_clutter] if m.sum() >= 0.002 * height * width]
    chosen = rng.permutation(len(candidates))[: int(rng.integers(3, 7))]
    clutter_masks = [candidates[i] for i in sorted(chosen)]
    clutter_scores = np.round(rng.uniform(0.5, 0.95, len(clutter_masks)), 3).tolist()

    masks = instance_masks + clutter_masks
    scores = [1.0] * len(instance_masks) + clutter_scores
    order = np.argsort(-np.asarray(scores), kind="stable")
    return _finish(canvas, rng, noise=4.0), ImageMasks(
        masks_rle=[encode_mask(masks[i]) for i in order],
        bboxes=[bbox_from_mask(masks[i]) for i in order],
        scores=[float(scores[i]) for i in order],
    )


def render_query(obj: ObjectSpec, size: int, rng: np.random.Generator) -> tuple[Image.Image, np.ndarray]:
    """The object large on a light, slightly tinted background; returns image and [H, W] mask."""
    tint = rng.uniform(225, 250, 3).astype(np.float32)
    ramp = np.linspace(-8, 8, size, dtype=np.float32)[:, None, None]
    canvas = np.broadcast_to(tint, (size, size, 3)) + ramp
    target, angle = rng.uniform(*QUERY_BOX_SHARE) * size * size, rng.uniform(-25, 25)
    rgb, alpha = _transform_object(obj, angle, target, "box", brightness=1.0)
    if max(alpha.shape) > size:  # an elongated object: shrink until it fits (box share drops a bit)
        target *= ((size - 2) / max(alpha.shape)) ** 2
        rgb, alpha = _transform_object(obj, angle, target, "box", brightness=1.0)
    h, w = alpha.shape
    x, y = int(rng.integers(0, size - w + 1)), int(rng.integers(0, size - h + 1))
    mask = _composite(canvas, rgb, alpha, x, y)
    return _finish(canvas, rng, noise=2.0), mask


# ---------------------------------------------------------------------------------------------
# Dataset
# ---------------------------------------------------------------------------------------------


# What make_demo_dataset writes, by folder (fnmatch): all that --overwrite may delete.
DEMO_FILES = {
    ".": ("anns.pt", "captions.pt", ".*.tmp"),
    "queries": ("q_[0-9][0-9][0-9]*.jpg",),
    "gallery": ("g_[0-9][0-9][0-9]*.jpg",),
}


def make_demo_dataset(
    out: str | Path,
    num_objects: int = 6,
    gallery_per_object: int = 4,
    distractors: int = 8,
    image_size: int = 320,
    seed: int = 0,
    overwrite: bool = False,
) -> Path:
    """Write the demo set to ``out`` (queries/, gallery/, anns.pt, captions.pt); returns ``out``.

    Gallery scenes are ``image_size`` high and ``image_size`` or 4/3 * ``image_size`` wide.
    Refuses to write into a folder holding a previous set unless ``overwrite``.
    """
    if num_objects < 1 or gallery_per_object < 1 or distractors < 0:
        raise ValueError("need num_objects >= 1, gallery_per_object >= 1, distractors >= 0")
    if image_size < 128:
        raise ValueError(f"image_size must be >= 128 so 1 % objects stay visible, got {image_size}")
    out = Path(out)
    # Only into a folder this script made (its .soir.json), and --overwrite deletes only the files of
    # the names it writes (DEMO_FILES): a user's photos or anns.pt are never touched.
    claim_folder(out, "demo")
    previous = [out / n for n in ("anns.pt", "captions.pt") if (out / n).exists()]
    previous += [out / n for n in ("queries", "gallery") if (out / n).is_dir() and any((out / n).iterdir())]
    if previous and not overwrite:
        raise FileExistsError(
            f"'{out}' already holds a demo dataset ({', '.join(p.name for p in previous)}); "
            "pass overwrite=True / --overwrite to replace it"
        )
    for folder, patterns in DEMO_FILES.items():
        remove_own_files(out / folder, patterns, root=out)
    (out / "queries").mkdir(exist_ok=True)
    (out / "gallery").mkdir(exist_ok=True)
    try:
        _write_demo(out, num_objects, gallery_per_object, distractors, image_size, seed)
    except BaseException:  # no half dataset: what this call wrote goes (anns.pt comes last, so none is there)
        for folder, patterns in DEMO_FILES.items():
            remove_own_files(out / folder, patterns, root=out)
        raise
    return out


def _write_demo(
    out: Path, num_objects: int, gallery_per_object: int, distractors: int, image_size: int, seed: int
) -> None:
    """The files of :func:`make_demo_dataset` (anns.pt and captions.pt last)."""

    rng = np.random.default_rng(seed)
    objects = [make_object(i, num_objects, rng) for i in range(num_objects)]
    anns: dict[str, dict] = {}
    captions: dict[str, ImageMasks] = {}

    for i, obj in enumerate(objects):
        image, mask = render_query(obj, image_size, rng)
        key = f"queries/q_{i:03d}.jpg"
        image.save(out / key, quality=JPEG_QUALITY)
        anns[key] = {"ins": i, "is_query": True, "bbox": bbox_from_mask(mask), "obj_name": obj.name}
        captions[key] = ImageMasks([encode_mask(mask)], [bbox_from_mask(mask)], [1.0])

    scenes: list[list[int]] = []
    for i in range(num_objects):
        for j in range(gallery_per_object):
            ids = [i]
            if num_objects > 1 and ((i == 0 and j == 0) or rng.random() < SECOND_INSTANCE_PROB):
                ids.append(int((i + rng.integers(1, num_objects)) % num_objects))
            scenes.append(ids)
    scenes += [[] for _ in range(distractors)]
    for index, scene in enumerate(rng.permutation(len(scenes))):
        ids = scenes[scene]
        width = image_size if rng.random() < 0.5 else image_size * 4 // 3
        image, masks = render_gallery_scene(objects, ids, image_size, width, rng)
        key = f"gallery/g_{index:03d}.jpg"
        image.save(out / key, quality=JPEG_QUALITY)
        anns[key] = {"ins": sorted(ids), "is_query": False}
        captions[key] = masks

    save_captions(captions, out / "captions.pt")
    save_anns(anns, out / "anns.pt")


def _summary(out: Path, seconds: float) -> str:
    from datasets.anns import load_anns, split
    from datasets.captions import load_captions

    queries, gallery = split(load_anns(out / "anns.pt"))
    captions = load_captions(out / "captions.pt")
    shares = []
    for image in gallery:
        masks = captions[image.key]
        height, width = masks.size
        shares += [m.sum() / (height * width) for m, s in zip(masks.masks(), masks.scores) if s == 1.0]
    return (
        f"demo dataset in {out} ({seconds:.1f} s): {len(queries)} queries, {len(gallery)} gallery images "
        f"(with two instances: {sum(len(g.ins) == 2 for g in gallery)}, "
        f"distractors: {sum(len(g.ins) == 0 for g in gallery)}); object area share in gallery "
        f"{min(shares):.2%}..{max(shares):.2%} (mean {np.mean(shares):.2%}); "
        f"files: queries/, gallery/, anns.pt, captions.pt"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    parser.add_argument("--num_objects", type=int, default=6)
    parser.add_argument("--gallery_per_object", type=int, default=4)
    parser.add_argument("--distractors", type=int, default=8, help="gallery scenes with no object")
    parser.add_argument("--image_size", type=int, default=320, help="image height in px")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true", help="replace a dataset already in --out")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        out = make_demo_dataset(
            args.out,
            num_objects=args.num_objects,
            gallery_per_object=args.gallery_per_object,
            distractors=args.distractors,
            image_size=args.image_size,
            seed=args.seed,
            overwrite=args.overwrite,
        )
    except (FileExistsError, ValueError) as err:
        raise SystemExit(f"error: {err}") from err
    print(_summary(out, time.perf_counter() - start))


if __name__ == "__main__":
    main()
