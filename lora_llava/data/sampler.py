"""Length-grouped batching: batches of samples of similar length, image and text-only samples apart.

Usage::

    sampler = ModalityLengthGroupedSampler(lengths, has_image, batch_size=4, seed=42)
    DataLoader(dataset, batch_size=4, sampler=sampler, ...)    # sampler.set_epoch(e) reshuffles per epoch

LLaVA's modality-length grouping, made reproducible: per modality, the indices are shuffled
(seeded by ``seed`` and the epoch), cut into groups of ``group_batches`` batches, each group sorted
by length (longest first) and cut into batches, so a batch holds neighbours in length and never
mixes image and text-only samples. The full batches of both modalities are then shuffled together;
the at most two partial batches (one per modality) come last, merged, so that the DataLoader's
re-batching of this index stream keeps every other batch whole. Every index appears exactly once
per epoch.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence

import torch

GROUP_BATCHES = 16  # batches per length-sorted group: larger groups cut padding more, randomize less


def grouped_batches(
    lengths: Sequence[int], has_image: Sequence[bool], batch_size: int, seed: int, group_batches: int = GROUP_BATCHES
) -> list[list[int]]:
    """The epoch's batches (lists of indices) in order; the last one may be short."""
    if len(lengths) != len(has_image):
        raise ValueError(f"{len(lengths)} lengths but {len(has_image)} modality flags")
    rng = random.Random(seed)
    full: list[list[int]] = []
    tail: list[int] = []
    for modality in (True, False):
        idx = [i for i, m in enumerate(has_image) if bool(m) is modality]
        rng.shuffle(idx)
        group = batch_size * group_batches
        ordered: list[int] = []
        for start in range(0, len(idx), group):
            ordered.extend(sorted(idx[start : start + group], key=lambda i: -lengths[i]))
        cut = len(ordered) - len(ordered) % batch_size
        full.extend(ordered[b : b + batch_size] for b in range(0, cut, batch_size))
        tail.extend(ordered[cut:])
    rng.shuffle(full)
    tail_batches = [tail[b : b + batch_size] for b in range(0, len(tail), batch_size)]
    return full + tail_batches


class ModalityLengthGroupedSampler(torch.utils.data.Sampler[int]):
    """Yields dataset indices so that consecutive runs of ``batch_size`` form length-grouped, one-modality batches."""

    def __init__(self, lengths: Sequence[int], has_image: Sequence[bool], batch_size: int, seed: int) -> None:
        self.lengths = list(lengths)
        self.has_image = [bool(m) for m in has_image]
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self) -> Iterator[int]:
        for batch in grouped_batches(self.lengths, self.has_image, self.batch_size, self.seed + self.epoch):
            yield from batch


def epoch_order(
    n: int,
    batch_size: int,
    world_size: int,
    seed: int,
    lengths: Sequence[int] | None = None,
    has_image: Sequence[bool] | None = None,
) -> list[int]:
    """One epoch's indices for ``world_size`` processes of ``batch_size`` each: whole global batches (one per
    optimizer micro-step, ``batch_size * world_size`` samples) that the DataLoader cuts into per-process batches
    in turn (process r gets the r-th ``batch_size`` of each). Grouped (``lengths`` and ``has_image``) exactly as
    one process with the global batch size groups, else a seeded shuffle. The last global batch is filled up
    with masked repeats of its own samples: index ``n + i`` stands for sample ``i`` with no label (``Repeats``),
    so every process gets a batch at every step, no sample counts twice, and the batch keeps its modality."""
    step = batch_size * world_size
    if lengths is not None and has_image is not None:
        order = [i for b in grouped_batches(lengths, has_image, step, seed) for i in b]
    else:
        order = list(range(n))
        random.Random(seed).shuffle(order)
    short = -len(order) % step
    # fill-ups repeat the last batch's own samples: a text-only batch stays text-only on every process, so a part
    # no sample uses (the projector) gets no gradient anywhere, as with one process
    last = order[-(len(order) % step) :] if len(order) % step else []
    return order + [n + last[k % len(last)] for k in range(short)] if order else []


class DistributedEpochSampler(torch.utils.data.Sampler[int]):
    """``epoch_order`` as a sampler (``set_epoch`` reshuffles); every process draws the same order."""

    def __init__(
        self,
        n: int,
        batch_size: int,
        world_size: int,
        seed: int,
        lengths: Sequence[int] | None = None,
        has_image: Sequence[bool] | None = None,
    ) -> None:
        self.n, self.batch_size, self.world_size, self.seed = n, batch_size, world_size, seed
        self.lengths = list(lengths) if lengths is not None else None
        self.has_image = [bool(m) for m in has_image] if has_image is not None else None
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        step = self.batch_size * self.world_size
        return -(-self.n // step) * step if self.n else 0

    def __iter__(self) -> Iterator[int]:
        order = epoch_order(
            self.n, self.batch_size, self.world_size, self.seed + self.epoch, self.lengths, self.has_image
        )
        yield from order
