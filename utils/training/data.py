"""Training data for MaO adapters: (query, scene) pairs, k object crops per scene, and their order.

A *pair* is a gallery scene and one instance it shows that has at least one query image. The scene is
cut into k object crops (detector boxes from ``captions.pt``, or the annotation's ``bbox``); each crop
is the box padded as ``smart_crop`` pads a mask (:func:`datasets.views.padded_box`) and grown to at
least ``min_crop_size`` pixels a side (the backbone input size), then resized to the model input. The
query image is prepared exactly as ``create_index.py`` prepares queries (crop to its bbox).

Order: epoch ``e`` visits the pairs in the permutation drawn from ``(seed, e)``; optimizer step ``s``
takes the next ``batch_size`` pairs of it, and each of ``world`` processes takes its contiguous
share, cut into micro-batches. Which query image stands for the instance is drawn from
``(seed, e, pair)``. So the data of a step depends only on (seed, step), never on the worker count,
and a resumed run reads exactly what an uninterrupted one reads.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from datasets import Annotation, ImageMasks, find_masks, load_rgb
from datasets.anns import pixel_box
from datasets.extraction import ImageJob, ViewDataset
from datasets.preprocessing import Preprocess
from datasets.views import ViewMaker, mao_box

log = logging.getLogger("soir.training")


@dataclass(frozen=True)
class Scene:
    """A gallery image with the boxes [x1, y1, x2, y2] (pixels) of its k object crops."""

    annotation: Annotation
    boxes: tuple[tuple[float, float, float, float], ...]


@dataclass(frozen=True)
class Pair:
    """Scene ``scene`` (index into the scene list) shows ``instance``, whose queries are ``queries``."""

    scene: int
    instance: int
    queries: tuple[int, ...]  # indices into the query list


def scene_boxes(
    gallery: Sequence[Annotation], captions: dict[str, ImageMasks] | None, max_crops: int
) -> tuple[list[Scene], int]:
    """The k <= ``max_crops`` best-scored boxes of every gallery image: from ``captions`` (detector
    boxes), or with ``captions=None`` (``box_source=anns``) the annotation's own object boxes: the
    parsed entry's ``boxes`` (VoxDet-SoIR: one per annotated object), else its ``bbox``; they have no
    scores, so the first ``max_crops`` in the file's order (the rest are counted and logged). Images
    without a box are left out; returns (scenes, number left out)."""
    scenes, without, cut = [], 0, 0
    for ann in gallery:
        if captions is None:
            boxes = list(ann.boxes) if ann.boxes else [ann.bbox] if ann.bbox is not None else []
            cut += max(0, len(boxes) - max_crops)
            boxes = boxes[:max_crops]
        else:
            masks = find_masks(captions, ann.key, ann.file)
            order = np.argsort(-np.asarray(masks.scores), kind="stable") if masks else []
            boxes = [masks.bboxes[i] for i in order[:max_crops]]
        if boxes:
            scenes.append(Scene(ann, tuple(tuple(float(v) for v in box) for box in boxes)))
        else:
            without += 1
    if cut:
        log.warning("box_source=anns: %d object boxes beyond max_crops=%d per scene are not used", cut, max_crops)
    return scenes, without


def make_pairs(scenes: Sequence[Scene], queries: Sequence[Annotation]) -> list[Pair]:
    """Every (scene, instance) with the instance in the scene and at least one query of it."""
    queries_of: dict[int, list[int]] = {}
    for q, ann in enumerate(queries):
        queries_of.setdefault(ann.ins[0], []).append(q)
    return [
        Pair(s, instance, tuple(queries_of[instance]))
        for s, scene in enumerate(scenes)
        for instance in sorted(set(scene.annotation.ins))
        if instance in queries_of
    ]


def held_out_instances(queries: Sequence[Annotation], fraction: float, seed: int) -> set[int]:
    """``fraction`` of the query instances (at least one), drawn with ``seed``; stable across runs."""
    instances = sorted({ann.ins[0] for ann in queries})
    count = max(1, int(round(fraction * len(instances))))
    if count >= len(instances):
        raise ValueError(f"val_fraction={fraction} holds out all {len(instances)} instances; nothing to train on")
    chosen = np.random.default_rng(seed).permutation(len(instances))[:count]
    return {instances[i] for i in chosen}


def crop_box(
    box: Sequence[float], width: int, height: int, pad: float, min_size: int, source: str
) -> tuple[int, int, int, int]:
    """Crop (x1, y1, x2, y2) in integer pixels, x2/y2 exclusive, for one object box of an image.

    The box in pixels (:func:`datasets.anns.pixel_box`) is padded as ``smart_crop`` pads a mask
    (:func:`datasets.views.padded_box`), then each side shorter than ``min_size`` grows around its
    centre to ``min(min_size, image side)``, shifted to stay inside the image: the crop of
    :func:`datasets.views.mao_box`, which ``descriptor=mao`` cuts around each mask.
    """
    left, top, right, bottom = pixel_box(box, width, height, source)
    rectangle = torch.zeros(height, width, dtype=torch.bool)
    rectangle[top:bottom, left:right] = True
    return mao_box(rectangle, pad, min_size)


class PairDataset(Dataset):
    """``dataset[(pair, query)]`` -> (query pixels [3, S, S], crops [k, 3, S, S]).

    Args:
        scenes, pairs, queries: as built by :func:`scene_boxes`, :func:`make_pairs` and ``load_anns``.
        preprocess: the backbone's input preparation (size S, normalisation).
        pad, min_size: crop rule, see :func:`crop_box`.
    """

    def __init__(
        self,
        scenes: Sequence[Scene],
        pairs: Sequence[Pair],
        queries: Sequence[Annotation],
        preprocess: Preprocess,
        pad: float,
        min_size: int,
    ):
        self.scenes, self.pairs, self.preprocess = list(scenes), list(pairs), preprocess
        self.pad, self.min_size = pad, min_size
        maker = ViewMaker(preprocess, "global")
        # Queries go through the extraction Dataset, so they are cut exactly as create_index.py cuts them.
        self.queries = ViewDataset(
            [ImageJob(q, crop="square" if q.bbox is not None else None) for q in queries], maker, maker
        )

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, item: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        pair, query = item
        return self.query_pixels(query), self.scene_crops(self.pairs[pair].scene)

    def query_pixels(self, query: int) -> torch.Tensor:
        return self.queries[query][1].views[0].pixel_values

    def scene_crops(self, scene: int) -> torch.Tensor:
        """The scene's k crops at the model input size, [k, 3, S, S]."""
        scene = self.scenes[scene]
        image = load_rgb(scene.annotation.file)
        crops = [
            image.crop(crop_box(box, image.width, image.height, self.pad, self.min_size, str(scene.annotation.file)))
            for box in scene.boxes
        ]
        return torch.stack([self.preprocess.image(crop) for crop in crops])


