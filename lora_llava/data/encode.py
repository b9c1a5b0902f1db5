"""Samples -> model inputs: chat rendering, exact image-token expansion, answer-only labels, padding.

Usage::

    enc = Encoder(processor, format_for("vicuna_v1", processor.tokenizer))
    item = enc.encode(sample)          # input_ids, labels, pixel_values
    items = enc.encode_batch(samples)  # the same, with one image-processor call for the whole batch
    enc.length(sample)                 # the exact token count the model will see

Batches of encoded items: ``lora_llava.data.batching`` (``Collator``, ``EncodedDataset``). Lengths need no
torch: this module imports it only when it makes tensors (``encode``), so ``check`` stays light.

``EncodedDataset`` implements ``__getitems__``, so a DataLoader fetches each batch through
``encode_batch``. Image-token counts are cached per image size (the processor's settings are fixed
once an Encoder is built).

Every ``<image>`` placeholder is expanded to exactly the number of image tokens the backbone's
processor reports for that image, so lengths are known exactly and a sample is never cut through
its image tokens: over-long samples are reported or handled by whole turns, never truncated.
The conversation is tokenized with one image token per placeholder and the image token is then
repeated in the ids (the image token is a special token, so the text around it tokenizes the same
either way); this skips tokenizing hundreds to thousands of identical tokens per image.
"""

from __future__ import annotations

from typing import Any

from PIL import Image

from lora_llava.annotations import Processor, Tokenizer
from lora_llava.compat import image_token_counts
from lora_llava.data.chat import ChatFormat, stop_token_id, tokenize_with_labels
from lora_llava.data.formats import IMAGE, Sample
from lora_llava.data.images import ImageRef, image_size, load_image, pad_to_square


