"""search_index.py end to end: output contract and numbers checked against sklearn."""

from __future__ import annotations

import csv
import json
import re

import numpy as np
import pytest
from safetensors.torch import load_file
from sklearn.metrics import average_precision_score

from tests.pipeline import features_dir_from, read_results, results_dir_from, run_main, run_script


@pytest.fixture(scope="module")
def features(clip_demo_features):
    return clip_demo_features


def test_results_follow_the_output_contract_and_standard_definitions(features):
    cwd, folder = features
    proc = run_main(
        "search_index.py", f"features_dir={folder}", "k_search=3", "map_at=5", "experiment=contract", cwd=cwd
    )
    results, rankings = read_results(results_dir_from(proc))
    gallery = json.loads((folder / "gallery" / "images.json").read_text())
    queries = json.loads((folder / "queries" / "images.json").read_text())
    assert results["num_queries"] == len(queries) == len(rankings)
    assert results["num_gallery_images"] == len(gallery)
    assert set(results["recall"]) == {"1", "5", "10"} and "mAP@5" in results

    # Independent recomputation: scores from the stored features, AP by sklearn over the whole gallery.
    g = load_file(folder / "gallery" / "shard-00000.safetensors")
    gallery_features = np.concatenate(
        [load_file(p)["features"].numpy() for p in sorted((folder / "gallery").glob("shard-*.safetensors"))]
    )
    query_features = np.concatenate(
        [load_file(p)["features"].numpy() for p in sorted((folder / "queries").glob("shard-*.safetensors"))]
    )
    assert g["features"].shape[1] == query_features.shape[1] == 24
    scores = query_features @ gallery_features.T
    relevant = np.array([[bool(set(q["ins"]) & set(im["ins"])) for im in gallery] for q in queries])
    aps = [average_precision_score(r, s) for r, s in zip(relevant, scores)]
    assert results["mAP"] == pytest.approx(np.mean(aps), abs=1e-6)
    order = np.argsort(-scores, axis=1, kind="stable")
    first_hit = np.array([np.flatnonzero(r[o])[0] + 1 for r, o in zip(relevant, order)])
    for k in (1, 5, 10):
        assert results["recall"][str(k)] == pytest.approx(np.mean(first_hit <= k))

    # rankings.jsonl: top k_search, best first, image-level keys and scores.
    for line, o, s in zip(rankings, order, scores):
        assert [key for key, _ in line["ranking"]] == [gallery[i]["key"] for i in o[:3]]
        assert [score for _, score in line["ranking"]] == pytest.approx(s[o[:3]].tolist(), abs=1e-5)
    with open(results_dir_from(proc) / "per_query.csv") as f:
        rows = list(csv.DictReader(f))
    assert [float(r["ap"]) for r in rows] == pytest.approx(aps, abs=1e-5)
    assert [int(r["first_positive_rank"]) for r in rows] == first_hit.tolist()


def test_missing_features_dir_is_a_clear_error(tmp_path):
    proc = run_main("search_index.py", f"features_dir={tmp_path / 'nothing'}", cwd=tmp_path, check=False)
    assert proc.returncode != 0 and "not a create_index.py output folder" in proc.stderr


def test_best_rows_is_the_argmax_behind_each_image_score():
    from utils.retrieval.ranking import best_rows, image_scores

    rng = np.random.default_rng(0)
    gallery_owner = rng.permutation(np.repeat(np.arange(7), rng.integers(1, 5, 7)))  # 1-4 rows per image, shuffled
    query_owner = np.repeat(np.arange(3), [1, 3, 2])
    gallery = rng.normal(size=(len(gallery_owner), 8)).astype(np.float32)
    queries = rng.normal(size=(len(query_owner), 8)).astype(np.float32)
    gallery[np.flatnonzero(gallery_owner == 4)] = gallery[np.flatnonzero(gallery_owner == 4)[0]]  # a tie
    pairs = np.array([(q, g) for q in range(3) for g in range(7)])
    rows = best_rows(queries, query_owner, gallery, gallery_owner, pairs)
    scores = image_scores(queries, query_owner, range(3), gallery, gallery_owner, 7)
    for (q, g), row in zip(pairs, rows):
        assert gallery_owner[row] == g
        candidates = np.flatnonzero(gallery_owner == g)
        by_row = [max(float(queries[i] @ gallery[r]) for i in np.flatnonzero(query_owner == q)) for r in candidates]
        assert row == candidates[int(np.argmax(by_row))]  # the first of equal rows on ties
        assert max(by_row) == pytest.approx(scores[q, g], abs=1e-6)


