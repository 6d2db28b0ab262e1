"""Mask Inversion (MI): an embedding per object mask, found by optimising a LeGrad explainability map.

For an image and a binary mask m, MI looks for the unit embedding e whose LeGrad map E(e)
(:mod:`utils.legrad`) covers m, staying close to the model's own global embedding g:

    loss(e) = dice_loss(E(e), m) + alpha * (1 - cos(e, g)) + beta * mean_{q != p} |cos(e, e_q)|

The raw parameter starts at the un-normalised g (so AdamW's step of ``lr`` is relative to g's
scale, as in the published code), e = normalize(raw) at every step, AdamW(lr, weight_decay=0),
and the result is normalize(raw) after the last step. The total loss is the SUM over images and
masks, so with beta = 0 every mask is optimised independently of the others (Adam is per element).

Speed: the model runs once per call, without gradients; each iteration only evaluates the small
linear "gradient decomposition" graph of :class:`utils.legrad.LeGrad` for all B x P masks at once,
and the Dice loss on the patch grid (:class:`utils.legrad.MapDice`, exact) instead of per pixel.
The model's parameters never receive gradients and their requires_grad flags are left untouched.

Edge cases (all finite):
    * empty mask: the Dice target is all zero, so the Dice term pushes the map's total mass
      down (towards a single peak); the result is a valid unit vector that carries no object
      information -- callers should not ask for it.
    * full mask: the Dice term pushes the map towards 1 everywhere (min-max keeps one pixel at 0).
    * a mask smaller than one patch works like any other (the map is bilinear at pixel level).
    * a constant map (no positive gradient anywhere) is all zeros; its Dice gradient is zero, so
      only the alpha term moves e.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from utils.legrad import LeGrad, MapDice, no_autocast, resolve_impl
from utils.vit_adapters import vit_parts

__all__ = ["dice_loss", "global_embedding", "legrad_map", "mask_inversion"]


def dice_loss(E: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Soft Dice loss per map: 1 - (2 sum(E m) + 1e-6) / (sum(E) + sum(m) + 1e-6).

    Args:
        E: maps [..., H, W] in [0, 1].
        m: masks [..., H, W] in {0, 1}, broadcastable to E.

    Returns:
        [...] loss per map, in [0, 1].
    """
    inter = (E * m).sum(dim=(-2, -1))
    return 1 - (2 * inter + 1e-6) / (E.sum(dim=(-2, -1)) + m.sum(dim=(-2, -1)) + 1e-6)


def global_embedding(
    model: nn.Module, pixel_values: torch.Tensor, spatial_shapes: torch.Tensor | None = None
) -> torch.Tensor:
    """The model's own global embedding, normalised, [B, D_out].

    DINOv2 / DINOv2-reg / DINOv3: pooler_output (layer-normed CLS); SigLIP / SigLIP2: pooler_output
    (attention-pooling head); CLIP: image_embeds. Works with any attention implementation.
    ``spatial_shapes`` [B, 2]: NaFlex models only (utils/vit_adapters.py).
    """
    parts = vit_parts(model)
    inputs = parts.model_inputs(pixel_values, spatial_shapes)
    with torch.no_grad(), _eval_mode(parts.model):
        output = parts.model(**inputs)
    return F.normalize(parts.global_embedding(output), dim=-1)


