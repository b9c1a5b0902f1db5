"""Encoded items -> batches: padding (loss never on padding), packed rows, AnyRes pixel tensors, a Dataset.

Usage::

    ds = EncodedDataset(samples, encoder, with_index=True)   # items encoded on access, a batch at a time
    batch = Collator(pad_id)(ds.__getitems__([0, 1, 2]))     # input_ids, attention_mask, labels, pixel_values
"""

from __future__ import annotations

from typing import Any

import torch

from lora_llava.data.encode import Encoder
from lora_llava.data.formats import Sample


def cat_pixels(pix: list[torch.Tensor]) -> torch.Tensor:
    """Concatenate per-sample pixel tensors; AnyRes tensors (images, tiles, C, H, W) are zero-padded
    to the most tiles in the batch (the model reads each image's real tile count from image_sizes)."""
    if pix[0].dim() == 5:
        most = max(p.shape[1] for p in pix)
        pix = [torch.nn.functional.pad(p, (0, 0, 0, 0, 0, 0, 0, most - p.shape[1])) for p in pix]
    return torch.cat(pix)


class Collator:
    """Pads a list of encoded items into a batch; padding never carries loss.

    ``input_ids``, ``labels`` and ``attention_mask`` are the three rows of one ``(3, batch, length)``
    tensor, each contiguous: a DataLoader worker hands them to the main process as one shared-memory
    block instead of three (measurably faster; see bench/data_throughput.py).
    """

    def __init__(self, pad_id: int, padding_side: str = "right") -> None:
        self.pad_id = pad_id
        self.padding_side = padding_side

    def __call__(self, items: list[dict]) -> dict:
        if "position_ids" in items[0]:
            return self._packed(items)
        left = self.padding_side == "left"
        rows = []
        for it in items:
            ids = it["input_ids"]
            row = torch.stack((ids, it["labels"], torch.ones_like(ids)), dim=1)  # (length, 3)
            rows.append(row.flip(0) if left else row)
        padded = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_value=0)  # (batch, width, 3)
        if left:
            padded = padded.flip(1)
        packed = padded.permute(2, 0, 1).contiguous().long()  # (3, batch, width)
        ids, labels, mask = packed[0], packed[1], packed[2]
        pad = mask == 0
        ids.masked_fill_(pad, self.pad_id)
        labels.masked_fill_(pad, -100)
        batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
        return self._images_and_index(items, batch)

    def _packed(self, items: list[dict]) -> dict:
        """Rows of packed samples (lora_llava.data.packing): no attention_mask; each row's padding is a block
        of its own (positions 0, 1, ...), so transformers' packed-sequence masks keep it apart; ``token_mask``
        (1 for real tokens) is for the trainer's counts, not for the model."""
        width = max(len(it["input_ids"]) for it in items)
        ids = torch.full((len(items), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(items), width), -100, dtype=torch.long)
        pos = torch.arange(width).repeat(len(items), 1)
        real = torch.zeros((len(items), width), dtype=torch.long)
        for r, it in enumerate(items):
            n = len(it["input_ids"])
            ids[r, :n], labels[r, :n], real[r, :n] = it["input_ids"], it["labels"], 1
            pos[r, :n] = it["position_ids"]
            pos[r, n:] = torch.arange(width - n)
        batch = {"input_ids": ids, "labels": labels, "position_ids": pos, "token_mask": real}
        return self._images_and_index(items, batch)

    def _images_and_index(self, items: list[dict], batch: dict) -> dict:
        if "index" in items[0]:
            index = [i for it in items for i in (it["index"] if isinstance(it["index"], list) else [it["index"]])]
            batch["sample_index"] = torch.tensor(index)
        pix = [it["pixel_values"] for it in items if "pixel_values" in it]
        if pix:
            batch["pixel_values"] = cat_pixels(pix)
        sizes = [it["image_sizes"] for it in items if "image_sizes" in it]
        if sizes:
            batch["image_sizes"] = torch.cat(sizes)
        return batch


class EncodedDataset(torch.utils.data.Dataset):
    """Samples encoded on access; ``with_index``: each item also carries its position (``index``), which the
    Collator turns into ``sample_index`` so a trainer can name the samples of a batch."""

    def __init__(self, samples: list[Sample], encoder: Encoder, with_index: bool = False) -> None:
        self.samples = samples
        self.encoder = encoder
        self.with_index = with_index

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict:
        item = self.encoder.encode(self.samples[i])
        if self.with_index:
            item["index"] = i
        return item

    def __getitems__(self, indices: list[int]) -> list[dict]:
        """A DataLoader batch in one go (torch's fetcher calls this when it exists)."""
        items = self.encoder.encode_batch([self.samples[i] for i in indices])
        if self.with_index:
            for i, item in zip(indices, items):
                item["index"] = i
        return items


class Repeats(torch.utils.data.Dataset):
    """``dataset``, and past its end masked repeats: index ``len(dataset) + i`` is item ``i`` with every label
    masked (it fills the last batch of an epoch on several processes, ``sampler.epoch_order``, and trains
    nothing). Its length is the dataset's."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict:
        n = len(self.dataset)
        if i < n:
            item: dict = self.dataset[i]
            return item
        return _masked(self.dataset[i - n])

    def __getitems__(self, indices: list[int]) -> list[dict]:
        n = len(self.dataset)
        fetch = getattr(self.dataset, "__getitems__", None)
        real = [i % n if i >= n else i for i in indices]
        items = fetch(real) if fetch is not None else [self.dataset[i] for i in real]
        return [_masked(item) if i >= n else item for i, item in zip(indices, items)]


def _masked(item: dict) -> dict:
    out = dict(item)
    labels = item["labels"]
    out["labels"] = torch.full_like(labels, -100) if torch.is_tensor(labels) else [-100] * len(labels)
    return out
