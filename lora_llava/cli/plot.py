"""lora-llava plot: draw a run's training curves (curves.png) from its metrics.jsonl."""

from __future__ import annotations

import argparse

HELP = "draw a run's curves (train/eval loss, eval accuracy, learning rate, tokens/s) into curves.png"
EPILOG = """examples:
  lora-llava plot runs/quickstart                    (writes runs/quickstart/curves.png)
  lora-llava plot runs/my-run --out my-run.png       (while it trains, too: it reads metrics.jsonl as it stands)

training draws curves.png by itself at the end; this redraws it, or draws it for a run still going"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", metavar="RUN", help="a run directory (a recipe's output_dir)")
    p.add_argument("--out", help="the image to write (default: RUN/curves.png); .png, .svg or .pdf")


def run(args: argparse.Namespace) -> int:
    import os

    from lora_llava.artifacts import open_artifact
    from lora_llava.curves import plot_run
    from lora_llava.errors import UserError

    if not os.path.isdir(args.run_dir):
        open_artifact(args.run_dir)  # says what it is instead (a missing path, a file, a backbone name)
        raise UserError(f"{args.run_dir!r} is not a run directory", hint="pass the output_dir of lora-llava train")
    print(f"wrote {plot_run(args.run_dir, args.out)}")
    return 0
