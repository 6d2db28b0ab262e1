"""LeGrad explainability maps as a cheap function of the query embedding ("gradient decomposition").

LeGrad (Bousselham et al.) explains a unit query embedding e on an image: for each hooked block l,
with A_l the block's attention probabilities [B, heads, T, T] and f_l = normalize(head(X_l)) the
feature of the block's output tokens X_l,

    G_l = d(e . f_l) / dA_l,   relevance_l[j] = mean_{head, query row i} max(G_l[head, i, j], 0),

then drop the CLS / register columns, reshape to the patch grid, upsample bilinearly by the patch
size, sum over hooked blocks, min-max normalise each map on its own and resize. Mask Inversion
optimises e so that this map matches a mask, i.e. it differentiates the map again with respect to e.

Doing that with autograd through the model (create_graph=True every iteration) repeats the work
below for every iteration. Instead, notice that A_l reaches f_l only through

    a = A V (per head) -> o_proj -> * ls1 -> + residual = r -> r + ls2 * fc2(act(fc1(LN2(r)))) = X_l,

which is token-wise after A V, so at the fixed image every piece of the chain rule is a constant:

    dS/dX_t   = w_t                        (head; same vector for all t for DINOv2 and CLIP)
    dS/dh_t   = ls2 * w_t  @ W2            (h = the MLP's hidden activation, W2 = fc2.weight)
    dS/dz_t   = act'(z_t) * dS/dh_t        (z = fc1 pre-activation, act' at the captured z)
    dS/dr_t   = w_t + LN2'(r_t)^T (dS/dz_t @ W1)
    u_t       = dS/da_t = ls1 * dS/dr_t  @ Wo
    G[h,i,j]  = sum_{c in head h} u_i[c] V_j[c]

Everything is linear in e. One no-grad forward pass captures V, r, z and X_l, and the products of
the fixed matrices are folded once per image (``M = W1' @ Wo'`` below), so one evaluation costs, per
mask, a [T, 4D] x [4D, D] matmul, the per-head [T, dh] x [dh, T] matmuls and element-wise work.
The model's parameters never enter it. SigLIP's head normalises every token before the mean, which
makes w_t differ per token: w_t = kappa_t (w - c_t x_hat_t) (a common vector minus a per-token
multiple of the normalised token), and the x_hat_t part is folded into a per-image constant ``C``.

Derivations (what the constants of :class:`_BlockConstants` are). Write x_hat = (x - mean x) / sigma,
sigma = sqrt(var x + eps), for a LayerNorm's input x [D] (``_layer_norm_stats``).

1. The LayerNorm Jacobian fold (LN2 before the MLP, input r_t). LN(r) = gamma * r_hat + beta and

       d r_hat / d r = (I - 1 1^T / D - r_hat r_hat^T / D) / sigma_r,

   so a gradient q at LN2's output comes back as LN'(r)^T q = (q' - r_hat (r_hat . q') / D) / sigma_r with
   q' = gamma * q - mean(gamma * q). For q = dS/dz @ W1 the centring is folded into the weights once,
   W1c = (W1 * gamma) minus its mean over D (``W1c`` in ``_constants``), so q' = dS/dz @ W1c. With
   dS/dz_t = act'(z_t) * y_t, y = w @ W2s (W2s = diag(ls2) W2), and u = dS/dr @ Wo_s (Wo_s = diag(ls1) Wo):

       u_t = w_t @ Wo_s + ((act'(z_t) / sigma_r) * y_t) @ (W1c @ Wo_s)
                        - (y_t . act'(z_t) * (r_hat_t @ W1c^T) / (D sigma_r)) (r_hat_t @ Wo_s)
           = w_t @ Wo_s + (a_s * y_t) @ M - (y_t . Sig_t) Q_t,

   the ``a_s``, ``M``, ``Sig`` and ``Q`` of :class:`_BlockConstants` (``sigma_r`` is a standard deviation).

2. SigLIP's per-token head. f = normalize(mean_t LN(X_t)) (post_layernorm on every token, then the mean;
   Jn = the Jacobian of normalize at the mean). By 1. applied to post_layernorm,

       dS/dX_t = LN'(X_t)^T (Jn^T e) / T = kappa_t (w - c_t x_hat_t),
       w = J^T e with J = centred(Jn * gamma),  kappa_t = 1 / (T sigma_t),  c_t = (x_hat_t . w) / D,

   (x_hat_t . (zeta - mean zeta) = x_hat_t . zeta, since x_hat_t sums to 0). u is linear in dS/dX_t, so
   u_t = kappa_t (u_t(w) - c_t u_t(x_hat_t)): the common vector w goes through the chain of 1. per mask,
   and x_hat_t goes through it once per image, giving ``C`` = u(x_hat) (``_head_constants``):
   C_t = x_hat_t @ Wo_s + (R_t @ Wo_s - (r_hat_t . R_t) / D Q_t) / sigma_r, R = (act'(z) * (x_hat @ W2s)) @ W1c.
   The attention-pooling (MAP) head gives g, the start of the optimisation, not f: it does not enter.
   DINO families and CLIP: f = normalize(head(mean_t X_t)), so dS/dX_t = J(mean X)^T e / T for every t.

A gated MLP, h = act(z_g) * z with z_g = gate(LN2(r)) and z = fc1(LN2(r)), has
dh = act(z_g) dz + z act'(z_g) dz_g: two plain-MLP paths that share fc2. So the chain above holds with
fc1 replaced by [fc1; gate] (2F rows), act'(z) by [act(z_g), z act'(z_g)] and fc2 by [fc2, fc2].

SigLIP2 NaFlex batches (``spatial_shapes``; see extractors/mi/vit_adapters.py): the feature's mean runs over
image b's N_b patch tokens only (kappa_t = 0 on padding, so u_t = 0 there and padding rows add nothing
to G's column sums), the relevance is the mean over heads and those N_b query rows, and its padding
columns are dropped. Each image keeps its own h_b x w_b patch grid; maps of a batch share one canvas
(image b's map in its top-left h_b p x w_b p pixels, 0 elsewhere; see :meth:`LeGrad.maps`).

Per mask and iteration the [T, 4D] x [4D, D] products (u and its gradient, 2 x 2 T F D flops: 5.4
GFLOP for SigLIP-384) cost about five times the relevance step (2 x 2 H T^2 dh = 1 GFLOP).
Implementations (``impl``), all with the same values and gradients:

* ``"dense"``: autograd through the formulas above; G = dS/dA [.., H, T, T] is materialised
  (:class:`_PositiveColumnMean`). The reference for the other two.
* ``"blockwise"``: one autograd node per block (:class:`_BlockRelevance`) with the backward of the
  linear chain written out; masks are processed in chunks whose [T, 4D] intermediates stay in cache,
  and G is evaluated in row blocks (:func:`extractors.mi.legrad_kernels.blockwise_forward`). The CPU path.
* ``"fused"``: the same node, G tiled inside a Triton kernel (:func:`extractors.mi.legrad_kernels.fused_forward`);
  all masks in one chunk. The CUDA path.

:class:`MapDice` evaluates Mask Inversion's Dice loss of the map on the patch grid instead of at pixel
resolution (exactly; see there).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from extractors.mi import legrad_kernels
from extractors.mi.vit_adapters import BlockParts, VitParts, hooked_blocks
from utils.quiet import no_jit_script_deprecation

IMPLS = ("auto", "dense", "blockwise", "fused")
CHUNK_ELEMENTS = 2**23  # CPU: masks per chunk such that the [n, T, 4D] intermediates are ~32 MB (fp32)


@dataclass
class _BlockConstants:
    """Per-image constants of one hooked block (B images, T tokens, D width, F MLP width, H heads).

    With w [B, P, D] = dS/dX (common part) and y = w @ W2s [B, P, F]:
        u = w @ Wo_s + (a_s * y) @ M - (y . Sig) Q             (DINO families, CLIP)
        u = kappa * (that - c C),  c = w @ x_hat^T / D         (SigLIP / SigLIP2, per-token head)

    F is the MLP width (2F for a gated MLP: see the module docstring).
    """

    V: torch.Tensor  # [B, H, T, dh] value states (v_proj output, LoRA included)
    J: torch.Tensor  # [B, D_out, D] e -> w (head Jacobian, see _head_constants)
    W2s: torch.Tensor  # [D, F]  diag(ls2) fc2.weight
    Wo_s: torch.Tensor  # [D, D]  diag(ls1) o_proj.weight
    M: torch.Tensor  # [F, D]  centred(fc1.weight * gamma2) @ Wo_s
    a_s: torch.Tensor  # [B, T, F] act'(z) / sigma_r (sigma_r: LN2's standard deviation of r)
    Sig: torch.Tensor  # [B, T, F] act'(z) * (r_hat @ W1c^T) / (D sigma_r)
    Q: torch.Tensor  # [B, T, D] r_hat @ Wo_s
    x_hat: torch.Tensor | None = None  # [B, T, D] token-normalised X (SigLIP)
    kappa: torch.Tensor | None = None  # [B, T]    1 / (T sigma_post); NaFlex: valid_t / (N_b sigma_post)
    C: torch.Tensor | None = None  # [B, T, D]


class LeGrad:
    """LeGrad maps of one image batch as a differentiable function of query embeddings.

    Construction runs the model once (no grad) and folds the constants; :meth:`maps` then evaluates
    E(e) for any number of embeddings per image without touching the model again.

    Args:
        parts: the model's pieces (:func:`extractors.mi.vit_adapters.vit_parts`).
        pixel_values: [B, 3, H, W] preprocessed images; NaFlex: [B, N, C p p] patch sequences.
        layer_index: hooked blocks L + layer_index + 1 .. L (-1 = last block).
        impl: "dense", "blockwise", "fused" (see the module docstring) or "auto": "fused" for CUDA
            tensors when Triton is installed, else "blockwise".
        precision: of the evaluation's products (explicit only; the default is exact float32):
            "fp32"; "tf32" (CUDA: float32 matmuls and the fused kernel's products on TF32 tensor
            cores); "bf16" (the fused kernel's u . V products with bfloat16 inputs, float32 sums).
        spatial_shapes: NaFlex only: [B, 2] patch rows and columns of each image.

    Attributes:
        g: [B, D_out] the model's own (un-normalised) global embedding of each image.
        dtype: float64 for float64 models, float32 otherwise (the precision of the maps).
        impl: the implementation in use ("dense", "blockwise" or "fused").
        grids: [B, 2] int64 patch rows and columns of each image (all equal unless NaFlex).
        grid: (rows, columns) of the patch grid the batch's relevance is laid out on: the largest
            rows and columns of ``grids`` (image b's relevance in its top-left corner, 0 elsewhere).
        image_size: the default size of :meth:`maps` (the images' size; NaFlex: grid x patch size).

    The forward pass runs with autocast off even under an active autocast context (see
    :func:`_capture`), the constants are folded with autocast off, and callers evaluate :meth:`maps`
    with autocast off too (see :func:`no_autocast`): Mask Inversion amplifies any perturbation of the
    captured constants, and one fp32 forward costs about as much as one iteration for one mask.
    """

    def __init__(
        self,
        parts: VitParts,
        pixel_values: torch.Tensor,
        layer_index: int = -1,
        impl: str = "auto",
        precision: str = "fp32",
        spatial_shapes: torch.Tensor | None = None,
        map_patch_size: int | None = None,
    ):
        inputs = parts.model_inputs(pixel_values, spatial_shapes)  # checks the shapes
        # The maps' upsampling factor: the patch size, or the original's hard-coded 16 for SigLIP
        # (``pixel_geometry=original``; original extractors/mi/engine.py:850).
        self.map_scale = map_patch_size or parts.patch_size
        if parts.naflex and self.map_scale != parts.patch_size:
            raise ValueError("map_patch_size is for fixed-size models (NaFlex maps fill their patch grid)")
        self.impl = resolve_impl(impl, precision, pixel_values.device)
        self.precision = precision
        self.parts = parts
        model_dtype = next(parts.model.parameters()).dtype
        self.dtype = torch.float64 if model_dtype == torch.float64 else torch.float32
        blocks = hooked_blocks(parts, layer_index)
        captured, output = _capture(parts, blocks, inputs)
        self.g = parts.global_embedding(output).detach().to(self.dtype)
        p = parts.patch_size
        self.grids = parts.patch_grids(pixel_values, spatial_shapes)
        self.grid = tuple(int(n) for n in self.grids.amax(0))
        self.image_size = tuple(pixel_values.shape[-2:]) if not parts.naflex else (self.grid[0] * p, self.grid[1] * p)
        tokens = captured[0]["x"].shape[1]
        patches = pixel_values.shape[1] if parts.naflex else self.grid[0] * self.grid[1]
        if tokens != parts.num_prefix_tokens + patches:
            raise ValueError(
                f"{tokens} tokens do not match {parts.num_prefix_tokens} prefix tokens + {patches} "
                f"patches ({self.grid} grid of a {tuple(pixel_values.shape[-2:])} image, patch {p})"
            )
        # NaFlex: which tokens are patches (the rest is padding), and where each grid cell's token is.
        self.valid = inputs["pixel_attention_mask"].bool() if parts.naflex else None
        if self.valid is not None and parts.token_norm is None:
            raise ValueError(f"{parts.family}: padded token sequences need a per-token head (token_norm)")
        if self.valid is not None:
            self._cell_token, self._cell_valid = _grid_cells(self.grids, self.grid, self.dtype, pixel_values.device)
            self._row_scale = (self.valid.shape[1] / self.valid.sum(1).to(self.dtype))[:, None, None]  # T / N_b
        self._layouts: dict[tuple[int, int], list] = {}
        with torch.no_grad(), no_autocast(pixel_values.device):
            self.blocks = [self._constants(b, c) for b, c in zip(blocks, captured)]

    # ------------------------------------------------------------------ evaluation (differentiable)
    def relevance(self, e: torch.Tensor) -> torch.Tensor:
        """Token relevance summed over hooked blocks, [B, P, T], for unit embeddings e [B, P, D_out].

        Each block's relevance is the mean over heads and query rows (NaFlex: image b's N_b patch
        rows; padding rows carry u = 0, so the sum over all T rows is rescaled by T / N_b).
        """
        with _matmul_precision(self.precision, e.device):
            if self.impl == "dense":
                rel = sum(self._block_relevance(k, e) for k in self.blocks)
            else:
                rel = sum(_BlockRelevance.apply(e @ k.J, k, self.impl, self.precision) for k in self.blocks)
        return rel * self._row_scale if self.valid is not None else rel

    def patch_relevance(self, e: torch.Tensor) -> torch.Tensor:
        """Relevance of the patch tokens on the patch grid, [B, P, *grid] (prefix tokens dropped;
        NaFlex: image b's h_b x w_b grid in the top-left corner, padding cells 0)."""
        B, P = e.shape[:2]
        rel = self.relevance(e)[..., self.parts.num_prefix_tokens :]
        if self.valid is None:
            return rel.reshape(B, P, *self.grid)
        cells = rel.gather(-1, self._cell_token.expand(B, P, -1)) * self._cell_valid
        return cells.reshape(B, P, *self.grid)

    def maps(
        self, e: torch.Tensor, size: tuple[int, int] | None = None, joint: bool | str = False, eps: float = 0.0
    ) -> torch.Tensor:
        """Explainability maps E(e) in [0, 1], [B, P, *size] (size defaults to ``image_size``).

        Each image's patch relevance is upsampled bilinearly by the patch size, min-max normalised on
        its own and resized bilinearly to its region of the output (:meth:`regions`): the whole
        ``size``, or NaFlex: its top-left grid x patch-size pixels, the rest of the canvas 0.
        ``joint=True`` uses one min and max for all P maps of an image (the original code's accident,
        ``legrad_norm=joint``); ``joint="batch"`` one for every map of the batch, and ``eps`` is added
        to the range (:func:`min_max`). A constant map (e.g. no positive gradient anywhere) becomes all
        zeros, never NaN.
        """
        rel = self.patch_relevance(e)
        size = tuple(size) if size is not None else self.image_size
        layout = self._layout(size)
        (h, w, rh, rw), _ = layout[0]
        if len(layout) == 1 and (rh, rw) == size:  # fixed size: one grid, no canvas
            return self._map(rel, (rh, rw), joint, eps)
        out = rel.new_zeros(*rel.shape[:2], *size)
        for (h, w, rh, rw), images in layout:
            if joint == "batch":
                raise ValueError("joint='batch' needs one patch grid for the whole batch (not NaFlex)")
            out[images, :, :rh, :rw] = self._map(rel[images, :, :h, :w], (rh, rw), joint, eps)
        return out

    def _map(
        self, rel: torch.Tensor, size: tuple[int, int], joint: bool | str = False, eps: float = 0.0
    ) -> torch.Tensor:
        """Patch relevance [.., h, w] -> min-max normalised bilinear map [.., *size]."""
        E = F.interpolate(rel, scale_factor=self.map_scale, mode="bilinear", align_corners=False)
        E = min_max(E, joint, eps)
        if tuple(E.shape[-2:]) != size:
            E = F.interpolate(E, size=size, mode="bilinear", align_corners=False)
        return E

    def regions(self, size: tuple[int, int]) -> torch.Tensor:
        """[B, 2] pixel rows, columns that image b's map fills in a ``size`` output, from its top-left.

        Fixed-size families: the whole output (maps are resized to any size). NaFlex: grid x patch
        size (no resizing: masks live at each image's own resolution, padded to a common canvas).
        """
        if not self.parts.naflex:
            return torch.tensor([list(size)]).expand(len(self.grids), 2)
        regions = self.grids * self.parts.patch_size
        too_big = (regions > torch.tensor(size)).any(1)
        if too_big.any():
            b = int(too_big.nonzero()[0])
            raise ValueError(
                f"a {tuple(size)} canvas cannot hold image {b}'s {tuple(regions[b].tolist())} pixels "
                f"(its {tuple(self.grids[b].tolist())} patch grid x patch size {self.parts.patch_size})"
            )
        return regions

    def _layout(self, size: tuple[int, int]) -> list[tuple[tuple[int, int, int, int], torch.Tensor]]:
        """Images grouped by (grid rows, grid columns, region rows, region columns), for batched resizing;
        cached per size (the iterations, and a CUDA graph capture, then do no host work here)."""
        if size not in self._layouts:
            keys = torch.cat([self.grids, self.regions(size)], dim=1)
            groups, inverse = torch.unique(keys, dim=0, return_inverse=True)
            self._layouts[size] = [
                (tuple(int(n) for n in key), torch.nonzero(inverse == i).squeeze(1).to(self.g.device))
                for i, key in enumerate(groups)
            ]
        return self._layouts[size]

    def _block_relevance(self, k: _BlockConstants, e: torch.Tensor) -> torch.Tensor:
        """impl="dense": the formulas of the module docstring, differentiated by autograd."""
        B, P, _ = e.shape
        H, T, dh = k.V.shape[1:]
        w = e @ k.J  # [B, P, D]  dS/dX
        y = w @ k.W2s  # [B, P, F]  dS/dh / act'
        u = (
            (w @ k.Wo_s)[:, :, None]  # residual path
            + (k.a_s[:, None] * y[:, :, None]) @ k.M  # MLP path, [B, P, T, D]
            - (y @ k.Sig.transpose(1, 2))[..., None] * k.Q[:, None]
        )  # LN2's projection
        if k.C is not None:  # per-token head (SigLIP)
            c = w @ k.x_hat.transpose(1, 2) / w.shape[-1]  # [B, P, T]
            u = k.kappa[:, None, :, None] * (u - c[..., None] * k.C[:, None])
        u = u.reshape(B, P, T, H, dh).transpose(2, 3)  # [B, P, H, T, dh] dS/d(A V)
        return _PositiveColumnMean.apply(u, k.V[:, None])  # [B, P, T]

    # ------------------------------------------------------------------ constants (no grad)
    def _constants(self, block: BlockParts, cap: dict[str, torch.Tensor]) -> _BlockConstants:
        dt = self.dtype
        V, r, z, X = (cap[n].to(dt) for n in ("v", "r", "z", "x"))
        B, T, D = X.shape
        H = self.parts.num_heads
        if not isinstance(block.norm2, nn.LayerNorm):
            raise ValueError(f"expected nn.LayerNorm before the MLP, got {type(block.norm2).__name__}")
        Wo_s = _scale_vector(block.layer_scale1, D, V)[:, None] * _affine_weight(block.o_proj, D, dt)
        W1 = _affine_weight(block.fc1, D, dt)  # [F, D]
        W2 = _affine_weight(block.fc2, W1.shape[0], dt)  # [D, F]
        if block.gate is None:
            act_d = _elementwise_derivative(block.activation, z)  # [B, T, F]
        else:  # h = act(z_g) * z: the paths through fc1 and through the gate (module docstring)
            z_g = cap["g"].to(dt)
            W1 = torch.cat([W1, _affine_weight(block.gate, D, dt)])  # [2F, D]
            W2 = torch.cat([W2, W2], dim=1)  # [D, 2F]
            act_d = torch.cat([block.activation(z_g), z * _elementwise_derivative(block.activation, z_g)], -1)
        W2s = _scale_vector(block.layer_scale2, D, V)[:, None] * W2
        W1c = W1 * _ln_weight(block.norm2, D, V)
        W1c = W1c - W1c.mean(dim=1, keepdim=True)  # LN2's mean removal, folded into fc1
        r_hat, sigma_r = _layer_norm_stats(r, block.norm2.eps)
        Q = r_hat @ Wo_s
        head = self._head_constants(X, W2s, W1c, Wo_s, act_d, r_hat, sigma_r, Q)
        return _BlockConstants(
            V=V.reshape(B, T, H, D // H).transpose(1, 2).contiguous(),
            W2s=W2s,
            Wo_s=Wo_s,
            M=W1c @ Wo_s,
            a_s=act_d / sigma_r[..., None],
            Sig=act_d * (r_hat @ W1c.T) / (D * sigma_r[..., None]),
            Q=Q,
            **head,
        )

    def _head_constants(self, X, W2s, W1c, Wo_s, act_d, r_hat, sigma_r, Q) -> dict:
        """J (and SigLIP's per-token pieces) for dS/dX_t; see the module docstring."""
        parts, dt = self.parts, self.dtype
        B, T, D = X.shape
        if parts.token_norm is None:
            # f = normalize(head(mean_t X_t)): dS/dX_t = J(mean X)^T e / T for every token.
            J = _unit_jacobian(parts.pooled_head, X.mean(dim=1)) / T
            return dict(J=J)
        # f = normalize(mean_t LN(X_t)): dS/dX_t = LN'(X_t)^T Jn^T e / T
        #   = (1/(T sigma_t)) (zeta - mean(zeta) - x_hat_t (x_hat_t . zeta) / D),  zeta = gamma * (Jn^T e)
        # NaFlex: the mean runs over image b's N_b patch tokens, so 1/T becomes valid_t / N_b.
        norm = parts.token_norm
        weights = (
            torch.full((B, T), 1.0 / T, dtype=dt, device=X.device)
            if self.valid is None
            else self.valid.to(dt) / self.valid.sum(1, keepdim=True).to(dt)
        )  # [B, T] token weights
        pooled = (norm(X.to(norm.weight.dtype)).to(dt) * weights[..., None]).sum(dim=1)
        Jn = _unit_jacobian(parts.pooled_head, pooled)
        J = Jn * _ln_weight(norm, D, X)
        J = J - J.mean(dim=-1, keepdim=True)
        x_hat, sigma = _layer_norm_stats(X, norm.eps)
        # The x_hat_t part of dS/dX_t, pushed through the same chain as the common part:
        R = (act_d * (x_hat @ W2s)) @ W1c  # [B, T, D]
        rho = (r_hat * R).sum(-1, keepdim=True)
        C = x_hat @ Wo_s + (R @ Wo_s - rho / D * Q) / sigma_r[..., None]
        return dict(J=J, x_hat=x_hat, kappa=weights / sigma, C=C)


class _PositiveColumnMean(torch.autograd.Function):
    """relevance[..., j] = mean_{h, i} max(G[..., h, i, j], 0) with G = u @ V^T (= dS/dA).

    Same values and gradient as ``(u @ V.mT).clamp_min(0).mean(dim=(-3, -2))``; written by hand
    because G [.., heads, T, T] is the largest tensor of an iteration (16 MB per mask for
    SigLIP-384): it is clamped and turned into its 0/1 mask in place, and the backward folds the
    incoming gradient into V (dS/du = mask @ (grad_j * V_j)) instead of materialising dG.
    """

    @staticmethod
    def forward(ctx, u: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
        G = u @ V.transpose(-1, -2)  # [..., H, T, T]
        G.clamp_min_(0)
        relevance = G.sum(dim=(-3, -2)) / (G.shape[-3] * G.shape[-2])
        ctx.save_for_backward(G.sign_(), V)  # 1 where G > 0, else 0
        return relevance

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        positive, V = ctx.saved_tensors
        scaled_V = V * (grad / (positive.shape[-3] * positive.shape[-2]))[..., None, :, None]
        return positive @ scaled_V, None


class _BlockRelevance(torch.autograd.Function):
    """impl "blockwise" / "fused": relevance [B, P, T] of one hooked block from w = dS/dX [B, P, D].

    u(w) is linear, so its backward is written out (:func:`_token_gradients_backward`) instead of
    recorded: autograd would keep every [.., T, 4D] intermediate of every mask alive until the
    backward. Masks go through in chunks (:func:`_chunks`) so those intermediates stay in cache; the
    relevance step keeps the sign of G (blockwise) or u itself (fused, which recomputes the sign).
    """

    @staticmethod
    def forward(ctx, w: torch.Tensor, k: _BlockConstants, impl: str, precision: str) -> torch.Tensor:
        B, P, _ = w.shape
        H, T, _ = k.V.shape[1:]
        relevance = torch.empty(B, P, T, dtype=w.dtype, device=w.device)
        saved = []
        for images, masks in _chunks(B, P, T, k.M.shape[0], w.device, impl):
            u = _token_gradients(k, images, w[images, masks])  # [b, n, T, D]
            V = k.V[images]
            if impl == "fused":
                relevance[images, masks] = legrad_kernels.fused_forward(u, V, precision)
                state = u
            else:
                relevance[images, masks], state = legrad_kernels.blockwise_forward(u, V)
            if ctx.needs_input_grad[0]:
                saved.append((images, masks, state))
        ctx.k, ctx.impl, ctx.precision, ctx.saved = k, impl, precision, saved
        ctx.shape = w.shape
        return relevance

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        k = ctx.k
        dw = torch.empty(ctx.shape, dtype=grad.dtype, device=grad.device)
        with _matmul_precision(ctx.precision, grad.device):  # autograd runs this outside relevance()
            for images, masks, state in ctx.saved:
                V, g = k.V[images], grad[images, masks]
                if ctx.impl == "fused":
                    du = legrad_kernels.fused_backward(state, V, g, ctx.precision)
                else:
                    du = legrad_kernels.blockwise_backward(state, V, g)
                dw[images, masks] = _token_gradients_backward(k, images, du)
        return dw, None, None, None


def _chunks(B: int, P: int, T: int, F_mlp: int, device: torch.device, impl: str):
    """(image slice, mask slice) pairs covering [B, P]: everything at once for "fused" (one launch per
    kernel); on the CPU one image at a time and as many masks as keep n x T x F_mlp <= CHUNK_ELEMENTS."""
    if impl == "fused":
        yield slice(0, B), slice(0, P)
        return
    n = max(1, CHUNK_ELEMENTS // (T * F_mlp)) if device.type == "cpu" else P
    for b in range(B):
        for p in range(0, P, n):
            yield slice(b, b + 1), slice(p, min(p + n, P))


def _token_gradients(k: _BlockConstants, images: slice, w: torch.Tensor) -> torch.Tensor:
    """u = dS/d(A V) [b, n, T, D] of w [b, n, D] on images k[images] (the module docstring's chain)."""
    a_s, Sig, Q = k.a_s[images], k.Sig[images], k.Q[images]
    y = w @ k.W2s  # [b, n, F]
    u = (a_s[:, None] * y[:, :, None]) @ k.M  # MLP path
    u += (w @ k.Wo_s)[:, :, None]  # residual path
    u -= (y @ Sig.transpose(1, 2))[..., None] * Q[:, None]  # LN2's projection
    if k.C is not None:  # per-token head (SigLIP)
        c = w @ k.x_hat[images].transpose(1, 2) / w.shape[-1]  # [b, n, T]
        u -= c[..., None] * k.C[images][:, None]
        u *= k.kappa[images][:, None, :, None]
    return u


def _token_gradients_backward(k: _BlockConstants, images: slice, du: torch.Tensor) -> torch.Tensor:
    """dL/dw [b, n, D] from dL/du [b, n, T, D]: the transpose of :func:`_token_gradients` (u is linear in w)."""
    a_s, Sig, Q = k.a_s[images], k.Sig[images], k.Q[images]
    dw = 0
    if k.C is not None:
        du = du * k.kappa[images][:, None, :, None]
        dc = -(du * k.C[images][:, None]).sum(-1)  # [b, n, T]
        dw = dc @ k.x_hat[images] / du.shape[-1]
    dy = ((du @ k.M.T) * a_s[:, None]).sum(2)  # MLP path, [b, n, F]
    dy -= (du * Q[:, None]).sum(-1) @ Sig  # LN2's projection
    return dw + du.sum(2) @ k.Wo_s.T + dy @ k.W2s.T


class MapDice:
    """``dice_loss(legrad.maps(e, size), masks)`` for fixed masks, evaluated on the patch grid.

    The map is E = R((U rel - lo) / (hi - lo)) with U the bilinear upsampling by the patch size, R the
    bilinear resize to the masks' size (identity if equal) and lo, hi the extremes of U rel. U and R
    are linear and separable, and R keeps constants (bilinear weights sum to 1), so with A = R U the
    two sums Dice needs are, per mask m (N pixels),

        sum(E m) = (<rel, A^T m> - lo sum(m)) / (hi - lo),   sum(E) = (<rel, A^T 1> - lo N) / (hi - lo),

    and A^T m is computed once. lo and hi: along each axis, between two neighbouring patch centres a
    bilinear map is affine in the interpolation weight, so its extremes over the pixels lie at the
    first or last pixel of each run of pixels between the same two patches; only those rows and
    columns of U rel are evaluated. Values and gradients equal the full-resolution evaluation (up to
    rounding) with O(grid) work per mask instead of O(pixels).

    NaFlex batches: image b's map fills only its region of the masks' canvas (:meth:`LeGrad.regions`) and
    is 0 elsewhere, so A is per image (zero rows outside the region, zero columns beyond its grid) and
    N is its region's pixel count; the masks must be 0 outside the region (``mask_inversion`` checks).

    Args:
        legrad: the images' :class:`LeGrad`.
        masks: [B, P, Hm, Wm] in {0, 1}.
        joint: one min and max for all maps of an image, or (``"batch"``) of the batch (:func:`norm_dims`).
        eps: added to each map's range (:func:`min_max`).
        overlap: "dice" (``dice_loss``) or "iou" (``iou_loss``, MaO's soft IoU): the same three sums.
    """

    def __init__(
        self, legrad: LeGrad, masks: torch.Tensor, joint: bool | str = False, eps: float = 0.0, overlap: str = "dice"
    ):
        self.dims, self.eps, self.overlap = norm_dims(joint), eps, overlap
        masks = masks.to(dtype=legrad.dtype, device=legrad.g.device)
        like = dict(dtype=masks.dtype, device=masks.device)
        p = legrad.map_scale
        size = tuple(masks.shape[-2:])
        regions = legrad.regions(size)
        axes = {}  # (grid n, region, canvas, padded grid) -> matrices
        with no_autocast(masks.device):  # exact weights even under autocast
            per_image = []
            for grid, region in zip(legrad.grids.tolist(), regions.tolist()):
                per_image.append(
                    [
                        axes.setdefault(key, _axis_matrices(*key, p, **like))
                        for key in zip(grid, region, size, legrad.grid)
                    ]
                )
            (self.Up_y, A_y), (self.Up_x, A_x) = (_stack_axis([image[axis] for image in per_image]) for axis in (0, 1))
            self.mask_on_grid = A_y.mT[:, None] @ masks @ A_x[:, None]  # [B, P, *grid]  A^T m
            self.ones_on_grid = (A_y.sum(1)[:, :, None] * A_x.sum(1)[:, None, :])[:, None]  # [B, 1, *grid]  A^T 1
        self.mask_sum = masks.sum(dim=(-2, -1))
        self.pixels = regions.prod(1).to(**like)[:, None]  # [B, 1]

    def __call__(self, relevance: torch.Tensor) -> torch.Tensor:
        """Dice loss [B, P] of the maps of patch relevance [B, P, *grid] (:meth:`LeGrad.patch_relevance`;
        [B, 1, *grid] compares one map with each of the P masks)."""
        extremes = self.Up_y @ relevance @ self.Up_x.mT  # rows / cols that hold them
        lo = extremes.amin(dim=self.dims, keepdim=True).flatten(2).amin(-1)  # [B, P] or [B, 1]
        span = (extremes.amax(dim=self.dims, keepdim=True).flatten(2).amax(-1) - lo + self.eps).clamp_min(1e-12)
        inter = ((relevance * self.mask_on_grid).sum(dim=(-2, -1)) - lo * self.mask_sum) / span
        total = ((relevance * self.ones_on_grid).sum(dim=(-2, -1)) - lo * self.pixels) / span
        if self.overlap == "iou":
            return 1 - (inter + 1e-6) / (total + self.mask_sum - inter + 1e-6)
        return 1 - (2 * inter + 1e-6) / (total + self.mask_sum + 1e-6)


def _axis_matrices(
    n: int, region: int, canvas: int, padded: int, p: int, dtype: torch.dtype, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """One axis of :class:`MapDice` for a grid of n patches whose map fills ``region`` of ``canvas`` pixels:
    (the run-end rows of the upsampling U [r, padded], A = R U [canvas, padded]), zero-padded."""
    Up = _interpolation_matrix(n, dict(scale_factor=p), dtype=dtype, device=device)  # [n p, n]
    A = Up if n * p == region else _interpolation_matrix(n * p, dict(size=region), dtype=dtype, device=device) @ Up
    ends = Up[_run_ends(Up)]
    return F.pad(ends, (0, padded - n)), F.pad(A, (0, padded - n, 0, canvas - region))


def _stack_axis(matrices: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack per-image (run-end rows, A) of one axis: [B, 1, r, padded], [B, canvas, padded]. Images with
    fewer run ends repeat their first one (a repeated row changes no extreme)."""
    rows = max(len(ends) for ends, _ in matrices)
    ends = [torch.cat([e, e[:1].expand(rows - len(e), -1)]) for e, _ in matrices]
    return torch.stack(ends)[:, None], torch.stack([A for _, A in matrices])


def _interpolation_matrix(n: int, how: dict, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """[n_out, n] matrix of 1-D linear interpolation (align_corners=False), i.e. the per-axis factor of
    F.interpolate(..., mode="bilinear", **how): obtained by interpolating the identity."""
    eye = torch.eye(n, dtype=dtype, device=device)[None]  # n channels of length n
    return F.interpolate(eye, mode="linear", align_corners=False, **how)[0].T


def _run_ends(W: torch.Tensor) -> torch.Tensor:
    """Rows of an interpolation matrix [n_out, n] that start or end a run with the same left neighbour."""
    left = (W != 0).to(torch.int8).argmax(dim=1)  # first non-zero weight
    change = left[1:] != left[:-1]
    first = torch.cat([change.new_ones(1), change])
    last = torch.cat([change, change.new_ones(1)])
    return torch.nonzero(first | last).squeeze(1)


def resolve_impl(impl: str, precision: str, device: torch.device) -> str:
    """The implementation for ``impl`` (see :class:`LeGrad`) on ``device``; refuses what cannot run."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if precision not in legrad_kernels.PRECISIONS:
        raise ValueError(f"precision must be one of {legrad_kernels.PRECISIONS}, got {precision!r}")
    if impl == "auto":
        impl = "fused" if device.type == "cuda" and legrad_kernels.triton_available() else "blockwise"
    if impl == "fused" and not legrad_kernels.triton_available():
        raise ValueError("impl='fused' needs Triton (pip install triton), which is not importable here")
    if precision != "fp32" and impl == "dense":
        raise ValueError(f"impl='dense' is the float32 reference; precision={precision!r} needs 'blockwise' or 'fused'")
    if precision == "tf32" and device.type != "cuda":
        raise ValueError(f"precision='tf32' exists only on CUDA devices, got {device.type}")
    if precision == "bf16" and impl != "fused":
        raise ValueError(f"precision='bf16' is implemented in the fused kernel only (impl='fused'), got {impl!r}")
    return impl


@contextlib.contextmanager
def _matmul_precision(precision: str, device: torch.device):
    """precision="tf32" on CUDA: let float32 matmuls use TF32 tensor cores inside the context."""
    if precision != "tf32" or device.type != "cuda":
        yield
        return
    before = torch.backends.cuda.matmul.fp32_precision
    torch.backends.cuda.matmul.fp32_precision = "tf32"
    try:
        yield
    finally:
        torch.backends.cuda.matmul.fp32_precision = before


def no_autocast(device: torch.device):
    """Context that switches autocast off on ``device``'s type (a no-op where it is not on)."""
    return torch.autocast(device_type=device.type, enabled=False)


def norm_dims(joint: bool | str) -> tuple[int, ...]:
    """The dims of maps [B, P, H, W] that share one min and max: each map (False), the P maps of an image
    (True), or every map of the batch (``"batch"``: the original code's min-max over its whole batch,
    which held one image's smart crops; original ``extractors/mi/engine.py:442-446, 1044-1048, 18-24``)."""
    if joint == "batch":
        return (-4, -3, -2, -1)
    if joint in (True, False):
        return (-3, -2, -1) if joint else (-2, -1)
    raise ValueError(f"joint={joint!r}; one of False, True, 'batch'")


def min_max(E: torch.Tensor, joint: bool | str = False, eps: float = 0.0) -> torch.Tensor:
    """Min-max normalise each map [B, P, H, W] on its own (or together: :func:`norm_dims`); a constant
    map becomes 0. ``eps`` is added to the range (the original's CLIP path added 1e-6, original
    ``extractors/mi/engine.py:18-24``, used at ``:1394``)."""
    dims = norm_dims(joint)
    lo = E.amin(dim=dims, keepdim=True)
    hi = E.amax(dim=dims, keepdim=True)
    return (E - lo) / (hi - lo + eps).clamp_min(1e-12)


# ---------------------------------------------------------------------- capture and small helpers
def _capture(parts: VitParts, blocks: list[BlockParts], inputs: dict[str, torch.Tensor]):
    """One no-grad fp32 forward on the model's ``inputs`` (:meth:`VitParts.model_inputs`); per hooked
    block V (v_proj out), r (norm2 in), z (fc1 out), X (block out) and, gated MLPs, g (gate out)."""
    names = [("v", "r", "z", "x") + (("g",) if b.gate is not None else ()) for b in blocks]
    captured: list[dict[str, list]] = [{n: [] for n in block_names} for block_names in names]

    def keep(store, name, use_input=False):
        def hook(module, args, output=None):
            value = args[0] if use_input else (output[0] if isinstance(output, tuple) else output)
            store[name].append(value.detach())

        return hook

    handles = []
    for block, store in zip(blocks, captured):
        handles += [
            block.v_proj.register_forward_hook(keep(store, "v")),
            block.norm2.register_forward_pre_hook(keep(store, "r", use_input=True)),
            block.fc1.register_forward_hook(keep(store, "z")),
            block.block.register_forward_hook(keep(store, "x")),
        ]
        if block.gate is not None:
            handles.append(block.gate.register_forward_hook(keep(store, "g")))
    device = inputs["pixel_values"].device
    try:
        # Always float32 (float64): a bf16 forward perturbs V, r, z, X by ~2^-8 relative, which 100
        # AdamW steps amplify (full-size SigLIP-384, random weights: pixel noise of 1e-4 alone moves
        # MI vectors to cosine 0.988 after 30 steps; a bf16 autocast forward to 0.92). The iterations
        # ran in fp32 already, so this is the only step that reduced precision changed.
        with torch.no_grad(), no_autocast(device):
            output = parts.model(**inputs)
    finally:
        for handle in handles:
            handle.remove()
    for store in captured:
        if any(len(v) != 1 for v in store.values()):
            raise RuntimeError(
                f"expected each hooked module to run once per forward, got { {k: len(v) for k, v in store.items()} }"
            )
    return [{k: v[0] for k, v in store.items()} for store in captured], output


def _grid_cells(
    grids: torch.Tensor, grid: tuple[int, int], dtype: torch.dtype, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """NaFlex: for each cell (r, c) of the padded ``grid``, the patch token of image b that lies there
    (r * w_b + c, row-major; 0 outside the image) and whether one does: [B, 1, rows * columns] each."""
    rows = torch.arange(grid[0])[:, None]
    cols = torch.arange(grid[1])[None, :]
    h, w = grids[:, 0, None, None], grids[:, 1, None, None]
    inside = (rows < h) & (cols < w)  # [B, *grid]
    token = torch.where(inside, rows * w + cols, 0)
    return (token.flatten(1)[:, None].to(device), inside.flatten(1)[:, None].to(device=device, dtype=dtype))


def _affine_weight(module: nn.Module, in_features: int, dtype: torch.dtype) -> torch.Tensor:
    """[out, in] matrix of an affine module (y = x W^T + b).

    A plain nn.Linear gives its weight; anything else (a peft LoRA layer wrapping a Linear) is probed
    with the identity, which is exact for any affine module and includes the adapter's update.
    """
    if type(module) is nn.Linear:
        return module.weight.detach().to(dtype)
    ref = next(module.parameters())
    probe = torch.cat([torch.zeros(1, in_features), torch.eye(in_features)]).to(ref)
    out = module(probe)
    return (out[1:] - out[:1]).T.to(dtype)


def _scale_vector(layer_scale: nn.Module | None, dim: int, like: torch.Tensor) -> torch.Tensor:
    """The per-channel factor of a layer scale module (ones if the block has none)."""
    if layer_scale is None:
        return torch.ones(dim, dtype=like.dtype, device=like.device)
    ref = next(layer_scale.parameters())
    return layer_scale(torch.ones(dim, dtype=ref.dtype, device=ref.device)).to(like)


def _ln_weight(norm: nn.LayerNorm, dim: int, like: torch.Tensor) -> torch.Tensor:
    if norm.normalized_shape != (dim,):
        raise ValueError(f"expected a LayerNorm over the last dim {dim}, got {norm.normalized_shape}")
    if norm.weight is None:
        return torch.ones(dim, dtype=like.dtype, device=like.device)
    return norm.weight.detach().to(like)


def _layer_norm_stats(x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """x_hat = (x - mean) / sigma and sigma = sqrt(var + eps) over the last dim (as nn.LayerNorm)."""
    centred = x - x.mean(dim=-1, keepdim=True)
    sigma = (centred.pow(2).mean(dim=-1, keepdim=True) + eps).sqrt()
    return centred / sigma, sigma.squeeze(-1)


def _elementwise_derivative(activation: nn.Module, z: torch.Tensor) -> torch.Tensor:
    """act'(z) of an element-wise activation module, by forward-mode AD (no formula hard-coded)."""
    with no_jit_script_deprecation():  # torch's own deprecation notice, raised by its first jvp
        return torch.func.jvp(activation, (z,), (torch.ones_like(z),))[1]


def _unit_jacobian(head: nn.Module, points: torch.Tensor) -> torch.Tensor:
    """Jacobian of x -> normalize(head(x)) at each point [B, D] -> [B, D_out, D] (dtype of points)."""
    ref = next(head.parameters(), None)
    ref_dtype = ref.dtype if ref is not None else points.dtype

    def unit(x):
        return F.normalize(head(x[None].to(ref_dtype)), dim=-1)[0].to(points.dtype)

    return torch.func.vmap(torch.func.jacrev(unit))(points)
