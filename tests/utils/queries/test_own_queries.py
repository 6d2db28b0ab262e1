"""Your own queries (utils/queries/own_queries.py through search_index.py): ad-hoc image and text queries, T2I.

Each ad-hoc result is checked against what create_index.py + search_index.py computed for the same query,
or against an independent computation from the stored shards (numpy, sklearn)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from safetensors.torch import load_file
from sklearn.metrics import average_precision_score

from datasets import load_captions, save_anns
from tests.pipeline import features_dir_from, read_results, results_dir_from, run_main
from tests.utils.results.test_report import parse
from utils.errors import SoIRError


def _split(folder: Path, name: str) -> tuple[list[dict], np.ndarray, np.ndarray, np.ndarray]:
    """(records, features [R, D], owner [R], mask_index [R]) of one split, read from its shards."""
    shards = [load_file(p) for p in sorted((folder / name).glob("shard-*.safetensors"))]
    records = json.loads((folder / name / "images.json").read_text())
    return records, *(torch.cat([s[k] for s in shards]).numpy() for k in ("features", "owner", "mask_index"))


def _image_scores(query: np.ndarray, folder: Path) -> tuple[list[dict], np.ndarray]:
    """Independent image-level scores of query rows [Rq, D] against the stored gallery: max over rows."""
    gallery, features, owner, _ = _split(folder, "gallery")
    per_row = (query @ features.T).max(0)
    scores = np.full(len(gallery), -np.inf)
    np.maximum.at(scores, owner, per_row)
    return gallery, scores


def _adhoc(folder: Path, cwd: Path, *overrides: str, check: bool = True):
    proc = run_main("search_index.py", f"features_dir={folder}", "device=cpu", *overrides, cwd=cwd, check=check)
    if not check:
        return proc
    run = results_dir_from(proc)
    return proc, run, json.loads((run / "results.json").read_text())


@pytest.fixture(scope="module")
def named_anns(demo_dir, tmp_path_factory) -> Path:
    """The demo's anns with obj_names a tiny CLIP tokenizer spells (letters: "blob checker")."""
    anns = torch.load(demo_dir / "anns.pt", weights_only=True)
    for entry in anns.values():
        if entry.get("obj_name"):
            entry["obj_name"] = " ".join(entry["obj_name"].split("_")[2:])
    return save_anns(anns, tmp_path_factory.mktemp("named") / "anns.pt")


@pytest.fixture(scope="module")
def crop_folder(tiny_model_dirs, demo_dir, named_anns, tmp_path_factory):
    """Tiny CLIP global embeddings; queries: the square crop around their bbox (the default)."""
    cwd = tmp_path_factory.mktemp("own_crop")
    proc = run_main(
        "create_index.py",
        "extractor=clip_features",
        f"model_name={tiny_model_dirs['clip']}",
        "vec_dim=24",
        f"anns_file={named_anns}",
        "dataset=demo",
        f"galleries_dir={demo_dir}",
        f"queries_dir={demo_dir}",
        "num_workers=0",
        "shard_size=5",
        "report=false",
        "device=cpu",
        cwd=cwd,
    )
    return cwd, features_dir_from(proc, cwd), results_dir_from(proc)


@pytest.fixture(scope="module")
def mi_folder(tiny_model_dirs, demo_dir, tmp_path_factory):
    """Tiny SigLIP Mask Inversion; queries: MI with their mask on the image with the background zeroed."""
    cwd = tmp_path_factory.mktemp("own_mi")
    proc = run_main(
        "create_index.py",
        "extractor=siglip_mi_features",
        f"model_name={tiny_model_dirs['siglip']}",
        "vec_dim=32",
        f"anns_file={demo_dir / 'anns.pt'}",
        f"captions_file={demo_dir / 'captions.pt'}",
        "mask_input=true",
        "mi_iterations=3",
        "num_workers=0",
        "report=false",
        "device=cpu",
        cwd=cwd,
    )
    return cwd, features_dir_from(proc, cwd), results_dir_from(proc)


