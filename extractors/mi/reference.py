"""A plain, slow, obviously-correct Mask Inversion: the yardstick for extractors/mi/engine.py.

It does what the paper says with autograd and nothing clever: one forward pass with the attention
probabilities A_l kept in the graph, and every iteration, for ONE MASK AT A TIME,
G = autograd.grad(e_p . f_l, A_l, create_graph=True). Written independently of the engine (no
SoIR import): its own family table, its own post-processing, its own loss.

The model is frozen (requires_grad False during the call, restored afterwards); the input image is
marked requires_grad instead, which is what puts the attention maps into the autograd graph.

Maps cover the patch tokens: CLS / register columns are dropped. SigLIP2 NaFlex inputs (patch
sequences + spatial_shapes [B, 2]): image b's first h*w tokens are its patches, the rest padding;
padding is left out of the feature's mean, of the query rows and of the columns, and image b's map
sits in the top-left h*p x w*p pixels of the output canvas, 0 elsewhere.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _mean(x, valid):
    """Mean over tokens [B, T, D] -> [B, D]; only the tokens with valid [B, T] True if given."""
    if valid is None:
        return x.mean(1)
    return torch.stack([x[b, valid[b]].mean(0) for b in range(len(x))])


def _family(model):
    """(model, blocks, block -> attention module, head(X, valid) -> un-normalised f, output -> g,
    #prefix tokens)."""
    model = model.get_base_model() if hasattr(model, "get_base_model") else model
    kind = model.config.model_type
    if kind == "dinov2":  # attention returning (output, probs): 5.24 / 5.17 layout
        return (
            model,
            list(model.encoder.layer),
            lambda b: b.attention if hasattr(b.attention, "v_proj") else b.attention.attention,
            lambda X, valid: model.layernorm(X.mean(1)),
            lambda out: out.pooler_output,
            1,
        )
    if kind == "dinov2_with_registers":
        return (
            model,
            list(model.encoder.layer),
            lambda b: b.attention,
            lambda X, valid: model.layernorm(X.mean(1)),
            lambda out: out.pooler_output,
            1 + model.config.num_register_tokens,
        )
    if kind == "dinov3_vit":
        return (
            model,
            list(model.model.layer),
            lambda b: b.attention,
            lambda X, valid: model.norm(X.mean(1)),
            lambda out: out.pooler_output,
            1 + model.config.num_register_tokens,
        )
    if kind in ("siglip_vision_model", "siglip2_vision_model"):
        return (
            model,
            list(model.encoder.layers),
            lambda b: b.self_attn,
            lambda X, valid: _mean(model.post_layernorm(X), valid),
            lambda out: out.pooler_output,
            0,
        )
    if kind == "clip_vision_model":
        vm = model.vision_model
        return (
            model,
            list(vm.encoder.layers),
            lambda b: b.self_attn,
            lambda X, valid: model.visual_projection(vm.post_layernorm(X.mean(1))),
            lambda out: out.image_embeds,
            1,
        )
    raise ValueError(kind)


class ReferenceLeGrad:
    """Forward once, keep A_l and X_l of the hooked blocks in the graph."""

    def __init__(self, model, pixel_values, layer_index=-1, spatial_shapes=None):
        self.base, blocks, attention_of, self.head, g_of, self.prefix = _family(model)
        self.patch = self.base.config.patch_size
        B = len(pixel_values)
        if spatial_shapes is None:
            self.grids = [(pixel_values.shape[-2] // self.patch, pixel_values.shape[-1] // self.patch)] * B
            self.valid, extra = None, {}
        else:
            self.grids = [tuple(hw) for hw in spatial_shapes.tolist()]
            self.valid = torch.zeros(B, pixel_values.shape[1], dtype=torch.bool)
            for b, (h, w) in enumerate(self.grids):
                self.valid[b, : h * w] = True
            extra = dict(pixel_attention_mask=self.valid.long(), spatial_shapes=spatial_shapes)
        hooked = blocks[len(blocks) + layer_index :]
        self.A, self.X = [], []
        handles = [attention_of(b).register_forward_hook(lambda m, a, o: self.A.append(o[1])) for b in hooked]
        handles += [b.register_forward_hook(lambda m, a, o: self.X.append(o)) for b in hooked]
        self.pixel_values = pixel_values.clone().requires_grad_(True)
        with torch.enable_grad():
            out = self.base(pixel_values=self.pixel_values, **extra)
        for h in handles:
            h.remove()
        self.g = g_of(out).detach()
        if spatial_shapes is None:
            self.size = tuple(pixel_values.shape[-2:])
        else:
            self.size = (max(h for h, _ in self.grids) * self.patch, max(w for _, w in self.grids) * self.patch)

    def raw_map(self, e):
        """Un-normalised LeGrad maps of unit embeddings e [B, D] (one per image): B tensors [1, 1, h p, w p]."""
        B = e.shape[0]
        totals = [0] * B
        for A, X in zip(self.A, self.X):
            f = F.normalize(self.head(X, self.valid), dim=-1)
            s = (e * f).sum()  # images are independent
            G = torch.autograd.grad(s, A, create_graph=True)[0]  # [B, heads, T, T]
            for b, (h, w) in enumerate(self.grids):
                rows = slice(None) if self.valid is None else self.valid[b]
                relevance = G[b].clamp(min=0)[:, rows].mean(dim=(0, 1))  # [T]: mean over heads, query rows
                grid = relevance[self.prefix :][: h * w].reshape(1, 1, h, w)
                totals[b] = totals[b] + F.interpolate(
                    grid, scale_factor=self.patch, mode="bilinear", align_corners=False
                )
        return totals

    def map_one(self, e, size=None):
        """Explainability map [B, H, W] of unit embeddings e [B, D] (one per image); differentiable in e."""
        return self.maps(e[:, None], size)[:, 0]

    def maps(self, e, size=None, joint=False, eps=0.0):
        """[B, P, H, W] for e [B, P, D], one mask at a time; min-max per map, or with ``joint`` over the
        P maps of an image together (the original code's batch-wide normalisation), or with
        ``joint="batch"`` over every map of the batch (fixed size only); ``eps`` is added to the range.
        Fixed size: resized to ``size``; NaFlex: each image's map at its own pixels, top-left on the
        ``size`` canvas."""
        B, P = e.shape[:2]
        size = size or self.size
        raw = [self.raw_map(e[:, p]) for p in range(P)]  # P lists of B [1, 1, h, w]
        out = torch.zeros(B, P, *size, dtype=e.dtype)
        dims = (1, 2, 3) if joint else (2, 3)
        everything = torch.stack([torch.stack(maps) for maps in raw]) if joint == "batch" else None
        for b in range(B):
            total = torch.cat([raw[p][b] for p in range(P)], dim=1)  # [1, P, h, w]
            lo, hi = total.amin(dim=dims, keepdim=True), total.amax(dim=dims, keepdim=True)
            if everything is not None:
                lo, hi = everything.min(), everything.max()
            E = (total - lo) / (hi - lo + eps).clamp_min(1e-12)
            if self.valid is None:  # fixed size: resized to the output
                out[b] = F.interpolate(E, size=size, mode="bilinear", align_corners=False)[0]
            else:  # NaFlex: its own pixels, top-left
                out[b, :, : E.shape[-2], : E.shape[-1]] = E[0]
        return out


class frozen:
    """Context: every parameter of ``model`` has requires_grad False; the flags are restored after."""

    def __init__(self, model):
        self.params = list(model.parameters())

    def __enter__(self):
        self.flags = [p.requires_grad for p in self.params]
        for p in self.params:
            p.requires_grad_(False)

    def __exit__(self, *exc):
        for p, flag in zip(self.params, self.flags):
            p.requires_grad_(flag)


def reference_legrad_map(model, pixel_values, embeddings, layer_index=-1, joint=False, spatial_shapes=None):
    with frozen(model):
        ref = ReferenceLeGrad(model, pixel_values, layer_index, spatial_shapes)
        return ref.maps(F.normalize(embeddings, dim=-1), joint=joint).detach()


def reference_mask_inversion(
    model,
    pixel_values,
    masks,
    alpha=0.03,
    iterations=100,
    lr=0.1,
    layer_index=-1,
    beta=0.0,
    joint=False,
    shared=False,
    spatial_shapes=None,
    eps=0.0,
    init=None,
    anchors=None,
    anchor_weight=0.0,
    return_raw=False,
):
    """Unit embeddings [B, P, D] ([B, 1, D] with ``shared``: one vector fitted to the mean of the P
    Dice terms); the loss is summed over images and masks. ``joint``: the P maps of an image are
    min-max normalised together ("batch": all maps of the batch), ``eps`` added to the range.
    ``init`` [B, V, D]: the raw start instead of g; ``anchors`` [B, Q, D]: each vector of image b also
    pays ``anchor_weight`` x the mean over q of 1 - cos(e, a_q); ``return_raw``: the raw parameter,
    not normalised."""
    masks = masks.to(pixel_values.dtype)
    with frozen(model):
        ref = ReferenceLeGrad(model, pixel_values, layer_index, spatial_shapes)
        B, P = masks.shape[:2]
        V = 1 if shared else P
        raw = (ref.g[:, None].repeat(1, V, 1) if init is None else init.clone()).requires_grad_(True)
        g_unit = F.normalize(ref.g, dim=-1)
        optimizer = torch.optim.AdamW([raw], lr=lr, weight_decay=0)
        size = tuple(masks.shape[-2:])
        for _ in range(iterations):
            loss = 0
            e = F.normalize(raw, dim=-1)
            E = ref.maps(e, size=size, joint=joint, eps=eps)  # [B, V, H, W]
            dices = []
            for p in range(P):
                Ep, m = E[:, 0 if shared else p], masks[:, p]
                dices.append(1 - (2 * (Ep * m).sum((1, 2)) + 1e-6) / (Ep.sum((1, 2)) + m.sum((1, 2)) + 1e-6))
            for v in range(V) if anchors is not None else ():
                for b in range(B):
                    pulls = [1 - F.cosine_similarity(e[b, v], a, dim=0) for a in anchors[b]]
                    loss = loss + anchor_weight * sum(pulls) / len(pulls)
            if shared:
                loss = loss + torch.stack(dices).mean(0).sum() + alpha * (1 - (e[:, 0] * g_unit).sum(-1)).sum()
            else:
                for p in range(P):
                    loss = loss + dices[p].sum() + alpha * (1 - (e[:, p] * g_unit).sum(-1)).sum()
                    if beta and P > 1:
                        others = [q for q in range(P) if q != p]
                        cos = torch.stack([(e[:, p] * e[:, q]).sum(-1).abs() for q in others]).mean(0)
                        loss = loss + beta * cos.sum()
            optimizer.zero_grad()
            raw.grad = torch.autograd.grad(loss, raw)[0]
            optimizer.step()
        return raw.detach() if return_raw else F.normalize(raw.detach(), dim=-1)


def reference_mao(
    model,
    pixel_values,
    masks,
    groups,
    alpha=0.03,
    iterations=80,
    lr=0.1,
    layer_index=-1,
    overlap="iou",
    spatial_shapes=None,
):
    """MaO's Stage B, plainly: one unit embedding per image [G, 1, D] for its object crops.

    pixel_values: the B crops; masks [B, 1, H, W]: each crop's object mask; groups: B ints, the image
    of each crop (0 .. G-1). For image c with crops i and their embeddings v_i (the model's own,
    un-normalised g_i, normalised), the paper's objective, minimised over v with AdamW:

        sum_i (1 - softIoU(E_i(v), m_i)) - alpha * cos(v, sum_i v_i)      (softDice with overlap="dice")

    started at v^c = mean_i v_i renormalised (the Stage-A scene vector), scaled to the mean |g_i|.
    """
    masks = masks.to(pixel_values.dtype)
    groups = [int(c) for c in groups]
    G = max(groups) + 1
    with frozen(model):
        ref = ReferenceLeGrad(model, pixel_values, layer_index, spatial_shapes)
        members = [[i for i, c in enumerate(groups) if c == image] for image in range(G)]
        v = [F.normalize(ref.g[i], dim=-1) for i in range(len(groups))]
        scene = torch.stack([sum(v[i] for i in crops) for crops in members])  # sum_i v_i [G, D]
        start = torch.stack([F.normalize(s / len(crops), dim=-1) for s, crops in zip(scene, members)])
        scale = torch.stack([sum(ref.g[i].norm() for i in crops) / len(crops) for crops in members])
        raw = (start * scale[:, None]).clone().requires_grad_(True)
        optimizer = torch.optim.AdamW([raw], lr=lr, weight_decay=0)
        size = tuple(masks.shape[-2:])
        for _ in range(iterations):
            e = F.normalize(raw, dim=-1)
            E = ref.maps(torch.stack([e[c] for c in groups])[:, None], size=size)[:, 0]  # [B, H, W]
            loss = 0
            for i, c in enumerate(groups):
                inter = (E[i] * masks[i, 0]).sum()
                if overlap == "iou":
                    score = (inter + 1e-6) / (E[i].sum() + masks[i, 0].sum() - inter + 1e-6)
                else:
                    score = (2 * inter + 1e-6) / (E[i].sum() + masks[i, 0].sum() + 1e-6)
                loss = loss + 1 - score
            for c in range(G):
                loss = loss - alpha * F.cosine_similarity(e[c], scene[c], dim=0)
            optimizer.zero_grad()
            raw.grad = torch.autograd.grad(loss, raw)[0]
            optimizer.step()
        return F.normalize(raw.detach(), dim=-1)[:, None]
