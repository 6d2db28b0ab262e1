"""report.html of search_index.py: page structure (html.parser), thumbnails, outlines, maps, a real browser."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from safetensors.torch import load_file

from datasets import ImageMasks, encode_mask, load_captions, save_captions
from tests.pipeline import features_dir_from, read_results, results_dir_from, run_main
from utils.results.report import Shown, report_captions, thumb_jobs

THUMB = 96


class ReportParser(HTMLParser):
    """The query sections of report.html: their data attributes, query pictures and gallery figures."""

    def __init__(self):
        super().__init__()
        self.sections: list[dict] = []
        self.notes: list[str] = []
        self._figure: dict | None = None
        self._in_note = False
        self._in_file = False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        classes = (attrs.get("class") or "").split()
        if tag == "section" and "query" in classes:
            self.sections.append({**attrs, "pictures": [], "hits": []})
        elif tag == "figure" and "hit" in classes:
            self._figure = {**attrs, "classes": classes}
            self.sections[-1]["hits"].append(self._figure)
        elif tag == "img" and self.sections:
            if self._figure is not None:
                self._figure["zoom" if "zoom" in classes else "src"] = attrs["src"]
            else:
                self.sections[-1]["pictures"].append(attrs["src"])
        elif tag == "a" and self._figure is not None:
            self._figure["full" if "full" in classes else "href"] = attrs["href"]
        elif tag == "span" and "file" in classes and self._figure is not None:
            self._in_file = True
        elif tag == "p" and "note" in classes:
            self._in_note = True
            self.notes.append("")

    def handle_endtag(self, tag):
        if tag == "figure":
            self._figure = None
        elif tag == "p":
            self._in_note = False
        elif tag == "span":
            self._in_file = False

    def handle_data(self, data):
        if self._in_note:
            self.notes[-1] += data
        if self._in_file:
            self._figure["file"] = data


def parse(path: Path) -> ReportParser:
    parser = ReportParser()
    parser.feed(path.read_text())
    return parser


@pytest.fixture(scope="module")
def mi_run(tiny_model_dirs, demo_dir, tmp_path_factory):
    """Tiny SigLIP MI on the demo set where half of the gallery has no masks (missing_masks=global: rows
    with mask_index -1), searched with the report and its maps."""
    cwd = tmp_path_factory.mktemp("report")
    captions = load_captions(demo_dir / "captions.pt")
    gallery_keys = sorted(k for k in captions if k.startswith("gallery/"))
    partial = {k: v for k, v in captions.items() if k not in gallery_keys[::2]}
    save_captions(partial, cwd / "captions_partial.pt")
    proc = run_main(
        "create_index.py",
        "extractor=siglip_mi_features",
        f"model_name={tiny_model_dirs['siglip']}",
        "vec_dim=32",
        f"anns_file={demo_dir / 'anns.pt'}",
        f"captions_file={cwd / 'captions_partial.pt'}",
        "missing_masks=global",
        "mi_iterations=2",
        "num_workers=0",
        cwd=cwd,
    )
    features = features_dir_from(proc, cwd)
    search = run_main(
        "search_index.py",
        f"features_dir={features}",
        "k_search=5",
        "report_k=4",
        f"report_thumb_size={THUMB}",
        "report_maps=true",
        "device=cpu",
        cwd=cwd,
    )
    run = results_dir_from(search)
    assert f"report: {run / 'report.html'}" in search.stdout
    return run, features, demo_dir


def test_every_query_is_shown_worst_ap_first(mi_run):
    run, features, _ = mi_run
    page = parse(run / "report.html")
    with open(run / "per_query.csv") as f:
        per_query = {row["query"]: row for row in csv.DictReader(f)}
    assert len(page.sections) == len(per_query) == json.loads((run / "results.json").read_text())["num_queries"]
    aps = [float(s["data-ap"]) for s in page.sections]
    assert aps == sorted(aps)
    for section in page.sections:
        key = section["data-search"].split()[0]
        assert float(section["data-ap"]) == pytest.approx(float(per_query[key]["ap"]), abs=1e-6)
        assert int(section["data-rank"]) == int(per_query[key]["first_positive_rank"])
        assert all((run / src).is_file() for src in section["pictures"])
        assert len(section["pictures"]) == 2  # the demo queries have a bbox: image + crop


def test_frames_are_green_for_positives_and_red_for_negatives(mi_run):
    run, features, demo_dir = mi_run
    _, rankings = read_results(run)
    top = {line["query"]: [key for key, _ in line["ranking"][:4]] for line in rankings}
    anns = torch.load(demo_dir / "anns.pt", weights_only=True)
    ins = {key: set(np.atleast_1d(entry["ins"]).tolist()) for key, entry in anns.items()}
    frames = []
    for section in parse(run / "report.html").sections:
        query = section["data-search"].split()[0]
        assert [hit["data-gallery"] for hit in section["hits"]] == top[query]
        for hit in section["hits"]:
            positive = bool(ins[query] & ins[hit["data-gallery"]])
            assert ("pos" if positive else "neg") in hit["classes"]
            assert ("neg" if positive else "pos") not in hit["classes"]
            frames.append(positive)
        assert section["data-hit"] == str(int(any("pos" in h["classes"] for h in section["hits"])))
    assert any(frames) and not all(frames)


def _best_gallery_rows(features: Path) -> dict[tuple[str, str], int]:
    """Independent argmax: for every (query, gallery image), the mask_index of the gallery row with the
    highest inner product with any query row, by plain loops over the shards."""
    load = lambda split: [load_file(p) for p in sorted((features / split).glob("shard-*.safetensors"))]  # noqa: E731
    g, q = load("gallery"), load("queries")
    g_feat, g_owner, g_mask = (torch.cat([s[k] for s in g]) for k in ("features", "owner", "mask_index"))
    q_feat, q_owner = (torch.cat([s[k] for s in q]) for k in ("features", "owner"))
    gallery = json.loads((features / "gallery" / "images.json").read_text())
    queries = json.loads((features / "queries" / "images.json").read_text())
    best = {}
    for qi, query in enumerate(queries):
        for gi, image in enumerate(gallery):
            rows = torch.nonzero(g_owner == gi).flatten()
            scores = (q_feat[q_owner == qi] @ g_feat[rows].T).amax(0)
            best[query["key"], image["key"]] = int(g_mask[rows[int(scores.argmax())]])
    return best


def _painted_cyan(thumb: Path, image_file: str) -> np.ndarray:
    """Pixels of a thumbnail that are cyan where a plain resize of its image is not: the outline."""
    with Image.open(thumb) as t, Image.open(image_file) as image:
        pixels = np.asarray(t.convert("RGB")).astype(int)
        plain = np.asarray(image.convert("RGB").resize(t.size, Image.BILINEAR)).astype(int)
    cyan = (pixels[..., 0] < 90) & (pixels[..., 1] > 170) & (pixels[..., 2] > 170)
    return cyan & (np.abs(pixels - plain).sum(-1) > 90)


def test_outlines_show_the_matching_mask_where_there_is_one(mi_run):
    run, features, _ = mi_run
    best = _best_gallery_rows(features)
    files = {r["key"]: r["file"] for r in json.loads((features / "gallery" / "images.json").read_text())}
    captions = load_captions(json.loads((features / "sources.json").read_text())["captions_file"])
    page = parse(run / "report.html")
    kinds = set()
    for section in page.sections:
        query = section["data-search"].split()[0]
        for hit in section["hits"]:
            key, mask = hit["data-gallery"], int(hit["data-mask-index"])
            assert mask == best[query, key]
            thumb = run / hit["src"]
            with Image.open(thumb) as t:
                thumb_size = t.size
            assert max(thumb_size) <= THUMB
            painted = _painted_cyan(thumb, files[key])
            if mask >= 0:
                assert hit["src"].endswith(f"_m{mask}.jpg") and painted.sum() > 10
                # The outline hugs that mask: every painted pixel lies within 3 px of its box.
                with Image.open(files[key]) as image:
                    scale = thumb_size[0] / image.width
                x1, y1, x2, y2 = (v * scale for v in captions[key].bboxes[mask])
                ys, xs = np.nonzero(painted)
                assert xs.min() >= x1 - 4 and xs.max() <= x2 + 3 and ys.min() >= y1 - 4 and ys.max() <= y2 + 3
            else:
                assert "_m" not in hit["src"] and painted.sum() == 0
            kinds.add(mask >= 0)
    assert kinds == {True, False}  # both kinds are on the page
    assert any("mask index -1" in note and "no outline" in note for note in page.notes)


def test_small_objects_are_enlarged_outlined_in_two_tones_and_named(mi_run):
    """Each shown gallery image with a matched object: its enlarged crop (the mask's box padded by a quarter
    of its longer side, longer side 128 px) with a dark + light outline; the file name under the image;
    a click opens the image with the matched object highlighted; a legend in words. Fails on main 4e786ae
    (no zoom, cyan only, no names)."""
    from datasets import bbox_from_mask

    run, features, _ = mi_run
    files = {r["key"]: r["file"] for r in json.loads((features / "gallery" / "images.json").read_text())}
    captions = load_captions(json.loads((features / "sources.json").read_text())["captions_file"])
    page = parse(run / "report.html")
    zoomed = 0
    for hit in (h for section in page.sections for h in section["hits"]):
        key, mask = hit["data-gallery"], int(hit["data-mask-index"])
        assert hit["file"] == Path(key).name
        if mask < 0:  # no single object matched: a click opens the image file itself
            assert "zoom" not in hit and hit["full"] == Path(files[key]).resolve().as_uri()
            continue
        # a click opens the image with its matched object outlined thick in cyan + black, the others thin
        assert hit["full"] == hit["src"].replace(".jpg", "_full.jpg")
        with Image.open(run / hit["full"]) as full, Image.open(files[key]) as image:
            assert full.size == image.size  # the demo's 160-px images: at most FULL_SIZE, never enlarged
            pixels = np.asarray(full.convert("RGB")).astype(int)
            original = np.asarray(image.convert("RGB")).astype(int)
        cyan = (pixels[..., 0] < 90) & (pixels[..., 1] > 170) & (pixels[..., 2] > 170)
        painted = cyan & (np.abs(pixels - original).sum(-1) > 90)
        ys, xs = np.nonzero(painted)
        x1, y1, x2, y2 = captions[key].bboxes[mask]
        assert len(xs) > 20 and xs.min() >= x1 - 4 and xs.max() <= x2 + 4 and ys.min() >= y1 - 4 and ys.max() <= y2 + 4
        zoomed += 1
        x1, y1, x2, y2 = bbox_from_mask(captions[key].masks()[mask])
        pad = 0.25 * max(x2 - x1, y2 - y1)
        with Image.open(files[key]) as image:
            width, height = (
                min(image.width, x2 + pad) - max(0, x1 - pad),
                min(image.height, y2 + pad) - max(0, y1 - pad),
            )
        with Image.open(run / hit["zoom"]) as picture:
            assert max(picture.size) == 128
            assert abs(picture.width / picture.height - width / height) < 0.1
            pixels = np.asarray(picture.convert("RGB")).astype(int)
        cyan = (pixels[..., 0] < 90) & (pixels[..., 1] > 170) & (pixels[..., 2] > 170)
        dark = pixels.sum(-1) < 60
        assert cyan.sum() > 20 and dark.sum() > 20  # both tones of the outline
        with Image.open(run / hit["src"]) as thumb:  # the thumbnail's outline has its dark halo too
            assert (np.asarray(thumb.convert("RGB")).astype(int).sum(-1) < 60).sum() > 0
    assert zoomed > 0
    assert any(note.startswith("How to read it: ") and "Green frame" in note for note in page.notes)
    text = (run / "report.html").read_text()
    assert "ins [" not in text and "no single mask" not in text  # plain words, not field names


def test_report_maps_link_each_shown_image_to_its_overlay(mi_run):
    run, _, _ = mi_run
    hits = [hit for section in parse(run / "report.html").sections for hit in section["hits"]]
    for hit in hits:
        assert hit["href"] == f"maps/{Path(hit['src']).stem.split('_')[0]}_r{hit['data-row']}.jpg"
        overlay = Image.open(run / hit["href"])
        assert max(overlay.size) <= 3 * THUMB and overlay.mode == "RGB"
    assert len(list((run / "maps").iterdir())) == len({(h["data-gallery"], h["data-row"]) for h in hits})


def test_report_false_writes_no_report(mi_run, tmp_path):
    _, features, _ = mi_run
    proc = run_main("search_index.py", f"features_dir={features}", "report=false", cwd=tmp_path)
    run = results_dir_from(proc)
    assert (run / "results.json").is_file()
    assert not (run / "report.html").exists() and not (run / "thumbs").exists()
    assert "report:" not in proc.stdout


def test_report_k_beyond_k_search_keeps_the_rankings_at_k_search(mi_run, tmp_path):
    _, features, _ = mi_run
    run = results_dir_from(
        run_main(
            "search_index.py",
            f"features_dir={features}",
            "k_search=2",
            "report_k=6",
            "report_thumb_size=48",
            cwd=tmp_path,
        )
    )
    _, rankings = read_results(run)
    sections = parse(run / "report.html").sections
    assert all(len(line["ranking"]) == 2 for line in rankings)
    by_query = {line["query"]: [key for key, _ in line["ranking"]] for line in rankings}
    for section in sections:
        hits = [hit["data-gallery"] for hit in section["hits"]]
        assert len(hits) == 6 and hits[:2] == by_query[section["data-search"].split()[0]]


def test_changed_captions_file_gives_no_outlines_and_says_why(mi_run, tmp_path):
    _, features, _ = mi_run
    copy = tmp_path / "features"
    shutil.copytree(features, copy)
    made_with = OmegaConf.load(copy / "config.yaml")
    captions, why_not = report_captions(copy, made_with)
    assert captions is not None and why_not == ""
    sources = json.loads((copy / "sources.json").read_text())
    captions_file = tmp_path / "captions.pt"
    shutil.copy(sources["captions_file"], captions_file)
    sources["captions_file"] = str(captions_file)
    (copy / "sources.json").write_text(json.dumps(sources))
    captions_file.write_bytes(captions_file.read_bytes() + b"\0")
    assert report_captions(copy, made_with) == (
        None,
        f"{captions_file} changed since the features were made (sha256 differs)",
    )
    captions_file.unlink()
    assert report_captions(copy, made_with) == (None, f"the captions_file {captions_file} no longer exists")


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def _screenshot(page: Path, shot: Path, height: int) -> np.ndarray:
    """(height, 1200, 3) int RGB pixels of ``page`` as headless Chromium draws it."""
    command = [
        _chromium(),
        "--headless",
        "--disable-gpu",
        "--hide-scrollbars",
        f"--window-size=1200,{height}",
        "--virtual-time-budget=5000",
        f"--screenshot={shot}",
        page.as_uri(),
    ]
    if os.geteuid() == 0:
        command.insert(1, "--no-sandbox")  # Chromium refuses to run as root with its sandbox
    subprocess.run(command, capture_output=True, timeout=120, check=True)
    return np.asarray(Image.open(shot).convert("RGB")).astype(int)


# Appended to a copy of report.html: every picture hidden (the demo's objects are red and green too) and
# every frame the same 40 x 40 px box, so a frame is exactly FRAME_PIXELS pixels of its border colour.
FRAMES_ONLY = (
    "<style>img { visibility: hidden; } .hit > * { display: none; } .hit { width: 40px; height: 40px; }</style>"
)
FRAME_PIXELS = (40 + 2 + 8) ** 2 - (40 + 2) ** 2  # 1 px padding and a 4 px border on each side: 736


@pytest.mark.slow  # two Chromium processes (~9 s)
@pytest.mark.skipif(
    _chromium() is None,
    reason="Chromium is not installed (Debian: apt-get install chromium); the browser test of report.html is skipped",
)
def test_report_renders_in_headless_chromium(mi_run, tmp_path):
    """The page draws (pictures, not a blank page), and each gallery image's frame is green when it shows
    the query's object and red when not, as many of each as the report lists."""
    run, _, _ = mi_run
    hits = [hit["classes"] for section in parse(run / "report.html").sections for hit in section["hits"]]
    positives, negatives = sum("pos" in c for c in hits), sum("neg" in c for c in hits)
    assert positives and negatives and positives + negatives == len(hits)  # both kinds of frame to draw
    pixels = _screenshot(run / "report.html", tmp_path / "shot.png", 900)
    assert pixels.shape == (900, 1200, 3)
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 1000  # pictures, not a blank page

    frames_only = run / "frames_only.html"  # next to report.html: the same relative links
    frames_only.write_text(
        (run / "report.html").read_text().replace("</body>", FRAMES_ONLY + "</body>"), encoding="utf-8"
    )
    try:
        pixels = _screenshot(frames_only, tmp_path / "frames.png", 1500)
    finally:
        frames_only.unlink()
    count = lambda rgb: int((pixels == rgb).all(-1).sum())  # noqa: E731
    assert (count((26, 150, 65)), count((215, 25, 28))) == (positives * FRAME_PIXELS, negatives * FRAME_PIXELS)


