"""The training objective, the embedding-cache step, the lr schedule and the config checks."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from omegaconf import OmegaConf

from datasets import Annotation
from datasets.preprocessing import Preprocess
from tests.datasets.voxdet_replica import write_voxdet_soir
from utils.errors import SoIRError
from utils.training.data import scene_boxes
from utils.training.trainer import (
    Context,
    TrainConfig,
    build_model,
    check_train_config,
    decays,
    encode_pairs,
    info_nce,
    learning_rate,
    load_splits,
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


def test_learning_rate_decays_exponentially_to_the_floor_per_step_when_asked():
    """lr_decay_every=1: the per-step reading of "exponential decay 0.93" (the floor after 54 steps)."""
    cfg = OmegaConf.merge(OmegaConf.structured(TrainConfig(anns_file="a.pt")), {"lr_decay_every": 1})
    assert learning_rate(0, cfg, 1406) == 5e-5
    assert math.isclose(learning_rate(10, cfg, 1406), 5e-5 * 0.93**10)
    # 5e-5 * 0.93^n reaches 1e-6 after 54 steps and stays there
    assert (
        learning_rate(53, cfg, 1406) > 1e-6 and learning_rate(54, cfg, 1406) == learning_rate(5000, cfg, 1406) == 1e-6
    )
    assert learning_rate(25, OmegaConf.merge(cfg, {"lr_decay_every": 10}), 1406) == 5e-5 * 0.93**2


@pytest.mark.parametrize("total", [20, 55, 100, 1406, 5000])
def test_default_learning_rate_reaches_the_floor_at_the_end_of_training(total):
    """The default spreads the 54 decays 5e-5 -> 1e-6 evenly over the run (the paper's epoch on VoxDet
    is ~1,406 steps: a decay every ~26), so the last step trains at min_lr and the ones before above it;
    before, the floor came after 54 steps whatever the run's length.
    Fails on main 4e786ae (learning_rate took no total and decayed every step)."""
    cfg = OmegaConf.structured(TrainConfig(anns_file="a.pt"))
    rates = [learning_rate(step, cfg, total) for step in range(total)]
    assert rates[0] == 5e-5 and rates[-1] == 1e-6 and min(rates[:-1]) > 1e-6
    assert all(a >= b for a, b in zip(rates, rates[1:]))
    counts = [decays(step, cfg, total) for step in range(total)]
    assert counts[-1] == 54 and max(b - a for a, b in zip(counts, counts[1:])) == math.ceil(54 / (total - 1))
    if total == 1406:  # one decay every 1405 / 54 = 26.02 steps: the first after step 26
        assert counts[27] == 1 and counts[26] == 0 and math.isclose(rates[27], 5e-5 * 0.93)


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


# ------------------------------------------------------------------ the paper's data: VoxDet-SoIR
def _voxdet_cfg(anns: Path, **overrides) -> Any:
    """box_source=anns on the VoxDet-SoIR replica (OWID and RoboTools share instance ids 1 and 2); the
    file is its own held-out split (val_anns_file), so every pair is visible."""
    return OmegaConf.merge(
        OmegaConf.structured(
            TrainConfig(anns_file=str(anns), box_source="anns", val_anns_file=str(anns), batch_size=1, image_size=32)
        ),
        overrides,
    )


PREPROCESS = Preprocess((32, 32), (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


def test_sets_sharing_instance_ids_are_refused_without_set(tmp_path):
    """VoxDet-SoIR numbers OWID and RoboTools instances independently: trained together, OWID queries
    would be paired with RoboTools scenes of other objects. Fails on main 4e786ae (no `set` key: 7 pairs
    across both sets)."""
    anns, _ = write_voxdet_soir(tmp_path)
    with pytest.raises(SoIRError, match="sets 'OWID' and 'RoboTools' share instance ids .* set=OWID or set=RoboTools"):
        load_splits(_voxdet_cfg(anns), PREPROCESS)


@pytest.mark.parametrize("name", ["OWID", "RoboTools"])
def test_set_pairs_only_that_sets_queries_and_scenes(tmp_path, name):
    """set=OWID: every training pair is an OWID scene with an OWID instance, its queries OWID queries;
    the held-out split likewise."""
    anns, facts = write_voxdet_soir(tmp_path)
    data = load_splits(_voxdet_cfg(anns, set=name), PREPROCESS)
    scenes, queries = data.train.scenes, data.train.queries.jobs
    assert {s.annotation.set for s in scenes} == {s.annotation.set for s in data.val.scenes} == {name}
    assert {job.annotation.set for job in queries} == {name}
    expected = sorted((s.annotation.key, i) for s in scenes for i in set(s.annotation.ins))
    assert sorted((scenes[p.scene].annotation.key, p.instance) for p in data.train.pairs) == expected
    assert all(queries[q].annotation.ins[0] == p.instance for p in data.train.pairs for q in p.queries)
    assert len(scenes) == sum(1 for key in facts["gallery_boxes"] if f"/{name}/" in key)


def test_box_source_anns_reads_every_object_box_of_voxdet_scenes(tmp_path):
    """A VoxDet-SoIR gallery entry keeps its boxes in the parsed entry's ``boxes`` (its bbox is a list):
    every scene is kept, with all its boxes. Fails on main 4e786ae ("scenes 0": only ``bbox`` was read)."""
    anns, facts = write_voxdet_soir(tmp_path)
    for name in ("OWID", "RoboTools"):
        data = load_splits(_voxdet_cfg(anns, set=name), PREPROCESS)
        boxes = {s.annotation.key: s.boxes for s in data.train.scenes}
        assert boxes == {
            key: tuple(tuple(float(v) for v in box) for box in value)
            for key, value in facts["gallery_boxes"].items()
            if f"/{name}/" in key
        }
    scenes, without = scene_boxes(
        [Annotation("a.jpg", Path("a.jpg"), (1, 2, 3), False, boxes=((0, 0, 4, 4), (1, 1, 5, 5), (2, 2, 6, 6)))],
        None,
        max_crops=2,
    )
    assert scenes[0].boxes == ((0.0, 0.0, 4.0, 4.0), (1.0, 1.0, 5.0, 5.0)) and without == 0


def test_a_run_refused_for_its_inputs_leaves_its_output_dir_to_the_corrected_rerun(tiny_model_dirs, tmp_path, capsys):
    """scripts/train_mao.py checks every input before it claims output_dir: VoxDet-SoIR without set= is
    refused in one line and writes nothing there, and the corrected rerun (set=OWID) into the same
    output_dir trains. In-process (hydra.main runs a given config). Fails on 23ee6a3 (the refused run
    had written identity.json with set: null, so the rerun was refused as "another training run")."""
    from scripts import train_mao
    from tests.datasets.voxdet_replica import write_voxdet_soir
    from tests.pipeline import compose_config

    anns, _ = write_voxdet_soir(tmp_path / "voxdet")
    out = tmp_path / "run"
    common = [
        f"anns_file={anns}",
        f"val_anns_file={anns}",
        "box_source=anns",
        f"model_name={tiny_model_dirs['dinov2']}",
        "image_size=56",
        "lora_rank=4",
        "batch_size=1",
        "micro_batch=1",
        "max_steps=1",
        "precision=fp32",
        "num_workers=0",
        "device=cpu",
        f"output_dir={out}",
    ]
    refused = compose_config(*common, config_name="train")
    corrected = compose_config(*common, "set=OWID", config_name="train")
    with pytest.raises(SystemExit) as exit_:
        train_mao.main(refused)
    assert exit_.value.code == 1
    assert "sets 'OWID' and 'RoboTools' share instance ids" in capsys.readouterr().err
    assert not out.exists()  # nothing claimed, no identity.json
    train_mao.main(corrected)
    assert json.loads((out / "identity.json").read_text())["set"] == "OWID"
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == 1 and records[0]["val_scenes"] == 2  # the two OWID scenes
