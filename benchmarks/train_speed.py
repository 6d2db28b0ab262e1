"""MaO adapter training speed: full-size random DINOv2-B (or CLIP-B/16) + LoRA r=256 at 224 px.

One optimizer step of ``scripts/train_mao.py`` (``utils.training.trainer.train_step`` + AdamW) on a batch of
``--batch`` images = ``--batch / (1 + k)`` (query, scene) pairs of one query and ``k`` object crops,
from random pixels (the model costs the same FLOPs as a trained one). Rows, in the same run:

* inference:   the same images through the same model without gradients (the floor of any step);
* plain step:  one forward and backward pass over the batch (micro_batch = all pairs);
* cached step: the embedding cache used for gradient accumulation and multi-GPU batches
               (micro_batch = 1 pair: one forward without a graph, then forward + backward per pair).

GFLOP/image is counted by ``torch.utils.flop_counter`` (matrix products; attention included), so
the hours of a full run can be estimated for any accelerator from its sustained FLOP/s.

    python benchmarks/train_speed.py [--family dinov2] [--batch 8] [--crops 3] [--steps 2] [--threads 2]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from transformers import (
    BitImageProcessor,
    CLIPImageProcessor,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
    Dinov2Config,
    Dinov2Model,
)

from utils.training.trainer import Context, TrainConfig, build_model, embed, train_step

# Full-size ViT-B configs of the default checkpoints (random weights).
FAMILIES = {
    "dinov2": (
        "DINOv2-B/14",
        lambda: Dinov2Model(Dinov2Config(image_size=518, patch_size=14)),
        lambda: BitImageProcessor(size={"shortest_edge": 256}, crop_size={"height": 224, "width": 224}),
    ),
    "clip": (
        "CLIP-B/16",
        lambda: CLIPVisionModelWithProjection(CLIPVisionConfig(patch_size=16, projection_dim=512)),
        CLIPImageProcessor,
    ),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", default="dinov2", choices=list(FAMILIES))
    parser.add_argument("--batch", type=int, default=8, help="images per step (queries + crops)")
    parser.add_argument("--crops", type=int, default=3, help="object crops per scene (k)")
    parser.add_argument("--rank", type=int, default=256)
    parser.add_argument("--steps", type=int, default=2, help="timed steps per row (after one warm-up step)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    args = parser.parse_args()
    if args.batch % (1 + args.crops):
        raise SystemExit(f"--batch {args.batch} must be a multiple of 1 + --crops = {1 + args.crops}")
    torch.set_num_threads(args.threads)
    pairs = args.batch // (1 + args.crops)
    label, build_backbone, build_processor = FAMILIES[args.family]
    with tempfile.TemporaryDirectory() as folder:
        build_backbone().save_pretrained(folder)
        build_processor().save_pretrained(folder)
        cfg = OmegaConf.structured(
            TrainConfig(
                anns_file="-",
                family=args.family,
                model_name=folder,
                lora_rank=args.rank,
                batch_size=pairs,
                micro_batch=pairs,
            )
        )
        model, settings = build_model(cfg)  # the real loading path: load_backbone + peft LoRA
    device = torch.device(args.device)
    model.to(device).train()
    ctx = Context(device, args.precision)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr)
    generator = torch.Generator().manual_seed(0)
    queries = torch.randn(pairs, 3, 224, 224, generator=generator)
    crops = torch.randn(pairs * args.crops, 3, 224, 224, generator=generator)
    counts = torch.full((pairs,), args.crops)
    positives = torch.eye(pairs, dtype=torch.bool)
    split = [
        (queries[i : i + 1], crops[i * args.crops : (i + 1) * args.crops], counts[i : i + 1]) for i in range(pairs)
    ]

    def inference() -> None:
        with torch.no_grad(), ctx.autocast():
            embed(model, torch.cat([queries, crops]).to(device))

    def step(micro_batches) -> None:
        optimizer.zero_grad(set_to_none=True)
        train_step(model, micro_batches, positives, cfg, 0, ctx)
        optimizer.step()

    rows = [
        ("inference (no grad)", inference),
        ("plain step", lambda: step([(queries, crops, counts)])),
        (f"cached step ({pairs} micro-batches)", lambda: step(split)),
    ]
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(
        f"{label} + LoRA r={settings.rank} alpha={settings.alpha:g} on {list(settings.target_modules)} "
        f"({trainable / 1e6:.1f}M trainable), 224 px, device={args.device} precision={args.precision} "
        f"torch threads={args.threads}; batch {args.batch} images = {pairs} pairs x (1 query + {args.crops} crops)"
    )
    print(f"{'row':<30}{'s/step':>9}{'steps/s':>10}{'images/s':>10}{'GFLOP/image':>13}")
    for name, run in rows:
        run()  # warm-up
        with FlopCounterMode(display=False) as counter:
            run()
        gflop = counter.get_total_flops() / 1e9 / args.batch
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(args.steps):
            run()
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = (time.perf_counter() - start) / args.steps
        print(f"{name:<30}{seconds:>9.2f}{1 / seconds:>10.3f}{args.batch / seconds:>10.2f}{gflop:>13.1f}")


if __name__ == "__main__":
    main()
