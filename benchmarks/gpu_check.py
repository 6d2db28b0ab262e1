"""One prepared check of the Mask Inversion engine on a CUDA machine: correctness against CPU, speed, GPU load.

Run through ``benchmarks/gpu_check.sh`` (which adds the environment and writes to ``$OUT``). Three parts:

1. kernels: the fused Triton kernels (extractors/mi/legrad_kernels.py) against the dense relevance step on
   random problems on the device (float64 and float32: max relative error of values and gradients;
   the tf32 / bf16 variants: their relative error).
2. per family (SigLIP-B/16-384, DINOv2-B/14-224, CLIP-B/16-224; full-size random weights, eager
   attention): the device against the CPU for one image and 2 masks (relative error of the patch
   relevance and of its gradient at a random embedding; cosine of the MI vectors after
   ``--check-iterations``), then the timing of ``--images`` x ``--masks`` objects, ``--iterations``
   iterations, for each engine variant: today's engine (impl="dense"), the fused kernels, with a
   CUDA graph, with TF32, with bf16 products. Per variant: ms per object (one timed call after a
   warm-up call that compiles the kernels), mean GPU utilisation sampled every 50 ms during the
   timed call, and the min cosine of its vectors to today's engine and to the fused fp32 vectors.
3. one table with all of it, printed and written to ``$OUT/gpu_check.txt`` (and ``.json``) if OUT is set.

MI with random weights is chaotic over 100 iterations: two exact fp32 evaluations that differ
only in rounding end at cosines of 0.99-0.9999 (measured on CPU, impl="dense" vs "blockwise"),
while in float64 they agree to 1e-12. The table therefore also gives the cosine of today's engine
in fp32 to itself in float64 (``fp32 noise``), the scale the other cosines must be read against.

    bash benchmarks/gpu_check.sh                      # on the CUDA machine, < 6 min on an H100
    python benchmarks/gpu_check.py --device cpu --quick  # logic check anywhere (fused variants skipped)
    TRITON_INTERPRET=1 python benchmarks/gpu_check.py --device cpu --quick   # fused kernels interpreted too
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from extractors.mi import legrad_kernels
from extractors.mi.engine import mask_inversion
from extractors.mi.legrad import LeGrad, _PositiveColumnMean
from extractors.mi.vit_adapters import vit_parts
from utils.files import atomic_write_text, new_file
from utils.testing.full_size import FAMILIES, build, inputs

warnings.filterwarnings("ignore", category=FutureWarning)
# name -> mask_inversion keyword arguments; "dense" is today's engine, the baseline of every cosine
VARIANTS = {
    "dense (today)": dict(impl="dense"),
    "fused": dict(impl="fused"),
    "fused+graph": dict(impl="fused", cuda_graph=True),
    "fused+tf32": dict(impl="fused", precision="tf32"),
    "fused+tf32+graph": dict(impl="fused", precision="tf32", cuda_graph=True),
    "fused+bf16": dict(impl="fused", precision="bf16"),
}
CPU_VARIANTS = {"dense (today)": dict(impl="dense"), "blockwise": dict(impl="blockwise")}
# On CPU, Triton's interpreter (TRITON_INTERPRET=1 before the first import of triton) runs the fused kernels
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
if INTERPRETED:
    CPU_VARIANTS["fused"] = dict(impl="fused")


class Utilisation:
    """Mean GPU utilisation (%) while the context is open: torch.cuda.utilization (NVML) every 50 ms,
    nvidia-smi if NVML is missing; None where neither answers (CPU, or no driver tools)."""

    def __init__(self, device: torch.device):
        self.device, self.samples, self.running = device, [], False

    def _read(self) -> float | None:
        try:
            return float(torch.cuda.utilization(self.device))
        except Exception:  # noqa: BLE001 - no NVML: try the CLI
            if shutil.which("nvidia-smi") is None:
                return None
            index = self.device.index or 0
            out = subprocess.run(
                ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits", "-i", str(index)],
                capture_output=True,
                text=True,
                timeout=5,
            )
            return float(out.stdout.strip()) if out.returncode == 0 and out.stdout.strip() else None

    def _watch(self):
        while self.running:
            value = self._read()
            if value is None:
                return
            self.samples.append(value)
            time.sleep(0.05)

    def __enter__(self):
        if self.device.type == "cuda":
            self.running = True
            self.thread = threading.Thread(target=self._watch, daemon=True)
            self.thread.start()
        return self

    def __exit__(self, *exc):
        if self.running:
            self.running = False
            self.thread.join()
        self.mean = sum(self.samples) / len(self.samples) if self.samples else None


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def min_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return F.cosine_similarity(a.double(), b.double(), dim=-1).min().item()


# ------------------------------------------------------------------------------------------ part 1
def check_kernels(device: torch.device) -> list[dict]:
    """Fused kernels vs the dense relevance step on random problems (CPU: only in Triton's interpreter)."""
    if not legrad_kernels.triton_available() or (device.type != "cuda" and not INTERPRETED):
        return [dict(check="fused kernels", result="skipped: needs CUDA (or TRITON_INTERPRET=1) and Triton")]
    cases = [(torch.float64, "fp32", 200), (torch.float32, "fp32", 576)]
    if device.type == "cuda":  # the interpreter has no TF32 and multiplies bf16 bit patterns
        cases += [(torch.float32, "tf32", 576), (torch.float32, "bf16", 576)]
    rows = []
    for dtype, precision, T in cases:
        generator = torch.Generator().manual_seed(0)
        B, P, H, dh = 2, 3, 12, 64
        u = torch.randn(B, P, T, H * dh, generator=generator, dtype=dtype).to(device)
        V = torch.randn(B, H, T, dh, generator=generator, dtype=dtype).to(device)
        grad = torch.randn(B, P, T, generator=generator, dtype=dtype).to(device)
        uh = u.unflatten(-1, (H, dh)).transpose(2, 3).detach().requires_grad_(True)
        ref = _PositiveColumnMean.apply(uh, V[:, None])
        (ref_du,) = torch.autograd.grad(ref, uh, grad)
        ref_du = ref_du.transpose(2, 3).flatten(-2)
        relevance = legrad_kernels.fused_forward(u, V, precision)
        du = legrad_kernels.fused_backward(u, V, grad, precision)
        rows.append(
            dict(
                check=f"fused kernels {str(dtype)[6:]} {precision} T={T}",
                result=f"relevance rel. err {relative_error(relevance, ref):.1e}, "
                f"gradient rel. err {relative_error(du, ref_du):.1e}",
            )
        )
    return rows


# ------------------------------------------------------------------------------------------ part 2
def check_against_cpu(family: str, device: torch.device, iterations: int) -> dict:
    """The device's default engine against the CPU's, 1 image x 2 masks of a full-size random model."""
    name, cpu_model, size = build(family, torch.device("cpu"))
    _, model, _ = build(family, device)
    pixels, masks, kw = inputs(cpu_model, size, 1, 2, torch.device("cpu"))
    e = F.normalize(torch.randn(1, 2, cpu_model_out_dim(cpu_model), generator=torch.Generator().manual_seed(0)), dim=-1)
    results = []
    for m, where in ((cpu_model, torch.device("cpu")), (model, device)):
        legrad = LeGrad(vit_parts(m), pixels.to(where), **kw)
        x = e.to(where).requires_grad_(True)
        relevance = legrad.patch_relevance(x)
        (grad,) = torch.autograd.grad((relevance**2).sum(), x)
        vectors = mask_inversion(m, pixels.to(where), masks.to(where), iterations=iterations, **kw)
        results.append((legrad.impl, relevance.detach().cpu(), grad.cpu(), vectors.cpu()))
    (cpu_impl, cpu_rel, cpu_grad, cpu_vec), (impl, rel, grad, vec) = results
    return dict(
        family=name,
        impl=f"{impl} vs cpu {cpu_impl}",
        relevance_err=relative_error(rel, cpu_rel),
        grad_err=relative_error(grad, cpu_grad),
        cosine=min_cosine(vec, cpu_vec),
    )


def cpu_model_out_dim(model) -> int:
    return getattr(model.config, "projection_dim", None) or model.config.hidden_size


def time_variants(
    family: str, device: torch.device, images: int, masks_per_image: int, iterations: int, variants: dict
) -> tuple[str, list[dict]]:
    name, model, size = build(family, device)
    pixels, masks, kw = inputs(model, size, images, masks_per_image, device)
    objects = images * masks_per_image
    rows, vectors = [], {}
    for variant, kwargs in variants.items():
        mask_inversion(model, pixels, masks, iterations=2, **kwargs, **kw)  # compile / warm up
        synchronize(device)
        with Utilisation(device) as load:
            start = time.perf_counter()
            vectors[variant] = mask_inversion(model, pixels, masks, iterations=iterations, **kwargs, **kw)
            synchronize(device)
            seconds = time.perf_counter() - start
        rows.append(dict(family=name, variant=variant, ms_per_object=1e3 * seconds / objects, utilisation=load.mean))
    baseline, fused = vectors["dense (today)"], vectors.get("fused", vectors.get("blockwise"))
    for row in rows:
        row["cos_today"] = min_cosine(vectors[row["variant"]], baseline)
        row["cos_fused_fp32"] = min_cosine(vectors[row["variant"]], fused)
    # the scale of fp32 rounding after `iterations` steps: today's engine in fp32 against float64
    fp64 = mask_inversion(model.double(), pixels.double(), masks, iterations=iterations, impl="dense", **kw)
    rows.append(
        dict(
            family=name,
            variant="fp32 noise: dense fp32 vs fp64",
            ms_per_object=None,
            utilisation=None,
            cos_today=min_cosine(baseline, fp64),
            cos_fused_fp32=min_cosine(fused, fp64),
        )
    )
    return name, rows


# ------------------------------------------------------------------------------------------ part 3
def table(kernels: list[dict], cpu_checks: list[dict], timings: list[dict], header: str) -> str:
    fmt = lambda x, spec: "-" if x is None else format(x, spec)  # noqa: E731
    lines = [header, "", "Kernels against the dense relevance step (random problems on the device):"]
    lines += [f"  {row['check']:34} {row['result']}" for row in kernels]
    lines += [
        "",
        "Device against CPU (1 image x 2 masks):",
        f"  {'model':19} {'engines':28} {'relevance err':>13} {'gradient err':>12} {'MI cosine':>10}",
    ]
    lines += [
        f"  {r['family']:19} {r['impl']:28} {r['relevance_err']:13.1e} {r['grad_err']:12.1e} {r['cosine']:10.7f}"
        for r in cpu_checks
    ]
    lines += [
        "",
        "Speed (ms per object = one call's wall time / objects) and agreement (min cosine over objects):",
        f"  {'model':19} {'variant':32} {'ms/object':>9} {'GPU util %':>10} {'cos today':>9} {'cos fused':>9}",
    ]
    lines += [
        f"  {r['family']:19} {r['variant']:32} {fmt(r['ms_per_object'], '9.2f'):>9} "
        f"{fmt(r['utilisation'], '10.0f'):>10} {r['cos_today']:9.6f} {r['cos_fused_fp32']:9.6f}"
        for r in timings
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--families", nargs="+", choices=list(FAMILIES), default=list(FAMILIES))
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--masks", type=int, default=8, help="masks per image")
    parser.add_argument("--iterations", type=int, default=100)
    parser.add_argument("--check-iterations", type=int, default=20, help="MI iterations of the CPU comparison")
    parser.add_argument("--quick", action="store_true", help="1 image x 2 masks, 3 iterations, CLIP only")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU side)")
    args = parser.parse_args()
    if args.quick:
        args.images, args.masks, args.iterations, args.check_iterations = 1, 2, 3, 2
        args.families = ["clip"] if args.families == list(FAMILIES) else args.families
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("gpu_check: --device cuda but torch sees no CUDA device; use --device cpu for a logic check")
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    triton_version = getattr(legrad_kernels.triton, "__version__", "not installed")
    header = (
        f"gpu_check: {where}, torch {torch.__version__}, triton {triton_version}; {args.images} images x "
        f"{args.masks} masks, {args.iterations} iterations, full-size random weights"
    )
    print(header, flush=True)
    started = time.perf_counter()
    kernels = check_kernels(device)
    print(*(f"  {row['check']}: {row['result']}" for row in kernels), sep="\n", flush=True)
    variants = VARIANTS if device.type == "cuda" else CPU_VARIANTS
    cpu_checks, timings = [], []
    for family in args.families:
        cpu_checks.append(check_against_cpu(family, device, args.check_iterations))
        print(f"  {cpu_checks[-1]}", flush=True)
        _, rows = time_variants(family, device, args.images, args.masks, args.iterations, variants)
        timings += rows
        for row in rows:
            print(f"  {row}", flush=True)
    text = table(kernels, cpu_checks, timings, header) + f"\n\ntotal {time.perf_counter() - started:.0f} s"
    print("\n" + text)
    if os.environ.get("OUT"):
        write_report(Path(os.environ["OUT"]), text, dict(kernels=kernels, cpu=cpu_checks, timings=timings))


def write_report(out: Path, text: str, data: dict) -> None:
    """``out``/gpu_check.txt (the table) and gpu_check.json (``data``), both only where neither file
    exists (checked before either is written): a report already there is never replaced."""
    txt, json_path = new_file(out / "gpu_check.txt", "check report"), new_file(out / "gpu_check.json", "check report")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(txt, text + "\n")
    atomic_write_text(json_path, json.dumps(data, indent=1))


if __name__ == "__main__":
    main()
