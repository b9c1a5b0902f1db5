"""Padding-free packing: several samples per row, none attending to another (``train.packing: true``).

Usage::

    packs = pack_indices(lengths, capacity=recipe.data.max_length)     # [[3, 17], [5], ...]
    dataset = PackedDataset(samples, encoder, packs, with_index=True)
    batch = Collator(pad_id)([dataset[i] for i in range(4)])

Samples are packed best-fit decreasing by their exact lengths (image tokens included) into rows of at most
``capacity`` tokens: deterministic, so a resumed run packs exactly as it did. A packed row concatenates
its samples' tokens, labels and images (in order, so each image's features land on its own image tokens)
and restarts ``position_ids`` at 0 for each sample. The Collator then leaves ``attention_mask`` out and
pads each row with a block of its own (positions 0, 1, ...): from restarting positions and no mask,
transformers builds the block-diagonal causal mask on SDPA and eager attention, and the variable-length
(varlen) calls on flash-attention, so no token attends across samples. The first label of every sample
is -100 (nothing predicts a sample from the one before it). ``tests/data/test_packing.py`` checks each
sample's loss in a packed row against the sample alone.
"""

from __future__ import annotations

import bisect
from typing import Any

import torch

from lora_llava.data.encode import Encoder
from lora_llava.data.formats import Sample


def pack_indices(lengths: list[int], capacity: int) -> list[list[int]]:
    """Sample indices grouped into packs of at most ``capacity`` tokens (best-fit decreasing).

    Each sample goes, longest first, into the pack whose room left is the smallest that still fits it.
    A sample longer than ``capacity`` is a ValueError (the data layer keeps samples within data.max_length).
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    packs: list[list[int]] = []
    room: dict[int, list[int]] = {}  # room left -> packs with that much room
    sizes: list[int] = []  # the room values present in ``room``, sorted
    for i in order:
        n = lengths[i]
        if n > capacity:
            raise ValueError(f"sample {i} has {n} tokens, more than a packed row's {capacity}")
        at = bisect.bisect_left(sizes, n)
        if at < len(sizes):
            left = sizes[at]
            pid = room[left].pop()
            if not room[left]:
                del room[left]
                sizes.pop(at)
        else:
            left, pid = capacity, len(packs)
            packs.append([])
        packs[pid].append(i)
        rest = left - n
        if rest > 0:
            if rest not in room:
                room[rest] = []
                bisect.insort(sizes, rest)
            room[rest].append(pid)
    return packs


class PackedDataset(torch.utils.data.Dataset):
    """Packs of samples, each item one row: see the module docstring."""

    def __init__(self, samples: list[Sample], encoder: Encoder, packs: list[list[int]], with_index: bool = False):
        self.samples = samples
        self.encoder = encoder
        self.packs = packs
        self.with_index = with_index

    def __len__(self) -> int:
        return len(self.packs)

    def __getitem__(self, i: int) -> dict:
        return self.__getitems__([i])[0]

    def __getitems__(self, indices: list[int]) -> list[dict]:
        flat = [j for i in indices for j in self.packs[i]]
        encoded = iter(self.encoder.encode_batch([self.samples[j] for j in flat]))
        return [self._row([next(encoded) for _ in self.packs[i]], self.packs[i]) for i in indices]

    def _row(self, items: list[dict], members: list[int]) -> dict:
        labels = []
        for it in items:
            lab = it["labels"].clone()
            lab[0] = -100
            labels.append(lab)
        row: dict[str, Any] = {
            "input_ids": torch.cat([it["input_ids"] for it in items]),
            "labels": torch.cat(labels),
            "position_ids": torch.cat([torch.arange(len(it["input_ids"])) for it in items]),
        }
        for key in ("pixel_values", "image_sizes"):
            parts = [it[key] for it in items if key in it]
            if parts:
                row[key] = _cat(parts)
        if self.with_index:
            row["index"] = members
        return row


def _cat(parts: list[torch.Tensor]) -> torch.Tensor:
    from lora_llava.data.batching import cat_pixels

    return cat_pixels(parts) if parts[0].dim() == 5 else torch.cat(parts)
