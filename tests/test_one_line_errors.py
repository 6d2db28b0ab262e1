"""Mistakes on the command line are one ``error:`` line, never a traceback, for every CLI.

One subprocess per CLI (slow): the entry point's wiring (the check runs on ``sys.argv`` before Hydra
composes) is what is tested there. The same mistakes in this process (tests.pipeline.run_main runs the
same check on the same overrides) keep the messages in the quick suite.
"""

from __future__ import annotations

import pytest

from tests.pipeline import run_main, run_script

CASES = [
    ("create_index.py", ("+mi_alhpa=0.03",), "unknown key 'mi_alhpa'; did you mean mi_alpha"),
    ("search_index.py", ("mi_alhpa=0.03",), "unknown key 'mi_alhpa'; did you mean mi_alpha"),
    ("scripts/train_mao.py", ("+temprature=0.1",), "unknown key 'temprature'; did you mean temperature?"),
    # no argument at all: was omegaconf's MissingMandatoryValue traceback
    ("create_index.py", (), "anns_file= is required"),
]


def _assert_one_error_line(proc, message: str) -> None:
    assert proc.returncode == 1
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], proc.stderr


@pytest.mark.slow  # a Python process per CLI: its exit status and its stderr are the subject
@pytest.mark.parametrize("script,args,message", [case for case in CASES if case[1]])
def test_command_line_mistakes_are_one_line(script, args, message, tmp_path):
    """Fails on main 4e786ae: Hydra's multi-line "Could not override" (or a silently appended `+key`)."""
    proc = run_script(script, *args, cwd=tmp_path, check=False)
    _assert_one_error_line(proc, message)
    assert not (tmp_path / "outputs").exists()  # a key is checked before Hydra makes a run folder


@pytest.mark.parametrize("script,args,message", CASES)
def test_command_line_mistakes_are_one_line_in_process(script, args, message, tmp_path):
    """Fails on main 4e786ae: Hydra's "Could not override" and a MissingMandatoryValue traceback for
    `python create_index.py` with no argument."""
    proc = run_main(script, *args, cwd=tmp_path, check=False)
    _assert_one_error_line(proc, message)
    if args:  # a key is checked before Hydra makes a run folder
        assert not (tmp_path / "outputs").exists()