def test_map_extractor_builds_plain_features_as_their_mi_variant(tiny_model_dirs, tmp_path):
    from extractors import CLIPExtractor, CLIPMIExtractor
    from utils.config import SoIRConfig
    from utils.results.report import map_extractor

    made_with = OmegaConf.merge(
        OmegaConf.structured(SoIRConfig),
        {"anns_file": "a.pt", "extractor": "clip_features", "model_name": str(tiny_model_dirs["clip"]), "vec_dim": 24},
    )
    extractor = map_extractor(made_with, "cpu")
    assert isinstance(extractor, CLIPMIExtractor) and extractor.model_name == str(tiny_model_dirs["clip"])
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 80, 3), dtype=np.uint8))
    stored = CLIPExtractor(str(tiny_model_dirs["clip"]), device="cpu").extract(image)  # a plain row
    mask = np.zeros((1, 48, 80), dtype=bool)
    mask[0, 10:30, 20:50] = True
    expected = CLIPMIExtractor(str(tiny_model_dirs["clip"]), device="cpu", mi_iterations=1).explain(image, mask)
    torch.testing.assert_close(extractor.legrad(image, stored[None])[0], expected.global_map, atol=1e-5, rtol=0)


def test_smart_crop_maps_are_drawn_inside_the_crop(tiny_model_dirs, tmp_path):
    from datasets import ImageMasks, encode_mask
    from datasets.views import padded_box
    from extractors import SigLIPMIExtractor
    from utils.results.report import Shown, write_maps

    rng = np.random.default_rng(0)
    smooth = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize((128, 96), Image.BICUBIC)
    image = smooth.convert("RGB")  # smooth, so the overlay's JPEG is close to exact
    image.save(tmp_path / "g.png")
    mask = np.zeros((96, 128), dtype=bool)
    mask[60:80, 90:115] = True
    extractor = SigLIPMIExtractor(str(tiny_model_dirs["siglip"]), device="cpu", smart_crop=True, mi_iterations=3)
    vectors = extractor.extract(image, mask[None]).numpy()
    captions = {"g.png": ImageMasks([encode_mask(mask)], [[90, 60, 115, 80]], [1.0])}
    gallery = [{"key": "g.png", "file": str(tmp_path / "g.png")}]
    shown = Shown(np.array([[0]]), np.array([[1.0]]), np.array([[True]]), rows=np.array([[0]]))
    names = write_maps(tmp_path / "maps", extractor, gallery, shown, np.array([[0]]), vectors, captions, size=128)
    assert names == {0: "g000000_r0.jpg"}
    picture = np.asarray(Image.open(tmp_path / "maps" / names[0])).astype(int)
    x1, y1, x2, y2 = padded_box(torch.from_numpy(mask), 0.1)
    dark = np.asarray(Image.blend(image, Image.new("RGB", image.size, (0, 0, 4)), 0.55)).astype(int)
    outside = np.ones((96, 128), dtype=bool)
    outside[max(0, y1 - 3) : y2 + 3, max(0, x1 - 3) : x2 + 3] = False  # margin for JPEG blocks and the outline
    assert np.abs(picture - dark)[outside].mean() < 6  # map 0 outside the crop
    assert np.abs(picture - dark)[y1:y2, x1:x2].mean() > 20  # the map lives in the crop


