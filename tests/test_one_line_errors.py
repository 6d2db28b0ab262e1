"""Mistakes on the command line are one ``error:`` line, never a traceback, for every CLI.

Subprocess tests: the entry point's wiring (the check runs before Hydra composes) is what is tested.
"""

from __future__ import annotations

import pytest

from tests.pipeline import run_script


@pytest.mark.parametrize(
    "script,args,message",
    [
        ("create_index.py", ("+mi_alhpa=0.03",), "unknown key 'mi_alhpa'; did you mean mi_alpha"),
        ("search_index.py", ("mi_alhpa=0.03",), "unknown key 'mi_alhpa'; did you mean mi_alpha"),
        ("scripts/train_mao.py", ("+temprature=0.1",), "unknown key 'temprature'; did you mean temperature?"),
        # no argument at all: was omegaconf's MissingMandatoryValue traceback
        ("create_index.py", (), "anns_file= is required"),
    ],
)
def test_command_line_mistakes_are_one_line(script, args, message, tmp_path):
    """Fails on main 4e786ae: Hydra's multi-line "Could not override" (or a silently appended `+key`),
    and a MissingMandatoryValue traceback for `python create_index.py`."""
    proc = run_script(script, *args, cwd=tmp_path, check=False)
    assert proc.returncode == 1
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], proc.stderr
    if args:  # a key is checked before Hydra makes a run folder
        assert not (tmp_path / "outputs").exists()
