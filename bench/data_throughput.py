"""Data throughput: samples/s of lora_llava's dataset + collator against the backbone's processor called directly.

Usage::

    python bench/data_throughput.py                                  # tiny backbone, 512 synthetic samples
    python bench/data_throughput.py --backbone tiny-next --samples 256 --workers 0 1 2
    python bench/data_throughput.py --image-size 336 --patch-size 14   # LLaVA-1.5's 576 image tokens per image

Both sides turn the same samples (the synthetic shapes task, one image each, 1 or 2 exchanges)
into padded batches through a ``torch.utils.data.DataLoader`` with 0, 1 and 2 worker processes,
and both load every image with lora_llava's safe loader:

- ``lora_llava``: ``EncodedDataset`` + ``Collator`` — chat rendering, exact image-token expansion,
  answer-only labels, pixel values, padding (what training uses);
- ``processor``: each sample rendered by the same chat format with its ``<image>`` placeholder,
  then ``processor(text=texts, images=images, padding=True, return_tensors="pt")`` per batch (what
  a plain transformers/TRL collator does; it produces no answer-only labels).

Numbers are samples/s over a whole pass (after one warm-up pass), best of ``--repeats`` passes
that alternate between the two sides.
Timing goes here, never into the tests.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from lora_llava.artifacts import resolve_backbone
from lora_llava.config.schema import DataSource
from lora_llava.data.batching import Collator, EncodedDataset
from lora_llava.data.chat import format_for
from lora_llava.data.encode import Encoder
from lora_llava.data.formats import read_source
from lora_llava.data.images import load_image
from lora_llava.data.synthetic import write_shapes_dataset
from lora_llava.model.loading import load_processor


class ProcessorInputs(torch.utils.data.Dataset):
    """(rendered text with <image> placeholders, loaded images) per sample, for the processor baseline."""

    def __init__(self, samples, fmt) -> None:
        self.samples = samples
        self.fmt = fmt

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        s = self.samples[i]
        text, _ = self.fmt.render(s.messages)
        return text, [load_image(p) for p in s.images]


class ProcessorCollator:
    def __init__(self, processor) -> None:
        self.processor = processor

    def __call__(self, items):
        texts = [t for t, _ in items]
        images = [im for _, ims in items for im in ims]
        return self.processor(text=texts, images=images, padding=True, return_tensors="pt")


def loader(dataset, collate, batch_size: int, workers: int) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=False, num_workers=workers, collate_fn=collate,
        persistent_workers=workers > 0,
    )  # fmt: skip


def one_pass(loader: torch.utils.data.DataLoader) -> float:
    t0 = time.perf_counter()
    n = sum(len(batch["input_ids"]) for batch in loader)
    return n / (time.perf_counter() - t0)


def compare(a: torch.utils.data.DataLoader, b: torch.utils.data.DataLoader, repeats: int) -> tuple[float, float]:
    """Best samples/s of each loader; passes alternate so that load from other processes hits both alike."""
    one_pass(a), one_pass(b)  # warm-up: worker start, caches
    best_a = best_b = 0.0
    for _ in range(repeats):
        best_a = max(best_a, one_pass(a))
        best_b = max(best_b, one_pass(b))
    return best_a, best_b


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backbone", default="tiny")
    p.add_argument("--samples", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--image-size", type=int, help="resize/crop images to this size (LLaVA-1.5: 336)")
    p.add_argument("--patch-size", type=int, help="vision patch size (LLaVA-1.5: 14); with --image-size")
    args = p.parse_args()
    torch.set_num_threads(1)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    spec = resolve_backbone(args.backbone)
    processor = load_processor(spec.local_path())
    if args.image_size:  # the tiny backbone's processor shaped like a bigger one: same code, more image tokens
        processor.image_processor.size = {"shortest_edge": args.image_size}
        processor.image_processor.crop_size = {"height": args.image_size, "width": args.image_size}
        processor.patch_size = args.patch_size or processor.patch_size
    fmt = format_for(spec.chat_format, processor.tokenizer)
    encoder = Encoder(processor, fmt)
    with tempfile.TemporaryDirectory() as tmp:
        data = write_shapes_dataset(Path(tmp), n_train=args.samples, n_eval=4, seed=0)
        samples, bad = read_source(DataSource(path=str(data / "train.json"), image_folder=str(data / "images")))
        assert not bad
        ours = EncodedDataset(samples, encoder)
        theirs = ProcessorInputs(samples, fmt)
        pad = processor.tokenizer.pad_token_id
        tokens = sum(len(ours[i]["input_ids"]) for i in range(len(ours))) / len(ours)
        print(
            f"{args.backbone}: {len(samples)} samples, {tokens:.0f} tokens/sample (after image expansion), "
            f"batch {args.batch_size}; {os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), "
            f"torch {torch.__version__}"
        )
        print(f"{'workers':>7}  {'lora_llava samples/s':>21}  {'processor samples/s':>20}  {'ratio':>6}")
        for w in args.workers:
            a, b = compare(
                loader(ours, Collator(pad), args.batch_size, w),
                loader(theirs, ProcessorCollator(processor), args.batch_size, w),
                args.repeats,
            )
            print(f"{w:>7}  {a:>21.0f}  {b:>20.0f}  {a / b:>6.2f}")


if __name__ == "__main__":
    main()
