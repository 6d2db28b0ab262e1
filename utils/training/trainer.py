"""MaO Stage A: train LoRA adapters so that a scene's averaged object-crop embedding finds its query object.

Per (query, scene) pair the scene's k object crops are encoded separately and averaged into one scene
vector ``s``; the query image's embedding is ``q`` (both unit norm, the backbone's own global
embedding: DINOv2 ``pooler_output``, CLIP ``image_embeds``). The loss is the symmetric InfoNCE over the
batch of N pairs, every other scene (query) of the batch being a negative::

    loss = (CE(Q S^T / T, I) + CE(S Q^T / T, I)) / 2

except that a scene which also shows the query's instance (two pairs of one instance, or two instances
of one scene, in the same batch) is not used as a negative for it (its logit is dropped).

Temperature: 0.07 by default. The paper does not give it; 0.07 is the value of InstDisc / MoCo and
CLIP's initial temperature, for unit vectors: cosines lie in [-1, 1], so at T = 1 the softmax over 128
candidates is almost flat and the loss hardly separates them; at 0.07 the logits span +-14.

Batch: ``batch_size`` pairs per optimizer step, whatever the number of processes and the micro-batch.
With several micro-batches or processes the step uses an *embedding cache* (as GradCache, Gao et al.
2021): (1) embed all micro-batches without a graph, (2) gather the embeddings of all processes and
compute the loss of the whole batch and its gradient with respect to the embeddings, (3) embed each
micro-batch again with a graph, replaying the same dropout, and backpropagate those gradients. The
loss and gradient are those of one batch of ``batch_size`` (every pair is a negative of every other),
at the memory of one micro-batch, for one more forward pass without a graph.

Randomness: LoRA's initialisation is drawn from ``seed``; the dropout of every micro-batch from
(seed, step, rank, micro-batch), and the data of every step from (seed, step) (utils/training/data.py).
So a run resumed from its checkpoint (weights, optimizer, scheduler, step) continues exactly as the
uninterrupted run, and nothing depends on DataLoader workers or on validation.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from datasets import atomic_torch_save, load_anns, load_captions, relevance, select_set, split
from datasets.preprocessing import Preprocess
from extractors.backbones import load_backbone
from extractors.base import resolve_device
from extractors.lora import LoraSettings, lora_checkpoint, wrap_with_lora
from extractors.mi.vit_adapters import vit_parts
from utils.config import LoRASettings, MISettings
from utils.errors import SoIRError
from utils.families import FAMILIES, lora_families
from utils.files import atomic_write_text
from utils.retrieval.metrics import retrieval_metrics
from utils.training.data import (
    MicroBatches,
    Pair,
    PairDataset,
    PairOrder,
    Scene,
    collate_pairs,
    held_out_instances,
    make_pairs,
    scene_boxes,
)

log = logging.getLogger("soir.training")


@dataclass
class TrainConfig:
    """Typed schema of ``configs/train.yaml``; the defaults are the paper's recipe (docs/training.md)."""

    # --- data --------------------------------------------------------------------------
    dataset: str = "voxdet"  # a name; used in the output path only
    anns_file: str = MISSING  # anns.pt: queries (with bbox) + gallery scenes (with ins)
    captions_file: Optional[str] = None  # captions.pt: detector boxes per scene (create_masked_dataset.py)
    box_source: str = "captions"  # captions: captions.pt boxes | anns: the anns entry's object boxes
    set: Optional[str] = None  # train on one split of anns_file (VoxDet-SoIR: OWID | RoboTools), as
    # create_index.py's `set`; null = all (refused when two sets share instance ids)
    galleries_dir: Optional[str] = None  # as create_index.py
    queries_dir: Optional[str] = None
    max_crops: int = 10  # k: the best-scored boxes per scene
    crop_pad: float = MISettings.smart_crop_pad  # as smart_crop_pad: padding, share of the box's longer side
    min_crop_size: Optional[int] = None  # crops grow to at least this side; null = image_size
    val_anns_file: Optional[str] = None  # held-out split; null = hold out val_fraction of the instances
    val_captions_file: Optional[str] = None  # boxes of the held-out scenes; null = captions_file
    val_fraction: float = 0.05
    # --- model ---------------------------------------------------------------------------
    family: str = "dinov2"  # a family that supports LoRA (utils.families.lora_families)
    model_name: Optional[str] = None  # null = facebook/dinov2-base | openai/clip-vit-base-patch16
    image_size: int = 224  # model input side in pixels
    lora_rank: int = LoRASettings.lora_rank  # create_index.py's defaults: adapters trained here load there as they are
    lora_alpha: float = LoRASettings.lora_alpha
    lora_dropout: float = 0.1
    # --- objective and optimisation --------------------------------------------------------
    temperature: float = 0.07  # InfoNCE temperature (see utils/training/trainer.py)
    lr: float = 5e-5  # AdamW
    weight_decay: float = 0.01  # AdamW (torch's default; the paper does not say)
    lr_decay: float = 0.93  # lr = max(min_lr, lr * lr_decay ** (step // lr_decay_every))
    lr_decay_every: Optional[int] = None  # optimizer steps; null = the interval at which lr reaches
    # min_lr at the end of training (see decay_interval); 1 = every step (min_lr after 54 steps)
    min_lr: float = 1e-6
    batch_size: int = 128  # pairs per optimizer step, all processes together
    micro_batch: int = 16  # pairs per forward pass and process (memory)
    epochs: int = 1
    max_steps: Optional[int] = None  # stop earlier (null = all epochs)
    precision: str = "bf16"  # bf16 (autocast, fp32 master weights) | fp32
    seed: int = 0
    # --- run ------------------------------------------------------------------------------
    device: str = "auto"  # auto | cpu | cuda (torchrun: cuda:LOCAL_RANK)
    num_workers: int = 4  # DataLoader processes per training process
    output_dir: Optional[str] = None  # null = outputs/train/<dataset>/<family>-<hash of the settings>
    log_every: int = 10  # steps between metrics.jsonl lines
    val_every: int = 100  # steps between validations (and at step 0 and the end)
    checkpoint_every: int = 50  # steps between resume checkpoints (and at the end)