def legrad_map(
    model: nn.Module,
    pixel_values: torch.Tensor,
    embeddings: torch.Tensor,
    layer_index: int = -1,
    joint: bool = False,
    spatial_shapes: torch.Tensor | None = None,
) -> torch.Tensor:
    """LeGrad explainability maps of ``embeddings`` on the images (patch tokens only; see
    utils/vit_adapters.py for which tokens each family has).

    Args:
        model: a supported vision model (utils/vit_adapters.py; optionally peft-wrapped), eager attention.
        pixel_values: [B, 3, H, W]; NaFlex: [B, N, C p p] patch sequences.
        embeddings: [B, P, D_out] query embeddings (normalised here).
        layer_index: hooked blocks L + layer_index + 1 .. L (-1 = last block).
        joint: one min-max normalisation for the P maps of an image (``legrad_norm=joint``).
        spatial_shapes: NaFlex only: [B, 2] patch rows and columns of each image.

    Returns:
        [B, P, H, W] maps in [0, 1] (float32, float64 for float64 models). NaFlex: on a canvas of the
        batch's largest grid x patch size, image b's map in its top-left h_b p x w_b p pixels, 0 elsewhere.
    """
    if embeddings.ndim != 3 or embeddings.shape[0] != pixel_values.shape[0]:
        raise ValueError(
            f"embeddings must be [B, P, D] with B = {pixel_values.shape[0]} images, got shape {tuple(embeddings.shape)}"
        )
    parts = vit_parts(model)
    with _eval_mode(parts.model):
        legrad = LeGrad(parts, pixel_values, layer_index, spatial_shapes=spatial_shapes)
        with torch.no_grad(), no_autocast(pixel_values.device):
            return legrad.maps(F.normalize(embeddings.to(legrad.g), dim=-1), joint=joint)


