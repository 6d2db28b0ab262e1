"""Look at Mask Inversion on one image: its masks, the LeGrad maps of the global and MI vectors, the loss curves.

    python scripts/inspect_mi.py --image demo_data/demo/gallery/g_000.jpg --captions demo_data/demo/captions.pt
    python scripts/inspect_mi.py --image scene.jpg --captions captions.pt --extractor clip_mi_features --masks 0 3
    python scripts/inspect_mi.py --image scene.jpg --captions captions.pt --tiny     # offline, tiny RANDOM model

Writes one PNG grid (``--out``, default ``inspect_mi_<image name>.png``):

    row 1   the image | each mask (filled, outlined) on the image
    row 2   the LeGrad map of the global vector | the map of each MI vector, with its mask's outline
    row 3   Dice loss and total loss of each mask over the AdamW iterations (colours as in row 1)

The masks come from the image's entry in ``--captions`` (``captions.pt`` format), found by ``--key``,
else by the path as given, its absolute path, or its path relative to the captions file's folder.
Maps and vectors are those of ``extractor.explain`` (the same as create_index.py computes).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from PIL.PngImagePlugin import PngInfo

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as `python scripts/inspect_mi.py`
    sys.path.insert(0, str(ROOT))

from datasets import ImageMasks, load_captions, load_rgb
from extractors import build_extractor, list_extractors
from extractors.mask_inversion import Explanation
from extractors.registry import extractor_class
from utils.config import MI_ITERATIONS, ComputeSettings, MISettings, RunSettings
from utils.errors import exit_on_error
from utils.hub import check_model_available
from utils.results.visualize import draw_outline, overlay, resize_mask

# Distinct colours per mask (matplotlib's tab10), shared by the mask cells and the curves.
PALETTE = [
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
    (188, 189, 34),
    (23, 190, 207),
]
LABEL_HEIGHT = 22


def find_entry(
    captions: dict[str, ImageMasks], image: Path, captions_file: Path, key: str | None
) -> tuple[str, ImageMasks]:
    """The captions entry of ``image``: by ``key``, else by the path as given, absolute, or relative to the
    captions file's folder. A miss is an error naming the keys tried and an example key of the file."""
    tried = [key] if key else [str(image), str(image.resolve())]
    if not key and image.resolve().is_relative_to(captions_file.resolve().parent):
        tried.append(image.resolve().relative_to(captions_file.resolve().parent).as_posix())
    for candidate in tried:
        if candidate in captions:
            return candidate, captions[candidate]
    example = next(iter(captions), None)
    raise SystemExit(
        f"{captions_file} has no entry for {image} (tried keys {tried}; its keys look like {example!r}); pass --key"
    )


def usable_masks(
    entry: ImageMasks, chosen: Sequence[int] | None, max_masks: int, extractor
) -> tuple[list[int], np.ndarray]:
    """Indices and [P, H, W] masks to invert: ``chosen``, or the first ``max_masks``; masks that vanish at
    the model's input size are skipped and said."""
    masks = entry.masks()
    indices = list(chosen) if chosen else list(range(min(len(entry), max_masks)))
    bad = [i for i in indices if not 0 <= i < len(entry)]
    if bad:
        raise SystemExit(f"--masks {bad}: the entry has {len(entry)} masks (0..{len(entry) - 1})")
    resized = extractor.preprocess.masks(masks[indices])
    visible = resized.flatten(1).any(1).tolist()
    if not all(visible):
        print(
            f"skipped masks {[i for i, v in zip(indices, visible) if not v]}: empty at the model's input size "
            f"{tuple(resized.shape[-2:])}"
        )
    indices = [i for i, v in zip(indices, visible) if v]
    if not indices:
        raise SystemExit("no mask left to invert")
    return indices, masks[indices]


