"""Speed of the Mask Inversion engine, today's evaluation against the blockwise one and the plain reference.

Models: SigLIP-B/16 at 384 (T=576), DINOv2-B/14 at 224 (T=257), CLIP-B/16 at 224 (T=197),
DINOv2-B/14 with 4 registers at 224 (T=261), DINOv3-B/16 at 224 (RoPE, 4 registers, T=201) and SigLIP2-B/16
NaFlex (256 patches; a 480 x 640 photo becomes 14 x 18 = 252 patches + 4 padding tokens, T=256), built
from ViT-B configs with random weights and eager attention (no download).

Per family, masks-per-image P and engine implementation (``--impls``, default ``dense blockwise``:
``dense`` is the engine before the blockwise path, the relevance step materialising [.., heads, T, T]
and the Dice loss at pixel resolution; ``blockwise`` is the CPU default), measured side by side in
this one run, it reports
  * wall seconds per object for the full run (one call: forward + N iterations, / (B*P)), and the
    per-iteration cost per object, (t(20 it) - t(0 it)) / 20 / (B*P), in wall and in process CPU
    time (the latter is less sensitive to other processes on a shared machine); t(0) is the minimum
    of 3 calls and t(20) of 2, and the implementations' calls are interleaved so that load from
    other processes hits both alike;
  * the plain reference (extractors/mi/reference.py: autograd.grad(create_graph=True) through the
    frozen block every iteration, one mask at a time): per-iteration cost per mask, measured the
    same way with ONE mask and one image, and its seconds per object EXTRAPOLATED to N iterations
    as t(0 it) / P + N * per-iteration (it is not run for N iterations x P masks);
  * peak memory: CPU = peak RSS growth over one call (3 iterations) in a FRESH child process, sampled
    every 5 ms from /proc/self/statm; CUDA = torch.cuda.max_memory_allocated growth over the full call.

A second table times the two products of one iteration on the model's real constants, for the
largest P: the relevance step (u . V, relu, column sums and its backward; 4 H T^2 dh useful flops per
mask) in each implementation, and the [T, 4D] x [4D, D] chain that computes u and its backward
(4 T F D flops per mask), as GFLOP/s against an fp32 matmul (2048^3) timed in the same run.

``--mao K [K ...]`` adds MaO's Stage B (``descriptor=mao``): per image, K object crops at the model's
input size (one box mask each) and ONE vector shared by them, ``--mao-iterations`` (80, the paper's)
steps of the soft-IoU objective; seconds per image for the full call (forward of the K crops + the
iterations) and per iteration, per implementation.

``--bf16-check`` adds the cosine of MI vectors under ``torch.autocast(bfloat16)`` (what
``precision=bf16`` does) to fp32, and, for scale, under pixels rounded to bfloat16.

    python benchmarks/mi_speed.py                                   # all families, P = 1 and 10
    python benchmarks/mi_speed.py --families siglip --masks 10 --no-reference --bf16-check
    python benchmarks/mi_speed.py --families dinov2 --iterations 20 --masks 1   # quick
    python benchmarks/mi_speed.py --device cuda --images 8 --masks 8 --no-reference --impls dense fused
    python benchmarks/mi_speed.py --families dinov2 clip --masks 1 --no-reference --no-products --mao 5 15
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

import torch.nn.functional as F

from extractors.mi import legrad_kernels
from extractors.mi.engine import mask_inversion
from extractors.mi.legrad import IMPLS, LeGrad, _PositiveColumnMean, _token_gradients, _token_gradients_backward
from extractors.mi.reference import reference_mask_inversion
from extractors.mi.vit_adapters import vit_parts
from utils.testing.full_size import FAMILIES, build, inputs

PER_ITERATION_RUN = 20
warnings.filterwarnings("ignore", category=FutureWarning)  # torch.jit deprecation noise from transformers


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


def timed(fn, device: torch.device) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of fn()."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    start, cpu = time.perf_counter(), time.process_time()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, time.process_time() - cpu


def bench_engines(model, pixels, masks, kw: dict, iterations: int, device: torch.device, impls: list[str]) -> dict:
    """Per implementation: full-call and per-iteration cost per object (see the module docstring)."""
    objects = masks.shape[0] * masks.shape[1]
    runs = {
        impl: (
            lambda n, impl=impl: timed(
                lambda: mask_inversion(model, pixels, masks, iterations=n, impl=impl, **kw), device
            )
        )
        for impl in impls
    }
    for run in runs.values():
        run(1)  # warm-up (allocator, lazy init, kernels)
    t0 = {impl: [] for impl in impls}
    t20 = {impl: [] for impl in impls}
    for repeat in range(3):  # interleaved: A B A B ...
        for impl, run in runs.items():
            t0[impl].append(run(0))
            if repeat < 2:
                t20[impl].append(run(PER_ITERATION_RUN))
    results = {}
    for impl, run in runs.items():
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        t_full = run(iterations)[0]
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20 if device.type == "cuda" else None
        wall0, cpu0 = min(w for w, _ in t0[impl]), min(c for _, c in t0[impl])
        wall20, cpu20 = min(w for w, _ in t20[impl]), min(c for _, c in t20[impl])
        results[impl] = dict(
            per_object=t_full / objects,
            setup=wall0,
            peak_mb=peak,
            per_iteration=(wall20 - wall0) / PER_ITERATION_RUN / objects,
            cpu_per_iteration=(cpu20 - cpu0) / PER_ITERATION_RUN / objects,
        )
    return results


def bench_mao(model, size, crops: int, iterations: int, device: torch.device, impls: list[str]) -> dict:
    """MaO Stage B on ONE image of ``crops`` object crops: per implementation, wall seconds of the full
    call (the crops' forward pass + ``iterations`` steps) and per iteration ((t(20) - t(0)) / 20, each
    the minimum of repeated calls, implementations interleaved), both per image."""
    pixels, masks, kw = inputs(model, size, crops, 1, device)
    groups = torch.zeros(crops, dtype=torch.long, device=device)
    runs = {
        impl: (
            lambda n, impl=impl: timed(
                lambda: mask_inversion(
                    model, pixels, masks, iterations=n, impl=impl, groups=groups, overlap="iou", **kw
                ),
                device,
            )[0]
        )
        for impl in impls
    }
    for run in runs.values():
        run(1)  # warm-up
    t0, t20 = {impl: [] for impl in impls}, {impl: [] for impl in impls}
    for repeat in range(3):
        for impl, run in runs.items():
            t0[impl].append(run(0))
            if repeat < 2:
                t20[impl].append(run(PER_ITERATION_RUN))
    return {
        impl: dict(
            per_image=run(iterations),
            setup=min(t0[impl]),
            per_iteration=(min(t20[impl]) - min(t0[impl])) / PER_ITERATION_RUN,
        )
        for impl, run in runs.items()
    }


def _child_peak_rss(family: str, images: int, masks: int, threads: int, impl: str, queue) -> None:
    torch.set_num_threads(threads)
    _, model, size = build(family, torch.device("cpu"))
    pixels, m, kw = inputs(model, size, images, masks, torch.device("cpu"))
    with PeakRSS() as rss:
        mask_inversion(model, pixels, m, iterations=3, impl=impl, **kw)
    queue.put(rss.growth)


def cpu_peak_mb(family: str, images: int, masks: int, threads: int, impl: str) -> float:
    """Peak RSS growth (MB) of one engine call in a fresh process."""
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    child = context.Process(target=_child_peak_rss, args=(family, images, masks, threads, impl, queue))
    child.start()
    growth = queue.get()
    child.join()
    return growth / 2**20


def bench_reference(model, pixels, masks, kw: dict, device: torch.device) -> dict:
    """One image, one mask: t(0) and per-iteration cost of the plain reference."""
    one_pixels, one_mask = pixels[:1], masks[:1, :1]
    one_kw = {k: v[:1] for k, v in kw.items()}
    run = lambda n: timed(
        lambda: reference_mask_inversion(
            model,
            one_pixels,
            one_mask,  # noqa: E731
            iterations=n,
            **one_kw,
        ),
        device,
    )[0]
    run(1)
    t0 = min(run(0) for _ in range(3))
    t20 = min(run(PER_ITERATION_RUN) for _ in range(2))
    return dict(setup=t0, per_iteration=(t20 - t0) / PER_ITERATION_RUN)


def best_of(fn, device: torch.device, repeats: int = 3) -> float:
    """Minimum wall seconds of fn() over repeats (after one warm-up call)."""
    fn()
    return min(timed(fn, device)[0] for _ in range(repeats))


def matmul_gflops(device: torch.device, n: int = 2048) -> float:
    """fp32 GFLOP/s of an n x n x n matmul: the machine's yardstick for the tables' GFLOP/s."""
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    return 2 * n**3 / best_of(lambda: a @ b, device) / 1e9


def bench_products(model, pixels, masks, kw: dict, device: torch.device, impls: list[str]) -> list[tuple]:
    """Rows (step, impl, ms per mask, GFLOP/s) for the relevance step and the u chain of one iteration."""
    legrad = LeGrad(vit_parts(model), pixels, impl="blockwise", **kw)
    k = legrad.blocks[0]
    B, P = masks.shape[:2]
    H, T, dh = k.V.shape[1:]
    F_mlp, D = k.M.shape
    w = (
        F.normalize(
            torch.randn(B, P, legrad.g.shape[-1], generator=torch.Generator().manual_seed(0)).to(legrad.g), dim=-1
        )
        @ k.J
    )
    everything = slice(0, B)
    u = _token_gradients(k, everything, w)
    grad = torch.randn(B, P, T, generator=torch.Generator().manual_seed(1)).to(u)
    rows = []
    chain_s = best_of(lambda: _token_gradients_backward(k, everything, _token_gradients(k, everything, w)), device)
    rows.append(("u chain [T,4D]x[4D,D], fwd + bwd", "(both)", chain_s / (B * P), 4 * T * F_mlp * D))
    relevance_flops = 4 * H * T * T * dh
    for impl in impls:
        if impl == "dense":

            def step():
                uh = u.unflatten(-1, (H, dh)).transpose(2, 3).detach().requires_grad_(True)
                relevance = _PositiveColumnMean.apply(uh, k.V[:, None])
                torch.autograd.grad(relevance, uh, grad)
        elif impl == "blockwise":

            def step():
                _, positive = legrad_kernels.blockwise_forward(u, k.V)
                legrad_kernels.blockwise_backward(positive, k.V, grad)
        else:

            def step():
                legrad_kernels.fused_forward(u, k.V)
                legrad_kernels.fused_backward(u, k.V, grad)

        rows.append(("relevance u.V, fwd + bwd", impl, best_of(step, device) / (B * P), relevance_flops))
    return [(name, impl, seconds * 1e3, flops / seconds / 1e9) for name, impl, seconds, flops in rows]


def bf16_cosines(model, pixels, masks, kw: dict, iterations: int) -> tuple[float, float]:
    """min cosine to fp32 MI of (MI under bf16 autocast, MI of pixels rounded to bf16)."""
    fp32 = mask_inversion(model, pixels, masks, iterations=iterations, **kw)
    with torch.autocast(pixels.device.type, dtype=torch.bfloat16):
        autocast = mask_inversion(model, pixels, masks, iterations=iterations, **kw)
    rounded = mask_inversion(model, pixels.bfloat16().float(), masks, iterations=iterations, **kw)
    return ((autocast * fp32).sum(-1).min().item(), (rounded * fp32).sum(-1).min().item())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", nargs="+", choices=list(FAMILIES), default=list(FAMILIES))
    parser.add_argument("--masks", nargs="*", type=int, default=[1, 10], help="masks per image (none: no MI table)")
    parser.add_argument("--images", type=int, default=1, help="images per call")
    parser.add_argument("--iterations", type=int, default=100)
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (CPU)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument(
        "--impls",
        nargs="+",
        choices=[i for i in IMPLS if i != "auto"],
        default=["dense", "blockwise"],
        help="engine implementations, first = baseline",
    )
    parser.add_argument("--no-reference", action="store_true", help="skip the plain reference")
    parser.add_argument("--no-products", action="store_true", help="skip the GFLOP/s table")
    parser.add_argument("--bf16-check", action="store_true", help="cosine of bf16 autocast MI to fp32")
    parser.add_argument("--mao", nargs="*", type=int, default=[], help="MaO Stage B: object crops per image")
    parser.add_argument("--mao-iterations", type=int, default=80, help="MaO Stage B steps (the paper's 80)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    where = f"{args.threads} CPU threads" if device.type == "cpu" else torch.cuda.get_device_name(device)
    memory = (
        "peak RSS growth of one call (3 it) in a fresh process"
        if device.type == "cpu"
        else "peak CUDA allocated growth during the full call"
    )
    base = args.impls[0]
    print(
        f"Mask Inversion speed, {args.iterations} iterations, {args.images} image(s) per call, {where}, "
        f"torch {torch.__version__}"
    )
    header = (
        f"{'family':19} {'BxP':>6} {'impl':>9} {'s/obj':>7} {'ms/it/obj':>9} {'cpu ms/it/obj':>13} "
        f"{'vs ' + base:>9} {'setup s':>7} {'peak MB':>7} {'ref s/it/mask':>13} {'ref s/obj*':>10} "
        f"{'vs ref':>7}"
    )
    print(header + "\n" + "-" * len(header))
    products, bf16, mao = [], [], []
    for family in args.families:
        name, model, size = build(family, device)
        reference = None
        for P in args.masks:
            pixels, masks, kw = inputs(model, size, args.images, P, device)
            engines = bench_engines(model, pixels, masks, kw, args.iterations, device, args.impls)
            if reference is None and not args.no_reference:
                reference = bench_reference(model, pixels, masks, kw, device)
            for impl, eng in engines.items():
                if eng["peak_mb"] is None:
                    eng["peak_mb"] = cpu_peak_mb(family, args.images, P, args.threads, impl)
                if reference:
                    ref_it = reference["per_iteration"]
                    ref_obj = reference["setup"] / P + args.iterations * ref_it
                    ref_cols = f"{ref_it:13.4f} {ref_obj:10.2f} {ref_it / eng['per_iteration']:6.1f}x"
                else:
                    ref_cols = f"{'-':>13} {'-':>10} {'-':>7}"
                speedup = engines[base]["per_iteration"] / eng["per_iteration"]
                print(
                    f"{name:19} {f'{args.images}x{P}':>6} {impl:>9} {eng['per_object']:7.3f} "
                    f"{1e3 * eng['per_iteration']:9.2f} {1e3 * eng['cpu_per_iteration']:13.2f} "
                    f"{speedup:8.2f}x {eng['setup']:7.2f} {eng['peak_mb']:7.0f} {ref_cols}",
                    flush=True,
                )
        if not args.no_products and args.masks:
            pixels, masks, kw = inputs(model, size, args.images, max(args.masks), device)
            products += [(name, *row) for row in bench_products(model, pixels, masks, kw, device, args.impls)]
        if args.bf16_check and args.masks:
            pixels, masks, kw = inputs(model, size, args.images, args.masks[0], device)
            bf16.append((name, args.masks[0], *bf16_cosines(model, pixels, masks, kw, args.iterations)))
        for crops in args.mao:
            for impl, row in bench_mao(model, size, crops, args.mao_iterations, device, args.impls).items():
                mao.append((name, crops, impl, row))
                print(f"MaO Stage B {name} K={crops} {impl}: {row['per_image']:.2f} s/image", flush=True)
        del model
    print(
        f"\ns/obj: measured wall time of one full call / (B*P). ms/it/obj: (t(20 it) - t(0 it)) / 20 / (B*P), "
        f"each t the minimum of repeated calls (3 and 2), implementations interleaved; cpu: the same in "
        f"process CPU time. vs {base}: per-iteration speed-up (wall). peak MB: {memory}.\n*ref s/obj: "
        f"EXTRAPOLATED, t(0 it) / P + {args.iterations} x the per-iteration cost measured with one image "
        f"and one mask (the reference handles masks one at a time). vs ref: ref s/it/mask / ms/it/obj."
    )
    if products:
        peak = matmul_gflops(device)
        print(
            f"\nOne iteration's products at {args.images}x{max(args.masks)} masks, per mask (min of 3), against "
            f"a 2048^3 fp32 matmul at {peak:.0f} GFLOP/s measured now:"
        )
        header = f"{'family':19} {'step':34} {'impl':>9} {'ms/mask':>8} {'GFLOP/s':>8} {'of matmul':>9}"
        print(header + "\n" + "-" * len(header))
        for name, step, impl, ms, gflops in products:
            print(f"{name:19} {step:34} {impl:>9} {ms:8.2f} {gflops:8.1f} {100 * gflops / peak:8.0f}%")
    if mao:
        print(
            f"\nMaO Stage B (descriptor=mao), ONE image of K object crops, {args.mao_iterations} iterations, "
            f"{where}: s/image = one full call (forward of the K crops + iterations); ms/it/image = "
            f"(t(20 it) - t(0 it)) / 20; setup = t(0 it), the forward pass and the maps' constants."
        )
        header = f"{'family':19} {'K':>3} {'impl':>9} {'s/image':>8} {'ms/it/image':>11} {'setup s':>7}"
        print(header + "\n" + "-" * len(header))
        for name, crops, impl, row in mao:
            print(
                f"{name:19} {crops:3d} {impl:>9} {row['per_image']:8.2f} {1e3 * row['per_iteration']:11.1f} "
                f"{row['setup']:7.2f}"
            )
    if bf16:
        print(f"\nCosine to fp32 MI ({args.iterations} iterations, min over masks):")
        header = f"{'family':19} {'P':>3} {'bf16 autocast':>13} {'pixels rounded to bf16':>22}"
        print(header + "\n" + "-" * len(header))
        for name, P, autocast, rounded in bf16:
            print(f"{name:19} {P:3d} {autocast:13.5f} {rounded:22.5f}")


if __name__ == "__main__":
    main()
