"""scripts/export_features.py and search=lancedb (utils/results/interop.py) on the demo set with Mask Inversion
features (several vectors per gallery image): embedding-reader reads the export back as written, a
FAISS index over what it reads finds SoIR's top-1 for every query, and LanceDB's multivector search
ranks like search=exact."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import faiss
import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from safetensors.torch import load_file

from datasets.captions import load_captions
from tests.pipeline import ROOT, compose_config, features_dir_from, run_main
from utils.errors import SoIRError
from utils.pipeline.search import search
from utils.results.interop import LANCEDB_TABLE, export_embeddings, export_lancedb, import_lancedb

META = ["image_path", "key", "image_index", "object", "bbox", "mask_rle", "score", "ins"]


@pytest.fixture(scope="module")
def mi_demo(tiny_model_dirs, demo_dir, tmp_path_factory) -> Path:
    """Features folder of tiny-SigLIP MI on the demo set (ground-truth masks, 3-7 per gallery image,
    5 images per shard)."""
    cwd = tmp_path_factory.mktemp("mi_demo")
    proc = run_main(
        "create_index.py",
        "extractor=siglip_mi_features",
        f"model_name={tiny_model_dirs['siglip']}",
        "vec_dim=32",
        f"anns_file={demo_dir / 'anns.pt'}",
        f"captions_file={demo_dir / 'captions.pt'}",
        "mi_iterations=2",
        "mask_input=true",
        "num_workers=0",
        "shard_size=5",
        "only_create=true",
        cwd=cwd,
    )
    return features_dir_from(proc, cwd)


def config(*overrides: str):
    return compose_config(*overrides)


def split_rows(folder: Path, split: str) -> dict[str, torch.Tensor]:
    shards = [load_file(p) for p in sorted((folder / split).glob("shard-*.safetensors"))]
    return {k: torch.cat([s[k] for s in shards]) for k in ("features", "owner", "mask_index")}


def read_back(base: Path) -> tuple[np.ndarray, dict]:
    """Every vector and metadata row of an embeddings export split, as embedding-reader gives them."""
    from embedding_reader import EmbeddingReader

    reader = EmbeddingReader(
        str(base / "img_emb"), file_format="parquet_npy", metadata_folder=str(base / "metadata"), meta_columns=META
    )
    vectors, meta = zip(*reader(batch_size=reader.count, start=0, end=reader.count, show_progress=False))
    table = {c: [v for m in meta for v in m[c].tolist()] for c in META}
    return np.concatenate(vectors), table


def test_embeddings_export_reads_back_and_faiss_top1_is_soirs(mi_demo, demo_dir, tmp_path):
    out = tmp_path / "export"
    summary = export_embeddings(config("format=embeddings", f"export_dir={out}"), mi_demo, out)
    assert summary["written"] == 4 + 1 and summary["kept"] == 0  # 16 gallery images / 5 per shard; 4 queries

    vectors, meta = read_back(out)
    gallery = json.loads((mi_demo / "gallery" / "images.json").read_text())
    rows = split_rows(mi_demo, "gallery")
    assert vectors.dtype == np.float32 and np.array_equal(vectors, rows["features"].numpy())
    assert meta["image_index"] == rows["owner"].tolist() and meta["object"] == rows["mask_index"].tolist()
    assert meta["image_path"] == [gallery[i]["file"] for i in rows["owner"].tolist()]
    assert [list(v) for v in meta["ins"]] == [gallery[i]["ins"] for i in rows["owner"].tolist()]
    captions = load_captions(demo_dir / "captions.pt")
    assert min(meta["object"]) >= 0 and len(vectors) > len(gallery)  # one MI vector per mask
    for key, obj, bbox, rle, score in zip(meta["key"], meta["object"], meta["bbox"], meta["mask_rle"], meta["score"]):
        entry = captions[key]
        assert np.array_equal(mask_utils.decode(json.loads(rle)).astype(bool), entry.masks()[obj])
        assert list(bbox) == entry.bboxes[obj] and score == pytest.approx(entry.scores[obj])
    import pyarrow.parquet as pq

    soir = json.loads(pq.read_schema(out / "metadata" / "metadata_00000.parquet").metadata[b"soir"])
    assert soir["identity"] == json.loads((mi_demo / "identity.json").read_text())

    # FAISS over what embedding-reader read: each query's top-1 image is SoIR's (exact search).
    query_vectors, query_meta = read_back(out / "queries")
    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(vectors)
    scores, found = index.search(query_vectors, 1)
    best: dict[str, tuple[float, str]] = {}
    for key, score, row in zip(query_meta["key"], scores[:, 0], found[:, 0]):
        if key not in best or score > best[key][0]:
            best[key] = (float(score), meta["key"][row])
    results = search(config(f"features_dir={mi_demo}", "report=false", "k_search=2"), mi_demo, tmp_path / "run")
    rankings = [json.loads(line) for line in (tmp_path / "run" / "rankings.jsonl").read_text().splitlines()]
    assert len(rankings) == results["num_queries"] == len(best) == 4
    for r in rankings:
        assert r["ranking"][0][1] - r["ranking"][1][1] > 1e-6  # no tie at the top: top-1 is well defined
        assert best[r["query"]][1] == r["ranking"][0][0]


def test_embeddings_export_resumes_float16_and_refuses_foreign_folders(mi_demo, tmp_path):
    out = tmp_path / "export"
    cfg = config("format=embeddings", "export_dtype=float16")
    export_embeddings(cfg, mi_demo, out)
    kept = (out / "img_emb" / "img_emb_00000.npy").stat().st_mtime_ns
    (out / "metadata" / "metadata_00002.parquet").unlink()  # as a run killed between its two files
    summary = export_embeddings(cfg, mi_demo, out)
    assert summary["written"] == 1 and summary["kept"] == 4
    assert (out / "img_emb" / "img_emb_00000.npy").stat().st_mtime_ns == kept
    assert np.load(out / "img_emb" / "img_emb_00002.npy").dtype == np.float16
    vectors, _ = read_back(out)  # embedding-reader hands float16 files out as float32
    assert np.array_equal(vectors, split_rows(mi_demo, "gallery")["features"].numpy().astype(np.float16))
    with pytest.raises(SoIRError, match=r"other settings or inputs \(dtype: 'float16' -> 'float32'\)"):
        export_embeddings(config("format=embeddings"), mi_demo, out)
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("user data")
    with pytest.raises(SoIRError, match="not made by SoIR"):
        export_embeddings(cfg, mi_demo, foreign)
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]


def test_lancedb_search_equals_exact_and_export_resumes(mi_demo, tmp_path):
    copy = tmp_path / "features"  # the default export location is inside the features folder
    shutil.copytree(mi_demo, copy)
    with pytest.raises(SoIRError, match="holds no LanceDB export"):
        search(config(f"features_dir={copy}", "report=false", "search=lancedb"), copy, tmp_path / "none")
    out = copy / "export" / "lancedb"
    cfg = config(f"features_dir={copy}", "format=lancedb")
    assert export_lancedb(cfg, copy, out)["images"] == 16

    # A run killed inside a shard: its table rows are deleted and added again, never twice.
    table = import_lancedb().connect(out / "db").open_table(LANCEDB_TABLE)
    table.delete("image_index = 7")
    summary = export_lancedb(cfg, copy, out)
    assert summary["written"] == 1 and summary["kept"] == 3 and summary["images"] == 16
    stored = import_lancedb().connect(out / "db").open_table(LANCEDB_TABLE).to_arrow()  # a fresh handle
    assert sorted(stored["image_index"].to_pylist()) == list(range(16))
    rows = split_rows(copy, "gallery")
    for image, vectors, objects in zip(
        stored["image_index"].to_pylist(), stored["vectors"].to_pylist(), stored["objects"].to_pylist()
    ):
        mine = rows["owner"] == image
        assert np.array_equal(np.array(vectors, dtype=np.float32), rows["features"][mine].numpy())
        assert objects == rows["mask_index"][mine].tolist()

    k = ["k_search=16", "report=false"]
    exact = search(config(f"features_dir={copy}", *k), copy, tmp_path / "exact")
    lance = search(config(f"features_dir={copy}", "search=lancedb", *k), copy, tmp_path / "lance")
    assert lance["search"] == "lancedb" and lance["lancedb_dir"] == str(out)
    for key in ("mAP", "recall", "precision", "num_queries", "num_gallery_images"):
        assert lance[key] == pytest.approx(exact[key], abs=1e-6), key
    for a, b in zip(*((tmp_path / r / "rankings.jsonl").read_text().splitlines() for r in ("exact", "lance"))):
        a, b = json.loads(a)["ranking"], json.loads(b)["ranking"]
        assert np.allclose([s for _, s in a], [s for _, s in b], atol=1e-6)
        # Same order, except within groups of images whose scores lie within float rounding (1e-5).
        scores = np.array([s for _, s in a])
        breaks = np.flatnonzero(np.diff(scores) < -1e-5) + 1
        for lo, hi in zip(np.r_[0, breaks], np.r_[breaks, len(a)]):
            assert {key for key, _ in a[lo:hi]} == {key for key, _ in b[lo:hi]}


def test_adhoc_image_query_through_lancedb_ranks_as_exact(mi_demo, demo_dir, tmp_path):
    """search_index.py query_image=... search=lancedb: the same top images and scores as the exact search."""
    from datasets import load_anns
    from utils.queries.own_queries import own_query

    copy = tmp_path / "features"
    shutil.copytree(mi_demo, copy)
    export_lancedb(config("format=lancedb"), copy, copy / "export" / "lancedb")
    query = next(a for a in load_anns(demo_dir / "anns.pt") if a.is_query)
    bbox = "[" + ",".join(str(v) for v in query.bbox) + "]"
    common = [f"features_dir={copy}", f"query_image={query.file}", f"query_bbox={bbox}", "k_search=16", "report=false"]
    exact = own_query(config(*common), copy, tmp_path / "exact")
    lance = own_query(config(*common, "search=lancedb"), copy, tmp_path / "lance")
    assert lance["search"].startswith("LanceDB table") and exact["search"].startswith("exact")
    assert len(lance["ranking"]) == len(exact["ranking"]) == 16
    scores = np.array([r["score"] for r in exact["ranking"]])
    assert np.allclose(scores, [r["score"] for r in lance["ranking"]], atol=1e-6)
    breaks = np.flatnonzero(np.diff(scores) < -1e-5) + 1
    for lo, hi in zip(np.r_[0, breaks], np.r_[breaks, len(scores)]):
        assert {r["key"] for r in exact["ranking"][lo:hi]} == {r["key"] for r in lance["ranking"][lo:hi]}


def test_qdrant_example_of_the_docs_ranks_as_exact(mi_demo, tmp_path):
    """docs/interop.md's Qdrant block (run as written): MaxSim over an image's vectors = SoIR's image score.
    qdrant-client is pinned in requirements-interop.txt: without it this test fails, never skips.
    Fails on 23ee6a3 where qdrant_client cannot be imported (it skipped)."""
    import re

    import qdrant_client  # noqa: F401  (the docs' block imports it; a missing package is an error here)

    text = (ROOT / "docs" / "interop.md").read_text()
    block = re.search(r"<!-- qdrant-example -->\n```python\n(.*?)```", text, flags=re.S).group(1)
    export = tmp_path / "export"
    export_embeddings(config("format=embeddings"), mi_demo, export)
    query_vectors, query_meta = read_back(export / "queries")
    search(config(f"features_dir={mi_demo}", "report=false", "k_search=16"), mi_demo, tmp_path / "run")
    rankings = {
        r["query"]: r["ranking"]
        for r in map(json.loads, (tmp_path / "run" / "rankings.jsonl").read_text().splitlines())
    }
    namespace = {"export": str(export), "qdrant_path": str(tmp_path / "qdrant"), "query_vector": query_vectors[0]}
    exec(block, namespace)
    client = namespace["client"]
    for vector, key in zip(query_vectors, query_meta["key"]):  # one vector per demo query (mask_input)
        hits = client.query_points("gallery", query=[vector.tolist()], limit=16).points
        exact = rankings[key]
        assert np.allclose([h.score for h in hits], [s for _, s in exact], atol=1e-5)
        scores = np.array([s for _, s in exact])
        breaks = np.flatnonzero(np.diff(scores) < -1e-5) + 1
        for lo, hi in zip(np.r_[0, breaks], np.r_[breaks, len(scores)]):
            assert {h.payload["key"] for h in hits[lo:hi]} == {k for k, _ in exact[lo:hi]}
    assert len(namespace["hits"]) == 10