# Keys that do not change the trained weights: a run may resume with other values.
NOT_RESULT_KEYS = {"output_dir", "num_workers", "log_every", "checkpoint_every", "device"}


def register() -> None:
    """Register the schema as ``soir_train_schema`` (used by configs/train.yaml)."""
    ConfigStore.instance().store(name="soir_train_schema", node=TrainConfig)


def check_train_config(cfg: Any) -> None:
    """Cross-key checks, before anything is loaded. Raises SoIRError naming the key."""
    choices = {"family": tuple(lora_families()), "box_source": ("captions", "anns"), "precision": ("bf16", "fp32")}
    for key, allowed in choices.items():
        if cfg[key] not in allowed:
            raise SoIRError(f"{key}={cfg[key]!r} is not one of {', '.join(allowed)}")
    for key in (
        "max_crops",
        "image_size",
        "lora_rank",
        "batch_size",
        "micro_batch",
        "epochs",
        "log_every",
        "val_every",
        "checkpoint_every",
        "lr_decay_every",
    ):
        if cfg[key] is not None and cfg[key] < 1:
            raise SoIRError(f"{key}={cfg[key]} must be positive")
    for key in ("temperature", "lr", "lora_alpha"):
        if not cfg[key] > 0:
            raise SoIRError(f"{key}={cfg[key]} must be > 0")
    if not 0 < cfg.lr_decay <= 1 or not 0 <= cfg.min_lr <= cfg.lr:
        raise SoIRError(
            f"need 0 < lr_decay <= 1 and 0 <= min_lr <= lr (lr_decay={cfg.lr_decay}, min_lr={cfg.min_lr}, lr={cfg.lr})"
        )
    if not 0 <= cfg.lora_dropout < 1 or not 0 <= cfg.crop_pad <= 2:
        raise SoIRError(
            f"need 0 <= lora_dropout < 1 and 0 <= crop_pad <= 2 "
            f"(lora_dropout={cfg.lora_dropout}, crop_pad={cfg.crop_pad})"
        )
    if cfg.box_source == "captions" and not cfg.captions_file:
        raise SoIRError(
            "box_source=captions needs captions_file= (boxes from scripts/create_masked_dataset.py); "
            "or box_source=anns to crop each scene to its anns.pt bbox"
        )
    if cfg.val_anns_file is None and not 0 < cfg.val_fraction < 1:
        raise SoIRError(f"val_fraction={cfg.val_fraction} must be in (0, 1) when val_anns_file is not given")


