"""Prepare one of the paper's benchmarks from its public source and print its statistics.

    python scripts/prepare_benchmark.py instre_xs  --root /data/INSTRE --out benchmarks/instre_xs
    python scripts/prepare_benchmark.py instre_xxs --root /data/INSTRE --out benchmarks/instre_xxs
    python scripts/prepare_benchmark.py permir --root /data/BURST/frames \
        --burst_annotations /data/BURST/annotations/test/all_classes.json --out benchmarks/permir
    python scripts/prepare_benchmark.py voxdet --root /data/VoxDet --out benchmarks/voxdet   # validates root/anns.pt

Writes to --out: ``anns.pt`` (keys relative to --root; INSTRE, PerMiR), ``captions.pt`` (ground-truth
masks; PerMiR) and ``benchmark.json`` (statistics, the paper's, the subset rule, and the arguments
``scripts/reproduce.sh`` passes to create_index.py). VoxDet's own ``anns.pt`` is used where it is.
The rules: datasets/benchmarks.py (``INSTRE_RULE``, ``PERMIR_RULE``, ``VOXDET_RULE``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as `python scripts/prepare_benchmark.py`
    sys.path.insert(0, str(ROOT))

from datasets import AnnotationError, CaptionsError, ImageLoadError, save_anns, save_captions
from datasets.benchmarks import (
    LABELS,
    PAPER_STATS,
    build_instre,
    build_permir,
    voxdet_report,
)
from utils.files import check_claimable, claim_folder
from utils.retrieval.feature_store import atomic_write_text

OUTPUTS = ("anns.pt", "captions.pt", "benchmark.json")


def prepare(
    benchmark: str,
    root: Path,
    out: Path,
    burst_annotations: Path | None = None,
    voxdet_anns: Path | None = None,
    voxdet_set: str | None = "RoboTools",
    overwrite: bool = False,
) -> dict:
    """Build ``benchmark`` from ``root`` into ``out``; returns the benchmark.json dict."""
    root = root.resolve()
    earlier = _check_out(out, overwrite)
    anns = captions = None
    if benchmark in ("instre_xs", "instre_xxs"):
        anns, report = build_instre(root, benchmark)
    elif benchmark == "permir":
        if burst_annotations is None:
            raise ValueError("permir needs --burst_annotations (BURST's <split>/all_classes.json)")
        anns, captions, report = build_permir(burst_annotations, root)
    else:
        voxdet_anns = (voxdet_anns or root / "anns.pt").resolve()
        report = voxdet_report(voxdet_anns, voxdet_set)
    if not report.stats.get("queries") or not report.stats.get("gallery_images"):
        # create_index.py refuses a benchmark without queries or gallery: none is written.
        raise ValueError(
            f"{root} gives an empty {benchmark} benchmark ({report.stats.get('queries', 0)} queries, "
            f"{report.stats.get('gallery_images', 0)} gallery images; left out: {dict(report.excluded) or 'nothing'}); "
            "check --root (and --burst_annotations / --anns) name the benchmark's folders"
        )
    claim_folder(out, "benchmark")
    for name in earlier:  # only now, with every input read: a failed build keeps the earlier benchmark
        (out / name).unlink()
    anns_file = save_anns(anns, out / "anns.pt").resolve() if anns is not None else voxdet_anns
    captions_file = save_captions(captions, out / "captions.pt").resolve() if captions is not None else None
    if benchmark == "voxdet":
        index_args = [f"anns_file={anns_file}"] + ([f"set={voxdet_set}"] if voxdet_set else [])
    else:
        index_args = [f"anns_file={anns_file}", f"galleries_dir={root}", f"queries_dir={root}"]
    info = {
        "benchmark": benchmark,
        "label": LABELS[benchmark],
        "source": str(root),
        "anns_file": str(anns_file),
        "captions_file": captions_file and str(captions_file),
        "index_args": index_args,
        # ground-truth masks for Mask Inversion: the captions.pt written here, else the anns boxes/masks
        "gt_mask_args": [f"captions_file={captions_file}"] if captions_file else ["masks_from=anns", "box_masks=true"],
        "stats": report.stats,
        "paper_stats": PAPER_STATS[benchmark],
        "excluded": report.excluded,
        "rule": report.rule,
    }
    atomic_write_text(out / "benchmark.json", json.dumps(info, indent=1))
    return {**info, "table": report.table()}


def _check_out(out: Path, overwrite: bool) -> list[str]:
    """Refuse a folder this script did not make (its ``.soir.json``, utils.files.claim_folder: a
    user's own anns.pt or benchmark.json is never replaced), and an earlier benchmark unless
    ``overwrite``; returns the names of the earlier run's files, which :func:`prepare` deletes once
    the new benchmark is built."""
    check_claimable(out, "benchmark")
    present = [name for name in OUTPUTS if (out / name).exists()]
    if present and not overwrite:
        raise FileExistsError(f"{out} already holds {', '.join(present)}; use another --out or --overwrite")
    return present


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("benchmark", choices=sorted(LABELS))
    parser.add_argument(
        "--root",
        required=True,
        type=Path,
        help="instre_*: the INSTRE folder (INSTRE-S1, INSTRE-S2, INSTRE-M); permir: BURST's "
        "images_base_dir (<split>/<dataset>/<seq_name>/...); voxdet: the VoxDet root",
    )
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    parser.add_argument("--burst_annotations", type=Path, help="permir: BURST <split>/all_classes.json")
    parser.add_argument("--anns", type=Path, help="voxdet: the VoxDet-SoIR anns.pt (default: <root>/anns.pt)")
    parser.add_argument(
        "--set",
        default="RoboTools",
        help="voxdet: the set to measure and evaluate (default RoboTools, the paper's; 'all': all)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace what an earlier run wrote to --out")
    args = parser.parse_args(argv)
    try:
        info = prepare(
            args.benchmark,
            args.root,
            args.out,
            args.burst_annotations,
            args.anns,
            None if args.set == "all" else args.set,
            args.overwrite,
        )
    except (FileExistsError, FileNotFoundError, ValueError, AnnotationError, CaptionsError, ImageLoadError) as err:
        raise SystemExit(f"error: {err}") from None
    print(f"{info['label']} from {info['source']}")
    print(info["table"])
    for reason, count in info["excluded"].items():
        print(f"left out: {count} {reason}")
    print(f"rule: {info['rule']}")
    print(
        f"wrote {args.out / 'benchmark.json'}"
        + (f", anns {info['anns_file']}" if args.benchmark != "voxdet" else "")
        + (f", captions {info['captions_file']}" if info["captions_file"] else "")
    )
    print(f"evaluate: bash scripts/reproduce.sh {args.out}")


if __name__ == "__main__":
    main()
