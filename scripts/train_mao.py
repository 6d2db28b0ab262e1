"""Train MaO LoRA adapters (the paper's Stage A) for ``create_index.py lora_adapt=true weights=...``.

    # one process (GPU if available); the paper's recipe is the default
    python scripts/train_mao.py anns_file=train/anns.pt captions_file=train/captions.pt
    # 4 GPUs, same result up to float rounding (batch_size counts pairs over all processes)
    torchrun --nproc_per_node 4 scripts/train_mao.py anns_file=... captions_file=...

Every key is in configs/train.yaml / utils/training/trainer.py:TrainConfig. The output folder
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

from datasets import load_anns
from utils import config as soir_config
from utils.errors import SoIRError, exit_on_error
from utils.families import FAMILIES
from utils.files import FolderLock, atomic_write_text, cached_sha256, check_identity, claim_folder
from utils.hub import model_weights_identity
from utils.training import trainer as training

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
    # Every input check (settings, batch split, annotations, set=, step count) before the folder is
    # claimed and identity.json written: a refused run leaves nothing, its corrected rerun is welcome there.
    inputs = training.load_inputs(cfg, ctx)
    identity = train_identity(cfg)
    out = Path(cfg.output_dir) if cfg.output_dir else default_output_dir(cfg, identity)
    if ctx.rank == 0:
        claim_folder(out, "training")
        with FolderLock(out):
            refuse_results_without_identity(out)
            check_identity(out / "identity.json", identity, "a training run", fix="use another output_dir")
            atomic_write_text(out / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
            training.train(cfg, out, ctx, inputs)
    else:
        training.train(cfg, out, ctx, inputs)
    if ctx.rank == 0:
        print(
            f"LoRA weights: {out / 'final.ckpt'} (best held-out mAP: {out / 'best.ckpt'})\n"
            f"use: python create_index.py extractor={cfg.family}_mi_features lora_adapt=true "
            f"lora_rank={cfg.lora_rank} weights={out / 'final.ckpt'} ..."
        )


TRAINING_OUTPUTS = ("last.ckpt", "best.ckpt", "final.ckpt", "metrics.jsonl")


def refuse_results_without_identity(out: Path) -> None:
    """A training folder holding checkpoints but no identity.json (deleted) is refused, not adopted:
    nothing says which model, settings and images its ``last.ckpt`` was trained with."""
    held = [name for name in TRAINING_OUTPUTS if (out / name).exists()]
    if held and not (out / "identity.json").exists():
        raise SoIRError(
            f"{out} holds {', '.join(held)} but no identity.json, so nothing says which model, settings and "
            f"images made them; use another output_dir, or delete {out} to train again"
        )


def train_identity(cfg: DictConfig) -> dict:
    """The settings the weights depend on (paths resolved), the sha256 of every input file, the base
    model's weights by content (utils.hub.model_weights_identity: a model folder rewritten with other
    weights is another run) and the bytes of every training and held-out image: a run resumes from
    ``last.ckpt`` only with exactly the inputs it started with."""
    identity = {k: v for k, v in OmegaConf.to_container(cfg, resolve=True).items() if k not in training.NOT_RESULT_KEYS}
    for key in INPUT_FILES:
        path = Path(identity[key]) if identity.get(key) else None
        if path is not None and path.exists():
            identity[key] = str(path.resolve())
            if path.is_file():
                identity[f"{key}_sha256"] = cached_sha256([path])[0]
    identity["model_weights"] = model_weights_identity(cfg.model_name or FAMILIES[cfg.family].default_models["base"])
    identity["images_sha256"] = images_digest(cfg)
    return identity


def images_digest(cfg: DictConfig) -> str:
    """sha256 over (key, sha256 of the bytes) of every image of ``anns_file`` and ``val_anns_file``."""
    digest = hashlib.sha256()
    for anns_file in (cfg.anns_file, cfg.val_anns_file):
        if anns_file:
            anns = load_anns(anns_file, cfg.galleries_dir, cfg.queries_dir)
            for ann, sha in zip(anns, cached_sha256([ann.file for ann in anns])):
                digest.update(f"{ann.key}\t{sha}\n".encode())
    return digest.hexdigest()


def default_output_dir(cfg: DictConfig, identity: dict) -> Path:
    """outputs/train/<dataset>/<family>-<hash of the identity>: the same command resumes in the same
    folder; other settings or inputs get their own."""
    digest = hashlib.sha1(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:10]
    return Path("outputs/train") / cfg.dataset / f"{cfg.family}-{digest}"


if __name__ == "__main__":
    main()
