"""lora-llava train: train a recipe and write a self-describing adapter."""

from __future__ import annotations

import argparse
import shlex
import sys

from lora_llava.cli.common import add_recipe_arguments, recipe_from_args, synthetic_eval_warning, training
from lora_llava.config.load import input_paths
from lora_llava.distributed import world
from lora_llava.layout import RunDir

HELP = "train a recipe (QLoRA on the language model, projector fully, vision tower frozen)"
EPILOG = """examples:
  lora-llava train quickstart
  lora-llava train quickstart train.max_steps=50 output_dir=runs/try1
  lora-llava train llava-1.5-7b/qlora data.train.0.path=my/train.json data.train.0.image_folder=my/images
  WANDB_MODE=offline lora-llava train my.yaml train.report_to=wandb

writes OUTPUT_DIR/adapter (LoRA + projector + processor + recipe), recipe.yaml, metrics.jsonl, curves.png
(and with train.eval_steps eval/step-N.jsonl; with train.save_steps checkpoints/checkpoint-N, each an adapter)

exit status: 0 trained; 2 a mistake (one error line); 75 stopped by SIGTERM or Ctrl-C after the step in
flight, with a checkpoint saved (the message gives the command that resumes); 130 aborted by a second
Ctrl-C (checkpoints already saved are intact)"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_recipe_arguments(p)
    p.add_argument(
        "--overwrite", action="store_true", help="replace an earlier run in OUTPUT_DIR (its adapter, checkpoints, ...)"
    )


def run(args: argparse.Namespace) -> int:
    recipe = recipe_from_args(args)  # a mistake in the recipe is reported before the heavy imports
    if world().main:  # several processes (torchrun): the first one claims the directory, the others follow it
        RunDir(recipe.output_dir).check_free(args.overwrite, recipe.train.resume, inputs=input_paths(recipe))
    warning = synthetic_eval_warning(recipe) if recipe.train.eval_steps else None  # eval during training
    if warning:
        print(warning, file=sys.stderr)
    from lora_llava.workflows import train

    kept = [o for o in args.overrides if not o.startswith(("output_dir=", "train.resume="))]
    training(recipe, " ".join([_launcher(), *map(shlex.quote, [str(args.recipe), *kept])]))  # pasted into a shell
    train(recipe, overwrite=args.overwrite)
    return 0


def _launcher() -> str:
    """How this training was started, for the command that resumes it: with the same number of processes."""
    w = world()
    if w.size == 1:
        return "lora-llava train"
    import os

    per_machine = os.environ.get("LOCAL_WORLD_SIZE", str(w.size))
    accelerate = "ACCELERATE_USE_CPU" in os.environ  # set by accelerate launch, which runs torchrun inside
    if "TORCHELASTIC_RUN_ID" in os.environ and not accelerate:  # torchrun
        machines = (
            f" --nnodes {w.size // int(per_machine)}" if per_machine.isdigit() and int(per_machine) < w.size else ""
        )
        return f"torchrun{machines} --nproc_per_node {per_machine} -m lora_llava train"
    return f"accelerate launch --num_processes {w.size} -m lora_llava train"