# ---------------------------------------------------------------------------------------------
# Model and objective
# ---------------------------------------------------------------------------------------------
def build_model(cfg: Any) -> tuple[nn.Module, LoraSettings]:
    """The backbone (``extractors.backbones.load_backbone``) wrapped with trainable LoRA (seeded init)."""
    settings = LoraSettings(
        rank=cfg.lora_rank,
        alpha=float(cfg.lora_alpha),
        dropout=cfg.lora_dropout,
        target_modules=FAMILIES[cfg.family].lora_targets,
        family=cfg.family,
    )
    backbone = load_backbone(cfg.family, cfg.model_name or FAMILIES[cfg.family].default_models["base"], "sdpa")
    torch.manual_seed(cfg.seed)
    model = wrap_with_lora(backbone, settings)  # only the LoRA tensors require gradients
    return model, settings


def embed(model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """The backbone's global embedding, unit norm, float32 [N, D]; with a graph when grad is enabled.

    ``model``: the peft-wrapped backbone, or its DistributedDataParallel wrapper.
    """
    output = model(pixel_values=pixel_values)
    inner = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    return F.normalize(vit_parts(inner).global_embedding(output).float(), dim=-1)


def encode_pairs(
    model: nn.Module, queries: torch.Tensor, crops: torch.Tensor, counts: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Query embeddings q [B, D] and scene embeddings s [B, D] (mean of each scene's crop embeddings,
    renormalised), from one forward pass over queries [B, 3, S, S] and crops [sum(counts), 3, S, S]."""
    vectors = embed(model, torch.cat([queries, crops]))
    q, c = vectors[: len(queries)], vectors[len(queries) :]
    owner = torch.repeat_interleave(torch.arange(len(counts), device=c.device), counts.to(c.device))
    s = torch.zeros(len(counts), c.shape[1], device=c.device, dtype=c.dtype).index_add(0, owner, c)
    return q, F.normalize(s / counts.to(c)[:, None], dim=-1)


def info_nce(q: torch.Tensor, s: torch.Tensor, positives: torch.Tensor, temperature: float) -> torch.Tensor:
    """Symmetric InfoNCE of matched rows q[i] <-> s[i] (unit vectors [N, D]).

    positives [N, N] bool: scene j shows query i's instance. Off-diagonal positives are dropped from
    the softmax (they are not negatives); the diagonal must be True.
    """
    logits = q @ s.T / temperature
    eye = torch.eye(len(q), dtype=torch.bool, device=q.device)
    logits = logits.masked_fill(positives.to(q.device) & ~eye, float("-inf"))
    targets = torch.arange(len(q), device=q.device)
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2


def decays(step: int, cfg: Any, total_steps: int) -> int:
    """How many times the rate has been multiplied by ``lr_decay`` before optimizer step ``step``
    (0-based) of a run of ``total_steps``: ``step // lr_decay_every``, or (null) n decays spread evenly
    over the run, ``step * n // (total_steps - 1)``, with n = ceil(log(min_lr / lr) / log(lr_decay))
    the decays that reach ``min_lr``, so the last step trains at ``min_lr``.

    The paper gives "exponential decay 0.93" from 5e-5 to 1e-6 without saying per what; per step the
    floor comes after n = 54 steps, ~4 % of the ~1,400 steps of its one epoch on VoxDet, and the rest
    trains at 1/50 of the stated rate. The default reads the recipe as a schedule over the whole run
    (a decay every ~26 steps there); ``lr_decay_every=1`` is the per-step reading.
    """
    if cfg.lr_decay_every is not None:
        return step // int(cfg.lr_decay_every)
    if cfg.lr_decay == 1 or cfg.min_lr >= cfg.lr:
        return 0  # no decay, or no room for one
    if cfg.min_lr == 0:
        raise SoIRError("lr_decay_every=null spreads the decay down to min_lr over the run: it needs min_lr > 0")
    count = math.ceil(math.log(cfg.min_lr / cfg.lr) / math.log(cfg.lr_decay))
    return step * count // max(1, total_steps - 1)


def learning_rate(step: int, cfg: Any, total_steps: int) -> float:
    """The rate of optimizer step ``step``: ``lr * lr_decay ** decays(...)`` floored at ``min_lr``."""
    return max(cfg.min_lr, cfg.lr * cfg.lr_decay ** decays(step, cfg, total_steps))


def micro_seed(seed: int, step: int, rank: int, micro: int) -> int:
    """A well-mixed seed for the dropout of one micro-batch."""
    return int(np.random.SeedSequence([seed, step, rank, micro]).generate_state(1)[0])


# ---------------------------------------------------------------------------------------------
# One optimizer step
# ---------------------------------------------------------------------------------------------
@dataclass
class Context:
    """Where the step runs: device, autocast, process rank and count, the DDP-wrapped model (or the model)."""

    device: torch.device
    precision: str
    rank: int = 0
    world: int = 1
    ddp: nn.Module | None = None

    def autocast(self):
        if self.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()


def train_step(
    model: nn.Module, micro_batches: list[tuple], positives: torch.Tensor, cfg: Any, step: int, ctx: Context
) -> float:
    """Accumulate the gradient of the whole batch's loss in the LoRA parameters; returns the loss.

    ``micro_batches``: this process's (queries, crops, counts) micro-batches of step ``step``;
    ``positives``: [N, N] bool over the whole batch (all processes, in order).
    """
    forward = ctx.ddp if ctx.ddp is not None else model
    moved = [(q.to(ctx.device), c.to(ctx.device), n) for q, c, n in micro_batches]
    if len(moved) == 1 and ctx.world == 1:  # the plain path: one forward, one backward
        torch.manual_seed(micro_seed(cfg.seed, step, ctx.rank, 0))
        with ctx.autocast():
            q, s = encode_pairs(forward, *moved[0])
        loss = info_nce(q, s, positives, cfg.temperature)
        loss.backward()
        return loss.item()
    # (1) embeddings of every micro-batch, without a graph
    cached = []
    with torch.no_grad():
        for m, batch in enumerate(moved):
            torch.manual_seed(micro_seed(cfg.seed, step, ctx.rank, m))
            with ctx.autocast():
                cached.append(encode_pairs(model, *batch))
    q_local, s_local = (torch.cat(t) for t in zip(*cached))
    # (2) the whole batch's loss and its gradient with respect to this process's embeddings
    q_all, s_all = _gather(q_local, ctx), _gather(s_local, ctx)
    start = ctx.rank * len(q_local)
    q_all[start : start + len(q_local)] = q_local
    s_all[start : start + len(s_local)] = s_local
    q_all.requires_grad_(True)
    s_all.requires_grad_(True)
    loss = info_nce(q_all, s_all, positives, cfg.temperature)
    loss.backward()
    q_grad = q_all.grad[start : start + len(q_local)]
    s_grad = s_all.grad[start : start + len(s_local)]
    # (3) replay each micro-batch with a graph and the same dropout; DDP averages over processes,
    # so the surrogate is scaled by their number to give the sum of their contributions.
    offset = 0
    for m, batch in enumerate(moved):
        sync = m == len(moved) - 1
        with contextlib.nullcontext() if sync or ctx.ddp is None else ctx.ddp.no_sync():
            torch.manual_seed(micro_seed(cfg.seed, step, ctx.rank, m))
            with ctx.autocast():
                q, s = encode_pairs(forward, *batch)
            rows = slice(offset, offset + len(q))
            surrogate = (q * q_grad[rows]).sum() + (s * s_grad[rows]).sum()
            (surrogate * ctx.world).backward()
        offset += len(q)
    return loss.item()


def _gather(x: torch.Tensor, ctx: Context) -> torch.Tensor:
    """[world * n, D]: this tensor of every process, in rank order (a fresh leaf tensor)."""
    if ctx.world == 1:
        return x.detach().clone()
    parts = [torch.empty_like(x) for _ in range(ctx.world)]
    dist.all_gather(parts, x.detach().contiguous())
    return torch.cat(parts)


def batch_positives(pairs: list[Pair], scenes: list[Scene]) -> torch.Tensor:
    """[N, N] bool: scene of pair j shows the instance of pair i."""
    return torch.tensor([[p.instance in scenes[o.scene].annotation.ins for o in pairs] for p in pairs])


# ---------------------------------------------------------------------------------------------
# Validation: image-level retrieval with the training's own descriptors
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def validate(
    model: nn.Module,
    data: PairDataset,
    queries: list[int],
    relevant: np.ndarray,
    ctx: Context,
    micro_batch: int,
    num_workers: int,
) -> dict:
    """Exact, image-level retrieval metrics (utils.retrieval.metrics) of the held-out split.

    Queries are embedded as in training (their bbox crop), every scene as the mean of its crop
    embeddings; scores are cosines, every query ranks every held-out scene.
    """
    was_training = model.training
    model.eval()
    try:
        loader = DataLoader(_ValItems(data, queries), batch_size=micro_batch, num_workers=num_workers, collate_fn=list)
        q_rows, s_rows = [], []
        for items in loader:
            for kind, rows in (("q", q_rows), ("s", s_rows)):
                chosen = [x for k, x in items if k == kind]
                if not chosen:
                    continue
                with ctx.autocast():
                    if kind == "q":
                        rows.append(embed(model, torch.stack(chosen).to(ctx.device)).cpu())
                    else:
                        counts = torch.tensor([len(c) for c in chosen])
                        _, s = encode_pairs(
                            model,
                            torch.empty(0, *chosen[0].shape[1:], device=ctx.device),
                            torch.cat(chosen).to(ctx.device),
                            counts,
                        )
                        rows.append(s.cpu())
        scores = (torch.cat(q_rows) @ torch.cat(s_rows).T).double().numpy()
    finally:
        model.train(was_training)
    result = retrieval_metrics(scores, relevant, recall_ks=(1, 5))
    return {
        "val_mAP": result["mAP"],
        "val_R@1": result["recall"]["1"],
        "val_R@5": result["recall"]["5"],
        "val_queries": len(queries),
        "val_scenes": len(data.scenes),
    }


class _ValItems(torch.utils.data.Dataset):
    """Queries first, then scenes: ("q", pixels [3, S, S]) or ("s", crops [k, 3, S, S])."""

    def __init__(self, data: PairDataset, queries: list[int]):
        self.data, self.queries = data, queries

    def __len__(self) -> int:
        return len(self.queries) + len(self.data.scenes)

    def __getitem__(self, i: int):
        if i < len(self.queries):
            return "q", self.data.query_pixels(self.queries[i])
        return "s", self.data.scene_crops(i - len(self.queries))


# ---------------------------------------------------------------------------------------------
# Data: training pairs and the held-out split
# ---------------------------------------------------------------------------------------------
@dataclass
class Splits:
    train: PairDataset
    val: PairDataset
    val_queries: list[int]  # indices into val.queries
    val_relevant: np.ndarray  # [Q, G] bool, queries x val scenes


def load_splits(cfg: Any, preprocess: Preprocess) -> Splits:
    """Training pairs and the held-out split, validated before the first forward pass."""
    min_size = cfg.min_crop_size or cfg.image_size
    queries, gallery = split(select_set(load_anns(cfg.anns_file, cfg.galleries_dir, cfg.queries_dir), cfg.set))
    captions = load_captions(cfg.captions_file) if cfg.box_source == "captions" else None
    scenes, without = scene_boxes(gallery, captions, cfg.max_crops)
    if without:
        log.warning(
            "%d of %d scenes have no box (%s) and are not used",
            without,
            len(gallery),
            cfg.captions_file if captions is not None else f"no object box in {cfg.anns_file}",
        )
    if cfg.val_anns_file:
        val_queries, val_gallery = split(
            select_set(load_anns(cfg.val_anns_file, cfg.galleries_dir, cfg.queries_dir), cfg.set)
        )
        val_captions = (
            load_captions(cfg.val_captions_file or cfg.captions_file) if cfg.box_source == "captions" else None
        )
        val_scenes, val_without = scene_boxes(val_gallery, val_captions, cfg.max_crops)
        if val_without:
            log.warning(
                "%d of %d held-out scenes have no box and are left out of validation", val_without, len(val_gallery)
            )
        train_pairs = make_pairs(scenes, queries)
    else:
        # Held-out instances: their queries, and every scene that shows one (never trained on).
        held = held_out_instances(queries, cfg.val_fraction, cfg.seed)
        val_scenes = [s for s in scenes if held & set(s.annotation.ins) or not s.annotation.ins]
        scenes = [s for s in scenes if not held & set(s.annotation.ins) and s.annotation.ins]
        val_queries = [q for q in queries if q.ins[0] in held]
        queries = [q for q in queries if q.ins[0] not in held]
        train_pairs = make_pairs(scenes, queries)
    relevant = relevance(val_queries, [s.annotation for s in val_scenes])
    keep = [q for q in range(len(val_queries)) if relevant[q].any()]
    if len(keep) < len(val_queries):
        log.warning(
            "%d of %d held-out queries have no held-out scene with a box and are not evaluated",
            len(val_queries) - len(keep),
            len(val_queries),
        )
    if not keep or not train_pairs:
        raise SoIRError(
            f"{cfg.anns_file}: {len(train_pairs)} training pairs and {len(keep)} held-out queries "
            f"with a positive scene; both are needed"
        )
    if len(train_pairs) < cfg.batch_size:
        raise SoIRError(f"{cfg.anns_file}: {len(train_pairs)} training pairs, fewer than batch_size={cfg.batch_size}")
    train = PairDataset(scenes, train_pairs, queries, preprocess, cfg.crop_pad, min_size)
    val = PairDataset(val_scenes, [], val_queries, preprocess, cfg.crop_pad, min_size)
    log.info(
        "training: %d pairs (%d scenes, %d queries); held out: %d queries x %d scenes",
        len(train_pairs),
        len(scenes),
        len(queries),
        len(keep),
        len(val_scenes),
    )
    return Splits(train, val, keep, relevant[keep])


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------
def check_batch(cfg: Any, world: int) -> None:
    """``batch_size`` must split into ``micro_batch`` pairs per forward pass on each of ``world`` processes."""
    if cfg.batch_size % (world * cfg.micro_batch):
        raise SoIRError(
            f"batch_size={cfg.batch_size} must be a multiple of micro_batch={cfg.micro_batch} x {world} processes"
        )


def load_resume_state(path: Path) -> dict:
    """``last.ckpt`` as :func:`train` wrote it; a truncated or foreign file (a pickled object, another
    program's checkpoint) is a SoIRError naming it, not a traceback."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated zip, pickle refused by weights_only, ...: all mean "not ours"
        raise SoIRError(
            f"{path} cannot be read as a training checkpoint ({type(err).__name__}: "
            f"{str(err).splitlines()[0][:120] if str(err) else ''}); delete it to start this run over, "
            "or use another output_dir"
        ) from None
    if not isinstance(state, dict) or not {"state_dict", "optimizer", "scheduler", "step", "best"} <= set(state):
        raise SoIRError(
            f"{path} is not a train_mao.py resume checkpoint; delete it to start this run over, "
            "or use another output_dir"
        )
    return state


@dataclass
class Inputs:
    """What :func:`load_inputs` checked and loaded: the run's data, its pair order and step count."""

    model_name: str
    data: Splits
    order: PairOrder
    total: int  # optimizer steps of the whole run


def load_inputs(cfg: Any, ctx: Context) -> Inputs:
    """Every check of the settings and the input files a run needs, writing nothing: the settings,
    the batch split, the model's processor, the annotations and their splits (``set=``), the step
    count. scripts/train_mao.py calls it before it claims the output folder and writes identity.json,
    so a refused run leaves nothing behind and its corrected rerun is welcome in the same folder.

    Raises:
        SoIRError: one line naming the setting or file and the fix.
    """
    check_train_config(cfg)
    check_batch(cfg, ctx.world)
    model_name = cfg.model_name or FAMILIES[cfg.family].default_models["base"]
    preprocess = Preprocess.from_pretrained(model_name)
    if preprocess.size != (cfg.image_size, cfg.image_size):
        log.warning(
            "image_size=%d, but %s's processor (used by create_index.py) resizes to %s",
            cfg.image_size,
            model_name,
            preprocess.size,
        )
    preprocess = Preprocess((cfg.image_size, cfg.image_size), preprocess.mean, preprocess.std, preprocess.resample)
    data = load_splits(cfg, preprocess)
    order = PairOrder(data.train.pairs, cfg.batch_size, cfg.seed)
    total = order.steps_per_epoch * cfg.epochs if cfg.max_steps is None else cfg.max_steps
    if total > order.steps_per_epoch * cfg.epochs:
        raise SoIRError(f"max_steps={cfg.max_steps} exceeds {cfg.epochs} epochs of {order.steps_per_epoch} steps")
    return Inputs(model_name, data, order, total)


def train(cfg: Any, out: Path, ctx: Context, inputs: Inputs | None = None) -> nn.Module:
    """Train (or resume) in ``out``: ``last.ckpt`` (resume state), ``best.ckpt`` / ``final.ckpt``
    (weights for ``create_index.py lora_adapt=true weights=...``), ``metrics.jsonl``.

    ``inputs``: :func:`load_inputs` of ``cfg`` when the caller checked them already (before it
    claimed ``out``); loaded here otherwise.

    Returns the trained peft model (in eval mode).
    """
    inputs = inputs or load_inputs(cfg, ctx)
    model_name, data, order, total = inputs.model_name, inputs.data, inputs.order, inputs.total
    model, settings = build_model(cfg)
    model.to(ctx.device).train()
    if ctx.world > 1:
        ctx.ddp = nn.parallel.DistributedDataParallel(
            model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None
        )
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: learning_rate(step, cfg, total) / cfg.lr)
    log.info(
        "learning rate %g x %g per decay (lr_decay_every=%s), floor %g reached at step %s of %d",
        cfg.lr,
        cfg.lr_decay,
        cfg.lr_decay_every if cfg.lr_decay_every is not None else "null: spread over the run",
        cfg.min_lr,
        next((s for s in range(total) if learning_rate(s, cfg, total) == cfg.min_lr), "never"),
        total,
    )

    out.mkdir(parents=True, exist_ok=True)
    step, best = 0, {"step": None, "val_mAP": -math.inf}
    if (out / "last.ckpt").is_file():
        state = load_resume_state(out / "last.ckpt")
        loaded = model.load_state_dict(state["state_dict"], strict=False)
        if loaded.unexpected_keys or any("lora_" in k for k in loaded.missing_keys):
            raise SoIRError(
                f"{out / 'last.ckpt'} does not fit this model (unexpected {loaded.unexpected_keys[:3]}, "
                f"missing {[k for k in loaded.missing_keys if 'lora_' in k][:3]})"
            )
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step, best = state["step"], state["best"]
        log.info("resuming %s at step %d of %d", out / "last.ckpt", step, total)
    metrics = MetricsLog(out / "metrics.jsonl", step, enabled=ctx.rank == 0)
    n_trainable = sum(p.numel() for p in params)
    log.info(
        "%s + LoRA(r=%d, alpha=%g, dropout=%g): %.1fM trainable parameters; %d steps of %d pairs "
        "(%d per process and forward pass), %d per epoch",
        model_name,
        settings.rank,
        settings.alpha,
        settings.dropout,
        n_trainable / 1e6,
        total,
        cfg.batch_size,
        cfg.micro_batch,
        order.steps_per_epoch,
    )

    def checkpoint_extra(at: int) -> dict:
        return {"step": at, "model_name": model_name, "image_size": cfg.image_size}

    def run_validation(at: int) -> None:
        nonlocal best
        if ctx.rank == 0:
            result = validate(
                model, data.val, data.val_queries, data.val_relevant, ctx, cfg.micro_batch, cfg.num_workers
            )
            metrics.write({"step": at, **result})
            log.info("step %d: held-out mAP %.4f, R@1 %.4f", at, result["val_mAP"], result["val_R@1"])
            if result["val_mAP"] > best["val_mAP"]:
                best = {"step": at, "val_mAP": result["val_mAP"]}
                atomic_torch_save(lora_checkpoint(model, settings, **checkpoint_extra(at), **result), out / "best.ckpt")
        _barrier(ctx)

    if step == 0:
        run_validation(0)  # the untrained model: the baseline the adapters must beat
    loader = DataLoader(
        data.train,
        batch_sampler=MicroBatches(order, step, total, ctx.rank, ctx.world, cfg.micro_batch),
        num_workers=cfg.num_workers,
        collate_fn=collate_pairs,
    )
    per_step = cfg.batch_size // (ctx.world * cfg.micro_batch)
    progress = tqdm(total=total, initial=step, desc="train", unit="step", disable=ctx.rank != 0)
    batches, started, images, first_step = [], time.perf_counter(), 0, step
    for micro in loader:
        batches.append(micro)
        if len(batches) < per_step:
            continue
        items = order.step_items(step)
        positives = batch_positives([order.pairs[p] for p, _ in items], data.train.scenes)
        optimizer.zero_grad(set_to_none=True)
        loss = train_step(model, batches, positives, cfg, step, ctx)
        optimizer.step()
        scheduler.step()
        step += 1
        images += sum(len(q) + len(c) for q, c, _ in batches) * ctx.world  # approximate for world > 1
        batches = []
        elapsed = time.perf_counter() - started
        progress.update(1)
        progress.set_postfix(
            loss=f"{loss:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}", img_s=f"{images / elapsed:.1f}"
        )
        if step % cfg.log_every == 0 or step == total:
            metrics.write(
                {
                    "step": step,
                    "epoch": step / order.steps_per_epoch,
                    "loss": loss,
                    "lr": scheduler.get_last_lr()[0],
                    "images_per_s": images / elapsed,
                    "pairs_per_s": cfg.batch_size * (step - first_step) / elapsed,
                }
            )
        if step % cfg.val_every == 0 or step == total:
            run_validation(step)
        if (step % cfg.checkpoint_every == 0 or step == total) and ctx.rank == 0:
            atomic_torch_save(
                lora_checkpoint(
                    model,
                    settings,
                    **checkpoint_extra(step),
                    optimizer=optimizer.state_dict(),
                    scheduler=scheduler.state_dict(),
                    best=best,
                ),
                out / "last.ckpt",
            )
    progress.close()
    if ctx.rank == 0:
        atomic_torch_save(lora_checkpoint(model, settings, **checkpoint_extra(step)), out / "final.ckpt")
        log.info(
            "done: %s (best held-out mAP %.4f at step %s in %s)",
            out / "final.ckpt",
            best["val_mAP"],
            best["step"],
            out / "best.ckpt",
        )
    _barrier(ctx)
    return model.eval()


def _barrier(ctx: Context) -> None:
    if ctx.world > 1:
        dist.barrier()


class MetricsLog:
    """``metrics.jsonl``: one JSON object per line. On resume, lines after the resumed step (written
    by the run that was killed after its last checkpoint) are dropped, so every step appears once."""

    def __init__(self, path: Path, resumed_step: int, enabled: bool = True):
        self.path, self.enabled = path, enabled
        if enabled and path.exists():
            kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= resumed_step]
            atomic_write_text(path, "".join(line + "\n" for line in kept))

    def write(self, record: dict) -> None:
        if self.enabled:
            with open(self.path, "a") as handle:
                handle.write(json.dumps(record) + "\n")


def setup_distributed(device: str, precision: str) -> Context:
    """torchrun (RANK / WORLD_SIZE / LOCAL_RANK set): init the process group, one device per process
    (nccl on CUDA, gloo on CPU). Otherwise a single process on ``device``."""
    if "RANK" not in os.environ:
        return Context(resolve_device(device), precision)
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    use_cuda = device != "cpu" and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(local)
    dist.init_process_group("nccl" if use_cuda else "gloo")
    return Context(torch.device("cuda", local) if use_cuda else torch.device("cpu"), precision, rank, world)
