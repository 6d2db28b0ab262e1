"""Mask Inversion (MI): an embedding per object mask, found by optimising a LeGrad explainability map.

For an image and a binary mask m, MI looks for the unit embedding e whose LeGrad map E(e)
(:mod:`extractors.mi.legrad`) covers m, staying close to the model's own global embedding g:

    loss(e) = dice_loss(E(e), m) + alpha * (1 - cos(e, g)) + beta * mean_{q != p} |cos(e, e_q)|

The raw parameter starts at the un-normalised g (so AdamW's step of ``lr`` is relative to g's
scale, as in the published code), e = normalize(raw) at every step, AdamW(lr, weight_decay=0),
and the result is normalize(raw) after the last step. The total loss is the SUM over images and
masks, so with beta = 0 every mask is optimised independently of the others (Adam is per element).

MaO's Stage B (``groups``, ``descriptor=mao``): the B inputs are object crops with one mask each, and
the crops of one image share ONE embedding v, started at the image's Stage-A scene vector
a = normalize(mean_i normalize(g_i)), with the loss sum_i overlap(E_i(v), m_i) + alpha * (1 - cos(v, a))
(``overlap``: "iou", the paper's soft IoU, or "dice").

Speed: the model runs once per call, without gradients; each iteration only evaluates the small
linear "gradient decomposition" graph of :class:`extractors.mi.legrad.LeGrad` for all B x P masks at once,
and the Dice loss on the patch grid (:class:`extractors.mi.legrad.MapDice`, exact) instead of per pixel.
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
import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from extractors.mi.legrad import LeGrad, MapDice, no_autocast, resolve_impl
from extractors.mi.vit_adapters import vit_parts
from utils.config import MI_ITERATIONS, MISettings

__all__ = ["OVERLAPS", "Inversion", "dice_loss", "global_embedding", "iou_loss", "legrad_map", "mask_inversion"]

OVERLAPS = ("dice", "iou")  # the overlap losses between a map and its mask (``overlap`` below)


@dataclass(frozen=True)
class Inversion:
    """The settings an MI extractor runs :func:`mask_inversion` with, resolved from its config keys
    (``mi_alpha`` -> ``alpha``, ``mi_iterations`` null -> 100 or 80, ``legrad_norm=joint`` ->
    ``joint_norm``, ...); see :func:`mask_inversion` for each. The optional three are set only where
    they apply (None: not passed), so that features folders made without them keep their identity."""

    alpha: float
    beta: float
    lr: float
    iterations: int
    layer_index: int
    impl: str
    precision: str
    cuda_graph: bool
    joint_norm: bool | str
    overlap: str | None = None  # descriptor=mao: its map-to-mask loss
    norm_eps: float | None = None  # legrad_norm=joint of a family the original code had
    map_patch_size: int | None = None  # pixel_geometry=original: the original's SigLIP maps

    def kwargs(self) -> dict[str, Any]:
        """:func:`mask_inversion`'s keyword arguments (and the extractor identity's ``mi``)."""
        optional = ("overlap", "norm_eps", "map_patch_size")
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in optional or v is not None}


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


def iou_loss(E: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Soft IoU loss per map (MaO's Stage B, as the paper writes it):
    1 - (sum(E m) + 1e-6) / (sum(E) + sum(m) - sum(E m) + 1e-6).

    Args:
        E: maps [..., H, W] in [0, 1].
        m: masks [..., H, W] in {0, 1}, broadcastable to E.

    Returns:
        [...] loss per map, in [0, 1].
    """
    inter = (E * m).sum(dim=(-2, -1))
    union = E.sum(dim=(-2, -1)) + m.sum(dim=(-2, -1)) - inter
    return 1 - (inter + 1e-6) / (union + 1e-6)


