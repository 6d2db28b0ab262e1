"""Descriptor rows on disk, in shards of consecutive images, written atomically so runs resume.

A features folder (made by ``create_index.py``)::

    .soir.json               marker: SoIR made this folder (utils.files.claim_folder)
    identity.json            what the gallery features depend on; a resume must match it
    config.yaml              the resolved config of the run that made the features
    gallery/, queries/       one split each, see below (queries/ has its own identity.json)
    index-<factory>.faiss    FAISS index over the gallery rows
    bad_images.txt           images skipped with bad_images=skip ("split<TAB>key<TAB>reason")
    summary.json

Layout of one split folder::

    images.json              one record per image: key, file, ins, bbox, obj_name
    jobs.json, jobs-00000.jsonl, ...   (written by ``stage=prepare``) the image count and shard size;
                             per shard one JSON line per image: {"record": <images.json record>,
                             "job": <how it is read: datasets.extraction.job_to_dict>}, so a worker
                             reads the few images of its shards, never the whole list
    shard-00000.safetensors  features [R, D] float32, owner [R] int64 (image index in images.json),
                             mask_index [R] int64 (the row's mask in the image's captions entry;
                             -1: global embedding, union or average of masks), failed [F] int64
                             (images whose pixels could not be decoded: no rows), stat.* counts
    ...

Shard ``s`` holds images ``[s * shard_size, (s + 1) * shard_size)``. A shard file exists only when
complete (:func:`utils.files.atomic_write`), so after a crash the missing shards are exactly the
work left, and rerunning computes them in the same batches as an uninterrupted run.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save

from utils.errors import SoIRError
from utils.files import (
    FolderLock,
    atomic_write,
    atomic_write_json,
    atomic_write_text,
    changed_keys,
    check_identity,
    claim_folder,
    read_json,
    remove_own_files,
    remove_stale_temporaries,
)

log = logging.getLogger("soir.features")

# Files of a split folder that SoIR writes (and so may delete when the queries are recomputed).
SPLIT_FILES = (
    "shard-*.safetensors",
    "images.json",
    "identity.json",
    ".shard-*.tmp",
    ".images.json.*.tmp",
    ".identity.json.*.tmp",
    "jobs.json",
    "jobs-*.jsonl",
    ".jobs.json.*.tmp",
    ".jobs-*.tmp",
)
JOBS_MANIFEST = "jobs.json"


@dataclass
class FeatureShards:
    """The shards of one split. ``records`` are JSON-able dicts, one per image, in index order (a list,
    or :class:`ShardedRecords` for a split written by ``stage=prepare``: see :meth:`prepared`)."""

    folder: Path
    records: Sequence[dict]
    shard_size: int

    def __post_init__(self):
        self.folder = Path(self.folder)

    @classmethod
    def prepared(cls, folder: str | Path) -> "FeatureShards":
        """The split ``stage=prepare`` wrote into ``folder``, from its ``jobs.json`` (no image list is read:
        records are read one shard at a time, when asked for)."""
        folder = Path(folder)
        manifest = folder / JOBS_MANIFEST
        if not manifest.is_file():
            raise SoIRError(
                f"{manifest} is missing: {folder.parent} was not made by create_index.py stage=prepare "
                "(or an older SoIR); run stage=prepare with the same settings first"
            )
        facts = read_json(manifest, fix="rerun create_index.py stage=prepare with the same settings")
        return cls(folder, ShardedRecords(folder, facts["num_images"], facts["shard_size"]), facts["shard_size"])

    def jobs_path(self, shard: int) -> Path:
        return self.folder / f"jobs-{shard:05d}.jsonl"

    def write_jobs(self, jobs: Sequence[dict]) -> None:
        """``stage=prepare``: one JSON line per image (``jobs[i]``: JSON-able, how image i is read) in
        ``jobs-<shard>.jsonl`` next to its shard, each line ``{"record": records[i], "job": jobs[i]}``;
        then ``jobs.json`` (image count, shard size), last, so a manifest means complete job files."""
        if len(jobs) != self.num_images:
            raise ValueError(f"{len(jobs)} jobs for {self.num_images} images")
        for shard in range(self.num_shards):
            lines = "".join(
                json.dumps({"record": self.records[i], "job": jobs[i]}, sort_keys=True) + "\n"
                for i in self.image_range(shard)
            )
            atomic_write_text(self.jobs_path(shard), lines)
        atomic_write_json(
            self.folder / JOBS_MANIFEST, {"num_images": self.num_images, "shard_size": self.shard_size, "format": 1}
        )

    def read_jobs(self, shard: int) -> list[dict]:
        """The lines of ``jobs-<shard>.jsonl`` (``{"record", "job"}`` per image of the shard), checked
        against the shard's image count."""
        path = self.jobs_path(shard)
        try:
            lines = [json.loads(line) for line in path.read_text().splitlines()]
        except (OSError, ValueError) as err:
            raise SoIRError(
                f"{path} is missing or damaged ({type(err).__name__}: {err}); rerun create_index.py "
                "stage=prepare with the same settings"
            ) from None
        if len(lines) != len(self.image_range(shard)):
            raise SoIRError(
                f"{path} lists {len(lines)} images, shard {shard} has {len(self.image_range(shard))}; "
                "rerun create_index.py stage=prepare with the same settings"
            )
        return lines

    def stats(self) -> dict[str, int]:
        """The shards' ``stat.*`` counts, summed (every shard must exist; no features are read)."""
        self.check_complete()
        total: dict[str, int] = {}
        for s in range(self.num_shards):
            with self._open(s) as f:
                for key in (k for k in f.keys() if k.startswith("stat.")):
                    total[key[5:]] = total.get(key[5:], 0) + int(f.get_tensor(key))
        return total

    def failed_images(self) -> list[int]:
        """Images whose pixels could not be decoded at extraction (they own no rows), from every shard."""
        failed = []
        for s in range(self.num_shards):
            with self._open(s) as f:
                failed += f.get_tensor("failed").tolist()
        return failed

    def check_complete(self) -> None:
        """SoIRError naming the missing shards (the extraction did not finish), if any."""
        if missing := self.missing():
            raise SoIRError(
                f"{self.folder}: {len(missing)} of {self.num_shards} shards are missing "
                f"(first: {[self.shard_path(s).name for s in missing[:5]]}); the extraction did not "
                "finish: rerun create_index.py with the same settings, it resumes and computes them"
            )

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
        """Create the folder and its image list; a folder made for other images is an error.

        Labels (``ins``, ``obj_name``) do not change features: when only they differ, the list is
        rewritten (logged) and the shards are kept.
        """
        self.folder.mkdir(parents=True, exist_ok=True)
        listing = self.folder / "images.json"
        if listing.exists():
            old = read_json(listing, fix=f"delete {self.folder.parent} (or use another features_dir) and rerun")
            if [_image_of(r) for r in old] != [_image_of(r) for r in self.records]:
                raise SoIRError(f"{listing} lists other images than this run; use another features_dir")
            if old == self.records:
                return
            log.warning("%s: labels changed (ins / obj_name / bbox), features kept; rewriting the list", listing)
        atomic_write_text(listing, json.dumps(self.records, indent=1))

    def missing(self) -> list[int]:
        return [s for s in range(self.num_shards) if not self.shard_path(s).exists()]

    def write(
        self,
        shard: int,
        features: torch.Tensor,
        owner: torch.Tensor,
        stats: dict[str, int],
        mask_index: torch.Tensor | None = None,
        failed: torch.Tensor | None = None,
    ) -> None:
        """Save one complete shard atomically. ``stats`` are counts kept for the run summary;
        ``mask_index`` None = -1 for every row (no single source mask).

        Raises SoIRError naming the images when a vector is not finite (a shard of NaNs would
        otherwise be searched as if it were features).
        """
        bad = ~torch.isfinite(features).all(dim=1)
        if bad.any():
            keys = [self.records[int(i)]["key"] for i in owner[bad].unique()[:5]]
            raise SoIRError(
                f"{self.folder.name}: {int(bad.sum())} non-finite feature vectors (NaN/inf), images "
                f"{keys}; check the MI settings (mi_lr, mi_alpha) and these images"
            )
        # Counts are stored as tensors: safetensors metadata is a hash map whose order (and so the
        # file's bytes) changes between runs, which would break byte-identical resumes.
        tensors = {
            "features": features.float().contiguous(),
            "owner": owner.long().contiguous(),
            "mask_index": (torch.full((len(owner),), -1) if mask_index is None else mask_index).long().contiguous(),
            "failed": (torch.zeros(0) if failed is None else failed).long().contiguous(),
        }
        tensors.update({f"stat.{k}": torch.tensor([v], dtype=torch.long) for k, v in stats.items()})
        atomic_write(self.shard_path(shard), lambda handle: handle.write(save(tensors)))

    def read(self, shard: int) -> dict[str, torch.Tensor]:
        """One shard's tensors; a damaged file is a SoIRError saying how to recompute it."""
        path = self.shard_path(shard)
        try:
            return load_file(path)
        except (SafetensorError, ValueError, OSError) as err:
            raise SoIRError(
                f"{path} is damaged ({type(err).__name__}: {err}); delete it and rerun "
                "create_index.py with the same settings, which recomputes it"
            ) from None

    def column(self, name: str) -> torch.Tensor:
        """One per-row tensor (e.g. ``mask_index``) of every shard, concatenated, without reading the
        features."""
        parts = []
        for s in range(self.num_shards):
            try:
                with safe_open(self.shard_path(s), "pt") as shard:
                    parts.append(shard.get_tensor(name))
            except (SafetensorError, OSError) as err:
                raise SoIRError(
                    f"{self.shard_path(s)} is damaged ({type(err).__name__}: {err}); delete it and "
                    "rerun create_index.py with the same settings, which recomputes it"
                ) from None
        return torch.cat(parts)

    def load(self) -> tuple[torch.Tensor, torch.Tensor, dict[str, int]]:
        """All rows of the split: features [R, D], owner [R], and the summed shard stats."""
        self.check_complete()
        features, owners, stats = [], [], {}
        for s in range(self.num_shards):
            tensors = self.read(s)
            features.append(tensors["features"])
            owners.append(tensors["owner"])
            for key, value in tensors.items():
                if key.startswith("stat."):
                    stats[key[5:]] = stats.get(key[5:], 0) + int(value)
        return torch.cat(features), torch.cat(owners), stats

    # --- lazy reading: one shard (or a row range of it) at a time, never the whole split ----------
    def _open(self, shard: int):
        path = self.shard_path(shard)
        if not path.is_file():
            raise SoIRError(
                f"{path} is missing (shard {shard} of {self.num_shards}); rerun create_index.py "
                "with the same settings to compute it"
            )
        try:
            return safe_open(path, framework="pt")  # memory-maps the file; tensors are read on access
        except (SafetensorError, OSError) as err:
            raise SoIRError(
                f"{path} is damaged ({type(err).__name__}: {err}); delete it and rerun "
                "create_index.py with the same settings, which recomputes it"
            ) from None

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
        if (
            owner.dim() != 1
            or bool((owner[1:] < owner[:-1]).any())
            or (len(owner) and (int(owner[0]) < images.start or int(owner[-1]) >= images.stop))
        ):
            raise SoIRError(
                f"{self.shard_path(shard)}: owner must hold image ids {images.start}.."
                f"{images.stop - 1} in ascending order; the file is damaged or from another "
                f"run: delete it and rerun create_index.py"
            )
        return owner

    @contextmanager
    def mapped(self, shard: int) -> Iterator[torch.Tensor]:
        """features [R, D] float32 of one shard as a view of the memory-mapped file, valid inside the
        ``with`` only (do not keep it, or slices of it): pages are read on access, nothing is copied.
        Reading whole shards into fresh buffers instead fragments the heap when small results are kept
        between reads (+15 MB RSS per 15 MB shard, seen while sampling training rows)."""
        with self._open(shard) as f:
            yield f.get_slice("features")[:]

    def take(self, name: str, shard: int, rows: Sequence[int]) -> torch.Tensor:
        """Rows ``rows`` (ids within the shard) of one per-row tensor (``features``, ``mask_index``, ...)
        of one shard, copied; only those rows are read."""
        with self._open(shard) as f:
            column = f.get_slice(name)
            return torch.cat([column[int(r) : int(r) + 1] for r in rows])

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
            parts = [rows[int(a) : int(b)] for a, b in zip(starts, stops)]
            return torch.cat(parts) if len(parts) > 1 else parts[0].clone()


