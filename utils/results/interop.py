"""SoIR features in the formats other retrieval tools read (``scripts/export_features.py``), and
``search=lancedb`` (search_index.py) through the exported LanceDB table.

Two targets, both written into a folder SoIR owns (:func:`utils.files.claim_folder`, kind "export"),
locked while written, resumable feature shard by feature shard, refused when it holds an export of
other features (``identity.json``: the features' identities, the format, the dtype):

``format=embeddings``: the clip-retrieval / autofaiss layout, which ``embedding-reader`` reads
(``file_format="parquet_npy"``)::

    img_emb/img_emb_00000.npy          [R_s, D] float32 | float16 (export_dtype), the rows of feature shard s
    metadata/metadata_00000.parquet    one row per vector, same order (columns: :data:`ROW_COLUMNS`),
                                       the features' identity in the schema metadata (key b"soir")
    queries/img_emb/, queries/metadata/    the same for the queries (their masks columns are null)

``format=lancedb``: an embedded LanceDB database (``lancedb.connect(<folder>)``, no server) with a
table ``gallery``: one row per gallery image, its vectors in the multivector column ``vectors``
(list of fixed-size lists), per vector its ``objects`` / ``bboxes`` / ``mask_rles`` / ``scores``, and
the image's ``key``, ``image_path``, ``image_index``, ``ins``, ``obj_name``. LanceDB's multivector
search with one query vector scores a row by the max cosine over its vectors: for SoIR's unit
vectors, exactly the image-level rule (an image's score is its best object's inner product).

File numbers are feature shard numbers (zero-padded, so the name order embedding-reader sorts by is
the row order); a shard whose images own no rows writes no file.
"""

from __future__ import annotations

import json
import logging
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf

from datasets.captions import ImageMasks, decode_mask, encode_mask
from utils.errors import SoIRError
from utils.files import FolderLock, atomic_write, atomic_write_json, check_identity, claim_folder, read_json
from utils.retrieval.feature_store import FeatureShards

log = logging.getLogger("soir.interop")

# Columns of the metadata parquet files (one row per vector) and, as lists, of the LanceDB table.
ROW_COLUMNS = ("image_path", "key", "image_index", "object", "bbox", "mask_rle", "score", "ins", "obj_name")
LANCEDB_TABLE = "gallery"


@contextmanager
def soir_datasets_hidden():
    """SoIR's top-level package ``datasets`` has the name of HuggingFace's: lancedb registers converters
    for HF datasets (``from datasets import Dataset``) whenever a module of that name is loaded, at its
    import and at every ``create_table`` / ``add``, and fails on ours. Ours is out of ``sys.modules``
    for those calls only and put back after (lancedb itself is not changed)."""
    ours = sys.modules.pop("datasets", None)
    try:
        yield
    finally:
        if ours is not None:
            sys.modules["datasets"] = ours


def import_lancedb():
    """``lancedb``, imported without tripping over SoIR's ``datasets`` package (see above)."""
    with soir_datasets_hidden():
        import lancedb
    return lancedb


def row_schema():
    """pyarrow schema of the metadata parquet files (explicit: a column of nulls keeps its type)."""
    import pyarrow as pa

    return pa.schema(
        [
            ("image_path", pa.string()),
            ("key", pa.string()),
            ("image_index", pa.int64()),
            ("object", pa.int64()),
            ("bbox", pa.list_(pa.float64())),
            ("mask_rle", pa.string()),
            ("score", pa.float64()),
            ("ins", pa.list_(pa.int64())),
            ("obj_name", pa.string()),
        ]
    )


def export_dir(cfg: DictConfig, features_dir: Path) -> Path:
    """``export_dir``, or ``<features_dir>/export/<format>`` (a SoIR-owned sub-folder)."""
    return Path(cfg.export_dir) if cfg.export_dir else features_dir / "export" / str(cfg.format)


def open_features(features_dir: Path) -> tuple[DictConfig, dict[str, FeatureShards]]:
    """The config a features folder was made with and its complete splits (gallery, queries if any)."""
    if not (features_dir / "config.yaml").is_file():
        raise SoIRError(f"{features_dir} has no config.yaml: not a create_index.py output folder; give features_dir=")
    made_with = OmegaConf.load(features_dir / "config.yaml")
    splits = {}
    for name in ("gallery", "queries"):
        listing = features_dir / name / "images.json"
        if name == "queries" and made_with.get("only_gallery"):
            continue
        if not listing.is_file():
            raise SoIRError(f"{listing} is missing: the extraction did not finish; rerun create_index.py, it resumes")
        records = read_json(listing, fix="rerun create_index.py with the same settings")
        splits[name] = FeatureShards(features_dir / name, records, made_with.shard_size)
        splits[name].check_complete()
    return made_with, splits


