"""Training data: crop rule, box sources, pairs, held-out instances, and the step -> data order."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from datasets import Annotation, ImageMasks
from datasets.views import padded_box
from utils.training.data import (
    MicroBatches,
    Pair,
    PairOrder,
    Scene,
    crop_box,
    held_out_instances,
    make_pairs,
    scene_boxes,
)


def _ann(key: str, ins, is_query=False, bbox=None) -> Annotation:
    return Annotation(key=key, file=Path(key), ins=tuple(ins), is_query=is_query, bbox=bbox)


def test_crop_is_the_smart_crop_box_grown_to_the_minimum_size():
    # A 20 x 10 box in a 300 x 200 image: padded by 0.1 x 20 = 2 px as smart_crop pads a mask ...
    mask = torch.zeros(200, 300, dtype=torch.bool)
    mask[50:60, 100:120] = True
    assert crop_box([100, 50, 120, 60], 300, 200, pad=0.1, min_size=0, source="s") == padded_box(mask, 0.1)
    assert padded_box(mask, 0.1) == (98, 48, 122, 62)
    # ... then grown around its centre to 64 px a side.
    assert crop_box([100, 50, 120, 60], 300, 200, pad=0.1, min_size=64, source="s") == (78, 23, 142, 87)
    # Near a corner the grown crop shifts inside the image; an image side shorter than min_size is taken whole.
    assert crop_box([0, 0, 10, 10], 300, 50, pad=0.1, min_size=64, source="s") == (0, 0, 64, 50)
    # A large box is only padded (and clipped to the image).
    assert crop_box([10, 20, 290, 180], 300, 200, pad=0.1, min_size=64, source="s") == (0, 0, 300, 200)


def test_scene_boxes_keep_the_best_scored_and_leave_out_scenes_without_boxes():
    gallery = [_ann("a.jpg", [1]), _ann("b.jpg", [2], bbox=(1, 2, 30, 40)), _ann("c.jpg", [])]
    rle = {"counts": "0", "size": [1, 1]}  # not decoded: only boxes and scores are used
    captions = {
        "a.jpg": ImageMasks([rle] * 3, [[0, 0, 5, 5], [1, 1, 6, 6], [2, 2, 7, 7]], [0.3, 0.9, 0.5]),
        "b.jpg": ImageMasks([], [], []),
        "c.jpg": ImageMasks([rle], [[3, 3, 8, 8]], [0.4]),
    }
    scenes, without = scene_boxes(gallery, captions, max_crops=2)
    assert [s.annotation.key for s in scenes] == ["a.jpg", "c.jpg"] and without == 1
    assert scenes[0].boxes == ((1.0, 1.0, 6.0, 6.0), (2.0, 2.0, 7.0, 7.0))
    scenes, without = scene_boxes(gallery, None, max_crops=2)  # box_source=anns
    assert [(s.annotation.key, s.boxes) for s in scenes] == [("b.jpg", ((1.0, 2.0, 30.0, 40.0),))] and without == 2


def test_pairs_and_held_out_instances():
    queries = [_ann(f"q{i}.jpg", [i], is_query=True) for i in range(10)] + [_ann("q3b.jpg", [3], is_query=True)]
    scenes = [Scene(_ann("s0.jpg", [3, 4]), ((0, 0, 1, 1),)), Scene(_ann("s1.jpg", [42]), ((0, 0, 1, 1),))]
    assert make_pairs(scenes, queries) == [Pair(0, 3, (3, 10)), Pair(0, 4, (4,))]  # 42 has no query
    held = held_out_instances(queries, 0.2, seed=0)
    assert len(held) == 2 and held == held_out_instances(queries, 0.2, seed=0) and held <= set(range(10))
    with pytest.raises(ValueError, match="holds out all 10 instances"):
        held_out_instances(queries, 1.0, seed=0)


def test_order_depends_only_on_seed_and_step_and_splits_over_processes():
    pairs = [Pair(i, i, (2 * i, 2 * i + 1)) for i in range(10)]
    order = PairOrder(pairs, batch_size=4, seed=7)
    assert order.steps_per_epoch == 2  # 10 pairs: 2 whole batches
    epoch0 = order.step_items(0) + order.step_items(1)
    assert len({p for p, _ in epoch0}) == 8  # no pair twice in an epoch
    assert all(q in pairs[p].queries for p, q in epoch0)
    assert order.step_items(2) != order.step_items(0)  # epoch 1: another permutation
    assert PairOrder(pairs, 4, 7).step_items(3) == order.step_items(3)
    # Two processes with micro-batches of 1 read exactly the step's items, rank 0 first.
    ranks = [list(MicroBatches(order, 1, 3, rank, 2, 1)) for rank in (0, 1)]
    assert len(ranks[0]) == len(MicroBatches(order, 1, 3, 0, 2, 1)) == 4
    for step, start in ((1, 0), (2, 2)):
        assert ranks[0][start] + ranks[0][start + 1] + ranks[1][start] + ranks[1][start + 1] == order.step_items(step)
    np.testing.assert_equal([len(b) for b in MicroBatches(order, 0, 2, 0, 1, 2)], [2, 2, 2, 2])