def mask_inversion(
    model: nn.Module,
    pixel_values: torch.Tensor,
    masks: torch.Tensor,
    alpha: float = 0.03,
    iterations: int = 100,
    lr: float = 0.1,
    layer_index: int = -1,
    beta: float = 0.0,
    return_history: bool = False,
    impl: str = "auto",
    precision: str = "fp32",
    cuda_graph: bool = False,
    joint_norm: bool = False,
    shared: bool = False,
    spatial_shapes: torch.Tensor | None = None,
    init: torch.Tensor | None = None,
):
    """Mask Inversion embeddings of P masks per image.

    Args:
        model: a supported vision model (utils/vit_adapters.py: DINOv2, DINOv2-reg, DINOv3, SigLIP,
            SigLIP2, CLIP; optionally peft-wrapped), loaded with attn_implementation="eager" (only its
            module tree and forward are used). It is run in eval mode; its train/eval flags are
            restored afterwards.
        pixel_values: [B, 3, H, W] preprocessed images; NaFlex: [B, N, C p p] patch sequences.
        masks: [B, P, Hm, Wm] bool / float / integer masks with values in {0, 1}; the maps are
            resized to (Hm, Wm). NaFlex: a canvas holding image b's masks at its own resolution
            (h_b p x w_b p pixels, top-left), 0 elsewhere (see :func:`legrad_map`).
        alpha: weight of 1 - cos(e, g).
        iterations: AdamW steps (0 returns normalize(g) for every mask).
        lr: AdamW learning rate (weight decay 0).
        layer_index: hooked blocks L + layer_index + 1 .. L (-1 = last block).
        beta: weight of each mask's mean |cos| with the other masks of its image (0 when P == 1).
        return_history: also return {"loss", "dice"}: [iterations, B, P] float tensors (CPU) with
            each mask's total loss and Dice loss before every step.
        impl: evaluation of the maps (:class:`utils.legrad.LeGrad`): "auto" (fused Triton kernel on
            CUDA, blockwise PyTorch elsewhere), "blockwise", "fused", or "dense" (the engine before
            the blockwise / fused paths: scores [.., heads, T, T] and full-resolution maps every
            iteration; kept as their reference and for benchmarks). Same results up to rounding.
        precision: "fp32" (default, exact), or explicitly "tf32" (CUDA) / "bf16" (impl="fused")
            for the evaluation's products (:class:`utils.legrad.LeGrad`); report their cosine to fp32.
        cuda_graph: CUDA only: capture one iteration (forward, backward, AdamW step) in a CUDA graph
            and replay it, removing the per-iteration launch cost (shapes are static within a call).
        joint_norm: min-max normalise the P maps of an image with one min and max (the original
            code's accident, ``legrad_norm=joint``): the masks of an image then interact.
        shared: ONE embedding per image for all its P masks, fitted to the mean of the P Dice terms
            (the original's ``mi_sum`` for SigLIP / CLIP, ``mi_sum_loss=mean_dice``); returns [B, 1, D].
        spatial_shapes: NaFlex only: [B, 2] patch rows and columns of each image.
        init: [B, P, D_out] starting directions instead of g (``mi_init=mask_pool``), scaled to g's norm
            so that AdamW's steps keep their size (a zero row starts from g); the loss (and its pull
            towards g) is unchanged.

    Returns:
        [B, P, D_out] unit embeddings (and the history dict if ``return_history``), float32
        (float64 for float64 models). An active autocast context is ignored: the forward pass and
        the iterations run in float32 / float64 (reduced precision only through ``precision``),
        because MI amplifies rounding of the forward pass (see :func:`utils.legrad._capture`).

    On CUDA, AdamW runs fused (``fused=True``: one kernel, same update).

    Raises:
        ValueError: wrong shapes, mask batch != image batch, mask values outside {0, 1} (NaFlex: or
            outside the image's region of the canvas), an impl / precision / cuda_graph that cannot
            run on this device.
        RuntimeError: called under torch.inference_mode (MI needs autograd for e).
    """
    parts = vit_parts(model)
    grids = parts.patch_grids(pixel_values, spatial_shapes)  # checks pixel_values' shape
    if masks.ndim != 4:
        raise ValueError(f"masks must be [B, P, H, W], got shape {tuple(masks.shape)}")
    if masks.shape[0] != pixel_values.shape[0]:
        raise ValueError(f"masks hold {masks.shape[0]} images but pixel_values hold {pixel_values.shape[0]}")
    if masks.shape[1] == 0:
        raise ValueError("masks has no mask (P = 0)")
    if not ((masks == 0) | (masks == 1)).all():
        raise ValueError("mask values must be in {0, 1} (convert 0-255 masks with mask > 127 first)")
    if not isinstance(iterations, int) or iterations < 0:
        raise ValueError(f"iterations must be an int >= 0, got {iterations!r}")
    if cuda_graph and pixel_values.device.type != "cuda":
        raise ValueError(f"cuda_graph=True needs CUDA tensors, got pixel_values on {pixel_values.device}")
    if torch.is_inference_mode_enabled():
        raise RuntimeError(
            "mask_inversion needs autograd for the embeddings; do not call it under torch.inference_mode()"
        )
    resolve_impl(impl, precision, pixel_values.device)  # refuse before the forward pass
    if parts.naflex:
        _check_canvas(masks, grids * parts.patch_size)

    with _eval_mode(parts.model):
        legrad = LeGrad(parts, pixel_values, layer_index, impl=impl, precision=precision, spatial_shapes=spatial_shapes)
    B, P = masks.shape[:2]
    target = masks.to(device=legrad.g.device, dtype=legrad.dtype)
    g_unit = F.normalize(legrad.g, dim=-1)[:, None]  # [B, 1, D]
    vectors = 1 if shared else P
    if init is None:
        raw = legrad.g[:, None].expand(B, vectors, -1).clone()
    else:
        if init.shape != (B, vectors, legrad.g.shape[-1]):
            raise ValueError(f"init must be [B, P, D] = {(B, vectors, legrad.g.shape[-1])}, got {tuple(init.shape)}")
        init = init.to(legrad.g)
        start = F.normalize(init, dim=-1) * legrad.g.norm(dim=-1)[:, None, None]
        # A zero row (a padding mask of a batch) starts from g, as without init.
        raw = torch.where(init.norm(dim=-1, keepdim=True) == 0, legrad.g[:, None], start)
    raw.requires_grad_(True)
    on_cuda = raw.device.type == "cuda"
    optimizer = torch.optim.AdamW(
        [raw], lr=lr, weight_decay=0.0, fused=True if on_cuda else None, capturable=cuda_graph
    )
    if legrad.impl == "dense":
        dice_of = lambda e: dice_loss(legrad.maps(e, size=target.shape[-2:], joint=joint_norm), target)  # noqa: E731
    else:
        map_dice = MapDice(legrad, target, joint=joint_norm)
        dice_of = lambda e: map_dice(legrad.patch_relevance(e))  # noqa: E731

    def step() -> tuple[torch.Tensor, torch.Tensor]:
        """One AdamW step on the summed loss; returns (loss, dice) [B, P] before the step."""
        e = F.normalize(raw, dim=-1)
        dice = dice_of(e)  # [B, P] (a shared e: one map, P masks)
        if shared:
            dice = dice.mean(dim=1, keepdim=True)
        loss = dice + alpha * (1 - (e * g_unit).sum(-1))
        if beta and vectors > 1:
            loss = loss + beta * _mean_abs_cos_to_others(e)
        loss.sum().backward()
        optimizer.step()
        return loss.detach(), dice.detach()

    history = torch.zeros(iterations, 2, B, vectors, dtype=legrad.dtype, device=raw.device) if return_history else None
    with torch.enable_grad(), no_autocast(pixel_values.device):
        if cuda_graph and iterations:
            _replay_in_cuda_graph(step, iterations, raw, optimizer, history)
        else:
            for i in range(iterations):
                optimizer.zero_grad(set_to_none=True)
                loss, dice = step()
                if history is not None:
                    history[i, 0], history[i, 1] = loss, dice
    result = F.normalize(raw.detach(), dim=-1)
    if return_history:
        history = history.float().cpu()
        return result, {"loss": history[:, 0], "dice": history[:, 1]}
    return result