def test_an_anns_query_asked_ad_hoc_gives_its_vector_and_its_ranking(crop_folder):
    cwd, folder, search_run = crop_folder
    queries, query_features, query_owner, _ = _split(folder, "queries")
    _, rankings = read_results(search_run)
    for q in (0, 2):
        record = queries[q]
        _, run, results = _adhoc(
            folder,
            cwd,
            f"query_image={record['file']}",
            f"query_bbox=[{','.join(map(str, record['bbox']))}]",
            "k_search=7",
        )
        vector = load_file(run / "query.safetensors")["features"].numpy()
        np.testing.assert_allclose(vector, query_features[query_owner == q], atol=1e-6, rtol=0)
        stored = next(line for line in rankings if line["query"] == record["key"])["ranking"][:7]
        assert [hit["key"] for hit in results["ranking"]] == [key for key, _ in stored]
        assert [hit["score"] for hit in results["ranking"]] == pytest.approx([s for _, s in stored], abs=1e-5)
        assert results["embedded_as"] == "global embedding of its square crop around query_bbox"
        assert results["search"].startswith("exact") and results["metrics"] is None
        line = json.loads((run / "rankings.jsonl").read_text())
        assert [key for key, _ in line["ranking"]] == [key for key, _ in stored]
        # The page: one query, its picture and crop, grey frames, and why there are no metrics.
        page = parse(run / "report.html")
        assert len(page.sections) == 1 and len(page.sections[0]["pictures"]) == 2
        hits = page.sections[0]["hits"]
        assert [h["data-gallery"] for h in hits] == [
            key for key, _ in next(r for r in rankings if r["query"] == record["key"])["ranking"][:10]
        ]
        assert all("unknown" in h["classes"] and "pos" not in h["classes"] for h in hits)
        assert any("No metrics: an ad-hoc query has no ground truth" in note for note in page.notes)
        assert "Metrics (%)" not in (run / "report.html").read_text()


def test_the_faiss_path_gives_the_exact_ranking(crop_folder):
    cwd, folder, _ = crop_folder
    record = _split(folder, "queries")[0][1]
    box = f"query_bbox=[{','.join(map(str, record['bbox']))}]"
    _, _, exact = _adhoc(folder, cwd, f"query_image={record['file']}", box, "k_search=5", "report=false")
    proc, _, candidates = _adhoc(
        folder, cwd, f"query_image={record['file']}", box, "k_search=5", "report=false", "query_exact_max_rows=3"
    )
    assert candidates["search"].startswith("FAISS Flat candidates") and exact["search"].startswith("exact")
    assert candidates["ranking"] == exact["ranking"]
    lines = proc.stdout.splitlines()  # the printed table: rank, score, key
    table = lines[lines.index(f"{'rank':>4}  {'score':>8}  gallery image") + 1 :][:5]
    assert [line.split() for line in table] == [
        [str(h["rank"]), f"{h['score']:.4f}", h["key"]] for h in exact["ranking"]
    ]


def test_a_mask_on_a_folder_of_crops_gives_the_crop_of_its_box(crop_folder, demo_dir, tmp_path):
    """A folder whose queries are crops (any plain or MI folder without mask_input / query_mi): the mask's
    box gives the crop, as the anns query's box did, so the anns query asked with its own mask gets the
    vector asked with that mask's box. Fails on main 4e786ae ("give query_bbox instead")."""
    from datasets import bbox_from_mask, load_captions

    cwd, folder, _ = crop_folder
    queries, *_ = _split(folder, "queries")
    record = queries[1]
    mask = load_captions(demo_dir / "captions.pt")[record["key"]].masks()[0]
    Image.fromarray(mask.astype(np.uint8) * 255).save(tmp_path / "mask.png")
    _, run, results = _adhoc(folder, cwd, f"query_image={record['file']}", f"query_mask={tmp_path / 'mask.png'}")
    assert results["embedded_as"] == "global embedding of its square crop around query_mask's box"
    box = f"query_bbox=[{','.join(map(str, bbox_from_mask(mask)))}]"
    _, by_box, _ = _adhoc(folder, cwd, f"query_image={record['file']}", box, "report=false")
    np.testing.assert_array_equal(
        load_file(run / "query.safetensors")["features"].numpy(),
        load_file(by_box / "query.safetensors")["features"].numpy(),
    )
    Image.fromarray(mask[:-2].astype(np.uint8) * 255).save(tmp_path / "short.png")
    proc = _adhoc(folder, cwd, f"query_image={record['file']}", f"query_mask={tmp_path / 'short.png'}", check=False)
    assert f"query_mask={tmp_path / 'short.png'} is 160x158 but query_image is 160x160" in proc.stderr


