"""Sweeps (``-m key=a,b``) that end with an answer: one row per job, compared in one table.

Hydra runs each job of ``python create_index.py -m mi_alpha=0.01,0.03 ...`` (or ``search_index.py``)
in a folder of the sweep directory. Two things here make the sweep readable:

* :func:`job_label` (the ``soir_job`` resolver in ``hydra.sweep.subdir``) names each job folder by
  the overrides that vary across the sweep, ``0-mi_alpha=0.01``, not only by its number;
* :class:`SweepSummary` (a Hydra callback, ``hydra.callbacks`` in configs/defaults.yaml) writes
  ``summary.csv`` in the sweep directory when the last job has returned and prints it as one table:
  per job its swept keys and values, mAP, R@1/5/10, features folder and run folder.

The swept keys are the master command line's sweep overrides (``a,b``, ``range()``, ``choice()``...),
passed to the jobs in the environment variable ``SOIR_SWEPT_KEYS`` so that a launcher's processes
(submitit, local or SLURM, inherit it) name their folders the same way.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
from pathlib import Path
from typing import Any, Sequence

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from utils.files import atomic_write_text

SWEPT_ENV = "SOIR_SWEPT_KEYS"
MAX_LABEL = 100  # characters of a job folder's label (file systems allow 255 per name)
RECALL_KS = ("1", "5", "10")


def swept_keys(task_overrides: Sequence[str]) -> list[str]:
    """Keys of the sweep overrides among the master command line's ``task_overrides``, in order."""
    parsed = OverridesParser.create().parse_overrides([str(o) for o in task_overrides])
    return [o.key_or_group for o in parsed if o.is_sweep_override()]


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def job_label(task_overrides: Sequence[str]) -> str:
    """``-key=value,...`` of the job's overrides whose keys the sweep varies (``SOIR_SWEPT_KEYS``), for
    its folder name after the job number; "" outside a sweep. A ``/`` in a value becomes ``_`` (one
    folder, not nested ones) and a label longer than ``MAX_LABEL`` characters is cut there: the job
    number before it keeps folder names unique."""
    keys = [k for k in os.environ.get(SWEPT_ENV, "").split(",") if k]
    parts = [str(o) for o in task_overrides if _key(str(o)) in keys]
    label = re.sub(r"[/\\\0]", "_", ",".join(parts))[:MAX_LABEL]
    return f"-{label}" if label else ""


def job_rows(sweep_dir: Path, keys: Sequence[str]) -> list[dict[str, Any]]:
    """One row per job folder of ``sweep_dir`` (those with ``.hydra/overrides.yaml``), by job number:
    its values of ``keys``, mAP, R@1/5/10 (percent, from its ``results.json``; empty when the job
    wrote none, e.g. ``only_create=true``), features folder and run folder."""
    rows = []
    for overrides_file in sweep_dir.glob("*/.hydra/overrides.yaml"):
        job_dir = overrides_file.parents[1]
        overrides = {_key(o): o.split("=", 1)[1] for o in OmegaConf.load(overrides_file) if "=" in o}
        num = OmegaConf.load(job_dir / ".hydra" / "hydra.yaml").hydra.job.num
        results_file = job_dir / "results.json"
        results = json.loads(results_file.read_text()) if results_file.is_file() else {}
        recall = results.get("recall", {})
        row = {"job": num, **{key: overrides.get(key, "") for key in keys}}
        row["mAP"] = f"{100 * results['mAP']:.2f}" if "mAP" in results else ""
        row.update({f"R@{k}": f"{100 * recall[k]:.2f}" if k in recall else "" for k in RECALL_KS})
        row.update(features_dir=results.get("features_dir", ""), run_dir=str(job_dir))
        rows.append(row)
    return sorted(rows, key=lambda row: row["job"])


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """``rows`` as aligned text columns with a header line."""
    if not rows:
        return "(no jobs)"
    columns = list(rows[0])
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in columns}
    lines = [" | ".join(f"{c:<{widths[c]}}" for c in columns)]
    lines += [" | ".join(f"{str(r[c]):<{widths[c]}}" for c in columns) for r in rows]
    return "\n".join(lines)


class SweepSummary(Callback):
    """Hydra callback: the swept keys to the jobs (``SOIR_SWEPT_KEYS``) at the start of a sweep, and
    at its end ``summary.csv`` in the sweep directory, printed as one table (see the module doc)."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.keys = swept_keys(OmegaConf.to_container(config.hydra.overrides.task))
        os.environ[SWEPT_ENV] = ",".join(self.keys)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)  # ${now:} and soir_uid are cached: the jobs' folder
        rows = job_rows(sweep_dir, getattr(self, "keys", []))
        if not rows:
            return
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_text(sweep_dir / "summary.csv", text.getvalue())
        print(f"\nsweep of {len(rows)} jobs (mAP and R@K in %): {sweep_dir / 'summary.csv'}\n{format_table(rows)}")