def font(size: int = 14) -> ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def labelled(picture: Image.Image, label: str, cell: int) -> Image.Image:
    """``picture`` fitted into a cell x cell square (aspect kept) under a text label."""
    tile = Image.new("RGB", (cell, cell + LABEL_HEIGHT), "white")
    small = picture.copy()
    small.thumbnail((cell, cell), Image.Resampling.BILINEAR)
    tile.paste(small, ((cell - small.width) // 2, LABEL_HEIGHT + (cell - small.height) // 2))
    ImageDraw.Draw(tile).text((4, 3), label, fill="black", font=font())
    return tile


def mask_picture(image: Image.Image, mask: np.ndarray, color: tuple[int, int, int]) -> Image.Image:
    """The image with ``mask`` filled half-transparent in ``color`` and outlined."""
    fill = Image.new("RGB", image.size, color)
    inside = Image.fromarray(resize_mask(mask, image.size).astype(np.uint8) * 255)
    shaded = Image.composite(Image.blend(image, fill, 0.5), image, inside)
    return draw_outline(shaded, mask, color, width=max(2, round(max(image.size) / 150)))


def curves(history: dict[str, torch.Tensor], labels: list[str], size: tuple[int, int]) -> Image.Image:
    """Line plots of history["dice"] and history["loss"] ([iterations, M]) side by side, one line per mask."""
    width, height = size
    plot = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(plot)
    iterations = history["dice"].shape[0]
    top = max(1e-6, float(max(history["dice"].max(), history["loss"].max()))) if iterations else 1.0
    panel_w = width // 2
    for p, (name, title) in enumerate((("dice", "Dice loss"), ("loss", "total loss (Dice + alpha + beta terms)"))):
        left, right, up, down = p * panel_w + 50, (p + 1) * panel_w - 20, 30, height - 30
        draw.text((left, 6), title, fill="black", font=font())
        draw.line([(left, up), (left, down), (right, down)], fill="black", width=1)
        for value in (0.0, top / 2, top):
            y = down - (down - up) * value / top
            draw.text((left - 45, y - 7), f"{value:.2f}", fill="black", font=font(11))
        for step in (0, iterations // 2, max(0, iterations - 1)):
            x = left + (right - left) * step / max(1, iterations - 1)
            draw.text((x - 6, down + 4), str(step), fill="black", font=font(11))
        for m in range(history[name].shape[1] if iterations else 0):
            values = history[name][:, m].tolist()
            points = [
                (left + (right - left) * i / max(1, iterations - 1), down - (down - up) * v / top)
                for i, v in enumerate(values)
            ]
            draw.line(points if len(points) > 1 else points * 2, fill=PALETTE[m % len(PALETTE)], width=2)
    x = 50
    for m, label in enumerate(labels + [f"(x: iteration, {iterations} in all)"]):
        color = PALETTE[m % len(PALETTE)] if m < len(labels) else "black"
        draw.text((x, height - 14), label, fill=color, font=font(11))
        x += draw.textlength(label, font=font(11)) + 18
    return plot


def grid(image: Image.Image, indices: list[int], masks: np.ndarray, explained: Explanation, cell: int) -> Image.Image:
    """The PNG grid described in the module docstring."""
    columns = 1 + max(len(indices), len(explained.vectors))
    picture = image.copy()
    picture.thumbnail((2 * cell, 2 * cell), Image.Resampling.BILINEAR)  # work at display resolution
    row1 = [labelled(image, f"image {image.width}x{image.height}", cell)]
    row1 += [
        labelled(mask_picture(picture, m, PALETTE[n % len(PALETTE)]), f"mask {i}", cell)
        for n, (i, m) in enumerate(zip(indices, masks))
    ]
    row2 = [labelled(overlay(picture, explained.global_map), "map of the global vector", cell)]
    # explain() numbers masks by their position in ``masks``; ``indices`` maps them back to the entry.
    for position, values in zip(explained.mask_index.tolist(), explained.maps):
        outline = masks[position] if position >= 0 else masks.any(0)
        name = f"MI map, mask {indices[position]}" if position >= 0 else "MI map, union/average"
        row2.append(labelled(overlay(picture, values, outline), name, cell))
    tile_h = cell + LABEL_HEIGHT
    sheet = Image.new("RGB", (columns * cell, 3 * tile_h), "white")
    for r, row in enumerate((row1, row2)):
        for c, tile in enumerate(row):
            sheet.paste(tile, (c * cell, r * tile_h))
    dice = explained.history["dice"]  # [iterations, inverted masks]
    names = [f"mask {i}" for i in indices] if dice.shape[1] == len(indices) else ["union of the masks"]
    labels = [f"{name}: Dice loss {float(dice[-1, n]):.3f}" if len(dice) else name for n, name in enumerate(names)]
    sheet.paste(curves(explained.history, labels, (columns * cell, tile_h)), (0, 2 * tile_h))
    return sheet


def tiny_model(family: str, folder: Path) -> str:
    """A tiny random model of ``family`` saved in ``folder`` (scripts/make_tiny_models.py): offline."""
    from utils.testing.tiny_models import TINY_BUILDERS

    return str(TINY_BUILDERS[family](folder / family))


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image", type=Path, required=True)
    parser.add_argument("--captions", type=Path, required=True, help="captions.pt with the image's masks")
    parser.add_argument("--key", help="the image's key in --captions (default: found from --image)")
    parser.add_argument(
        "--masks", type=int, nargs="+", help="mask indices in the entry (default: the first --max_masks)"
    )
    parser.add_argument("--max_masks", type=int, default=6)
    parser.add_argument(
        "--extractor",
        default=RunSettings.extractor,
        choices=[n for n in list_extractors() if n.endswith("_mi_features")],
    )
    parser.add_argument("--model", help="HF hub id or local folder (default: the extractor's default model)")
    parser.add_argument(
        "--tiny", action="store_true", help="a tiny RANDOM model built here: offline, maps mean nothing"
    )
    for name, kind, default in (
        ("mi_alpha", float, MISettings.mi_alpha),
        ("mi_beta", float, MISettings.mi_beta),
        ("mi_lr", float, MISettings.mi_lr),
        ("mi_iterations", int, MI_ITERATIONS["mi"]),
        ("mi_layer_index", int, MISettings.mi_layer_index),
        ("smart_crop_pad", float, MISettings.smart_crop_pad),
    ):
        parser.add_argument(
            f"--{name}", type=kind, default=default, help=f"as create_index.py's {name} (default {default})"
        )
    parser.add_argument("--smart_crop", action="store_true", help="MI inside each mask's padded box")
    parser.add_argument("--device", default=ComputeSettings.device)
    parser.add_argument("--cell", type=int, default=256, help="grid cell size, pixels")
    parser.add_argument("--out", type=Path, help="PNG to write (default: inspect_mi_<image stem>.png)")
    parser.add_argument("--overwrite", action="store_true", help="replace an --out that this script wrote")
    args = parser.parse_args(argv)
    if args.tiny and args.model:
        parser.error("--tiny builds its own model; drop --model")
    if args.max_masks < 1 or args.cell < 64:
        parser.error("--max_masks must be >= 1 and --cell >= 64")
    args.out = args.out or Path(f"inspect_mi_{args.image.stem}.png")
    return args


PNG_TAG = ("Software", "SoIR scripts/inspect_mi.py")


def made_by_inspect_mi(path: Path) -> bool:
    """Whether ``path`` is a PNG this script wrote (its text tag :data:`PNG_TAG`): the only file
    ``--overwrite`` replaces."""
    try:
        with Image.open(path) as image:
            return image.format == "PNG" and image.text.get(PNG_TAG[0]) == PNG_TAG[1]
    except (OSError, ValueError):  # not an image at all
        return False


@exit_on_error
def main(argv: Sequence[str] | None = None) -> Path:
    args = parse_args(argv)
    if not args.tiny:  # offline without the model: one line whose fix names this script's --model
        check_model_available(args.model or extractor_class(args.extractor).default_model(), key="--model")
    if args.out.exists() and not args.overwrite:
        raise SystemExit(f"{args.out} exists; pass --overwrite to replace it or --out elsewhere")
    if args.out.exists() and not made_by_inspect_mi(args.out):
        raise SystemExit(
            f"{args.out} was not written by inspect_mi.py (no '{PNG_TAG[0]}' tag); SoIR does not replace files "
            "it did not write: choose another --out"
        )
    image = load_rgb(args.image)
    key, entry = find_entry(load_captions(args.captions), args.image, args.captions, args.key)
    if entry.size != (image.height, image.width):
        raise SystemExit(
            f"{args.captions}, image {key!r}: masks of size {entry.size} do not match the "
            f"{image.width}x{image.height} image"
        )
    with tempfile.TemporaryDirectory(prefix="soir_tiny_") as tmp:
        model = tiny_model(args.extractor.split("_")[0], Path(tmp)) if args.tiny else args.model
        extractor = build_extractor(
            args.extractor,
            model_name=model,
            device=args.device,
            mi_alpha=args.mi_alpha,
            mi_beta=args.mi_beta,
            mi_lr=args.mi_lr,
            mi_iterations=args.mi_iterations,
            mi_layer_index=args.mi_layer_index,
            smart_crop=args.smart_crop,
            smart_crop_pad=args.smart_crop_pad,
        )
    if args.tiny:
        print("--tiny: a tiny RANDOMLY initialised model; the maps show the mechanics, not a trained model")
    indices, masks = usable_masks(entry, args.masks, args.max_masks, extractor)
    explained = extractor.explain(image, masks)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tag = PngInfo()
    tag.add_text(*PNG_TAG)  # what --overwrite checks before replacing this file
    grid(image, indices, masks, explained, args.cell).save(args.out, format="PNG", pnginfo=tag)
    print(f"{key}: {len(indices)} masks, {args.mi_iterations} iterations -> {args.out}")
    return args.out


if __name__ == "__main__":
    main()