class Encoder:
    def __init__(
        self, processor: Processor, fmt: ChatFormat, max_length: int | None = None, pad_to_square: bool = False
    ) -> None:
        self.processor = processor
        self.pad_to_square = pad_to_square
        mean = getattr(processor.image_processor, "image_mean", None) or [0.5, 0.5, 0.5]
        # the processor's mean color, truncated as upstream LLaVA-1.5 and transformers' LlavaImageProcessor do
        r, g, b = (int(255 * m) for m in mean)
        self.pad_color = (r, g, b)
        self.tokenizer = processor.tokenizer
        self.fmt = fmt
        self.max_length = max_length
        self.image_token = processor.image_token
        self.image_token_id = self.tokenizer.convert_tokens_to_ids(self.image_token)
        # A stop string that is not one token of this tokenizer can never be emitted as a stop: check
        # answers against the tokenizer's EOS then, so the mismatch fails loudly instead of unchecked.
        stop = stop_token_id(self.tokenizer, fmt.stop)
        self.stop_id = stop if stop is not None else self.tokenizer.eos_token_id
        self.control = control_strings(self.tokenizer, fmt, self.image_token)
        self._counts: dict[tuple[int, int], int] = {}  # (width, height) -> image tokens

    # -- image tokens -------------------------------------------------------------------------
    def image_token_counts(self, sizes: list[tuple[int, int]]) -> list[int]:
        """Image tokens per image of (width, height), as the backbone's processor expands them."""
        new = sorted({(w, h) for w, h in sizes} - self._counts.keys())
        if new:
            counts = image_token_counts(self.processor, [(h, w) for w, h in new])
            self._counts.update(zip(new, counts))
        return [self._counts[(w, h)] for w, h in sizes]

    def expand(self, messages: list[tuple[str, str]], counts: list[int]) -> list[tuple[str, str]]:
        """``messages`` with the k-th ``<image>`` replaced by ``counts[k]`` image tokens."""
        found = sum(text.count(IMAGE) for _, text in messages)
        if found != len(counts):
            raise ValueError(f"{found} {IMAGE} placeholder(s) for {len(counts)} image(s)")
        out, k = [], 0
        for role, text in messages:
            pieces = text.split(IMAGE)
            buf = pieces[0]
            for piece in pieces[1:]:
                buf += self.image_token * counts[k] + piece
                k += 1
            out.append((role, buf))
        return out

    # -- training -----------------------------------------------------------------------------
    def tokens(self, sample: Sample, sizes: list[tuple[int, int]]) -> tuple[list[int], list[int]]:
        """(input_ids, labels) of ``sample`` with images of (width, height) ``sizes``, image tokens expanded."""
        self.check_text(sample.messages)
        counts = self.image_token_counts(sizes)
        text, spans = self.fmt.render(self.expand(sample.messages, [1] * len(counts)))
        ids, labels = tokenize_with_labels(self.tokenizer, text, spans, self.stop_id)
        return self._repeat_image_tokens(ids, labels, counts)

    def check_text(self, messages: list[tuple[str, str]]) -> None:
        """ValueError naming the turn when a turn's text holds a control string: a special token of the
        tokenizer (``</s>`` in an answer teaches the model to stop there) or a role marker of the chat
        format (``ASSISTANT:`` in a question fakes a turn boundary). Tokenized as written, they would
        be control, not text."""
        seen: dict[str, int] = {}
        for role, text in messages:
            seen[role] = seen.get(role, 0) + 1
            for s, why in self.control.items():
                if s in text:
                    turn = {"user": "question", "assistant": "answer"}.get(role, role)
                    number = f" {seen[role]}" if role != "system" else ""
                    raise ValueError(f"{turn}{number} holds {s!r}, {why}; remove it from the text")

    def _repeat_image_tokens(self, ids: list[int], labels: list[int], counts: list[int]) -> tuple[list[int], list[int]]:
        at = [i for i, t in enumerate(ids) if t == self.image_token_id]
        if len(at) != len(counts):
            raise ValueError(
                f"{len(at)} image tokens after tokenizing, for {len(counts)} image(s): the text itself holds "
                f"{self.image_token!r}"
            )
        if not at:
            return ids, labels
        out_ids: list[int] = []
        out_labels: list[int] = []
        start = 0
        for i, n in zip(at, counts):
            out_ids += ids[start:i]
            out_ids += [self.image_token_id] * n
            out_labels += labels[start:i]
            out_labels += [-100] * n
            start = i + 1
        return out_ids + ids[start:], out_labels + labels[start:]

    def load(self, src: ImageRef) -> Image.Image:
        """A sample's image as the model sees it (padded to a square when ``pad_to_square``)."""
        img = load_image(src)
        return pad_to_square(img, self.pad_color) if self.pad_to_square else img

    def image_sizes(self, sample: Sample) -> list[tuple[int, int]]:
        """(width, height) of each of the sample's images as the model sees them, from their headers only."""
        sizes = [image_size(p) for p in sample.images]
        return [(max(w, h), max(w, h)) for w, h in sizes] if self.pad_to_square else sizes

    def length(self, sample: Sample) -> int:
        """Exact token count after image expansion (reads image headers only)."""
        ids, labels = self.tokens(sample, self.image_sizes(sample))
        if all(x == -100 for x in labels):
            raise ValueError("no answer tokens to learn from")
        return len(ids)

    def encode(self, sample: Sample) -> dict:
        return self.encode_batch([sample])[0]

    def encode_batch(self, samples: list[Sample]) -> list[dict]:
        """``encode`` for each sample; every image of the batch goes through one image-processor call."""
        images = [[self.load(p) for p in s.images] for s in samples]
        items = []
        for sample, ims in zip(samples, images):
            ids, labels = self.tokens(sample, [im.size for im in ims])
            if self.max_length is not None and len(ids) > self.max_length:
                raise ValueError(f"{sample.where()}: {len(ids)} tokens, over data.max_length={self.max_length}")
            items.append({"input_ids": _long(ids), "labels": _long(labels)})
        flat = [im for ims in images for im in ims]
        if flat:
            pix = self.processor.image_processor(images=flat, return_tensors="pt")
            start = 0
            for item, ims in zip(items, images):
                if ims:
                    end = start + len(ims)
                    item.update({k: v[start:end] for k, v in pix.items() if k in ("pixel_values", "image_sizes")})
                    start = end
        return items

    # -- generation ---------------------------------------------------------------------------
    def prompt(self, sample: Sample) -> tuple[str, str, list]:
        """(prompt text, reference answer, images) for scoring the sample's last answer."""
        messages = sample.messages[:-1]
        images = [self.load(p) for p in sample.images]
        messages = self.expand(messages, self.image_token_counts([im.size for im in images]))
        text, _ = self.fmt.render(messages, add_generation_prompt=True)
        return text, sample.messages[-1][1], images


def control_strings(tokenizer: Tokenizer, fmt: ChatFormat, image_token: str) -> dict[str, str]:
    """Strings a sample's text may not hold, each with why: the tokenizer's special tokens and the
    format's role markers (the image token is the placeholder, handled by its own rules)."""
    out: dict[str, str] = {}
    names = {tokenizer.eos_token: "the end-of-sequence token (the model would learn to stop there)",
             tokenizer.bos_token: "the beginning-of-sequence token", tokenizer.pad_token: "the padding token"}  # fmt: skip
    specials = set(tokenizer.all_special_tokens)
    specials |= {t.content for t in tokenizer.added_tokens_decoder.values() if getattr(t, "special", False)}
    for s in sorted(specials - {image_token, None, ""}):
        out[s] = names.get(s) or "a special token of the tokenizer"
    for m in fmt.markers:
        out.setdefault(m, f"a role marker of the {fmt.name} chat format (it would fake a turn boundary)")
    return out


def _long(values: list[int]) -> Any:
    """``torch.tensor(values)`` (int64), through numpy: four times faster for token lists."""
    import numpy as np
    import torch

    return torch.from_numpy(np.array(values, dtype=np.int64))
