"""Rank the whole gallery for every query and report mAP, Recall@K and P@k at image level.

Scores are exact inner products of the stored features, so the metrics do not depend on the FAISS
index type; with an approximate index (``index=HNSW32`` ...) ``index_recall@k`` reports how many of the
exact top-k rows that index finds. A gallery whose features exceed ``search_block_mb`` is not loaded:
it is streamed from its shards (utils/retrieval/streaming.py, the same numbers in bounded memory).
``search=faiss`` ranks FAISS's candidates only, re-scored exactly: its mAP is a lower bound of the
full-gallery mAP (said in results.json and the printed table, with the candidates' coverage of the
positives).

    python search_index.py features_dir=outputs/features/pe/siglip_mi_features-1a2b3c4d5e k_search=100

Writes to the run folder (printed at the end): results.json, rankings.jsonl, per_query.csv, and
report.html with thumbs/ (``report=false`` turns it off; see utils/results/report.py).

``T2I=true``: text-to-image retrieval, each query's text is ``text_prompt`` with its ``obj_name``
(SigLIP / CLIP text tower); the same metrics. Your own query, embedded as the folder's queries were
(utils/queries/own_queries.py; no metrics, there is no ground truth)::

    python search_index.py features_dir=... query_image=photo.jpg [query_bbox=[x1,y1,x2,y2]] k_search=20
    python search_index.py features_dir=... query_text="a red mug"
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from utils.config import CONFIG_GROUPS, SoIRConfig, check_config, refuse_unknown_keys, register, resolve_aliases
from utils.errors import exit_on_error
from utils.quiet import set_verbose

register()


@refuse_unknown_keys(SoIRConfig, CONFIG_GROUPS, "search_index.py")
@hydra.main(version_base="1.3", config_path="configs", config_name="defaults")
@exit_on_error
def main(cfg: DictConfig) -> None:
    set_verbose(cfg.verbose)
    resolve_aliases(cfg)
    check_config(cfg)
    # torch and faiss load here, after the settings are checked: --help, a misspelt key or a refused value
    # answer without them.
    from utils.pipeline.search import run

    run(cfg)


if __name__ == "__main__":
    main()
