"""lora-llava quickstart: the whole pipeline on a recipe (default: the offline tiny quickstart)."""

from __future__ import annotations

from pathlib import Path

from lora_llava.cli.common import quiet

HELP = "run base eval -> train -> eval -> merge -> eval of the merged model, then print a summary"
EPILOG = """examples:
  lora-llava quickstart                                   (offline: tiny backbone, synthetic shapes data)
  lora-llava quickstart train.max_steps=300 output_dir=runs/qs2
  lora-llava quickstart my.yaml                           (your recipe; needs data.eval)
  lora-llava quickstart quickstart data.train.0.path=d/train.json data.train.0.image_folder=d/images \\
      data.eval.0.path=d/eval.json data.eval.0.image_folder=d/images output_dir=runs/mine

with the built-in quickstart recipe, the synthetic dataset is written first (to the folder of
data.train.0.path) unless its files already exist"""


def add_arguments(p) -> None:
    p.add_argument(
        "args",
        nargs="*",
        metavar="[RECIPE] [key=value ...]",
        help="a recipe (default: quickstart) followed by overrides",
    )


def run(args) -> int:
    quiet()
    from lora_llava.config import load_recipe
    from lora_llava.data.synthetic import write_shapes_dataset
    from lora_llava.pipeline import run_pipeline
    from lora_llava.recipes import recipe_path

    rest = list(args.args)
    name = rest.pop(0) if rest and "=" not in rest[0] else "quickstart"
    builtin = load_recipe(recipe_path("quickstart"))
    recipe = load_recipe(recipe_path(name), rest)
    default_train = builtin.data.train[0].path
    if recipe.data.train[0].path == default_train and not Path(default_train).is_file():
        folder = Path(default_train).parent
        write_shapes_dataset(folder)
        print(f"wrote the synthetic shapes dataset to {folder}")
    run_pipeline(recipe)
    return 0