class ShardedRecords(Sequence[dict]):
    """The ``images.json`` records of a prepared split (``len`` = image count), read from the shards'
    ``jobs-<shard>.jsonl`` when indexed; the last shard read is kept."""

    def __init__(self, folder: Path, num_images: int, shard_size: int):
        self.folder, self.num_images, self.shard_size = Path(folder), num_images, shard_size
        self._shard, self._records = -1, []

    def __len__(self) -> int:
        return self.num_images

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        i = range(self.num_images)[i]  # IndexError outside, negative indices allowed
        shard = i // self.shard_size
        if shard != self._shard:
            shards = FeatureShards(self.folder, self, self.shard_size)
            self._records, self._shard = [line["record"] for line in shards.read_jobs(shard)], shard
        return self._records[i - shard * self.shard_size]


def _image_of(record: dict) -> tuple:
    """The part of an images.json record that determines the features: which file, under which key."""
    return record["key"], record["file"]


class FeaturesFolder:
    """A features folder for writing: SoIR-owned, locked, and holding one identity.

    ``with FeaturesFolder(root).open(gallery_identity, query_identity, config_yaml):`` claims the
    folder (a non-empty folder SoIR did not make is refused), takes its lock, refuses a gallery made
    with another identity (listing what changed), and empties the queries when only their identity
    changed (queries are few; a query-only change must not cost hours of gallery MI).
    """

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.lock = FolderLock(self.root)

    def open(self, gallery_identity: dict, query_identity: dict, config_yaml: str) -> "FeaturesFolder":
        claim_folder(self.root, "features")
        self.lock.__enter__()
        try:
            for folder in (self.root, self.root / "gallery", self.root / "queries"):
                remove_stale_temporaries(folder, root=self.root)  # of a killed run: never renamed
            self._check_gallery(gallery_identity)
            self._refresh_queries(query_identity)
            atomic_write_text(self.root / "config.yaml", config_yaml)
        except BaseException:
            self.lock.__exit__()
            raise
        return self

    def __enter__(self) -> "FeaturesFolder":
        return self

    def __exit__(self, *exc) -> None:
        self.lock.__exit__()

    def _check_gallery(self, identity: dict) -> None:
        saved = self.root / "identity.json"
        held = sorted(p.name for p in (self.root / "gallery").glob("*") if p.name != "identity.json")
        held += sorted(p.name for p in self.root.glob("index-*"))
        if not saved.exists() and held:
            # The identity is written before any feature: features without one cannot be matched to a
            # model or to images, so they are never adopted (they could be another model's).
            raise SoIRError(
                f"{self.root} holds features ({', '.join(held[:3])}{', ...' if len(held) > 3 else ''}) but no "
                "identity.json, so nothing says which model, settings and images made them; use another "
                f"features_dir, or delete {self.root} to compute them again"
            )
        check_identity(saved, identity, "features", fix="use another features_dir")

    def _refresh_queries(self, identity: dict) -> None:
        folder = self.root / "queries"
        saved = folder / "identity.json"
        if saved.exists():
            old = read_json(saved, fix=f"delete {saved} (the queries are recomputed)") if saved.stat().st_size else {}
            changed = changed_keys(old, identity)
            if not changed:
                return
            log.warning("query settings or inputs changed (%s): recomputing the query features", ", ".join(changed))
        had_identity = saved.exists()
        removed = remove_own_files(folder, SPLIT_FILES, root=self.root)
        if any(p.name != "identity.json" for p in removed) and not had_identity:
            log.warning("%s held query shards without an identity: recomputing them", folder)
        atomic_write_json(saved, identity)


def write_bad_images(root: Path, skipped: list[tuple[str, str, str]]) -> None:
    """``bad_images.txt``: one "split<TAB>key<TAB>reason" line per image skipped (bad_images=skip)."""
    atomic_write_text(root / "bad_images.txt", "".join(f"{s}\t{k}\t{r}\n" for s, k, r in skipped))