def global_embedding(
    model: nn.Module, pixel_values: torch.Tensor, spatial_shapes: torch.Tensor | None = None
) -> torch.Tensor:
    """The model's own global embedding, normalised, [B, D_out].

    DINOv2 / DINOv2-reg / DINOv3: pooler_output (layer-normed CLS); SigLIP / SigLIP2: pooler_output
    (attention-pooling head); CLIP: image_embeds. Works with any attention implementation.
    ``spatial_shapes`` [B, 2]: NaFlex models only (extractors/mi/vit_adapters.py).
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
    layer_index: int = MISettings.mi_layer_index,
    joint: bool = False,
    spatial_shapes: torch.Tensor | None = None,
) -> torch.Tensor:
    """LeGrad explainability maps of ``embeddings`` on the images (patch tokens only; see
    extractors/mi/vit_adapters.py for which tokens each family has).

    Args:
        model: a supported vision model (extractors/mi/vit_adapters.py; optionally peft-wrapped), eager attention.
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
    alpha: float = MISettings.mi_alpha,
    iterations: int = MI_ITERATIONS["mi"],
    lr: float = MISettings.mi_lr,
    layer_index: int = MISettings.mi_layer_index,
    beta: float = MISettings.mi_beta,
    return_history: bool = False,
    impl: str = MISettings.mi_impl.value,
    precision: str = MISettings.mi_precision.value,
    cuda_graph: bool = MISettings.mi_cuda_graph,
    joint_norm: bool | str = False,
    norm_eps: float = 0.0,
    shared: bool = False,
    spatial_shapes: torch.Tensor | None = None,
    map_patch_size: int | None = None,
    overlap: str = "dice",
    groups: torch.Tensor | None = None,
    init: torch.Tensor | None = None,
    init_direction: torch.Tensor | None = None,
    anchors: torch.Tensor | None = None,
    anchor_weight: float = 0.0,
    return_raw: bool = False,
):
    """Mask Inversion embeddings of P masks per image.

    Args:
        model: a supported vision model (extractors/mi/vit_adapters.py: DINOv2, DINOv2-reg, DINOv3, SigLIP,
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
        impl: evaluation of the maps (:class:`extractors.mi.legrad.LeGrad`): "auto" (fused Triton kernel on
            CUDA, blockwise PyTorch elsewhere), "blockwise", "fused", or "dense" (the engine before
            the blockwise / fused paths: scores [.., heads, T, T] and full-resolution maps every
            iteration; kept as their reference and for benchmarks). Same results up to rounding.
        precision: "fp32" (default, exact), or explicitly "tf32" (CUDA) / "bf16" (impl="fused")
            for the evaluation's products (:class:`extractors.mi.legrad.LeGrad`); report their cosine to fp32.
        cuda_graph: CUDA only: capture one iteration (forward, backward, AdamW step) in a CUDA graph
            and replay it, removing the per-iteration launch cost (shapes are static within a call).
        joint_norm: min-max normalise the P maps of an image with one min and max (the original
            code's accident, ``legrad_norm=joint``): the masks of an image then interact. ``"batch"``:
            one min and max for every map of the batch (the original's smart crops of one image
            shared a batch; pass one image's views only).
        norm_eps: added to the range of the min-max normalisation (the original's CLIP path: 1e-6).
        shared: ONE embedding per image for all its P masks, fitted to the mean of the P Dice terms
            (the original's ``mi_sum`` for SigLIP / CLIP, ``mi_sum_loss=mean_dice``); returns [B, 1, D].
        spatial_shapes: NaFlex only: [B, 2] patch rows and columns of each image.
        map_patch_size: upsample the maps by this factor instead of the patch size (the original's
            SigLIP used 16 for every checkpoint; ``pixel_geometry=original``).
        overlap: "dice" (:func:`dice_loss`) or "iou" (:func:`iou_loss`): the map-to-mask loss.
        groups: MaO's Stage B (``descriptor=mao``): [B] int64 in 0 .. G-1, the image each of the B
            inputs (object crops, one mask each: P = 1) belongs to; every group gets ONE embedding v,
            shared by its crops, minimising sum_i overlap_loss(E_i(v), m_i) + alpha * (1 - cos(v, a)),
            with a = normalize(mean_i normalize(g_i)) over its crops (the Stage-A scene vector; the
            paper's ``- alpha cos(v, sum_i v_i)`` up to a constant: the same gradients and steps). The
            raw parameter starts at a scaled to the mean norm of its crops' g_i, so ``lr`` is relative
            to the backbone's scale as for per-mask MI. Returns [G, 1, D]; history [iterations, G, 1].
        init: [B, V, D] the raw parameter's start instead of g (V = P, or 1 with ``shared``), used as
            given; the original code's ``alpha_sum_full`` starts at the sum of the masks' raw MI vectors.
        init_direction: [B, V, D] starting directions instead of g's (``mi_init=mask_pool``), scaled to
            g's norm so that AdamW's steps keep their size (a zero row starts from g); the loss (and its
            pull towards g) is unchanged. At most one of ``init`` and ``init_direction``.
        anchors, anchor_weight: [B, Q, D] vectors (normalised here) every embedding of image b is pulled
            towards, adding ``anchor_weight * mean_q (1 - cos(e, a_q))`` to its loss (``alpha_sum_full``).
        return_raw: return the raw parameter after the last step (not normalised; an ``init`` for a
            later call) instead of the unit embeddings.

    Returns:
        [B, P, D_out] unit embeddings (and the history dict if ``return_history``), float32
        (float64 for float64 models). An active autocast context is ignored: the forward pass and
        the iterations run in float32 / float64 (reduced precision only through ``precision``),
        because MI amplifies rounding of the forward pass (see :func:`extractors.mi.legrad._capture`).

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
    if overlap not in OVERLAPS:
        raise ValueError(f"overlap={overlap!r}; one of {OVERLAPS}")
    if groups is not None:
        groups = torch.as_tensor(groups)
        if shared or masks.shape[1] != 1 or groups.shape != (masks.shape[0],):
            raise ValueError(
                f"groups (MaO) needs one mask per crop (P = 1, got {masks.shape[1]}), one group id per crop "
                f"({masks.shape[0]}, got shape {tuple(groups.shape)}) and shared=False"
            )
        if len(groups) and not torch.equal(torch.unique(groups), torch.arange(int(groups.max()) + 1)):
            raise ValueError("groups must number the images 0 .. G-1, each with at least one crop")
        if init is not None or init_direction is not None or anchors is not None:
            raise ValueError("init / init_direction / anchors are for images, not for MaO's groups of crops")
    vectors = 1 if shared else masks.shape[1]
    if init is not None and init_direction is not None:
        raise ValueError("give init (the raw start) or init_direction (its direction), not both")
    for name, given in (("init", init), ("init_direction", init_direction)):
        if given is not None and tuple(given.shape[:2]) != (masks.shape[0], vectors):
            raise ValueError(f"{name} must be [B, V, D] = [{masks.shape[0]}, {vectors}, D], got {tuple(given.shape)}")
    if anchors is not None and (anchors.ndim != 3 or anchors.shape[0] != masks.shape[0]):
        raise ValueError(f"anchors must be [B, Q, D] with B = {masks.shape[0]}, got {tuple(anchors.shape)}")
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
        legrad = LeGrad(
            parts,
            pixel_values,
            layer_index,
            impl=impl,
            precision=precision,
            spatial_shapes=spatial_shapes,
            map_patch_size=map_patch_size,
        )
    B, P = masks.shape[:2]
    target = masks.to(device=legrad.g.device, dtype=legrad.dtype)
    if groups is None:
        g_unit = F.normalize(legrad.g, dim=-1)[:, None]  # [B, 1, D]
        if init is not None:
            start = init.to(legrad.g)
        elif init_direction is not None:
            direction = init_direction.to(legrad.g)
            start = F.normalize(direction, dim=-1) * legrad.g.norm(dim=-1)[:, None, None]
            # A zero row (a padding mask of a batch) starts from g, as without a direction.
            start = torch.where(direction.norm(dim=-1, keepdim=True) == 0, legrad.g[:, None], start)
        else:
            start = legrad.g[:, None].expand(B, vectors, -1)
        raw = start.clone().requires_grad_(True)
    else:
        groups = groups.to(legrad.g.device)
        g_unit, scale = _group_anchors(legrad.g, groups)  # [G, 1, D], [G, 1, 1]
        raw = (g_unit * scale).clone().requires_grad_(True)
    on_cuda = raw.device.type == "cuda"
    optimizer = torch.optim.AdamW(
        [raw], lr=lr, weight_decay=0.0, fused=True if on_cuda else None, capturable=cuda_graph
    )
    if legrad.impl == "dense":
        loss_of_map = iou_loss if overlap == "iou" else dice_loss
        dice_of = (
            lambda e: loss_of_map(  # noqa: E731
                legrad.maps(e, size=target.shape[-2:], joint=joint_norm, eps=norm_eps), target
            )
        )
    else:
        map_dice = MapDice(legrad, target, joint=joint_norm, eps=norm_eps, overlap=overlap)
        dice_of = lambda e: map_dice(legrad.patch_relevance(e))  # noqa: E731

    anchor_units = None if anchors is None else F.normalize(anchors.to(legrad.g), dim=-1)  # [B, Q, D]

    def step() -> tuple[torch.Tensor, torch.Tensor]:
        """One AdamW step on the summed loss; returns (loss, dice) [B, P] ([G, 1] with groups) before
        the step ("dice": the overlap loss, Dice or IoU)."""
        e = F.normalize(raw, dim=-1)
        if groups is None:
            dice = dice_of(e)  # [B, P] (a shared e: one map, P masks)
        else:  # each crop's map of its image's vector, summed over the image's crops
            dice = torch.zeros_like(e[..., 0]).index_add(0, groups, dice_of(e[groups]))
        if shared:
            dice = dice.mean(dim=1, keepdim=True)
        loss = dice + alpha * (1 - (e * g_unit).sum(-1))
        if beta and vectors > 1:
            loss = loss + beta * _mean_abs_cos_to_others(e)
        if anchor_units is not None and anchor_weight:
            loss = loss + anchor_weight * (1 - e @ anchor_units.mT).mean(-1)
        loss.sum().backward()
        optimizer.step()
        return loss.detach(), dice.detach()

    history = (
        torch.zeros(iterations, 2, *raw.shape[:2], dtype=legrad.dtype, device=raw.device) if return_history else None
    )
    with torch.enable_grad(), no_autocast(pixel_values.device):
        if cuda_graph and iterations:
            _replay_in_cuda_graph(step, iterations, raw, optimizer, history)
        else:
            for i in range(iterations):
                optimizer.zero_grad(set_to_none=True)
                loss, dice = step()
                if history is not None:
                    history[i, 0], history[i, 1] = loss, dice
    result = raw.detach().clone() if return_raw else F.normalize(raw.detach(), dim=-1)
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


def _group_anchors(g: torch.Tensor, groups: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """MaO's scene vectors: a = normalize(mean_i normalize(g_i)) over each group's crops [G, 1, D], and
    the mean norm of their un-normalised g_i [G, 1, 1] (the scale the raw parameter starts at)."""
    count = torch.bincount(groups).to(g.dtype)[:, None]  # [G, 1]
    G = len(count)
    summed = torch.zeros(G, g.shape[-1], dtype=g.dtype, device=g.device).index_add(0, groups, F.normalize(g, dim=-1))
    norms = torch.zeros(G, dtype=g.dtype, device=g.device).index_add(0, groups, g.norm(dim=-1))[:, None]
    return F.normalize(summed / count, dim=-1)[:, None], (norms / count)[:, :, None]


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
