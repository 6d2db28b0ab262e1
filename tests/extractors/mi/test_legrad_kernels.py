"""The relevance step without the T x T tensor (extractors/mi/legrad_kernels.py) against the dense evaluation.

The blockwise PyTorch path is tested here directly; the fused Triton kernels run on CPU only in
Triton's interpreter, which must be switched on before triton is first imported, so their tests
(test_legrad_kernels_interpreted.py) run in a fresh subprocess with TRITON_INTERPRET=1.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import extractors.mi.legrad_kernels as kernels
from extractors.mi.legrad import _PositiveColumnMean
from extractors.mi.legrad_kernels import _blocks, blockwise_backward, blockwise_forward

ROOT = Path(__file__).resolve().parents[3]


def dense_relevance_and_grad(u: torch.Tensor, V: torch.Tensor, grad: torch.Tensor):
    """The dense reference: relevance [B, P, T] and d(grad . relevance)/du for u [B, P, T, H*dh]."""
    H, dh = V.shape[1], V.shape[3]
    u = u.detach().requires_grad_(True)
    relevance = _PositiveColumnMean.apply(u.unflatten(-1, (H, dh)).transpose(2, 3), V[:, None])
    (du,) = torch.autograd.grad(relevance, u, grad)
    return relevance.detach(), du


def random_problem(B=2, P=3, H=2, T=300, dh=8, dtype=torch.float64, seed=0):
    generator = torch.Generator().manual_seed(seed)
    u = torch.randn(B, P, T, H * dh, generator=generator, dtype=dtype)
    V = torch.randn(B, H, T, dh, generator=generator, dtype=dtype)
    grad = torch.randn(B, P, T, generator=generator, dtype=dtype)
    return u, V, grad


@pytest.mark.parametrize("T, block_rows", [(7, 64), (64, 64), (300, 64), (20, 40)])  # rows; 2 masks at once
def test_blockwise_matches_dense(T, block_rows, monkeypatch):
    monkeypatch.setattr(kernels, "BLOCK_ELEMENTS", 2 * T * block_rows)  # H = 2
    u, V, grad = random_problem(T=T)
    relevance, positive = blockwise_forward(u, V)
    ref_relevance, ref_du = dense_relevance_and_grad(u, V, grad)
    torch.testing.assert_close(relevance, ref_relevance, atol=1e-12, rtol=0)
    torch.testing.assert_close(blockwise_backward(positive, V, grad), ref_du, atol=1e-12, rtol=0)
    assert positive.dtype == torch.bool and positive.shape == (2, 3, 2, T, T)
    assert relevance.abs().max() > 0.1  # not a trivially zero problem


def test_blockwise_float32_matches_dense():
    u, V, grad = random_problem(T=200, dtype=torch.float32)
    relevance, positive = blockwise_forward(u, V)
    ref_relevance, ref_du = dense_relevance_and_grad(u, V, grad)
    torch.testing.assert_close(relevance, ref_relevance, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(blockwise_backward(positive, V, grad), ref_du, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("P, H, T", [(1, 12, 1), (10, 12, 197), (10, 12, 257), (10, 12, 576), (3, 64, 4096)])
def test_blocks_cover_g_once_within_the_budget(P, H, T):
    covered = torch.zeros(P, T, dtype=torch.int64)
    for masks, rows in _blocks(P, H, T):
        covered[masks, rows] += 1
        n = masks.stop - masks.start
        assert n * H * (rows.stop - rows.start) * T <= max(kernels.BLOCK_ELEMENTS, H * T)
    assert (covered == 1).all()


def _run(code_or_args: list[str], interpret: bool | None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    return subprocess.run(
        [sys.executable, *code_or_args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900
    )


needs_triton = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None,
    reason="Triton is not installed: the fused kernels cannot run, not even "
    "in Triton's CPU interpreter (pip install triton)",
)


@pytest.mark.slow  # a nested pytest under the Triton interpreter (minutes)
@needs_triton
def test_fused_kernels_in_triton_interpreter():
    """Runs test_legrad_kernels_interpreted.py in a fresh process with TRITON_INTERPRET=1."""
    result = _run(
        [
            "-m",
            "pytest",
            "tests/extractors/mi/test_legrad_kernels_interpreted.py",
            "-o",
            "addopts=",
            "-q",
            "-rs",
            "-p",
            "no:cacheprovider",
            "-W",
            "ignore",
        ],
        interpret=True,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    summary = re.search(r"(\d+) passed(?:, (\d+) skipped)? in ", output)
    assert summary, output[-3000:]
    # everything ran except the bf16 test (the interpreter cannot multiply bf16, see that test)
    # 14 = 4 kernel tests + 10 models; the one skip is the bf16 test
    assert (int(summary.group(1)), int(summary.group(2) or 0)) == (14, 1), output[-3000:]
    assert re.search(r"SKIPPED \[1\] .*bf16", output), output[-3000:]  # -rs: the reason of the skip


_CALL_KERNEL = """
import os, sys, torch
if sys.argv[1] == "after_triton":
    import triton
    os.environ["TRITON_INTERPRET"] = "1"
from extractors.mi import legrad_kernels
if sys.argv[1] == "after_module":
    os.environ["TRITON_INTERPRET"] = "1"
u, V = torch.randn(1, 1, 20, 32), torch.randn(1, 2, 20, 16)
print(legrad_kernels.fused_forward(u, V).shape)
"""


@pytest.mark.slow  # three fresh interpreters: import order is the subject
@needs_triton
def test_triton_interpret_must_be_set_before_triton_is_imported():
    before = _run(["-c", _CALL_KERNEL, "before"], interpret=True)
    assert before.returncode == 0 and "torch.Size([1, 1, 20])" in before.stdout, before.stderr[-3000:]
    for when in ("after_triton", "after_module"):
        late = _run(["-c", _CALL_KERNEL, when], interpret=False)
        assert late.returncode != 0, f"{when}: the kernel ran on CPU tensors without the interpreter"
