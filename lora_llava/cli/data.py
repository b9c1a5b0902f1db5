"""lora-llava data: make training data. ``data generate`` turns captions and boxes into LLaVA instruction data."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HELP = "make training data: generate LLaVA instruction data from image captions and boxes with an LLM"
EPILOG = """examples:
  lora-llava data configs                                   (the example configs, one per annotation format)
  lora-llava data configs copy coco my-datagen.yaml
  lora-llava data generate my-datagen.yaml --limit 20 --output data/sample.json     (a dry sample)
  lora-llava data generate my-datagen.yaml                  (everything; re-run it to resume)
  lora-llava data generate coco annotations.path=captions.json annotations.image_folder=images
  OPENAI_API_KEY=... lora-llava data generate my-datagen.yaml generator.concurrency=16

for each image, each kind in `kinds` (conversation, detail, complex_reasoning; brief: stage-1 caption
pairs without an LLM) is asked of the generator; malformed answers are rejected with a reason. Writes
OUTPUT (LLaVA-Instruct JSON, ready for a recipe's data.train), OUTPUT's stem + .journal.jsonl (every
generation; a re-run skips what is done) and + .report.txt (the quality report, also printed).
An existing OUTPUT is replaced only when its journal records writing it (a re-run), or with --overwrite
when it is an earlier output of data generate; an input (the annotations, the image folder) or a file
data generate did not write is never replaced. One run at a time uses a journal (a lock beside it)."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    from lora_llava.datagen.keys import keys_epilog  # the schema alone: nothing heavy is imported

    sub = p.add_subparsers(dest="action", metavar="ACTION")
    g = sub.add_parser(
        "generate",
        help="generate instruction data from annotations",
        description="Generate LLaVA instruction data from annotations (captions, boxes) with a generator LLM.",
        epilog=f"{EPILOG}\n\n{keys_epilog()}",  # every config key, read from the schema: it cannot drift
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    g.add_argument(
        "config", metavar="CONFIG", help="a datagen YAML file or a built-in example (lora-llava data configs)"
    )
    g.add_argument("overrides", metavar="key=value", nargs="*", help="override config keys: generator.concurrency=8")
    g.add_argument(
        "--limit", type=int, metavar="N", help="only the first N images (a dry sample; the output then holds those)"
    )
    g.add_argument("--output", metavar="FILE", help="the LLaVA JSON to write (default: the config's output)")
    g.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an earlier output of data generate at OUTPUT that its journal does not record "
        "(a re-run needs no flag; the journal is kept: delete it to start over)",
    )
    g.add_argument("--samples", type=int, default=2, metavar="K", help="samples shown in the report (default 2)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    c = sub.add_parser("configs", help="list the example configs, show or copy one")
    c.add_argument("what", nargs="?", choices=["list", "show", "copy"], default="list")
    c.add_argument("name", nargs="?", help="config name (show, copy)")
    c.add_argument("dest", nargs="?", help="destination file (copy; default: NAME-datagen.yaml)")


def run(args: argparse.Namespace) -> int:
    from lora_llava.errors import UserError

    if args.action == "generate":
        return _generate(args)
    if args.action == "configs":
        return _configs(args)
    raise UserError("data needs an action: generate or configs", hint="lora-llava data --help")


def _generate(args: argparse.Namespace) -> int:
    from lora_llava.datagen.config import load_datagen_config
    from lora_llava.datagen.run import companion, generate_data
    from lora_llava.errors import UserError

    if args.limit is not None and args.limit < 1:
        raise UserError(f"--limit must be >= 1, got {args.limit}")
    config = load_datagen_config(args.config, args.overrides)
    out = Path(args.output or config.output)
    try:
        generate_data(
            config,
            limit=args.limit,
            output=out,
            progress=not args.no_progress,
            n_samples=args.samples,
            overwrite=args.overwrite,
        )
    except KeyboardInterrupt:
        print(
            f"interrupted: what was generated is in {companion(out, '.journal.jsonl')}; "
            "run the same command again to continue",
            file=sys.stderr,
        )
        return 130
    return 0


def _configs(args: argparse.Namespace) -> int:
    from lora_llava.cli.common import list_show_or_copy
    from lora_llava.datagen.config import config_path, list_configs

    default = f"{args.name}-datagen.yaml"
    return list_show_or_copy(
        args.what, args.name, args.dest, list_configs, config_path, default, "data configs", "config"
    )