def test_an_unreadable_gallery_image_is_shown_as_unavailable(mi_run, tmp_path):
    run, features, _ = mi_run
    copy = tmp_path / "features"
    shutil.copytree(features, copy)
    _, rankings = read_results(run)
    missing_key = rankings[0]["ranking"][0][0]
    records = json.loads((copy / "gallery" / "images.json").read_text())
    for record in records:
        if record["key"] == missing_key:
            record["file"] = str(tmp_path / "gone.jpg")
    (copy / "gallery" / "images.json").write_text(json.dumps(records))
    proc = run_main(
        "search_index.py", f"features_dir={copy}", "report_k=2", "report_maps=true", "device=cpu", cwd=tmp_path
    )
    page_path = results_dir_from(proc) / "report.html"
    text = page_path.read_text()
    assert text.count("image unavailable") >= 1 and "1 image(s) could not be shown" in text
    log = proc.stdout + proc.stderr
    assert "gone.jpg" in log and "file does not exist" in log
    hits = [h for s in parse(page_path).sections for h in s["hits"] if h["data-gallery"] == missing_key]
    assert hits and all("src" not in h and "href" not in h for h in hits)


def test_full_mask_fallback_rows_get_a_report(tiny_model_dirs, demo_dir, tmp_path):
    """missing_masks=full_mask (what compat=original sets) on a gallery where half the images have no
    masks: the full-image-mask rows belong to no captions entry, so they carry mask_index -1 and the
    report shows them plain. Fails on main 4e786ae: search_index.py printed the metrics, then died in
    utils/results/report.py with "'NoneType' object has no attribute 'masks_rle'" (exit 1)."""
    captions = load_captions(demo_dir / "captions.pt")
    gallery_keys = sorted(k for k in captions if k.startswith("gallery/"))
    save_captions({k: v for k, v in captions.items() if k not in gallery_keys[::2]}, tmp_path / "partial.pt")
    proc = run_main(
        "create_index.py",
        "extractor=siglip_mi_features",
        f"model_name={tiny_model_dirs['siglip']}",
        "vec_dim=32",
        f"anns_file={demo_dir / 'anns.pt'}",
        f"captions_file={tmp_path / 'partial.pt'}",
        "missing_masks=full_mask",
        "mi_iterations=2",
        "num_workers=0",
        "only_create=true",
        cwd=tmp_path,
    )
    features = features_dir_from(proc, tmp_path)
    search = run_main(
        "search_index.py", f"features_dir={features}", "k_search=20", f"report_k={len(gallery_keys)}", cwd=tmp_path
    )
    run = results_dir_from(search)
    assert f"report: {run / 'report.html'}" in search.stdout
    gallery = json.loads((features / "gallery" / "images.json").read_text())
    shards = [load_file(p) for p in sorted((features / "gallery").glob("shard-*.safetensors"))]
    owner, mask_index = (torch.cat([s[k] for s in shards]).tolist() for k in ("owner", "mask_index"))
    unmasked = {i for i, g in enumerate(gallery) if g["key"] in gallery_keys[::2]}
    assert unmasked and {m for o, m in zip(owner, mask_index) if o in unmasked} == {-1}
    assert {m for o, m in zip(owner, mask_index) if o not in unmasked} >= {0}
    shown = {hit["src"] for section in parse(run / "report.html").sections for hit in section["hits"]}
    assert {Path(s).name for s in shown} >= {f"g{i:06d}.jpg" for i in unmasked}  # plain thumbnails


