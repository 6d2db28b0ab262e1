"""The LeGrad relevance step without the [.., heads, T, T] score tensor: blockwise (PyTorch) and fused (Triton).

For one mask and one hooked block, with u [T, D] = dS/d(A V) split into heads u^h [T, dh] and the
value states V^h [T, dh] (see :mod:`extractors.mi.legrad`),

    G^h[i, j]    = u^h_i . V^h_j                                  (= dS/dA, per head)
    relevance[j] = 1/(H T) sum_{h, i} max(G^h[i, j], 0)
    dL/du^h_i    = 1/(H T) sum_j [G^h[i, j] > 0] dL/drelevance[j] V^h_j

The dense evaluation materialises G for all masks of a batch at once (H T^2 floats per mask: 16 MB
for SigLIP-384, 160 MB for 10 masks), writes it once and reads it three times, at memory speed. The
two implementations here never hold more than a block of G:

* :func:`blockwise_forward` / :func:`blockwise_backward` (PyTorch, any device; the CPU path): G in
  blocks of at most BLOCK_ELEMENTS entries (rows of one mask, or several whole masks when T is
  small), few and large enough to keep per-op overhead low, small enough for the last-level cache;
  the forward keeps the sign of G as a bool tensor (a quarter of a float) so the backward is one
  matmul per block.
* :func:`fused_forward` / :func:`fused_backward` (Triton, CUDA tensors): flash-attention-style tiles
  of G in registers; the forward reduces over rows i per column tile, the backward recomputes the
  sign of each tile (nothing of size T x T is ever stored).

Both take u [B, P, T, H*dh] (P masks per image) and V [B, H, T, dh] (one per image) and return
relevance [B, P, T] / dL/du [B, P, T, H*dh]. The dense evaluation (``extractors.mi.legrad._PositiveColumnMean``)
is the reference both are tested against.

Triton's interpreter (``TRITON_INTERPRET=1``) runs the kernels on CPU tensors for tests. The variable
is read when ``@triton.jit`` decorates a function, and Triton decorates its own library functions
(``tl.sum``, ...) when it is imported, so it must be set before the process first imports triton
(set later, the kernels fail with "0 active drivers" or "Cannot call @triton.jit'd outside of the
scope of a kernel"); tests run the interpreted kernels in a fresh subprocess.
"""

from __future__ import annotations

import torch

try:  # Triton ships with CUDA builds of torch; CPU-only installs may lack it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the installation
    triton = None

BLOCK_ELEMENTS = 2**22  # entries of G per CPU block (16 MB in fp32, within L3): few, large ops
PRECISIONS = ("fp32", "tf32", "bf16")  # of the u . V products in the fused kernels (accumulation is fp32)


def triton_available() -> bool:
    """Whether the fused kernels can run (Triton importable)."""
    return triton is not None


