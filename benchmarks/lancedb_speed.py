"""search=lancedb next to search=exact on one synthetic features folder (random unit vectors, several per
image): the format=lancedb export's build time, and per query the time to score every gallery image
(LanceDB's exact multivector search vs SoIR's exact inner products + max per image, in RAM).

    python benchmarks/lancedb_speed.py [--images 10000] [--vectors 4] [--dim 768] [--queries 20]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from utils.files import atomic_write_json, claim_folder  # noqa: E402
from utils.results.interop import LanceDBGallery, export_lancedb  # noqa: E402
from utils.retrieval.feature_store import FeatureShards  # noqa: E402
from utils.retrieval.ranking import image_scores  # noqa: E402


def synthetic_features(root: Path, images: int, vectors: int, dim: int, shard_size: int = 1000) -> np.ndarray:
    """A features folder (gallery only) of ``images`` images with ``vectors`` unit vectors each; returns them."""
    claim_folder(root, "features")
    atomic_write_json(root / "identity.json", {"synthetic": [images, vectors, dim]})
    (root / "config.yaml").write_text(
        OmegaConf.to_yaml({"shard_size": shard_size, "vec_dim": dim, "extractor": "x", "only_gallery": True})
    )
    records = [{"key": f"g{i}", "file": f"/g{i}.jpg", "ins": [], "bbox": None, "obj_name": None} for i in range(images)]
    shards = FeatureShards(root / "gallery", records, shard_size)
    shards.prepare()
    features = torch.nn.functional.normalize(
        torch.randn(images * vectors, dim, generator=torch.Generator().manual_seed(0)), dim=1
    )
    owner = torch.arange(images).repeat_interleave(vectors)
    for s in range(shards.num_shards):
        rows = slice(shards.image_range(s).start * vectors, shards.image_range(s).stop * vectors)
        shards.write(s, features[rows], owner[rows], {}, torch.arange(vectors).repeat(len(shards.image_range(s))))
    return features.numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--vectors", type=int, default=4, help="vectors per gallery image")
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--queries", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "features"
        gallery = synthetic_features(root, args.images, args.vectors, args.dim)
        owner = np.repeat(np.arange(args.images), args.vectors)
        started = time.perf_counter()
        export_lancedb(OmegaConf.create({"export_dtype": "float32"}), root, root / "export" / "lancedb")
        build = time.perf_counter() - started
        table = LanceDBGallery(root / "export" / "lancedb", root)
        queries = gallery[:: max(1, len(gallery) // args.queries)][: args.queries]
        keys = [f"g{i}" for i in range(args.images)]
        timings = {"lancedb": 0.0, "exact": 0.0}
        for q, vector in enumerate(queries):
            started = time.perf_counter()
            lance = table.image_scores(vector[None], np.zeros(1, dtype=np.int64), 1, keys)
            timings["lancedb"] += time.perf_counter() - started
            started = time.perf_counter()
            exact = image_scores(vector[None], np.zeros(1, dtype=np.int64), range(1), gallery, owner, args.images)
            timings["exact"] += time.perf_counter() - started
            assert np.abs(lance - exact).max() < 1e-5
        result = {
            "images": args.images,
            "rows": len(gallery),
            "dim": args.dim,
            "lancedb_build_s": round(build, 2),
            **{f"{k}_ms_per_query": round(1000 * v / len(queries), 1) for k, v in timings.items()},
        }
        print(json.dumps(result))


if __name__ == "__main__":
    main()