def test_rows_of_images_without_a_captions_entry_are_shown_plain():
    """A features folder made before issue 21 gave full-image-mask rows mask_index 0 for images without a
    captions entry; their thumbnails are plain, not outlines of a mask that does not exist. Fails on
    main 4e786ae ('NoneType' object has no attribute 'masks_rle')."""
    shown = Shown(gallery=np.array([[0, 1]]), scores=np.zeros((1, 2)), positive=None, rows=np.array([[0, 1]]))
    gallery = [{"key": "g/a.jpg", "file": "/x/a.jpg"}, {"key": "g/b.jpg", "file": "/x/b.jpg"}]
    queries = [{"file": "/x/q.jpg", "bbox": None}]
    mask = np.zeros((1, 8, 8), dtype=bool)
    mask[0, 2:5, 2:5] = True
    captions = {"g/b.jpg": ImageMasks(masks_rle=[encode_mask(mask[0])], bboxes=[[2, 2, 5, 5]], scores=[1.0])}
    jobs = thumb_jobs(queries, gallery, shown, np.array([[0, 0]]), captions)
    plain_a, outlined_b = jobs[1], jobs[2]
    assert plain_a.plain == "g000000.jpg" and plain_a.outlines == ()
    assert outlined_b.plain is None and outlined_b.outlines[0][0] == "g000001_m0.jpg"
