"""Descriptor rows on disk, in shards of consecutive images, written atomically so runs resume.

Layout of one split folder (``gallery/`` or ``queries/``)::

    images.json              one record per image: key, file, ins, bbox, obj_name
    shard-00000.safetensors  features [R, D] float32, owner [R] int64 (image index in images.json)
    ...

Shard ``s`` holds images ``[s * shard_size, (s + 1) * shard_size)``. A shard file exists only when
complete (write to a temporary name, then ``os.replace``), so after a crash the missing shards are
exactly the work left, and rerunning computes them in the same batches as an uninterrupted run.
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


@dataclass
class FeatureShards:
    """The shards of one split. ``records`` are JSON-able dicts, one per image, in index order."""

    folder: Path
    records: list[dict]
    shard_size: int

    def __post_init__(self):
        self.folder = Path(self.folder)

    @property
    def num_images(self) -> int:
        return len(self.records)

    @property
    def num_shards(self) -> int:
        return -(-len(self.records) // self.shard_size)

    def shard_path(self, shard: int) -> Path:
        return self.folder / f"shard-{shard:05d}.safetensors"

    def image_range(self, shard: int) -> range:
        return range(shard * self.shard_size, min(len(self.records), (shard + 1) * self.shard_size))

    def prepare(self) -> None:
        """Create the folder and its image list; a folder made for other images is an error."""
        self.folder.mkdir(parents=True, exist_ok=True)
        listing = self.folder / "images.json"
        text = json.dumps(self.records, indent=1)
        if listing.exists():
            if json.loads(listing.read_text()) != self.records:
                raise ValueError(f"{listing} lists other images than this run (changed anns file or "
                                 f"paths?); use another features_dir or delete {self.folder}")
        else:
            atomic_write_text(listing, text)

    def missing(self) -> list[int]:
        return [s for s in range(self.num_shards) if not self.shard_path(s).exists()]

    def write(self, shard: int, features: torch.Tensor, owner: torch.Tensor, stats: dict[str, int]) -> None:
        """Save one complete shard atomically. ``stats`` are counts kept for the run summary."""
        path = self.shard_path(shard)
        tmp = path.with_name(path.name + ".tmp")
        # Counts are stored as tensors: safetensors metadata is a hash map whose order (and so the
        # file's bytes) changes between runs, which would break byte-identical resumes.
        tensors = {"features": features.float().contiguous(), "owner": owner.long().contiguous()}
        tensors.update({f"stat.{k}": torch.tensor([v], dtype=torch.long) for k, v in stats.items()})
        save_file(tensors, tmp)
        os.replace(tmp, path)

    def load(self) -> tuple[torch.Tensor, torch.Tensor, dict[str, int]]:
        """All rows of the split: features [R, D], owner [R], and the summed shard stats."""
        if missing := self.missing():
            raise FileNotFoundError(f"{self.folder}: shards {missing[:5]} are missing "
                                    f"({len(missing)} of {self.num_shards}); rerun create_index.py")
        features, owners, stats = [], [], {}
        for s in range(self.num_shards):
            tensors = load_file(self.shard_path(s))
            features.append(tensors.pop("features"))
            owners.append(tensors.pop("owner"))
            for key, value in tensors.items():
                stats[key.removeprefix("stat.")] = stats.get(key.removeprefix("stat."), 0) + int(value)
        return torch.cat(features), torch.cat(owners), stats

    # --- lazy reading: one shard (or a row range of it) at a time, never the whole split ----------
    def _open(self, shard: int):
        path = self.shard_path(shard)
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing (shard {shard} of {self.num_shards}); rerun "
                                    f"create_index.py to compute it")
        return safe_open(path, framework="pt")   # memory-maps the file; tensors are read on access

    def row_count(self, shard: int) -> int:
        """Number of rows of one shard, from its header (no feature data is read)."""
        with self._open(shard) as f:
            return f.get_slice("owner").get_shape()[0]

    def row_offsets(self) -> list[int]:
        """[num_shards + 1]: shard s holds the split's global rows offsets[s]:offsets[s + 1] (the row ids a
        FAISS index built from the shards in order uses). Reads the headers only."""
        offsets = [0]
        for shard in range(self.num_shards):
            offsets.append(offsets[-1] + self.row_count(shard))
        return offsets

    def read_owner(self, shard: int) -> torch.Tensor:
        """owner [R] int64 of one shard, checked: non-decreasing (rows of one image are contiguous) and
        within ``image_range(shard)``. An image may own no rows (unreadable, skipped at extraction)."""
        with self._open(shard) as f:
            owner = f.get_tensor("owner")
        images = self.image_range(shard)
        if (owner.dim() != 1 or bool((owner[1:] < owner[:-1]).any())
                or (len(owner) and (int(owner[0]) < images.start or int(owner[-1]) >= images.stop))):
            raise ValueError(f"{self.shard_path(shard)}: owner must hold image ids {images.start}.."
                             f"{images.stop - 1} in ascending order; the file is damaged or from another "
                             f"run: delete it and rerun create_index.py")
        return owner

    @contextmanager
    def mapped(self, shard: int) -> Iterator[torch.Tensor]:
        """features [R, D] float32 of one shard as a view of the memory-mapped file, valid inside the
        ``with`` only (do not keep it, or slices of it): pages are read on access, nothing is copied.
        Reading whole shards into fresh buffers instead fragments the heap when small results are kept
        between reads (+15 MB RSS per 15 MB shard, seen while sampling training rows)."""
        with self._open(shard) as f:
            yield f.get_slice("features")[:]

    def read_rows(self, shard: int, start: int, stop: int) -> torch.Tensor:
        """features[start:stop] [stop - start, D] float32 of one shard; only those rows are read."""
        return self.read_ranges(shard, [start], [stop])

    def read_ranges(self, shard: int, starts: Sequence[int], stops: Sequence[int]) -> torch.Tensor:
        """The rows of several ranges [starts[i], stops[i]) of one shard, concatenated [R, D] float32;
        the file is opened once and only those rows are read."""
        with self._open(shard) as f:
            rows = f.get_slice("features")
            # Copies (cat/clone): a slice is a view that keeps the file mapped, and every mapping's pages
            # count in RSS again (1000 small slices of 20 files showed as 0.9 GB).
            parts = [rows[int(a):int(b)] for a, b in zip(starts, stops)]
            return torch.cat(parts) if len(parts) > 1 else parts[0].clone()
