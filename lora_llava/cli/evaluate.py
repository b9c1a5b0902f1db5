"""lora-llava eval: exact-match accuracy of greedy answers on a run's eval data or any data file."""

from __future__ import annotations

import argparse
import json
import sys

from lora_llava.config.schema import DataSource

HELP = "score a run, adapter, merged model or backbone by exact match of greedy answers"
EPILOG = """examples:
  lora-llava eval runs/quickstart                       (the run's own eval data, generation settings of its recipe)
  lora-llava eval runs/quickstart --data runs/quickstart/data/eval.json --image-folder runs/quickstart/data/images
  lora-llava eval runs/quickstart/merged --data eval.json --image-folder images --json
  lora-llava eval tiny --data eval.json --image-folder images          (the untrained base)
  lora-llava eval runs/x --data support.jsonl --columns '{conversations: dialog, image: img_path}' \
      --roles '{user: [customer], assistant: [agent]}' --prompt-style short_answer
  lora-llava eval runs/x --data vqa_folder --split test                 (a DatasetDict folder's test split)

each sample's last answer is the reference; case, quotes and trailing punctuation are ignored.
--max-new-tokens and --batch-size default to the run's recipe (eval section), else 16 and 8"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL", help="run directory, adapter directory, merged directory or backbone name")
    add_source_arguments(p)
    p.add_argument("--json", action="store_true", help="print one JSON object (accuracy, n, correct, predictions)")
    p.add_argument("--max-samples", type=_positive, default=None, help="score the first N samples")
    p.add_argument("--max-new-tokens", type=_positive, default=None, help="longest answer (default: the run's)")
    p.add_argument("--batch-size", type=_positive, default=None, help="samples generated together (default: the run's)")
    p.add_argument("--skip-bad", action="store_true", help="score the good samples and list the bad ones")


def add_source_arguments(p: argparse.ArgumentParser, required: bool = False) -> None:
    """--data and the options a recipe's data entry takes."""
    p.add_argument(
        "--data",
        default=None,
        required=required,
        help="data file or datasets folder (any format a recipe source reads); default: the run's eval data",
    )
    p.add_argument("--image-folder", default=None, help="folder the samples' image paths are relative to")
    p.add_argument("--format", default="auto", help="auto | llava | messages | sharegpt (as data.*.format)")
    p.add_argument("--split", default=None, help="split of a saved DatasetDict folder (as data.*.split)")
    p.add_argument(
        "--columns", default=None, metavar="YAML", help="other field names, e.g. '{conversations: dialog, image: img}'"
    )
    p.add_argument("--roles", default=None, metavar="YAML", help="other speaker names, e.g. '{user: [customer]}'")
    p.add_argument(
        "--prompt-style", default="plain", help="plain | short_answer | multiple_choice (as data.*.prompt_style)"
    )


def _positive(text: str) -> int:
    import argparse

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def run(args: argparse.Namespace) -> int:
    from lora_llava.artifacts import open_artifact
    from lora_llava.cli.common import cpu_threads_for
    from lora_llava.config import load_recipe
    from lora_llava.config.schema import EvalConfig
    from lora_llava.errors import UserError
    from lora_llava.infer import evaluate, format_predictions, load_model

    art = open_artifact(args.model)
    adapter = art.adapter_dir
    recipe = load_recipe(adapter / "recipe.yaml") if adapter is not None else None
    settings = recipe.eval if recipe is not None else EvalConfig()
    max_new_tokens = args.max_new_tokens or settings.max_new_tokens
    batch_size = args.batch_size or settings.batch_size
    cpu_threads_for(getattr(art.meta, "backbone", None) or args.model)
    loaded = load_model(args.model)
    if args.data is None:
        if recipe is None:
            raise UserError(
                f"--data is needed: {args.model!r} is {art.description}, which records no eval data",
                hint="pass --data FILE (and --image-folder DIR); a run directory evaluates its own eval data",
            )
        from lora_llava.workflows import run_eval_samples

        samples = run_eval_samples(recipe, loaded.encoder)
        if not samples:
            raise UserError(
                f"the run's recipe ({art.path}) has no eval data (data.eval, data.eval_split)",
                hint="pass --data FILE (and --image-folder DIR)",
            )
        where = "the run's eval data"
        samples = samples[: args.max_samples] if args.max_samples else samples
    else:
        samples = _read(args)
        where = args.data
    result = evaluate(loaded, samples, max_new_tokens, batch_size)
    if args.json:
        print(json.dumps(result.to_json()))
    else:
        print(format_predictions(result))
        print(f"accuracy {result.accuracy:.3f} ({result.correct}/{result.n}) — {loaded.kind} {loaded.ref} on {where}")
    return 0


def source_from_args(args: argparse.Namespace) -> DataSource:
    """--data and the source options, validated exactly as a recipe's data.* entry."""
    import yaml

    from lora_llava.config.load import load_source
    from lora_llava.errors import UserError

    raw: dict = {"path": args.data, "image_folder": args.image_folder, "format": args.format}
    raw.update({"split": args.split, "prompt_style": args.prompt_style})
    for key in ("columns", "roles"):
        text = getattr(args, key)
        if text is not None:
            try:
                raw[key] = yaml.safe_load(text)
            except yaml.YAMLError as e:
                raise UserError(
                    f"--{key} {text!r}: not YAML ({e})", hint="e.g. --columns '{conversations: dialog}'"
                ) from None
    return load_source(raw, "eval --data")


def _read(args: argparse.Namespace) -> list:
    from lora_llava.data.formats import read_source
    from lora_llava.errors import UserError

    samples, bad = read_source(source_from_args(args), limit=args.max_samples)
    if bad:
        listing = "\n  ".join(b.describe() for b in bad[:50]) + (
            f"\n  ... and {len(bad) - 50} more" if len(bad) > 50 else ""
        )
        hints = ["--skip-bad scores the good ones"]
        if args.image_folder is None and any("not found in" in b.reason for b in bad):
            hints.insert(0, "image paths are relative to --image-folder (default: the current directory)")
        if not args.skip_bad:
            raise UserError(f"{len(bad)} bad sample(s) in {args.data}:\n  {listing}", hint="; ".join(hints))
        print(f"skipping {len(bad)} bad sample(s):\n  {listing}", file=sys.stderr)
    if not samples:
        raise UserError(f"no samples to score in {args.data}", hint="check --data (and --max-samples)")
    return samples