# ---------------------------------------------------------------------------------- PyTorch, blockwise
def _blocks(P: int, H: int, T: int) -> list[tuple[slice, slice]]:
    """(masks, rows) blocks of G [P, H, T, T] with at most ~BLOCK_ELEMENTS entries each: whole masks
    (several at once when H T^2 is small), else near-equal row blocks of one mask."""
    rows = max(1, BLOCK_ELEMENTS // (H * T))
    if rows >= T:
        per_block = max(1, BLOCK_ELEMENTS // (H * T * T))
        return [(slice(p, min(p + per_block, P)), slice(0, T)) for p in range(0, P, per_block)]
    count = -(-T // rows)
    size = -(-T // count)
    return [(slice(p, p + 1), slice(i, min(i + size, T))) for p in range(P) for i in range(0, T, size)]


def _heads(x: torch.Tensor, H: int) -> torch.Tensor:
    """[.., T, H*dh] -> [.., H, T, dh] (a view)."""
    return x.unflatten(-1, (H, -1)).transpose(-3, -2)


def blockwise_forward(u: torch.Tensor, V: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """relevance [B, P, T] and the sign of G as bool [B, P, H, T, T] (G > 0), block by block.

    Args:
        u: [B, P, T, H*dh] dS/d(A V) per mask.
        V: [B, H, T, dh] value states per image.
    """
    B, P, T, _ = u.shape
    H = V.shape[1]
    uh = _heads(u, H)  # [B, P, H, T, dh]
    Vt = V.transpose(-1, -2)  # [B, H, dh, T]
    relevance = torch.zeros(B, P, T, dtype=u.dtype, device=u.device)
    positive = torch.empty(B, P, H, T, T, dtype=torch.bool, device=u.device)
    for b in range(B):
        for masks, rows in _blocks(P, H, T):
            G = torch.matmul(uh[b, masks, :, rows], Vt[b])  # [n, H, rows, T], stays in cache
            torch.gt(G, 0, out=positive[b, masks, :, rows])
            relevance[b, masks] += G.clamp_min_(0).sum(dim=(1, 2))
    return relevance / (H * T), positive


def blockwise_backward(positive: torch.Tensor, V: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """dL/du [B, P, T, H*dh] from the saved sign [B, P, H, T, T] and dL/drelevance [B, P, T]."""
    B, P, H, T, _ = positive.shape
    dh = V.shape[-1]
    du = torch.empty(B, P, H, T, dh, dtype=V.dtype, device=V.device)
    scaled_V = V[:, None] * (grad / (H * T))[:, :, None, :, None]  # [B, P, H, T, dh]: dL/drel_j V_j
    for b in range(B):
        for masks, rows in _blocks(P, H, T):
            sign = positive[b, masks, :, rows].to(V.dtype)  # [n, H, rows, T]
            torch.matmul(sign, scaled_V[b, masks], out=du[b, masks, :, rows])
    return du.transpose(-3, -2).flatten(-2)


# ---------------------------------------------------------------------------------- Triton, fused
if triton is not None:

    @triton.jit
    def _dot(a, b, PRECISION: tl.constexpr):
        """a @ b with fp32 (or fp64) accumulation; PRECISION 0 = ieee, 1 = tf32, 2 = bf16 inputs."""
        if PRECISION == 2:
            return tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16), out_dtype=tl.float32)
        if PRECISION == 1:
            return tl.dot(a, b, input_precision="tf32")
        return tl.dot(a, b, input_precision="ieee")

    @triton.jit
    def _relevance_fwd_kernel(
        u_ptr,
        v_ptr,
        out_ptr,
        P,
        H,
        T,
        DH,
        su_b,
        su_p,
        su_t,
        sv_b,
        sv_h,
        sv_t,
        so_b,
        so_p,
        so_h,
        BLOCK_I: tl.constexpr,
        BLOCK_J: tl.constexpr,
        BLOCK_D: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        """out[b, p, h, j] = sum_i max(u[b, p, i, h] . V[b, h, j], 0) for one (b, p, h) and a tile of j."""
        bph = tl.program_id(0)
        j0 = tl.program_id(1) * BLOCK_J
        h = bph % H
        p = (bph // H) % P
        b = bph // (H * P)
        d = tl.arange(0, BLOCK_D)
        j = j0 + tl.arange(0, BLOCK_J)
        v = tl.load(
            v_ptr + b * sv_b + h * sv_h + j[:, None] * sv_t + d[None, :],
            mask=(j[:, None] < T) & (d[None, :] < DH),
            other=0.0,
        )  # [BJ, BD]
        vt = tl.trans(v)
        acc = tl.zeros((BLOCK_J,), dtype=v.dtype)  # fp32 (fp64 for fp64 inputs)
        base = u_ptr + b * su_b + p * su_p + h * DH
        for i0 in range(0, T, BLOCK_I):
            i = i0 + tl.arange(0, BLOCK_I)
            ut = tl.load(
                base + i[:, None] * su_t + d[None, :], mask=(i[:, None] < T) & (d[None, :] < DH), other=0.0
            )  # [BI, BD]
            G = _dot(ut, vt, PRECISION)  # [BI, BJ]
            acc += tl.sum(tl.maximum(G, 0.0), axis=0)  # masked rows are 0: no effect
        tl.store(out_ptr + b * so_b + p * so_p + h * so_h + j, acc, mask=j < T)

    @triton.jit
    def _relevance_bwd_kernel(
        u_ptr,
        v_ptr,
        g_ptr,
        du_ptr,
        P,
        H,
        T,
        DH,
        su_b,
        su_p,
        su_t,
        sv_b,
        sv_h,
        sv_t,
        sg_b,
        sg_p,
        sd_b,
        sd_p,
        sd_t,
        BLOCK_I: tl.constexpr,
        BLOCK_J: tl.constexpr,
        BLOCK_D: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        """du[b, p, i, h] = sum_j [u_i . V_j > 0] g[b, p, j] V[b, h, j] for one (b, p, h) and a tile of i."""
        bph = tl.program_id(0)
        i0 = tl.program_id(1) * BLOCK_I
        h = bph % H
        p = (bph // H) % P
        b = bph // (H * P)
        d = tl.arange(0, BLOCK_D)
        i = i0 + tl.arange(0, BLOCK_I)
        ut = tl.load(
            u_ptr + b * su_b + p * su_p + h * DH + i[:, None] * su_t + d[None, :],
            mask=(i[:, None] < T) & (d[None, :] < DH),
            other=0.0,
        )  # [BI, BD]
        acc = tl.zeros((BLOCK_I, BLOCK_D), dtype=ut.dtype)
        for j0 in range(0, T, BLOCK_J):
            j = j0 + tl.arange(0, BLOCK_J)
            v = tl.load(
                v_ptr + b * sv_b + h * sv_h + j[:, None] * sv_t + d[None, :],
                mask=(j[:, None] < T) & (d[None, :] < DH),
                other=0.0,
            )  # [BJ, BD]
            g = tl.load(g_ptr + b * sg_b + p * sg_p + j, mask=j < T, other=0.0)  # [BJ]
            G = _dot(ut, tl.trans(v), PRECISION)  # [BI, BJ] recomputed
            weights = tl.where(G > 0, g[None, :], 0.0).to(v.dtype)  # sign x dL/drel_j
            acc += _dot(weights, v, PRECISION)
        tl.store(
            du_ptr + b * sd_b + p * sd_p + h * DH + i[:, None] * sd_t + d[None, :],
            acc.to(du_ptr.dtype.element_ty),
            mask=(i[:, None] < T) & (d[None, :] < DH),
        )


def _kernel_args(u: torch.Tensor, V: torch.Tensor, precision: str):
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if u.dtype == torch.float64 and precision != "fp32":
        raise ValueError(f"precision={precision!r} is for float32 tensors, got float64")
    B, P, T, D = u.shape
    H, dh = V.shape[1], V.shape[3]
    if V.shape != (B, H, T, dh) or H * dh != D:
        raise ValueError(f"u {tuple(u.shape)} and V {tuple(V.shape)} do not match ([B, P, T, H*dh], [B, H, T, dh])")
    u, V = u.contiguous(), V.contiguous()
    block_d = max(16, triton.next_power_of_2(dh))
    return u, V, (B, P, H, T, dh), dict(BLOCK_I=64, BLOCK_J=64, BLOCK_D=block_d, PRECISION=PRECISIONS.index(precision))


def fused_forward(u: torch.Tensor, V: torch.Tensor, precision: str = "fp32") -> torch.Tensor:
    """relevance [B, P, T] of u [B, P, T, H*dh] and V [B, H, T, dh] (Triton; nothing T x T is stored)."""
    u, V, (B, P, H, T, dh), meta = _kernel_args(u, V, precision)
    per_head = torch.empty(B, P, H, T, dtype=u.dtype, device=u.device)
    grid = (B * P * H, triton.cdiv(T, meta["BLOCK_J"]))
    _relevance_fwd_kernel[grid](
        u,
        V,
        per_head,
        P,
        H,
        T,
        dh,
        u.stride(0),
        u.stride(1),
        u.stride(2),
        V.stride(0),
        V.stride(1),
        V.stride(2),
        per_head.stride(0),
        per_head.stride(1),
        per_head.stride(2),
        **meta,
    )
    return per_head.sum(dim=2) / (H * T)


def fused_backward(u: torch.Tensor, V: torch.Tensor, grad: torch.Tensor, precision: str = "fp32") -> torch.Tensor:
    """dL/du [B, P, T, H*dh] from u, V and dL/drelevance [B, P, T]; the sign of G is recomputed."""
    u, V, (B, P, H, T, dh), meta = _kernel_args(u, V, precision)
    scaled = (grad / (H * T)).contiguous()
    du = torch.empty_like(u)
    grid = (B * P * H, triton.cdiv(T, meta["BLOCK_I"]))
    _relevance_bwd_kernel[grid](
        u,
        V,
        scaled,
        du,
        P,
        H,
        T,
        dh,
        u.stride(0),
        u.stride(1),
        u.stride(2),
        V.stride(0),
        V.stride(1),
        V.stride(2),
        scaled.stride(0),
        scaled.stride(1),
        du.stride(0),
        du.stride(1),
        du.stride(2),
        **meta,
    )
    return du