def test_an_image_without_a_box_is_embedded_whole(crop_folder, demo_dir):
    cwd, folder, _ = crop_folder
    from extractors import build_extractor

    file = demo_dir / "gallery" / "g_000.jpg"
    _, run, results = _adhoc(folder, cwd, f"query_image={file}", "k_search=3")
    model = OmegaConf.load(folder / "config.yaml").model_name
    expected = build_extractor("clip_features", model_name=model, device="cpu").extract(file)
    np.testing.assert_allclose(load_file(run / "query.safetensors")["features"][0].numpy(), expected.numpy(), atol=1e-6)
    assert results["embedded_as"] == "global embedding of the whole image"
    # the run is named by the folder's dataset, not the default's (fails on main 4e786ae: pe_retrieval)
    assert "-search_index-demo_retrieval-" in run.name
    gallery, scores = _image_scores(expected.numpy()[None], folder)
    assert results["ranking"][0]["key"] == "gallery/g_000.jpg"  # itself
    assert [h["score"] for h in results["ranking"]] == pytest.approx(np.sort(scores)[::-1][:3].tolist(), abs=1e-5)


def test_mask_inversion_queries_with_a_mask_or_the_box_rectangle(mi_folder, demo_dir, tmp_path):
    cwd, folder, search_run = mi_folder
    queries, query_features, query_owner, _ = _split(folder, "queries")
    record = queries[1]
    mask = load_captions(demo_dir / "captions.pt")[record["key"]].masks()[0]
    Image.fromarray(mask.astype(np.uint8) * 255).save(tmp_path / "mask.png")
    box = f"query_bbox=[{','.join(map(str, record['bbox']))}]"
    _, run, results = _adhoc(folder, cwd, f"query_image={record['file']}", f"query_mask={tmp_path / 'mask.png'}", box)
    np.testing.assert_allclose(
        load_file(run / "query.safetensors")["features"].numpy(), query_features[query_owner == 1], atol=1e-5, rtol=0
    )
    assert "query_mask on the image with the pixels outside the mask set to zero" in results["embedded_as"]
    _, rankings = read_results(search_run)
    stored = next(line for line in rankings if line["query"] == record["key"])["ranking"][:10]
    assert [hit["key"] for hit in results["ranking"][:10]] == [key for key, _ in stored]
    # Outlines: the page marks each shown image with the mask of its best-matching row.
    gallery, features, owner, mask_index = _split(folder, "gallery")
    vector = load_file(run / "query.safetensors")["features"].numpy()
    for hit in parse(run / "report.html").sections[0]["hits"]:
        rows = np.flatnonzero(owner == next(i for i, g in enumerate(gallery) if g["key"] == hit["data-gallery"]))
        assert int(hit["data-mask-index"]) == mask_index[rows[np.argmax((vector @ features[rows].T).max(0))]]

    # No mask: MI with the bbox rectangle, as create_index.py does for a query without one.
    from datasets.extraction import bbox_mask
    from extractors import build_extractor

    _, run, results = _adhoc(folder, cwd, f"query_image={record['file']}", box)
    assert "query_bbox's rectangle" in results["embedded_as"]
    image = Image.open(record["file"]).convert("RGB")
    model = OmegaConf.load(folder / "config.yaml").model_name
    extractor = build_extractor("siglip_mi_features", model_name=model, device="cpu", mask_input=True, mi_iterations=3)
    expected = extractor.extract(image, bbox_mask(image, record["bbox"], source="test"))
    np.testing.assert_allclose(load_file(run / "query.safetensors")["features"].numpy(), expected.numpy(), atol=1e-5)


def test_text_query_ranks_by_the_text_towers_vector(crop_folder):
    cwd, folder, _ = crop_folder
    from extractors import TextEncoder

    _, run, results = _adhoc(folder, cwd, "query_text='a red mug'", "k_search=4")
    model = OmegaConf.load(folder / "config.yaml").model_name
    expected = TextEncoder(model, "clip").embed(["a red mug"]).numpy()
    np.testing.assert_allclose(load_file(run / "query.safetensors")["features"].numpy(), expected, atol=1e-6)
    gallery, scores = _image_scores(expected, folder)
    order = np.argsort(-scores, kind="stable")[:4]
    assert [h["key"] for h in results["ranking"]] == [gallery[g]["key"] for g in order]
    assert results["mode"] == "text" and results["query"] == {"text": "a red mug"}
    section = parse(run / "report.html").sections[0]
    assert section["pictures"] == []  # report_k=10 images, whatever k_search
    assert [h["data-gallery"] for h in section["hits"]] == [
        gallery[g]["key"] for g in np.argsort(-scores, kind="stable")[:10]
    ]
    assert "text: &ldquo;a red mug&rdquo;" in (run / "report.html").read_text()