def features_identity(features_dir: Path) -> dict:
    """The identities of a features folder's gallery and queries (what an export of it depends on)."""
    identity = {"gallery": read_json(features_dir / "identity.json", fix="rerun create_index.py")}
    queries = features_dir / "queries" / "identity.json"
    if queries.is_file():
        identity["queries"] = read_json(queries, fix="rerun create_index.py")
    return identity


def gallery_masks(features_dir: Path, made_with: DictConfig) -> tuple[dict[str, ImageMasks] | None, str]:
    """The masks the gallery features were made with (checked by sha256 against ``sources.json``), or
    None and why not: the report's reader (utils.results.report.report_captions), one implementation."""
    from utils.results.report import report_captions  # the report module pulls in Pillow drawing; only when exporting

    return report_captions(features_dir, made_with)


def row_metadata(
    records: list[dict], owner: np.ndarray, mask_index: np.ndarray, masks: dict[str, ImageMasks] | None
) -> dict[str, list]:
    """Columns :data:`ROW_COLUMNS` of rows owned by ``owner`` [R] (image ids into ``records``) with
    ``mask_index`` [R] (-1: a global vector). ``bbox`` [x1, y1, x2, y2] pixels, ``mask_rle`` (COCO
    compressed RLE as JSON ``{"counts", "size"}``) and ``score`` (detector score) come from ``masks``;
    null for a global vector or when ``masks`` is None."""
    columns: dict[str, list] = {name: [] for name in ROW_COLUMNS}
    for image, obj in zip(owner.tolist(), mask_index.tolist()):
        record = records[image]
        entry = masks.get(record["key"]) if masks is not None and obj >= 0 else None
        if entry is not None and obj >= len(entry):
            raise SoIRError(
                f"{record['key']}: a feature row is of mask {obj}, its captions entry has {len(entry)} masks; "
                "the masks file does not match the features (rerun create_index.py)"
            )
        columns["image_path"].append(record["file"])
        columns["key"].append(record["key"])
        columns["image_index"].append(image)
        columns["object"].append(obj)
        columns["ins"].append([int(i) for i in record["ins"]])
        columns["obj_name"].append(record.get("obj_name"))
        columns["bbox"].append([float(v) for v in entry.bboxes[obj]] if entry is not None else None)
        columns["mask_rle"].append(json.dumps(coco_rle(entry.masks_rle[obj])) if entry is not None else None)
        columns["score"].append(float(entry.scores[obj]) if entry is not None and entry.scores else None)
    return columns


def coco_rle(rle: dict) -> dict:
    """A mask's RLE as COCO compressed RLE with ``str`` counts (the original code's row-major list RLE
    is decoded and re-encoded, so every exported mask reads with ``pycocotools.mask.decode``)."""
    if isinstance(rle["counts"], list):
        return encode_mask(decode_mask(rle))
    counts = rle["counts"]
    return {"counts": counts.decode() if isinstance(counts, bytes) else counts, "size": [int(s) for s in rle["size"]]}


class ExportFolder:
    """An export folder: claimed (kind "export"), locked, and tied to one features folder's identity."""

    def __init__(self, out: Path, identity: dict):
        self.out, self.identity = out, identity
        self.lock = FolderLock(out)

    def __enter__(self) -> "ExportFolder":
        claim_folder(self.out, "export")
        self.lock.__enter__()
        try:
            check_identity(self.out / "identity.json", self.identity, "an export", fix="use another export_dir")
        except BaseException:
            self.lock.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.lock.__exit__()


