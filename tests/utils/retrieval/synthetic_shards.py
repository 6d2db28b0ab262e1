"""Synthetic SoIR feature folders for tests: shards written by ``FeatureShards.write`` like create_index.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from utils.retrieval.feature_store import FeatureShards


def write_split(
    folder: Path, instances: list[list[int]], shard_size: int, rows_per_image: np.ndarray, make_rows
) -> tuple[FeatureShards, torch.Tensor, torch.Tensor]:
    """Write one split: image i owns ``rows_per_image[i]`` rows from ``make_rows(n) -> [n, D] float32``.
    Returns the shards and all rows (features [R, D], owner [R]) for the in-RAM reference."""
    records = [
        {
            "key": f"{Path(folder).name}/{i:05d}.jpg",
            "file": f"/x/{i:05d}.jpg",
            "ins": ins,
            "bbox": None,
            "obj_name": None,
        }
        for i, ins in enumerate(instances)
    ]
    shards = FeatureShards(folder, records, shard_size)
    shards.prepare()
    features, owners = [], []
    for s in range(shards.num_shards):
        images = shards.image_range(s)
        owner = torch.from_numpy(
            np.repeat(np.arange(images.start, images.stop), rows_per_image[images.start : images.stop])
        )
        rows = torch.as_tensor(make_rows(len(owner)), dtype=torch.float32)
        shards.write(s, rows, owner, {"dropped_masks": 0})
        features.append(rows)
        owners.append(owner)
    return shards, torch.cat(features), torch.cat(owners)


def dyadic_rows(rng: np.random.Generator, dim: int):
    """Rows with entries in {-2, -1, 0, 1, 2} / 4: every inner product is exact in float32 whatever the
    summation order, so any two BLAS give bit-equal scores, and scores tie often."""
    return lambda n: rng.integers(-2, 3, (n, dim)).astype(np.float32) / 4


def unit_rows(rng: np.random.Generator, dim: int):
    def make(n):
        x = rng.standard_normal((n, dim)).astype(np.float32)
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    return make