def collate_pairs(items: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> queries [B, 3, S, S], crops of all scenes [sum k, 3, S, S], crops per scene [B] (int64)."""
    queries, crops = zip(*items)
    return torch.stack(queries), torch.cat(crops), torch.tensor([len(c) for c in crops])


@dataclass(frozen=True)
class PairOrder:
    """Which pairs each optimizer step uses (see the module docstring).

    Attributes:
        pairs: the training pairs; num_pairs = len(pairs).
        batch_size: pairs per optimizer step, all processes together.
        seed: the run's seed.
    """

    pairs: Sequence[Pair]
    batch_size: int
    seed: int

    @property
    def steps_per_epoch(self) -> int:
        """Whole batches per epoch; the last, incomplete batch of an epoch is dropped."""
        return len(self.pairs) // self.batch_size

    def step_items(self, step: int) -> list[tuple[int, int]]:
        """The (pair, query) items of optimizer step ``step`` (0-based), all processes together."""
        epoch, within = divmod(step, self.steps_per_epoch)
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.pairs))
        chosen = order[within * self.batch_size : (within + 1) * self.batch_size]
        return [(int(p), self._query(epoch, int(p))) for p in chosen]

    def _query(self, epoch: int, pair: int) -> int:
        queries = self.pairs[pair].queries
        return queries[int(np.random.default_rng([self.seed, epoch, pair]).integers(len(queries)))]


class MicroBatches(Sampler):
    """This process's micro-batches of (pair, query) items, from optimizer step ``start`` to ``stop``.

    Each step's batch is split into ``world`` contiguous shares (this process takes share ``rank``),
    each cut into micro-batches of ``micro_batch`` items.
    """

    def __init__(self, order: PairOrder, start: int, stop: int, rank: int, world: int, micro_batch: int):
        self.order, self.start, self.stop = order, start, stop
        self.rank, self.world, self.micro_batch = rank, world, micro_batch
        self.share = order.batch_size // world

    def __len__(self) -> int:
        return (self.stop - self.start) * (self.share // self.micro_batch)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for step in range(self.start, self.stop):
            mine = self.order.step_items(step)[self.rank * self.share : (self.rank + 1) * self.share]
            for i in range(0, self.share, self.micro_batch):
                yield mine[i : i + self.micro_batch]