def test_t2i_evaluates_each_querys_obj_name_with_the_same_metrics(crop_folder):
    cwd, folder, _ = crop_folder
    from extractors import TextEncoder

    proc = run_main(
        "search_index.py",
        f"features_dir={folder}",
        "T2I=true",
        "text_prompt='a photo of a {obj_name}'",
        "k_search=5",
        "device=cpu",
        cwd=cwd,
    )
    run = results_dir_from(proc)
    results, rankings = read_results(run)
    queries = json.loads((folder / "queries" / "images.json").read_text())
    texts = [f"a photo of a {q['obj_name']}" for q in queries]
    vectors = TextEncoder(OmegaConf.load(folder / "config.yaml").model_name, "clip").embed(texts).numpy()
    gallery = json.loads((folder / "gallery" / "images.json").read_text())
    aps = []
    for q, vector in zip(queries, vectors):
        _, scores = _image_scores(vector[None], folder)
        relevant = [bool(set(q["ins"]) & set(g["ins"])) for g in gallery]
        aps.append(average_precision_score(relevant, scores))
    assert results["T2I"] is True and results["text_prompt"] == "a photo of a {obj_name}"
    assert results["mAP"] == pytest.approx(np.mean(aps), abs=1e-6)
    assert [line["text"] for line in rankings] == texts
    sections = parse(run / "report.html").sections
    assert len(sections) == len(queries) and all(len(s["pictures"]) == 2 for s in sections)
    assert all(f"text: &ldquo;{t}&rdquo;" in (run / "report.html").read_text() for t in texts)


def test_t2i_queries_without_obj_name_are_listed_before_any_model_loads(tmp_path):
    from utils.queries.own_queries import text_query_rows

    cfg = OmegaConf.create({"text_prompt": "a photo of {obj_name}", "device": "cpu"})
    queries = [{"key": "q/a.jpg", "obj_name": "mug"}, {"key": "q/b.jpg", "obj_name": None}, {"key": "q/c.jpg"}]
    with pytest.raises(SoIRError, match=r"2 of 3 queries .* have none: \['q/b.jpg', 'q/c.jpg'\]"):
        text_query_rows(cfg, tmp_path / "no_such_folder", OmegaConf.create({"extractor": "clip_features"}), queries, 24)


def test_text_queries_need_a_text_tower(tmp_path):
    from utils.queries.own_queries import text_encoder

    for extractor, family in (
        ("dinov2_mi_features", "dinov2"),
        ("dinov3_features", "dinov3"),
        ("siglip2_mi_features", "siglip2"),
    ):
        with pytest.raises(
            SoIRError, match=f"{extractor} features: {family} checkpoints have no text tower SoIR can use"
        ):
            text_encoder(tmp_path, OmegaConf.create({"extractor": extractor}), "cpu")


def test_a_changed_model_folder_is_refused(tiny_model_dirs, demo_dir, tmp_path):
    model = tmp_path / "clip"
    shutil.copytree(tiny_model_dirs["clip"], model)
    proc = run_main(
        "create_index.py",
        "extractor=clip_features",
        f"model_name={model}",
        "vec_dim=24",
        f"anns_file={demo_dir / 'anns.pt'}",
        "num_workers=0",
        "only_create=true",
        "device=cpu",
        cwd=tmp_path,
    )
    folder = features_dir_from(proc, tmp_path)
    query = f"query_image={demo_dir / 'gallery' / 'g_001.jpg'}"
    _adhoc(folder, tmp_path, query, "report=false")  # unchanged: fine
    config = json.loads((model / "preprocessor_config.json").read_text())
    config["image_mean"] = [0.5, 0.5, 0.5]  # another preprocessing
    (model / "preprocessor_config.json").write_text(json.dumps(config))
    for extra in (query, "query_text=mug"):
        proc = _adhoc(folder, tmp_path, extra, check=False)
        assert proc.returncode != 0
        assert f"{model.resolve()} is not the checkpoint {folder.resolve()}" in proc.stderr.replace(
            str(folder), str(folder.resolve())
        )
        assert "model_files_sha256 changed" in proc.stderr