def export_embeddings(cfg: DictConfig, features_dir: Path, out: Path) -> dict:
    """``format=embeddings`` (module doc). Returns the summary (also written as ``summary.json``)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    made_with, splits = open_features(features_dir)
    dtype = np.dtype(str(cfg.export_dtype))
    identity = {"format": "embeddings", "dtype": dtype.name, "features": features_identity(features_dir)}
    masks, why_not = gallery_masks(features_dir, made_with)
    summary = {"features_dir": str(features_dir), "dtype": dtype.name, "written": 0, "kept": 0, "rows": {}}
    with ExportFolder(out, identity):
        for name, shards in splits.items():
            base = out if name == "gallery" else out / "queries"
            split_masks = masks if name == "gallery" else None
            schema_metadata = {
                b"soir": json.dumps(
                    {
                        "split": name,
                        "features_dir": str(features_dir),
                        "identity": identity["features"][name],
                        "extractor": made_with.extractor,
                        "masks": "from the features' masks file" if split_masks is not None else why_not,
                    },
                    sort_keys=True,
                ).encode()
            }
            summary["rows"][name] = 0
            for shard in range(shards.num_shards):
                npy = base / "img_emb" / f"img_emb_{shard:05d}.npy"
                parquet = base / "metadata" / f"metadata_{shard:05d}.parquet"
                rows = shards.row_count(shard)
                summary["rows"][name] += rows
                if rows == 0:
                    continue
                if npy.is_file() and parquet.is_file():  # the parquet is written last: both = complete
                    summary["kept"] += 1
                    continue
                tensors = shards.read(shard)
                owner, mask_index = tensors["owner"].numpy(), tensors["mask_index"].numpy()
                columns = row_metadata(list(shards.records), owner, mask_index, split_masks)
                table = pa.table(columns, schema=row_schema().with_metadata(schema_metadata))
                atomic_write(npy, lambda handle: np.save(handle, tensors["features"].numpy().astype(dtype)))
                atomic_write(parquet, lambda handle: pq.write_table(table, handle))
                summary["written"] += 1
        if masks is None:
            log.warning("gallery rows have no bbox / mask_rle / score: %s", why_not)
            summary["no_masks_because"] = why_not
        atomic_write_json(out / "summary.json", summary)
    return summary


def export_lancedb(cfg: DictConfig, features_dir: Path, out: Path) -> dict:
    """``format=lancedb`` (module doc): the gallery as table ``gallery`` of the database in ``out``.

    Resumable: images already in the table are kept; a feature shard found partly added (a run killed
    during ``add``) has its rows deleted and added again, so no image is ever in the table twice."""
    import pyarrow as pa

    lancedb = import_lancedb()
    made_with, splits = open_features(features_dir)
    shards = splits["gallery"]
    dtype = np.dtype(str(cfg.export_dtype))
    identity = {"format": "lancedb", "dtype": dtype.name, "features": features_identity(features_dir)}
    masks, why_not = gallery_masks(features_dir, made_with)
    value = pa.float16() if dtype == np.float16 else pa.float32()
    schema = pa.schema(
        [
            ("key", pa.string()),
            ("image_path", pa.string()),
            ("image_index", pa.int64()),
            ("ins", pa.list_(pa.int64())),
            ("obj_name", pa.string()),
            ("vectors", pa.list_(pa.list_(value, int(made_with.vec_dim)))),
            ("objects", pa.list_(pa.int64())),
            ("bboxes", pa.list_(pa.list_(pa.float64()))),
            ("mask_rles", pa.list_(pa.string())),
            ("scores", pa.list_(pa.float64())),
        ],
        metadata={b"soir": json.dumps({"identity": identity["features"]["gallery"]}, sort_keys=True).encode()},
    )
    summary = {"features_dir": str(features_dir), "dtype": dtype.name, "written": 0, "kept": 0}
    with ExportFolder(out, identity):
        db = lancedb.connect(out / "db")
        if LANCEDB_TABLE in db.list_tables().tables:
            table = db.open_table(LANCEDB_TABLE)
            # The images already added (a scan of one column, not of the vectors).
            present = set(table.search().select(["image_index"]).limit(None).to_arrow()["image_index"].to_pylist())
        else:
            with soir_datasets_hidden():
                table, present = db.create_table(LANCEDB_TABLE, schema=schema), set()
        for shard in range(shards.num_shards):
            tensors = shards.read(shard)
            owner = tensors["owner"].numpy()
            images = np.unique(owner).tolist()
            if not images or all(i in present for i in images):
                summary["kept"] += bool(images)
                continue
            first, stop = shards.image_range(shard).start, shards.image_range(shard).stop
            if any(i in present for i in images):
                table.delete(f"image_index >= {first} AND image_index < {stop}")
            columns = row_metadata(list(shards.records), owner, tensors["mask_index"].numpy(), masks)
            features = tensors["features"].numpy().astype(dtype)
            starts = np.searchsorted(owner, images, side="left")
            ends = np.searchsorted(owner, images, side="right")
            per_image = {
                "key": [columns["key"][s] for s in starts],
                "image_path": [columns["image_path"][s] for s in starts],
                "image_index": images,
                "ins": [columns["ins"][s] for s in starts],
                "obj_name": [columns["obj_name"][s] for s in starts],
                # [images] lists of [vectors, D] rows, from the shard's buffer (no Python floats).
                "vectors": pa.ListArray.from_arrays(
                    pa.array(np.r_[starts, ends[-1:]].astype(np.int32)),
                    pa.FixedSizeListArray.from_arrays(pa.array(features.ravel()), features.shape[1]),
                ),
                "objects": [columns["object"][s:e] for s, e in zip(starts, ends)],
                "bboxes": [columns["bbox"][s:e] for s, e in zip(starts, ends)],
                "mask_rles": [columns["mask_rle"][s:e] for s, e in zip(starts, ends)],
                "scores": [columns["score"][s:e] for s, e in zip(starts, ends)],
            }
            with soir_datasets_hidden():
                table.add(pa.table(per_image, schema=schema))
            summary["written"] += 1
        summary["images"] = table.count_rows()
        if masks is None:
            log.warning("gallery rows have no bbox / mask_rle / score: %s", why_not)
            summary["no_masks_because"] = why_not
        atomic_write_json(out / "summary.json", summary)
    return summary


def lancedb_folder(cfg: DictConfig, features_dir: Path) -> Path:
    """``lancedb_dir``, or the default ``format=lancedb`` export folder of ``features_dir``."""
    return Path(cfg.lancedb_dir) if cfg.lancedb_dir else features_dir / "export" / "lancedb"


class LanceDBGallery:
    """The ``gallery`` table of a ``format=lancedb`` export, checked against the features folder it is
    searched with (its identity), scoring query vectors image by image."""

    def __init__(self, folder: Path, features_dir: Path):
        lancedb = import_lancedb()
        self.folder = folder
        saved = folder / "identity.json"
        if not saved.is_file():
            raise SoIRError(
                f"{folder} holds no LanceDB export; run python scripts/export_features.py "
                f"features_dir={features_dir} format=lancedb (or set lancedb_dir=)"
            )
        identity = read_json(saved, fix=f"delete {folder} and export again")
        if identity.get("format") != "lancedb" or identity.get("features") != features_identity(features_dir):
            raise SoIRError(
                f"{folder} was exported from other features than {features_dir} (identity differs); export "
                f"again: python scripts/export_features.py features_dir={features_dir} format=lancedb"
            )
        db = lancedb.connect(folder / "db")
        if LANCEDB_TABLE not in db.list_tables().tables:
            raise SoIRError(f"{folder}/db has no table {LANCEDB_TABLE!r}: the export did not finish; rerun it")
        self.table = db.open_table(LANCEDB_TABLE)
        self.num_images = self.table.count_rows()

    def search_row(self, row: np.ndarray, limit: int) -> tuple[list[str], np.ndarray]:
        """The ``limit`` best gallery images for one query vector ``row`` [D]: their keys and scores
        (1 - LanceDB's cosine distance = the best inner product over the image's unit vectors)."""
        found = (
            self.table.search(row.astype(np.float32), vector_column_name="vectors")
            .distance_type("cosine")
            .bypass_vector_index()  # exact: every row scored, whatever index the table has
            .select(["key"])
            .limit(limit)
            .to_arrow()
        )
        return found["key"].to_pylist(), 1.0 - found["_distance"].to_numpy().astype(np.float32)

    def top_images(self, query_rows: np.ndarray, k: int) -> tuple[list[str], np.ndarray]:
        """The ``k`` best gallery images for one query of rows ``query_rows`` [Rq, D] (an image's score: the
        max over the query's rows), best first; ties in key order."""
        best: dict[str, float] = {}
        for row in query_rows:
            for key, score in zip(*self.search_row(row, k)):
                best[key] = max(best.get(key, -np.inf), float(score))
        ranked = sorted(best.items(), key=lambda item: (-item[1], item[0]))[:k]
        return [key for key, _ in ranked], np.array([score for _, score in ranked], dtype=np.float32)

    def image_scores(self, query_rows: np.ndarray, query_owner: np.ndarray, num_queries: int, keys: list[str]):
        """[num_queries, len(keys)] float32: per query image the max over its rows ``query_rows`` [Rq, D]
        (owned by ``query_owner`` [Rq] in [0, num_queries)) of LanceDB's multivector score 1 - cosine
        distance, for the gallery images named ``keys`` (in that order). Every one of them must be in the
        table (else the export is incomplete: SoIRError)."""
        column = {key: i for i, key in enumerate(keys)}
        scores = np.full((num_queries, len(keys)), -np.inf, dtype=np.float32)
        for row, query in zip(query_rows, query_owner.tolist()):
            found, values = self.search_row(row, self.num_images)
            # Images of the table that are not evaluated (e.g. left out with set=) are skipped.
            kept = np.array([key in column for key in found], dtype=bool)
            ids = np.array([column[key] for key in found if key in column], dtype=np.int64)
            scores[query, ids] = np.maximum(scores[query, ids], values[kept])
        if not np.isfinite(scores).all():
            missing = [keys[i] for i in np.flatnonzero(~np.isfinite(scores).all(0))[:5]]
            raise SoIRError(
                f"the LanceDB table lacks gallery images {missing}: the export is incomplete; rerun "
                "scripts/export_features.py format=lancedb with the same features_dir"
            )
        return scores