def _check_canvas(masks: torch.Tensor, regions: torch.Tensor) -> None:
    """NaFlex: image b's masks must fit its region (rows, columns) [B, 2] of the canvas and be 0 outside it."""
    for b, (rows, cols) in enumerate(regions.tolist()):
        if rows > masks.shape[-2] or cols > masks.shape[-1]:
            raise ValueError(
                f"masks of size {tuple(masks.shape[-2:])} cannot hold image {b}'s {rows} x {cols} "
                f"pixel grid (NaFlex masks live at each image's own resolution, padded to a canvas)"
            )
        if masks[b, :, rows:].any() or masks[b, :, :, cols:].any():
            raise ValueError(
                f"image {b}'s masks are non-zero outside its {rows} x {cols} region of the canvas "
                f"(NaFlex: place each image's masks top-left at its own resolution)"
            )


def _replay_in_cuda_graph(
    step, iterations: int, raw: torch.Tensor, optimizer: torch.optim.Optimizer, history: torch.Tensor | None
) -> None:
    """Run ``iterations`` x ``step`` as replays of one captured CUDA graph (same updates as eager).

    Two warm-up steps on a side stream initialise cuBLAS, Triton and AdamW's state (as the capture
    requires); ``raw`` and the optimizer state are then reset in place, so the replays start from
    the same point as the eager loop and read / write the very tensors the graph captured.
    """
    start = raw.detach().clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            optimizer.zero_grad(set_to_none=True)
            step()
    torch.cuda.current_stream().wait_stream(side)
    with torch.no_grad():
        raw.copy_(start)
        for state in optimizer.state.values():
            for value in state.values():
                value.zero_()  # step, exp_avg, exp_avg_sq: AdamW's initial state
    optimizer.zero_grad(set_to_none=True)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        loss, dice = step()
    for i in range(iterations):
        graph.replay()
        if history is not None:
            history[i, 0], history[i, 1] = loss, dice


def _mean_abs_cos_to_others(e: torch.Tensor) -> torch.Tensor:
    """[B, P] mean over q != p of |cos(e_p, e_q)| for unit e [B, P, D] (P > 1)."""
    P = e.shape[1]
    cos = (e @ e.transpose(1, 2)).abs()
    off_diagonal = 1 - torch.eye(P, dtype=e.dtype, device=e.device)
    return (cos * off_diagonal).sum(-1) / (P - 1)


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Run ``model`` in eval mode (no dropout) and restore every module's own flag afterwards."""
    flags = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in flags:
            module.training = training