def test_inconsistent_ad_hoc_requests_are_one_clear_line(crop_folder, mi_folder, tiny_model_dirs, demo_dir, tmp_path):
    """Every refusal comes before a model loads: one ``error:`` line naming the problem and the fix."""
    cwd, folder, _ = crop_folder
    file = demo_dir / "queries" / "q_000.jpg"
    image = f"query_image={file}"
    width, height = Image.open(file).size
    corner = np.zeros((height, width), dtype=np.uint8)
    corner[:4, :4] = 255  # a mask far from the box below
    Image.fromarray(corner).save(tmp_path / "corner.png")
    far_box = f"query_bbox=[{width - 6},{height - 6},{width},{height}]"
    _, earlier, _ = _adhoc(folder, cwd, image, "report=false", "k_search=2")
    cases = [
        ((folder, image, "mask_input=true"), "these settings differ from it: mask_input=True (folder: False)"),
        (
            (folder, image, f"model_name={tiny_model_dirs['siglip']}"),
            f"model_name={tiny_model_dirs['siglip']} (folder: ",
        ),
        (
            (folder, image, f"query_mask={tmp_path / 'corner.png'}", "query_bbox=[1,1,9,9]"),
            "this folder's queries are square crops around a box: give query_mask (its box is used) or query_bbox",
        ),
        ((mi_folder[1], image), "give query_mask=mask.png (the object's mask) or query_bbox"),
        (
            (mi_folder[1], image, f"query_mask={tmp_path / 'corner.png'}", far_box),
            f"query_mask={tmp_path / 'corner.png'} does not overlap query_bbox=",
        ),
        (
            (mi_folder[1], image, f"query_mask={tmp_path / 'no_mask.png'}"),
            f"query_mask={tmp_path / 'no_mask.png'}: no such file",
        ),
        (
            (folder, image, "query_bbox=[0,0,5000,20]"),
            f"query image {file}: bbox [0.0, 0.0, 5000.0, 20.0] lies outside the {width}x{height} image",
        ),
        ((folder, f"query_image={tmp_path / 'missing.jpg'}"), f"query_image={tmp_path / 'missing.jpg'}: no such file"),
        ((folder, image, f"hydra.run.dir={earlier}"), f"{earlier} already holds another run's results (results.json"),
        ((tmp_path, image), f"{tmp_path} has no config.yaml"),
    ]
    for (features, *overrides), message in cases:
        proc = _adhoc(features, cwd, *overrides, check=False)
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
        assert proc.returncode == 1 and len(errors) == 1 and message in errors[0], proc.stderr[-2000:]
        assert "Traceback" not in proc.stderr
    assert sorted(p.name for p in earlier.iterdir() if not p.name.startswith(".")) == [
        "query.safetensors",
        "rankings.jsonl",
        "results.json",
        "search_index.log",
    ]  # its results untouched
    proc = run_main("create_index.py", f"anns_file={demo_dir / 'anns.pt'}", image, cwd=cwd, check=False)
    assert proc.returncode != 0 and "query_image is search_index.py's ad-hoc mode" in proc.stderr


def test_a_box_on_a_folder_of_whole_image_queries_is_refused(tmp_path):
    from utils.config import SoIRConfig
    from utils.queries.own_queries import image_query

    Image.new("RGB", (32, 24)).save(tmp_path / "photo.jpg")
    made_with = OmegaConf.merge(OmegaConf.structured(SoIRConfig), {"extractor": "clip_features", "no_query_crop": True})
    cfg = OmegaConf.create({"query_image": str(tmp_path / "photo.jpg"), "query_bbox": [1, 1, 9, 9], "query_mask": None})
    with pytest.raises(SoIRError, match="queries are whole images \\(no_query_crop=true\\), so query_bbox"):
        image_query(cfg, made_with)
    _, jobs, how = image_query(OmegaConf.merge(cfg, {"query_bbox": None}), made_with)
    assert how == "global embedding of the whole image" and jobs[0].crop is None
