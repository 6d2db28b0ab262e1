"""The CLIs answer --help, a misspelt key and a refused value without loading torch, transformers,
torchvision or faiss (issue 28 part 5): the process is the subject, so each command runs as a process.

Each run is timed in user CPU (``resource.getrusage(RUSAGE_CHILDREN)``). The target is 1.0 s on a
developer machine; the bound here is generous (CI machines vary): what it catches is a heavy import
creeping back, which costs 5-8 s.
"""

from __future__ import annotations

import resource
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
HEAVY = ("torch", "torchvision", "transformers", "faiss")
USER_CPU_BOUND_S = 2.5


def imported_modules(importtime: str) -> set[str]:
    """The top-level names of the modules in ``python -X importtime``'s report (its stderr lines
    ``import time: self | cumulative | name``, the name indented by nesting)."""
    names = set()
    for line in importtime.splitlines():
        if line.startswith("import time:") and "|" in line:
            name = line.rsplit("|", 1)[1].strip()
            if name != "imported package":  # the report's header line
                names.add(name.split(".", 1)[0])
    return names


def test_imported_modules_reads_the_importtime_report():
    report = (
        "import time: self [us] | cumulative | imported package\n"
        "import time:       120 |        120 |   torch._C\n"
        "import time:       300 |        420 | torch\nerror: x\n"
    )
    assert imported_modules(report) == {"torch"}


@pytest.mark.parametrize(
    "script,args,rc,says",
    [
        ("search_index.py", ["--help"], 0, "mi_alpha=0.03"),
        ("create_index.py", ["--help"], 0, "mi_alpha=0.03"),
        ("create_index.py", ["extractr=x"], 1, "unknown key 'extractr'; did you mean extractor"),
        ("create_index.py", ["stage=bogus"], 1, "Invalid value 'bogus'"),  # refused by the schema
        ("create_index.py", ["rerank_k=0"], 1, "rerank_k=0 must be >= 1"),  # refused by check_config
        ("search_index.py", ["serch=exact"], 1, "unknown key 'serch'; did you mean search"),
        ("search_index.py", ["k_search=0"], 1, "k_search=0 must be positive"),
    ],
)
def test_cli_answers_without_torch(tmp_path, script, args, rc, says):
    """Fails before issue 28 part 5: utils/config.py imported utils/families.py, which imported
    transformers and torchvision, so each of these took 6-9 s of user CPU."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_utime
    done = subprocess.run(
        [sys.executable, "-X", "importtime", str(ROOT / script), *args, f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    user_cpu = resource.getrusage(resource.RUSAGE_CHILDREN).ru_utime - before
    assert done.returncode == rc, done.stdout[-2000:] + done.stderr[-2000:]
    assert says in done.stdout + done.stderr
    heavy = imported_modules(done.stderr) & set(HEAVY)
    assert not heavy, f"{script} {' '.join(args)} imported {sorted(heavy)}"
    assert user_cpu < USER_CPU_BOUND_S, f"{script} {' '.join(args)}: {user_cpu:.2f} s of user CPU"
