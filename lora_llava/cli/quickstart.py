"""lora-llava quickstart: the whole pipeline on a recipe (default: the offline tiny quickstart)."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from lora_llava.cli.common import cpu_threads_for, ensure_synthetic_data, synthetic_eval_warning
from lora_llava.config.load import input_paths
from lora_llava.layout import RunDir

if TYPE_CHECKING:
    pass

HELP = "run base eval -> train -> eval -> merge -> eval of the merged model, then print a summary"
EPILOG = """examples:
  lora-llava quickstart                                   (offline: tiny backbone, synthetic shapes data)
  lora-llava quickstart train.max_steps=300 output_dir=runs/qs2
  lora-llava quickstart my.yaml                           (your recipe; needs data.eval)
  lora-llava quickstart quickstart data.train.0.path=d/train.json data.train.0.image_folder=d/images \\
      data.eval.0.path=d/eval.json data.eval.0.image_folder=d/images output_dir=runs/mine

when a recipe reads from the quickstart's synthetic data folder (runs/quickstart/data) and a file
is missing there, the synthetic shapes dataset is written first; when only the training data is yours
(data.train overridden, data.eval still the synthetic shapes), a warning says so before training: override
data.eval too, or carve eval from your data with data.eval=[] data.eval_split=0.1"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "args",
        nargs="*",
        metavar="[RECIPE] [key=value ...]",
        help="a recipe (default: quickstart) followed by overrides",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an earlier run in the recipe's output_dir")


def run(args: argparse.Namespace) -> int:
    from lora_llava.config import load_recipe
    from lora_llava.recipes import recipe_path

    rest = list(args.args)
    name = rest.pop(0) if rest and "=" not in rest[0] else "quickstart"
    recipe = load_recipe(recipe_path(name), rest)
    ensure_synthetic_data(recipe)
    RunDir(recipe.output_dir).check_free(
        args.overwrite, inputs=input_paths(recipe)
    )  # before anything heavy is imported
    warning = synthetic_eval_warning(recipe)
    if warning:
        print(warning, file=sys.stderr)
    cpu_threads_for(recipe.backbone)
    from lora_llava.pipeline import run_pipeline

    run_pipeline(recipe, overwrite=args.overwrite)
    return 0
