"""The training objective, the embedding-cache step, the lr schedule and the config checks."""

from __future__ import annotations

import math

import pytest
import torch
from omegaconf import OmegaConf

from utils.training import (
    Context,
    TrainConfig,
    build_model,
    check_train_config,
    encode_pairs,
    info_nce,
    learning_rate,
    micro_seed,
    train_step,
)


def test_info_nce_matches_a_direct_computation():
    torch.manual_seed(0)
    q = torch.nn.functional.normalize(torch.randn(4, 6, dtype=torch.float64), dim=-1)
    s = torch.nn.functional.normalize(torch.randn(4, 6, dtype=torch.float64), dim=-1)
    positives = torch.eye(4, dtype=torch.bool)
    positives[0, 2] = True  # scene 2 also shows query 0's instance: not a negative of query 0
    t = 0.1
    loss = 0.0
    for i in range(4):  # query -> scenes
        others = [j for j in range(4) if j == i or not positives[i, j]]
        loss -= (q[i] @ s[i] / t - torch.logsumexp(torch.stack([q[i] @ s[j] / t for j in others]), 0)) / 8
    for j in range(4):  # scene -> queries
        others = [i for i in range(4) if i == j or not positives[i, j]]
        loss -= (q[j] @ s[j] / t - torch.logsumexp(torch.stack([q[i] @ s[j] / t for i in others]), 0)) / 8
    torch.testing.assert_close(info_nce(q, s, positives, t), loss)


def test_learning_rate_decays_exponentially_to_the_floor():
    cfg = OmegaConf.structured(TrainConfig(anns_file="a.pt"))
    assert learning_rate(0, cfg) == 5e-5
    assert math.isclose(learning_rate(10, cfg), 5e-5 * 0.93**10)
    # 5e-5 * 0.93^n reaches 1e-6 after 54 steps and stays there
    assert learning_rate(53, cfg) > 1e-6 and learning_rate(54, cfg) == learning_rate(5000, cfg) == 1e-6
    assert learning_rate(25, OmegaConf.merge(cfg, {"lr_decay_every": 10})) == 5e-5 * 0.93**2


def _micro_batches(pairs: int, crops: int, size: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(1, 3, size, size, generator=generator),
            torch.randn(crops + i % 2, 3, size, size, generator=generator),
            torch.tensor([crops + i % 2]),
        )
        for i in range(pairs)
    ]


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_embedding_cache_gives_the_gradient_of_the_whole_batch(tiny_model_dirs):
    """Micro-batches through the cache = the loss of all pairs at once, with each micro-batch's own
    dropout replayed (here recomputed by hand: the same seeds, one graph over the whole batch)."""
    cfg = OmegaConf.structured(
        TrainConfig(
            anns_file="a.pt", model_name=str(tiny_model_dirs["dinov2"]), lora_rank=4, lora_dropout=0.5, temperature=0.1
        )
    )
    model, _ = build_model(cfg)
    torch.manual_seed(1)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0, 0.3)
    model.train()
    batches = _micro_batches(pairs=3, crops=2, size=56)
    positives = torch.eye(3, dtype=torch.bool)
    ctx = Context(torch.device("cpu"), "fp32")
    loss = train_step(model, batches, positives, cfg, step=5, ctx=ctx)
    cached = _grads(model)
    model.zero_grad()
    embeddings = []
    for m, batch in enumerate(batches):
        torch.manual_seed(micro_seed(cfg.seed, 5, 0, m))
        embeddings.append(encode_pairs(model, *batch))
    q, s = (torch.cat(t) for t in zip(*embeddings))
    reference = info_nce(q, s, positives, cfg.temperature)
    reference.backward()
    assert loss == pytest.approx(reference.item(), rel=1e-6)
    for name, grad in _grads(model).items():
        torch.testing.assert_close(cached[name], grad, atol=1e-6, rtol=1e-4, msg=name)
    assert any(g.abs().max() > 1e-4 for g in cached.values())
    # Without dropout the split does not matter: one micro-batch (plain path) gives the same gradient.
    model = build_model(OmegaConf.merge(cfg, {"lora_dropout": 0.0}))[0].train()
    for name, param in model.named_parameters():
        if "lora_" in name:
            param.data.normal_(0, 0.3, generator=torch.Generator().manual_seed(hash(name) % 1000))
    train_step(model, batches, positives, cfg, 0, ctx)
    split = _grads(model)
    model.zero_grad()
    whole = [
        tuple(torch.cat(t) for t in zip(*[(q, c) for q, c, _ in batches])) + (torch.cat([n for *_, n in batches]),)
    ]
    train_step(model, whole, positives, cfg, 0, ctx)
    for name, grad in _grads(model).items():
        torch.testing.assert_close(split[name], grad, atol=1e-6, rtol=1e-4, msg=name)


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"family": "siglip"}, "family='siglip' is not one of dinov2, clip"),
        ({"captions_file": None}, "box_source=captions needs captions_file="),
        ({"temperature": 0.0}, "temperature=0.0 must be > 0"),
        ({"micro_batch": 0}, "micro_batch=0 must be positive"),
        ({"min_lr": 1.0}, "min_lr <= lr"),
        ({"val_fraction": 1.0}, "val_fraction=1.0 must be in"),
    ],
)
def test_inconsistent_settings_are_refused(overrides, message):
    cfg = OmegaConf.merge(OmegaConf.structured(TrainConfig(anns_file="a.pt", captions_file="c.pt")), overrides)
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        check_train_config(cfg)
