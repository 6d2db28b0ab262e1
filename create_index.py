"""Extract gallery and query descriptors to disk (resumable shards) and build a FAISS index.

    python create_index.py extractor=siglip_mi_features anns_file=anns.pt captions_file=captions.pt

Every key is documented in docs/configuration.md; ``--help`` lists them, ``--cfg job`` prints the config.

Order of work, so that mistakes cost seconds, not hours: (1) read and check every input that
needs no model (annotations, masks, image headers, boxes, the index string); (2) load the model;
(3) claim and lock the features folder, which must hold nothing made with another identity;
(4) extract the missing shards; (5) build the index.

``stage=all`` (the default) does all of it in one process, then searches. For galleries that need
many processes the same work is split into stages (docs/scaling-out.md)::

    stage=prepare    (1)-(3), one process: writes the identity, images.json and per shard a job file
    stage=extract    (4), ``workers=W worker=w``: the missing shards s with s % W == w (any W resumes);
                     no lock, the identity is checked read-only; unreadable pixels are recorded in
                     their shard (bad_images=error is enforced by stage=index)
    stage=index      (5), one process: an IVF index is trained on a sample, added in resumable blocks
                     and merged on disk (utils/retrieval/index_build.py); writes summary.json
    stage=search     search_index.py
"""

from __future__ import annotations

import os
from pathlib import Path

import hydra
from omegaconf import DictConfig

from utils.config import CONFIG_GROUPS, SoIRConfig, check_config, refuse_unknown_keys, register, resolve_aliases
from utils.errors import exit_on_error
from utils.quiet import set_verbose

register()


@refuse_unknown_keys(SoIRConfig, CONFIG_GROUPS, "create_index.py")
@hydra.main(version_base="1.3", config_path="configs", config_name="defaults")
@exit_on_error
def main(cfg: DictConfig) -> None:
    set_verbose(cfg.verbose)
    resolve_aliases(cfg)
    check_config(cfg)
    # torch, transformers and faiss load here, after the settings are checked: --help, a misspelt key or
    # a refused value answer without them.
    from utils.pipeline.create import STAGES

    STAGES[cfg.stage](cfg)


def repository_on_pythonpath() -> None:
    """Put this repository on ``PYTHONPATH`` for the processes a Hydra launcher starts (submitit's jobs,
    local or SLURM, inherit the environment): they unpickle ``main`` and import ``utils``, ``datasets``
    ... from wherever the command was run, not from the script's folder as this process does."""
    root = str(Path(__file__).resolve().parent)
    paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if root not in paths:
        os.environ["PYTHONPATH"] = os.pathsep.join([root, *paths])


if __name__ == "__main__":
    repository_on_pythonpath()
    main()
