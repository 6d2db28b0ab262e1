"""The fused Triton kernels (extractors/mi/legrad_kernels.py) on CPU tensors, through Triton's interpreter.

Only meaningful with TRITON_INTERPRET=1 set before triton is imported, so this file is run by
test_legrad_kernels.py::test_fused_kernels_in_triton_interpreter in a fresh subprocess; in a plain
pytest run it is skipped. On a CUDA machine the same comparisons run on the GPU in
benchmarks/gpu_check.py.
"""

from __future__ import annotations

import os

import pytest
import torch

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1",
    reason="needs TRITON_INTERPRET=1 before triton is imported; run through "
    "tests/extractors/mi/test_legrad_kernels.py::test_fused_kernels_in_triton_interpreter",
)

from extractors.mi.engine import mask_inversion  # noqa: E402
from extractors.mi.legrad_kernels import fused_backward, fused_forward  # noqa: E402
from tests.extractors.mi.test_legrad_kernels import dense_relevance_and_grad, random_problem  # noqa: E402
from tests.extractors.mi.test_mask_inversion import MODELS, _inputs, _load  # noqa: E402


@pytest.mark.parametrize("T, dh", [(17, 16), (70, 16), (130, 12)])  # partial tiles; dh padded to 16
def test_fused_matches_dense_float64(T, dh):
    u, V, grad = random_problem(B=2, P=2, H=2, T=T, dh=dh)
    ref_relevance, ref_du = dense_relevance_and_grad(u, V, grad)
    torch.testing.assert_close(fused_forward(u, V), ref_relevance, atol=1e-12, rtol=0)
    torch.testing.assert_close(fused_backward(u, V, grad), ref_du, atol=1e-12, rtol=0)


def test_fused_matches_dense_float32():
    u, V, grad = random_problem(B=1, P=3, H=2, T=70, dh=16, dtype=torch.float32)
    ref_relevance, ref_du = dense_relevance_and_grad(u, V, grad)
    torch.testing.assert_close(fused_forward(u, V), ref_relevance, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fused_backward(u, V, grad), ref_du, atol=1e-5, rtol=1e-5)


@pytest.mark.skip(
    reason="Triton's interpreter multiplies the raw bit patterns of bfloat16 tl.dot operands "
    "(triton-lang/triton#11584, not supported upstream); precision='bf16' is checked on "
    "the GPU by benchmarks/gpu_check.py"
)
def test_fused_bf16_products_are_close():
    u, V, grad = random_problem(B=1, P=2, H=2, T=70, dh=16, dtype=torch.float32)
    ref_relevance, ref_du = dense_relevance_and_grad(u, V, grad)
    relevance = fused_forward(u, V, precision="bf16")
    du = fused_backward(u, V, grad, precision="bf16")
    assert relevance.dtype == du.dtype == torch.float32
    assert (relevance - ref_relevance).norm() / ref_relevance.norm() < 2e-2
    assert (du - ref_du).norm() / ref_du.norm() < 5e-2
    assert not torch.equal(relevance, fused_forward(u, V))  # the products really were bf16


@pytest.mark.parametrize("family", MODELS)
def test_fused_mask_inversion_matches_blockwise(tiny_model_dirs, tiny_variant_dirs, family):
    model = _load({**tiny_model_dirs, **tiny_variant_dirs}[family], family)
    pixels, masks, kw = _inputs(model, B=2, P=2, seed=1)
    args = dict(iterations=5, layer_index=-2, beta=0.1, **kw)
    fused = mask_inversion(model, pixels, masks, impl="fused", **args)
    blockwise = mask_inversion(model, pixels, masks, impl="blockwise", **args)
    torch.testing.assert_close(fused, blockwise, atol=1e-12, rtol=0)
