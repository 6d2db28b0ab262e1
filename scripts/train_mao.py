"""Train MaO LoRA adapters (the paper's Stage A) for ``create_index.py lora_adapt=true weights=...``.

    # one process (GPU if available); the paper's recipe is the default
    python scripts/train_mao.py anns_file=train/anns.pt captions_file=train/captions.pt
    # 4 GPUs, same result up to float rounding (batch_size counts pairs over all processes)
    torchrun --nproc_per_node 4 scripts/train_mao.py anns_file=... captions_file=...

Every key is in configs/train.yaml / utils/training.py:TrainConfig. The output folder
(``output_dir``, default ``outputs/train/<dataset>/<family>-<hash of the settings>``) holds:

    final.ckpt        LoRA weights at the end  -> create_index.py lora_adapt=true lora_rank=R weights=final.ckpt
    best.ckpt         LoRA weights with the best held-out mAP (validated every val_every steps)
    last.ckpt         resume state: weights, optimizer, scheduler, step (rerun the same command to resume)
    metrics.jsonl     loss, lr, throughput every log_every steps; held-out mAP / R@1 / R@5 at validations
    identity.json     the settings and input hashes the weights depend on; config.yaml

A rerun of the same command resumes from last.ckpt (also after kill -9); a rerun with other settings in
the same folder is refused.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as `python scripts/train_mao.py`
    sys.path.insert(0, str(ROOT))

from utils import config as soir_config
from utils import training
from utils.errors import exit_on_error
from utils.files import FolderLock, atomic_write_text, cached_sha256, check_identity, claim_folder

log = logging.getLogger("soir.train_mao")
soir_config.register()  # the soir_uid resolver of the run folder names
training.register()

INPUT_FILES = (
    "anns_file",
    "captions_file",
    "val_anns_file",
    "val_captions_file",
    "galleries_dir",
    "queries_dir",
    "model_name",
)


@soir_config.refuse_unknown_keys(training.TrainConfig, (), "scripts/train_mao.py")
@hydra.main(version_base="1.3", config_path="../configs", config_name="train")
@exit_on_error
def main(cfg: DictConfig) -> None:
    training.check_train_config(cfg)
    ctx = training.setup_distributed(cfg.device, cfg.precision)
    identity = train_identity(cfg)
    out = Path(cfg.output_dir) if cfg.output_dir else default_output_dir(cfg, identity)
    if ctx.rank == 0:
        claim_folder(out, "training")
        with FolderLock(out):
            check_identity(out / "identity.json", identity, "a training run", fix="use another output_dir")
            atomic_write_text(out / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
            training.train(cfg, out, ctx)
    else:
        training.train(cfg, out, ctx)
    if ctx.rank == 0:
        print(
            f"LoRA weights: {out / 'final.ckpt'} (best held-out mAP: {out / 'best.ckpt'})\n"
            f"use: python create_index.py extractor={cfg.family}_mi_features lora_adapt=true "
            f"lora_rank={cfg.lora_rank} weights={out / 'final.ckpt'} ..."
        )


def train_identity(cfg: DictConfig) -> dict:
    """The settings the weights depend on (paths resolved) and the sha256 of every input file."""
    identity = {k: v for k, v in OmegaConf.to_container(cfg, resolve=True).items() if k not in training.NOT_RESULT_KEYS}
    for key in INPUT_FILES:
        path = Path(identity[key]) if identity.get(key) else None
        if path is not None and path.exists():
            identity[key] = str(path.resolve())
            if path.is_file():
                identity[f"{key}_sha256"] = cached_sha256([path])[0]
    return identity


def default_output_dir(cfg: DictConfig, identity: dict) -> Path:
    """outputs/train/<dataset>/<family>-<hash of the identity>: the same command resumes in the same
    folder; other settings or inputs get their own."""
    digest = hashlib.sha1(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:10]
    return Path("outputs/train") / cfg.dataset / f"{cfg.family}-{digest}"


if __name__ == "__main__":
    main()
