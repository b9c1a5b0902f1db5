"""lora-llava check: validate a recipe and its data without loading model weights."""

from __future__ import annotations

from lora_llava.cli.common import add_recipe_arguments, quiet, recipe_from_args

HELP = "validate a recipe and every data sample (no model weights are loaded)"
EPILOG = """examples:
  lora-llava check quickstart
  lora-llava check my.yaml data.on_bad_sample=skip

prints the data table and length summary, then "ok", or every problem found (exit status 2)"""


def add_arguments(p) -> None:
    add_recipe_arguments(p)


def run(args) -> int:
    quiet()
    from lora_llava.train.run import prepare_run

    recipe = recipe_from_args(args)
    spec, _, _, report = prepare_run(recipe, run_dir=None)
    print(f"backbone: {spec.name} ({spec.source}), chat format {spec.chat_format}")
    print(report.summary())
    if report.bad:
        print(f"{len(report.bad)} bad sample(s) would be skipped (data.on_bad_sample=skip):")
        for b in report.bad:
            print(f"  {b.describe()}")
    print("ok")
    return 0
