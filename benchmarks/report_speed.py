"""Time the HTML report of search_index.py on a synthetic run: default 1000 queries x top-10 of a 10k-image gallery.

A features folder is written without a model: random unit features (10 rows per gallery image, one per
mask, ``mask_index`` 0..9), a captions file with 10 masks per image, and 1024x768 JPEG photos-like
images. Gallery and query paths are symlinks to ``--distinct_files`` real JPEGs, so every shown image
is decoded from its own path as in a real run. search_index.py then runs as a user runs it, with
``report=false`` and with ``report=true`` (threads: ``num_workers``), side by side.

    python benchmarks/report_speed.py [--queries 1000 --gallery 10000 --report_k 10 --workers 0 2]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from datasets import encode_mask, save_captions
from utils.config import SoIRConfig
from utils.retrieval.feature_store import FeatureShards
from utils.retrieval.index_io import build_index, index_path, save_index

WIDTH, HEIGHT, MASKS, DIM = 1024, 768, 10, 64


def photo(rng: np.random.Generator) -> tuple[Image.Image, list[np.ndarray]]:
    """A smooth colour field with ellipses on it (JPEG-compresses like a photo) and their masks."""
    field = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)).resize((WIDTH, HEIGHT), Image.BICUBIC)
    draw, masks = ImageDraw.Draw(field), []
    for _ in range(MASKS):
        x, y = rng.integers(0, WIDTH - 120), rng.integers(0, HEIGHT - 120)
        box = [int(x), int(y), int(x + rng.integers(20, 120)), int(y + rng.integers(20, 120))]
        draw.ellipse(box, fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
        mask = Image.new("L", (WIDTH, HEIGHT))
        ImageDraw.Draw(mask).ellipse(box, fill=255)
        masks.append(np.asarray(mask) > 0)
    return field, masks


def make_run(root: Path, queries: int, gallery: int, distinct: int, seed: int) -> Path:
    """Images, captions.pt, anns-like records and a features folder as create_index.py writes it."""
    rng = np.random.default_rng(seed)
    files, entries = [], []
    for i in range(distinct):
        image, masks = photo(rng)
        path = root / "files" / f"{i:04d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path, quality=90)
        files.append(path)
        entries.append(
            {
                "masks_rle": [encode_mask(m) for m in masks],
                "bboxes": [[float(v) for v in _box(m)] for m in masks],
                "scores": [1.0] * MASKS,
            }
        )
    records = {}
    for split, count in (("gallery", gallery), ("queries", queries)):
        records[split] = []
        for i in range(count):
            link = root / split / f"{i:06d}.jpg"
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(files[i % distinct])
            bbox = [100.0, 100.0, 400.0, 350.0] if split == "queries" else None
            records[split].append(
                {
                    "key": f"{split}/{i:06d}.jpg",
                    "file": str(link),
                    "ins": [int(i % 500)],
                    "bbox": bbox,
                    "obj_name": None,
                }
            )
    captions = root / "captions.pt"
    save_captions({r["key"]: entries[i % distinct] for i, r in enumerate(records["gallery"])}, captions)

    features = root / "features"
    cfg = OmegaConf.merge(
        OmegaConf.structured(SoIRConfig),
        {"anns_file": "synthetic", "dataset": "synthetic", "captions_file": str(captions), "vec_dim": DIM},
    )
    features.mkdir()
    (features / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    with open(captions, "rb") as f:
        import hashlib

        digest = hashlib.file_digest(f, "sha256").hexdigest()
    (features / "identity.json").write_text(
        json.dumps({"captions_file": str(captions), "captions_file_sha256": digest})
    )
    generator = torch.Generator().manual_seed(seed)
    for split, rows_per_image in (("gallery", MASKS), ("queries", 1)):
        shards = FeatureShards(features / split, records[split], cfg.shard_size)
        shards.prepare()
        for s in range(shards.num_shards):
            images = shards.image_range(s)
            vectors = torch.nn.functional.normalize(
                torch.randn(len(images) * rows_per_image, DIM, generator=generator), dim=-1
            )
            owner = torch.arange(images.start, images.stop).repeat_interleave(rows_per_image)
            mask_index = (
                torch.arange(rows_per_image).repeat(len(images))
                if split == "gallery"
                else torch.full((len(images),), -1)
            )
            shards.write(s, vectors, owner, {}, mask_index)
    gallery_features, _, _ = FeatureShards(features / "gallery", records["gallery"], cfg.shard_size).load()
    save_index(build_index(gallery_features.numpy()), index_path(features, "Flat"))
    return features


def _box(mask: np.ndarray) -> list[int]:
    ys, xs = np.nonzero(mask)
    return [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]


def search(features: Path, cwd: Path, *overrides: str) -> tuple[float, float, str, str, str]:
    """One search_index.py run: its wall and CPU seconds, and the report's wall and CPU seconds and
    counts (from its log line; "-" without a report)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    started, cpu = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run(
        [sys.executable, str(ROOT / "search_index.py"), f"features_dir={features}", *overrides],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    wall, after = time.perf_counter() - started, resource.getrusage(resource.RUSAGE_CHILDREN)
    line = re.search(
        r"report: (\d+ queries x \d+ images, \d+ thumbnails), \d+ maps in ([\d.]+) s \(CPU ([\d.]+) s",
        proc.stdout + proc.stderr,
    )
    report = line.groups() if line else ("", "-", "-")
    return wall, after.ru_utime + after.ru_stime - cpu.ru_utime - cpu.ru_stime, report[1], report[2], report[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--gallery", type=int, default=10_000)
    parser.add_argument("--report_k", type=int, default=10)
    parser.add_argument("--distinct_files", type=int, default=200, help="real JPEG files behind the symlinks")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="num_workers values to time")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="soir_report_speed_") as tmp:
        root = Path(tmp)
        started = time.perf_counter()
        features = make_run(root, args.queries, args.gallery, args.distinct_files, args.seed)
        print(
            f"synthetic run: {args.queries} queries, {args.gallery} gallery images of {WIDTH}x{HEIGHT} "
            f"({MASKS} masks and rows each), made in {time.perf_counter() - started:.0f} s; "
            f"{os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}"
        )
        rows = [("report=false", *search(features, root, "report=false", f"report_k={args.report_k}"))]
        for workers in args.workers:
            rows.append(
                (
                    f"report=true num_workers={workers}",
                    *search(features, root, f"report_k={args.report_k}", f"num_workers={workers}"),
                )
            )
    print(
        f"load average while measuring: {os.getloadavg()[0]:.1f} (wall times are only meaningful on a quiet machine; "
        "CPU seconds count the work)"
    )
    print("| run | search_index.py wall s | CPU s | report wall s | report CPU s | shown |")
    print("|---|---:|---:|---:|---:|---|")
    for name, wall, cpu, report_wall, report_cpu, shown in rows:
        print(f"| {name} | {wall:.1f} | {cpu:.1f} | {report_wall} | {report_cpu} | {shown} |")


if __name__ == "__main__":
    main()
