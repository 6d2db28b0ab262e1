"""Helpers to run create_index.py / search_index.py as users do.

:func:`run_main` runs a CLI's ``main`` in this process, on the config Hydra composes from the same
command line (the same schema, checks, run folder, ``.hydra`` files and log configuration), so an
end-to-end test does not pay a new interpreter's imports. :func:`run_script` starts the CLI as a
subprocess: for the tests where the process itself is the subject (exit codes, kill -9, workers).
"""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

from omegaconf import DictConfig

ROOT = Path(__file__).resolve().parents[1]


def run_script(script: str, *overrides: str, cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    """Run ``python <repo>/<script> overrides...`` in ``cwd`` with the hub offline."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / script), *overrides], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def compose_config(
    *overrides: str, config_name: str = "defaults", job_name: str = "create_index", hydra: bool = False
) -> DictConfig:
    """The config Hydra composes for ``python <job_name>.py overrides...`` (configs/<config_name>.yaml
    with the ``soir_schema`` registered by utils.config.register); with ``hydra=True`` its ``hydra``
    node too (run folder, logging), as :func:`run_main` needs."""
    from hydra import compose, initialize_config_dir

    from utils.config import register

    register()  # what importing create_index.py / search_index.py does: the schema and the resolvers
    if config_name == "train":
        from utils.training.trainer import register as register_training

        register_training()  # what importing scripts/train_mao.py does: its schema
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3", job_name=job_name):
        return compose(config_name=config_name, overrides=list(overrides), return_hydra_config=hydra)


def run_main(script: str, *overrides: str, cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    """``python <repo>/<script> overrides...`` in ``cwd``, in this process (create_index.py,
    search_index.py, scripts/train_mao.py): the command line's keys
    are checked as the CLI checks them (utils.config.check_overrides), the config is composed by
    Hydra's compose API and the script's ``main(cfg)`` runs under Hydra's own ``run_job`` (run folder
    under ``cwd``, ``.hydra/`` files, ``<job>.log``, the console handler at the configured level).

    What the CLI sets for the rest of its process is put back afterwards: the working folder, the root
    logger's handlers and level, Hydra's config, ``verbose``. Warnings go to pytest's warning capture,
    not to stderr: tests of what reaches the terminal use :func:`run_script`.

    Returns what :func:`run_script` returns: exit status, stdout, stderr. A ``SystemExit`` (the CLIs'
    one-line ``error:``) becomes the exit status; any other exception propagates with its traceback.
    Multirun (``-m``) is not supported: its launcher is tested by :func:`run_script`.
    """
    from hydra import compose, initialize_config_dir
    from hydra._internal.callbacks import Callbacks
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from hydra.core.utils import run_job
    from hydra.types import HydraContext

    from utils import quiet
    from utils.config import CONFIG_GROUPS, SoIRConfig, check_overrides
    from utils.errors import exit_on_error
    from utils.training.trainer import TrainConfig

    # script -> (module, configs/<name>.yaml, schema and config groups that refuse_unknown_keys checks)
    clis = {
        "create_index.py": ("create_index", "defaults", SoIRConfig, CONFIG_GROUPS),
        "search_index.py": ("search_index", "defaults", SoIRConfig, CONFIG_GROUPS),
        "scripts/train_mao.py": ("scripts.train_mao", "train", TrainConfig, ()),
    }
    module_name, config_name, schema, groups = clis[script]
    assert "-m" not in overrides and "--multirun" not in overrides, "multirun: use run_script"
    module = importlib.import_module(module_name)
    job_name = Path(script).stem
    stdout, stderr = io.StringIO(), io.StringIO()
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    old_cwd = os.getcwd()
    verbose = quiet._VERBOSE  # set by the CLI's verbose= for the rest of its process
    returncode = 0
    try:
        os.chdir(cwd)
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            try:
                # The CLI's refuse_unknown_keys runs this on sys.argv before Hydra composes.
                exit_on_error(check_overrides)(list(overrides), schema, groups, script)
                with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3", job_name=job_name):
                    cfg = compose(config_name=config_name, overrides=list(overrides), return_hydra_config=True)
                    HydraConfig.instance().set_config(cfg)
                    context = HydraContext(
                        config_loader=GlobalHydra.instance().config_loader(), callbacks=Callbacks(cfg)
                    )
                    ret = run_job(module.main, cfg, "hydra.run.dir", None, context)
                    ret.return_value  # noqa: B018 - re-raises the task's exception, as hydra.main does
            except SystemExit as exit_:
                returncode = exit_.code if isinstance(exit_.code, int) else 1
    finally:
        os.chdir(old_cwd)
        quiet.set_verbose(verbose)
        HydraConfig.instance().cfg = None
        for handler in root.handlers:
            if handler not in handlers:
                handler.close()
        root.handlers[:] = handlers
        root.setLevel(level)
    proc = subprocess.CompletedProcess([script, *overrides], returncode, stdout.getvalue(), stderr.getvalue())
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def features_dir_from(proc: subprocess.CompletedProcess, cwd: Path) -> Path:
    line = next(s for s in proc.stdout.splitlines() if s.startswith(("features and index: ", "features: ")))
    return cwd / line.split(": ", 1)[1]


def results_dir_from(proc: subprocess.CompletedProcess) -> Path:
    line = next(s for s in proc.stdout.splitlines() if s.startswith("results: "))
    return Path(line.split(": ", 1)[1])


def read_results(folder: Path) -> tuple[dict, list[dict]]:
    results = json.loads((folder / "results.json").read_text())
    rankings = [json.loads(line) for line in (folder / "rankings.jsonl").read_text().splitlines()]
    return results, rankings
