"""Quiet by default (utils/quiet.py): the two known third-party warnings are filtered where they arise,
INFO goes to the run's log file, and verbose=true restores both."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.pipeline import ROOT, features_dir_from, results_dir_from, run_main, run_script
from utils import quiet


@pytest.fixture
def restore_quiet():
    yield
    quiet.set_verbose(False)


def test_token_id_config_warnings_are_filtered_unless_verbose(caplog, restore_quiet):
    """Fails on main 4e786ae (no filter: one warning per special token per config)."""
    from transformers import SiglipTextConfig

    import utils.hub  # noqa: F401  (installs the filter, as every model load does)

    with caplog.at_level("WARNING"):
        SiglipTextConfig(vocab_size=57, bos_token_id=4242)  # ids never logged before: warning_once
        assert "must be `None` or an integer within the vocabulary" not in caplog.text
        quiet.set_verbose(True)
        SiglipTextConfig(vocab_size=58, bos_token_id=4243)
    assert "bos_token_id must be `None` or an integer within the vocabulary (between 0 and 57), got 4243" in caplog.text


@pytest.mark.slow  # a fresh interpreter: torch warns once per process
def test_legrad_raises_no_jit_script_deprecation():
    """torch's FutureWarning from its first jvp (LeGrad's activation derivative) is filtered there, and
    only there: an error under -W error. Fails on main 4e786ae."""
    code = (
        "import torch\nfrom extractors.mi.legrad import _elementwise_derivative\n"
        "print(_elementwise_derivative(torch.nn.GELU(), torch.zeros(2)).tolist())"
    )
    proc = subprocess.run(
        [sys.executable, "-W", "error::FutureWarning", "-c", code], cwd=ROOT, capture_output=True, text=True
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "[0.5, 0.5]", proc.stderr[-2000:]


@pytest.mark.slow  # a subprocess: what reaches the terminal (warnings included) is the subject
def test_the_terminal_gets_tables_not_logs(tiny_model_dirs, demo_dir, tmp_path):
    """A default MI run: no third-party warning and no INFO line on the terminal (the run's log file has
    them); verbose=true brings INFO back. Fails on main 4e786ae (timestamped INFO lines, `done: {json}`,
    the torch.jit.script FutureWarning)."""
    args = (
        "extractor=siglip_mi_features",
        f"model_name={tiny_model_dirs['siglip']}",
        "vec_dim=32",
        f"anns_file={demo_dir / 'anns.pt'}",
        f"captions_file={demo_dir / 'captions.pt'}",
        "mi_iterations=2",
        "num_workers=0",
        "report=false",
    )
    proc = run_script("create_index.py", *args, cwd=tmp_path)
    terminal = proc.stdout + proc.stderr
    for noise in ("[INFO]", "Warning", "warnings.warn", "done: {", "token_id"):
        assert noise not in terminal, terminal
    assert "    mAP |     R@1" in proc.stdout and "results: " in proc.stdout
    (log,) = results_dir_from(proc).glob("create_index.log")
    assert "[soir.create_index][INFO] - done: {" in log.read_text()
    verbose = run_main(  # the console handler's level follows verbose (Hydra's job logging, in this process)
        "search_index.py", f"features_dir={features_dir_from(proc, tmp_path)}", "verbose=true", cwd=tmp_path
    )
    assert "[soir.search_index][INFO]" in verbose.stdout