def test_streamed_search_equals_in_ram_search_with_ties_and_several_positives(tiny_model_dirs, demo_dir, tmp_path):
    """A gallery larger than search_block_mb is streamed from its shards (utils/retrieval/streaming.py): every output
    equals the in-RAM search's. Two byte-identical gallery images give exactly tied scores."""
    import shutil

    import torch

    data = tmp_path / "data"
    shutil.copytree(demo_dir, data)
    anns = torch.load(data / "anns.pt", weights_only=True)
    query = next(k for k, v in anns.items() if v["is_query"])
    positive = next(k for k, v in anns.items() if not v["is_query"] and anns[query]["ins"] in np.atleast_1d(v["ins"]))
    shutil.copy(data / positive, data / "gallery" / "zz_copy.jpg")
    anns["gallery/zz_copy.jpg"] = dict(anns[positive])
    torch.save(anns, data / "anns.pt")
    proc = run_main(
        "create_index.py",
        "extractor=clip_features",
        f"model_name={tiny_model_dirs['clip']}",
        "vec_dim=24",
        f"anns_file={data / 'anns.pt'}",
        "num_workers=0",
        "batch_size=1",
        "shard_size=5",
        "only_create=true",
        cwd=tmp_path,
    )
    folder = features_dir_from(proc, tmp_path)
    runs = {}
    for name, extra in (("ram", ()), ("streamed", ("search_block_mb=0.0001",))):
        search = run_main(
            "search_index.py",
            f"features_dir={folder}",
            "k_search=8",
            "map_at=5",
            f"experiment={name}",
            *extra,
            cwd=tmp_path,
        )
        (log,) = results_dir_from(search).glob("search_index.log")  # INFO lines go to the run's log file
        assert ("streamed" if extra else "in RAM") in log.read_text()
        runs[name] = results_dir_from(search)
    (results, rankings), (streamed, streamed_rankings) = (read_results(runs[name]) for name in ("ram", "streamed"))
    settings = ("settings", "overrides")  # the two runs' own command lines; their numbers must agree
    assert {k: v for k, v in streamed.items() if k not in settings} == {
        k: v for k, v in results.items() if k not in settings
    }
    assert streamed["settings"]["search_block_mb"] == 0.0001 and results["settings"]["search_block_mb"] == 256
    per_query = [(runs[name] / "per_query.csv").read_text() for name in runs]
    assert per_query[0] == per_query[1]
    assert min(int(r["positives"]) for r in csv.DictReader(per_query[0].splitlines())) >= 2
    tied = [line for line in rankings if len({s for _, s in line["ranking"]}) < len(line["ranking"])]
    assert tied, "the copy must tie with its original"
    for a, b in zip(rankings, streamed_rankings):
        assert [key for key, _ in a["ranking"]] == [key for key, _ in b["ranking"]]
        assert [s for _, s in a["ranking"]] == pytest.approx([s for _, s in b["ranking"]], abs=1e-6)
    figure = re.compile(r'data-gallery="[^"]*" data-mask-index="-?\d+" data-row="\d+"')
    rows = [figure.findall((runs[name] / "report.html").read_text()) for name in runs]
    assert rows[0] and rows[0] == rows[1]  # the report shows the same images and matching rows


def test_faiss_search_ranks_candidates_and_says_map_is_a_lower_bound(features):
    cwd, folder = features
    exact, _ = read_results(results_dir_from(run_main("search_index.py", f"features_dir={folder}", cwd=cwd)))
    proc = run_main("search_index.py", f"features_dir={folder}", "search=faiss", "search_candidates=1000", cwd=cwd)
    everything, _ = read_results(results_dir_from(proc))
    assert "mAP(lb)" in proc.stdout and "lower bound" in proc.stdout
    assert everything["mAP_is_lower_bound"] is True and everything["candidate_coverage"] == 1.0
    assert everything["mAP"] == pytest.approx(exact["mAP"], abs=1e-7)  # every image a candidate: exact
    proc = run_main("search_index.py", f"features_dir={folder}", "search=faiss", "search_candidates=1", cwd=cwd)
    one, rankings = read_results(results_dir_from(proc))
    assert one["candidate_coverage"] < 1 and one["mAP"] <= exact["mAP"] and one["search_candidates"] == 1
    assert all(len(line["ranking"]) == 1 for line in rankings)  # one candidate image per query row


@pytest.mark.slow  # a subprocess: Hydra's multirun launcher and the sweep callback are the subject
def test_a_sweep_ends_with_one_summary_table_and_named_job_folders(features, tmp_path):
    """`-m map_at=3,5`: job folders named by the swept key's value, results.json records the settings,
    and summary.csv + one printed table compare the jobs (values from each job's results.json).
    Fails on main 4e786ae (folders 0/ and 1/, no settings in results.json, no summary)."""
    import csv

    _, folder = features
    proc = run_script(
        "search_index.py", "-m", f"features_dir={folder}", "report=false", "map_at=3,5", "k_search=5", cwd=tmp_path
    )
    (summary,) = (tmp_path / "outputs" / "multirun").glob("*/*/summary.csv")
    sweep = summary.parent
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == ["0-map_at=3", "1-map_at=5"]
    rows = list(csv.DictReader(summary.open()))
    assert [(r["job"], r["map_at"]) for r in rows] == [("0", "3"), ("1", "5")]
    for row, map_at in zip(rows, (3, 5)):
        results = json.loads((sweep / f"{row['job']}-map_at={map_at}" / "results.json").read_text())
        assert results["settings"]["map_at"] == map_at and f"map_at={map_at}" in results["overrides"]
        assert results["settings"]["k_search"] == 5
        assert row["mAP"] == f"{100 * results['mAP']:.2f}"
        assert [row[f"R@{k}"] for k in (1, 5, 10)] == [f"{100 * results['recall'][k]:.2f}" for k in ("1", "5", "10")]
        assert row["features_dir"] == str(folder) and row["run_dir"] == str(
            sweep.relative_to(tmp_path) / f"{row['job']}-map_at={map_at}"
        )
    # the one table, at the end of the output: a header line and a line per job
    table = proc.stdout[proc.stdout.index("sweep of 2 jobs") :].splitlines()
    assert table[1].split(" | ")[:2] == ["job", "map_at"] and len(table) == 4
    assert table[2].split(" | ")[2].strip() == rows[0]["mAP"]
