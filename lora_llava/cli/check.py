"""lora-llava check: validate a recipe and its data without loading model weights."""

from __future__ import annotations

import argparse
from pathlib import Path

from lora_llava.cli.common import add_recipe_arguments, recipe_from_args
from lora_llava.fsutil import cache_root

HELP = "validate a recipe and every data sample (no model weights are loaded)"
EPILOG = """examples:
  lora-llava check quickstart
  lora-llava check my.yaml data.on_bad_sample=skip
  lora-llava check my.yaml data.overlength=truncate_turns data.max_length=1024

prints the sources, the mixture table, the length histogram and what each over-length policy would
do, then "ok", or every bad sample found (exit status 2 with data.on_bad_sample=error)"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_recipe_arguments(p)


def run(args: argparse.Namespace) -> int:
    recipe = recipe_from_args(args)  # a mistake in the recipe is reported before the heavy imports
    from lora_llava.data.check import enforce_policy
    from lora_llava.training.prepare import describe_format, prepare_run

    prepared = prepare_run(recipe, run_dir=None, enforce=False, pixels=False)
    spec, report = prepared.spec, prepared.report
    print(f"backbone: {spec.name} ({spec.source}), {describe_format(prepared.fmt)}")
    print(report.summary())
    # where a list too long to print goes: lora_llava's log folder, not output_dir (no run has claimed it yet)
    full_list = cache_root() / "logs" / "check-bad_samples.jsonl"
    if report.dropped:
        print(f"{len(report.dropped)} sample(s) over data.max_length would be left out (data.overlength):")
        _print_capped(report.dropped)
    if report.bad and recipe.data.on_bad_sample == "skip":
        print(f"{len(report.bad)} bad sample(s) would be skipped (data.on_bad_sample=skip):")
        _print_capped(report.bad, full_list)
    enforce_policy(report, recipe.data, run_dir=None, list_file=full_list)  # the bad samples, then exit 2
    print("ok")
    return 0


def _print_capped(items: list, full_list: Path | None = None) -> None:
    from lora_llava.data.check import MAX_LISTED, write_rejected

    for b in items[:MAX_LISTED]:
        print(f"  {b.describe()}")
    if len(items) > MAX_LISTED:
        tail = f"  ... and {len(items) - MAX_LISTED} more"
        if full_list is not None:
            write_rejected(items, full_list)
            tail += f"; all {len(items)} in {full_list}"
        print(tail)
