"""Speed of the Mask Inversion engine against the plain frozen reference, on full-size random ViT-Bs.

Models: SigLIP-B/16 at 384 (T=576), DINOv2-B/14 at 224 (T=257), CLIP-B/16 at 224 (T=197), built
from default configs with random weights and eager attention (no download).

Per family and masks-per-image P it reports
  * engine: wall seconds per object for the full run (one call: forward + N iterations, / (B*P)),
    and the per-iteration cost per object, (t(20 it) - t(0 it)) / 20 / (B*P), with t(0) the
    minimum of 3 calls and t(20) the minimum of 2 (the machine may be shared);
  * reference (tests/utils/mi_reference.py: autograd.grad(create_graph=True) through the frozen
    block every iteration, one mask at a time): per-iteration cost per mask, measured the same way
    with ONE mask and one image, and its seconds per object EXTRAPOLATED to N iterations as
    t(0 it) / P + N * per-iteration (it is not run for N iterations x P masks);
  * peak memory of the engine: CPU = peak RSS growth over one call (3 iterations; memory does not
    grow with iterations) in a FRESH child process, sampled every 5 ms from /proc/self/statm (in
    the parent, freed memory kept by the allocator would hide it); CUDA =
    torch.cuda.max_memory_allocated growth over the full call.

    python benchmarks/mi_speed.py                                   # all families, P = 1 and 10
    python benchmarks/mi_speed.py --families dinov2 --iterations 20 --masks 1   # quick
    python benchmarks/mi_speed.py --device cuda --images 8 --masks 8 --no-reference
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import threading
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from transformers import (CLIPVisionConfig, CLIPVisionModelWithProjection, Dinov2Config,  # noqa: E402
                          Dinov2Model, SiglipVisionConfig, SiglipVisionModel)

from tests.utils.mi_reference import reference_mask_inversion  # noqa: E402
from utils.mask_inversion import mask_inversion  # noqa: E402

FAMILIES = {
    "siglip": ("SigLIP-B/16-384", lambda: SiglipVisionModel(SiglipVisionConfig(image_size=384, patch_size=16)), 384),
    "dinov2": ("DINOv2-B/14-224", lambda: Dinov2Model(Dinov2Config(image_size=224, patch_size=14)), 224),
    "clip": ("CLIP-B/16-224", lambda: CLIPVisionModelWithProjection(CLIPVisionConfig(image_size=224, patch_size=16)), 224),
}
PER_ITERATION_RUN = 20
warnings.filterwarnings("ignore", category=FutureWarning)   # torch.jit deprecation noise from transformers


class PeakRSS:
    """Peak resident-set growth (bytes) while the context is open, sampled every 5 ms."""

    def __enter__(self):
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.base = self.peak = self._rss()
        self.running = True
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()
        return self

    def _rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page

    def _watch(self):
        while self.running:
            self.peak = max(self.peak, self._rss())
            time.sleep(0.005)

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()
        self.peak = max(self.peak, self._rss())
        self.growth = self.peak - self.base


def timed(fn, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def build(family: str, device: torch.device):
    name, make, size = FAMILIES[family]
    torch.manual_seed(0)
    model = make().eval().to(device)
    model.set_attn_implementation("eager")
    return name, model, size


def inputs(size: int, images: int, masks: int, device: torch.device):
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randn(images, 3, size, size, generator=generator)
    # random boxes covering 5-40 % of the image side each way
    m = torch.zeros(images, masks, size, size)
    for b in range(images):
        for p in range(masks):
            h, w = (torch.randint(size // 20, size * 2 // 5, (2,), generator=generator)).tolist()
            y, x = torch.randint(0, size - h, (1,), generator=generator).item(), \
                torch.randint(0, size - w, (1,), generator=generator).item()
            m[b, p, y:y + h, x:x + w] = 1
    return pixels.to(device), m.to(device)


def bench_engine(model, pixels, masks, iterations: int, device: torch.device) -> dict:
    objects = masks.shape[0] * masks.shape[1]
    run = lambda n: timed(lambda: mask_inversion(model, pixels, masks, iterations=n), device)  # noqa: E731
    run(1)                                                   # warm-up (allocator, lazy init)
    t0, t20 = per_iteration_timings(run)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        t_full = run(iterations)
        peak = torch.cuda.max_memory_allocated() - base
    else:
        t_full = run(iterations)
        peak = None
    return dict(per_object=t_full / objects, per_iteration=(t20 - t0) / PER_ITERATION_RUN / objects,
                setup=t0, peak_mb=None if peak is None else peak / 2**20)


def _child_peak_rss(family: str, images: int, masks: int, threads: int, queue) -> None:
    torch.set_num_threads(threads)
    _, model, size = build(family, torch.device("cpu"))
    pixels, m = inputs(size, images, masks, torch.device("cpu"))
    with PeakRSS() as rss:
        mask_inversion(model, pixels, m, iterations=3)
    queue.put(rss.growth)


def cpu_peak_mb(family: str, images: int, masks: int, threads: int) -> float:
    """Peak RSS growth (MB) of one engine call in a fresh process."""
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    child = context.Process(target=_child_peak_rss, args=(family, images, masks, threads, queue))
    child.start()
    growth = queue.get()
    child.join()
    return growth / 2**20


def bench_reference(model, pixels, masks, device: torch.device) -> dict:
    """One image, one mask: t(0) and per-iteration cost of the plain reference."""
    one_pixels, one_mask = pixels[:1], masks[:1, :1]
    run = lambda n: timed(lambda: reference_mask_inversion(model, one_pixels, one_mask,  # noqa: E731
                                                            iterations=n), device)
    run(1)
    t0, t20 = per_iteration_timings(run)
    return dict(setup=t0, per_iteration=(t20 - t0) / PER_ITERATION_RUN)


def per_iteration_timings(run) -> tuple[float, float]:
    """(t(0 it), t(20 it)), each the minimum of repeated runs (3 and 2) against timing noise."""
    return min(run(0) for _ in range(3)), min(run(PER_ITERATION_RUN) for _ in range(2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", nargs="+", choices=list(FAMILIES), default=list(FAMILIES))
    parser.add_argument("--masks", nargs="+", type=int, default=[1, 10], help="masks per image")
    parser.add_argument("--images", type=int, default=1, help="images per call")
    parser.add_argument("--iterations", type=int, default=100)
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (CPU)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--no-reference", action="store_true", help="skip the plain reference")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    where = f"{args.threads} CPU threads" if device.type == "cpu" else torch.cuda.get_device_name(device)
    memory = ("peak RSS growth of one call (3 it) in a fresh process" if device.type == "cpu"
              else "peak CUDA allocated growth during the full call")
    print(f"Mask Inversion speed, {args.iterations} iterations, {args.images} image(s) per call, {where}, "
          f"torch {torch.__version__}")
    header = (f"{'family':16} {'BxP':>6} {'engine s/obj':>12} {'engine s/it/obj':>15} {'setup s':>8} "
              f"{'peak MB':>8} {'ref s/it/mask':>13} {'ref s/obj*':>10} {'it speedup':>10}")
    print(header + "\n" + "-" * len(header))
    for family in args.families:
        name, model, size = build(family, device)
        reference = None
        for P in args.masks:
            pixels, masks = inputs(size, args.images, P, device)
            eng = bench_engine(model, pixels, masks, args.iterations, device)
            if eng["peak_mb"] is None:
                eng["peak_mb"] = cpu_peak_mb(family, args.images, P, args.threads)
            if reference is None and not args.no_reference:
                reference = bench_reference(model, pixels, masks, device)
            if reference:
                ref_it = reference["per_iteration"]
                ref_obj = reference["setup"] / P + args.iterations * ref_it
                ref_cols = f"{ref_it:13.4f} {ref_obj:10.2f} {ref_it / eng['per_iteration']:9.1f}x"
            else:
                ref_cols = f"{'-':>13} {'-':>10} {'-':>10}"
            print(f"{name:16} {f'{args.images}x{P}':>6} {eng['per_object']:12.3f} {eng['per_iteration']:15.4f} "
                  f"{eng['setup']:8.2f} {eng['peak_mb']:8.0f} {ref_cols}", flush=True)
        del model
    print(f"\nengine s/obj: measured wall time of one full call / (B*P). s/it: (t(20 it) - t(0 it)) / 20, "
          f"each t the minimum of repeated calls (3 and 2). "
          f"peak MB: {memory}.\n*ref s/obj: EXTRAPOLATED, t(0 it) / P + "
          f"{args.iterations} x the per-iteration cost measured with one image and one mask (the reference "
          f"handles masks one at a time). it speedup: ref s/it/mask / engine s/it/obj.")


if __name__ == "__main__":
    main()
