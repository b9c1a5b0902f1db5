"""Samples -> model inputs: chat rendering, exact image-token expansion, answer-only labels, padding.

Usage::

    enc = Encoder(processor, format_for("vicuna_v1", processor.tokenizer))
    item = enc.encode(sample)          # input_ids, labels, pixel_values
    enc.length(sample)                 # the exact token count the model will see
    batch = Collator(pad_id)([item, ...])

Every ``<image>`` placeholder is expanded to exactly the number of image tokens the backbone's
processor reports for that image, *before* tokenizing, so lengths are known exactly and a sample
is never cut through its image tokens: over-long samples are reported, not truncated.
"""

from __future__ import annotations

import torch

from lora_llava.data.chat import ChatFormat, tokenize_with_labels
from lora_llava.data.formats import IMAGE, Sample
from lora_llava.data.images import image_size, load_image


class Encoder:
    def __init__(self, processor, fmt: ChatFormat, max_length: int | None = None) -> None:
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.fmt = fmt
        self.max_length = max_length
        self.image_token = processor.image_token
        stop_ids = self.tokenizer.encode(fmt.stop, add_special_tokens=False)
        # A stop string that is not one token of this tokenizer can never be emitted as a stop: check
        # answers against the tokenizer's EOS then, so the mismatch fails loudly instead of unchecked.
        self.stop_id = stop_ids[0] if len(stop_ids) == 1 else self.tokenizer.eos_token_id

    # -- image tokens -------------------------------------------------------------------------
    def image_token_counts(self, sizes: list[tuple[int, int]]) -> list[int]:
        """Image tokens per image of (width, height), as the backbone's processor expands them."""
        if not sizes:
            return []
        data = self.processor._get_num_multimodal_tokens(image_sizes=[(h, w) for w, h in sizes])
        return list(data["num_image_tokens"] if isinstance(data, dict) else data.num_image_tokens)

    def expand(self, messages: list[tuple[str, str]], counts: list[int]) -> list[tuple[str, str]]:
        out, k = [], 0
        for role, text in messages:
            pieces = text.split(IMAGE)
            buf = pieces[0]
            for piece in pieces[1:]:
                buf += self.image_token * counts[k] + piece
                k += 1
            out.append((role, buf))
        if k != len(counts):
            raise ValueError(f"{k} {IMAGE} placeholder(s) for {len(counts)} image(s)")
        return out

    # -- training -----------------------------------------------------------------------------
    def tokens(self, sample: Sample, sizes: list[tuple[int, int]]) -> tuple[list[int], list[int]]:
        messages = self.expand(sample.messages, self.image_token_counts(sizes))
        text, spans = self.fmt.render(messages)
        return tokenize_with_labels(self.tokenizer, text, spans, self.stop_id)

    def image_sizes(self, sample: Sample) -> list[tuple[int, int]]:
        """(width, height) of each of the sample's images, from their headers only."""
        return [image_size(p) for p in sample.images]

    def length(self, sample: Sample) -> int:
        """Exact token count after image expansion (reads image headers only)."""
        ids, labels = self.tokens(sample, self.image_sizes(sample))
        if all(x == -100 for x in labels):
            raise ValueError("no answer tokens to learn from")
        return len(ids)

    def encode(self, sample: Sample) -> dict:
        images = [load_image(p) for p in sample.images]
        ids, labels = self.tokens(sample, [im.size for im in images])
        if self.max_length is not None and len(ids) > self.max_length:
            raise ValueError(f"{len(ids)} tokens, over data.max_length={self.max_length}")
        item = {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels)}
        if images:
            pix = self.processor.image_processor(images=images, return_tensors="pt")
            item.update({k: v for k, v in pix.items() if k in ("pixel_values", "image_sizes")})
        return item

    # -- generation ---------------------------------------------------------------------------
    def prompt(self, sample: Sample) -> tuple[str, str, list]:
        """(prompt text, reference answer, images) for scoring the sample's last answer."""
        messages = sample.messages[:-1]
        images = [load_image(p) for p in sample.images]
        messages = self.expand(messages, self.image_token_counts([im.size for im in images]))
        text, _ = self.fmt.render(messages, add_generation_prompt=True)
        return text, sample.messages[-1][1], images


def cat_pixels(pix: list[torch.Tensor]) -> torch.Tensor:
    """Concatenate per-sample pixel tensors; AnyRes tensors (images, tiles, C, H, W) are zero-padded
    to the most tiles in the batch (the model reads each image's real tile count from image_sizes)."""
    if pix[0].dim() == 5:
        most = max(p.shape[1] for p in pix)
        pix = [torch.nn.functional.pad(p, (0, 0, 0, 0, 0, 0, 0, most - p.shape[1])) for p in pix]
    return torch.cat(pix)


class Collator:
    """Pads a list of encoded items into a batch; padding never carries loss."""

    def __init__(self, pad_id: int, padding_side: str = "right") -> None:
        self.pad_id = pad_id
        self.padding_side = padding_side

    def __call__(self, items: list[dict]) -> dict:
        width = max(len(it["input_ids"]) for it in items)
        ids = torch.full((len(items), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(items), width), -100, dtype=torch.long)
        mask = torch.zeros((len(items), width), dtype=torch.long)
        for i, it in enumerate(items):
            n = len(it["input_ids"])
            sl = slice(0, n) if self.padding_side == "right" else slice(width - n, width)
            ids[i, sl] = it["input_ids"]
            labels[i, sl] = it["labels"]
            mask[i, sl] = 1
        batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
        pix = [it["pixel_values"] for it in items if "pixel_values" in it]
        if pix:
            batch["pixel_values"] = cat_pixels(pix)
        sizes = [it["image_sizes"] for it in items if "image_sizes" in it]
        if sizes:
            batch["image_sizes"] = torch.cat(sizes)
        return batch


class EncodedDataset(torch.utils.data.Dataset):
    def __init__(self, samples: list[Sample], encoder: Encoder) -> None:
        self.samples = samples
        self.encoder = encoder

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict:
        return self.encoder.encode(self.samples[i])
