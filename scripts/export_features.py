#!/usr/bin/env python
"""Export a features folder (create_index.py's output) for other retrieval tools (docs/interop.md).

    python scripts/export_features.py features_dir=outputs/features/pe/siglip_mi_features-1a2b3c4d5e format=embeddings
    python scripts/export_features.py features_dir=... format=lancedb [export_dtype=float16] [export_dir=...]

``format=embeddings``: clip-retrieval / autofaiss layout (``img_emb/img_emb_<shard>.npy`` +
``metadata/metadata_<shard>.parquet``, read by embedding-reader); ``format=lancedb``: an embedded LanceDB
table, one row per gallery image with a multivector column (``search_index.py search=lancedb`` ranks
through it). Output goes to ``export_dir`` (default ``<features_dir>/export/<format>``), a new or
SoIR-owned folder; rerunning the command resumes (see utils/results/interop.py).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

import hydra
from omegaconf import DictConfig

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as `python scripts/export_features.py`
    sys.path.insert(0, str(ROOT))

from utils.config import check_config, register, resolve_aliases  # noqa: E402
from utils.errors import SoIRError, exit_on_error  # noqa: E402
from utils.results.interop import export_dir, export_embeddings, export_lancedb  # noqa: E402

log = logging.getLogger("soir.export")
register()


@hydra.main(version_base="1.3", config_path="../configs", config_name="defaults")
@exit_on_error
def main(cfg: DictConfig) -> None:
    resolve_aliases(cfg)
    check_config(cfg)
    if not cfg.features_dir:
        raise SoIRError("features_dir is required: the folder create_index.py printed")
    features_dir = Path(cfg.features_dir)
    out = export_dir(cfg, features_dir)
    started = time.perf_counter()
    summary = (export_embeddings if cfg.format == "embeddings" else export_lancedb)(cfg, features_dir, out)
    log.info("export done in %.1f s: %s", time.perf_counter() - started, json.dumps(summary))
    print(f"export ({cfg.format}): {out}")


if __name__ == "__main__":
    main()
