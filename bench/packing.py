"""Packing against length-grouped batches on a mixed-length mixture: one epoch each, side by side.

Usage::

    python bench/packing.py                      # the table in bench/README.md (about 3 minutes on 2 cores)
    python bench/packing.py --repeats 3 --batch 8

The mixture: the synthetic shapes task (one 32 px image, 16 image tokens, a short answer) and text-only
conversations of 1 to 6 exchanges with answers of 1 to 40 words (lengths from ~20 to ~500 tokens), on the
``tiny`` backbone (QLoRA, float32 compute on the CPU, one torch thread). Each runner trains one epoch
through ``lora_llava.train`` in a fresh process: ``grouped`` (train.group_by_length, the default) and
``packed`` (train.packing: rows of up to data.max_length tokens). Reported: wall time of the epoch's steps
(from the end of the first optimizer step to the end of the last), samples/s over those steps (each step
trains the epoch's samples / its steps), optimizer steps, padding share, the mean loss.
The runners alternate ``--repeats`` times; medians are shown. Not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORDS = "the a model image answer question short long red blue green left right top word some more of and".split()


def write_data(root: Path, n_text: int) -> None:
    from lora_llava.data.synthetic import write_shapes_dataset

    write_shapes_dataset(root / "shapes", n_train=n_text, n_eval=8, seed=0)
    rng = random.Random(0)
    records = []
    for i in range(n_text):
        turns = []
        for _ in range(rng.randint(1, 6)):
            q = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 15))) + "?"
            a = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 40))).capitalize() + "."
            turns += [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
        records.append({"id": f"text-{i}", "conversations": turns})
    (root / "text.json").write_text(json.dumps(records))


def recipe(root: Path, packing: bool, batch: int, max_length: int) -> object:
    from lora_llava.config.load import load_recipe

    return load_recipe({
        "backbone": "tiny",
        "output_dir": str(root / ("packed" if packing else "grouped")),
        "data": {"train": [{"path": str(root / "shapes" / "train.json"), "image_folder": str(root / "shapes" / "images")},
                           {"path": str(root / "text.json")}],
                 "max_length": max_length},
        "quantization": {"compute_dtype": "float32"},
        "train": {"epochs": 1, "batch_size": batch, "grad_accum": 1, "learning_rate": 1e-3, "logging_steps": 10_000,
                  "gradient_checkpointing": False, "packing": packing, "seed": 0},
    })  # fmt: skip


def child(root: Path, packing: bool, batch: int, max_length: int, out: Path) -> None:
    import torch

    import lora_llava

    torch.set_num_threads(1)
    ends: list[float] = []
    from torch.optim.optimizer import register_optimizer_step_post_hook

    register_optimizer_step_post_hook(lambda *a: ends.append(time.perf_counter()))
    result = lora_llava.train(recipe(root, packing, batch, max_length), log=lambda *a: None, overwrite=True)
    out.write_text(json.dumps({
        "seconds": ends[-1] - ends[0], "steps": result.steps, "samples": result.train_samples,
        "padding": result.padding_fraction, "loss": result.train_loss}))  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--text", type=int, default=384, help="text-only samples (and as many image samples)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--root", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(Path(args.root), args.child == "packed", args.batch, args.max_length, Path(args.out))
        return
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    command = "python bench/packing.py " + " ".join(sys.argv[1:])
    runs: dict[str, list[dict]] = {"grouped": [], "packed": []}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_data(root, args.text)
        for _ in range(args.repeats):
            for name in runs:
                out = root / f"{name}-{time.time_ns()}.json"
                subprocess.run([sys.executable, __file__, "--child", name, "--root", str(root), "--out", str(out),
                                "--batch", str(args.batch), "--max-length", str(args.max_length)], check=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
                runs[name].append(json.loads(out.read_text()))
    print(f"$ {command}")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, one torch thread")
    first = runs["grouped"][0]
    print(f"data: {first['samples']} samples (half shapes images, half text-only, 1-6 exchanges), one epoch, "
          f"batch {args.batch}, data.max_length {args.max_length}; medians of {args.repeats} runs")  # fmt: skip
    print(f"{'runner':<8} {'steps s':>8} {'samples/s':>9} {'steps':>6} {'padding':>8} {'mean loss':>9}")
    medians = {}
    for name, rs in runs.items():
        sec = statistics.median(r["seconds"] for r in rs)
        medians[name] = sec
        r = rs[0]
        rate = statistics.median((x["steps"] - 1) * x["samples"] / x["steps"] / x["seconds"] for x in rs)
        print(f"{name:<8} {sec:>8.1f} {rate:>9.1f} {r['steps']:>6} {r['padding']:>8.1%} {r['loss']:>9.4f}")
    print(f"packed / grouped: {medians['packed'] / medians['grouped']:.2f}x the time of the steps after the first")


if __name__ == "__main__":
    main()
