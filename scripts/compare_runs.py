"""Several search runs side by side: one table of mAP, R@1, R@5 and the path of each run's report.

    python scripts/compare_runs.py global=outputs/runs/.../A mi_ground_truth_masks=outputs/runs/.../B

Each argument is ``label=run folder`` (a folder with the ``results.json`` of create_index.py's or
search_index.py's search). example/run_example.sh ends with this table; numbers in %.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as `python scripts/compare_runs.py`
    sys.path.insert(0, str(ROOT))

from utils.errors import exit_on_error
from utils.files import read_json
from utils.sweeps import format_table


def compare(runs: Sequence[tuple[str, Path]]) -> list[dict[str, str]]:
    """One row per (label, run folder): mAP, R@1, R@5 in % (two decimals) and the report's path
    ("(none)" when the run wrote no report.html)."""
    rows = []
    for label, folder in runs:
        results = read_json(folder / "results.json", fix="give the folder of a finished search run")
        report = folder / "report.html"
        rows.append(
            {
                "setting": label,
                "mAP": f"{100 * results['mAP']:.2f}",
                "R@1": f"{100 * results['recall']['1']:.2f}",
                "R@5": f"{100 * results['recall']['5']:.2f}",
                "report": str(report) if report.is_file() else "(none)",
            }
        )
    return rows


@exit_on_error
def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", metavar="LABEL=RUN_FOLDER")
    args = parser.parse_args(argv)
    runs = []
    for item in args.runs:
        label, sep, folder = item.partition("=")
        if not sep or not (Path(folder) / "results.json").is_file():
            parser.error(f"{item}: expected LABEL=RUN_FOLDER with a results.json in the folder")
        runs.append((label, Path(folder)))
    print(format_table(compare(runs)))
    print("(mAP, R@1, R@5 in %)")


if __name__ == "__main__":
    main()
