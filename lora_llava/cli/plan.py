"""lora-llava plan: the peak memory of a recipe's training step, before any weight is loaded."""

from __future__ import annotations

import argparse

from lora_llava.cli.common import add_recipe_arguments, recipe_from_args

HELP = "estimate a recipe's peak training memory by category and suggest the micro-batch that fits (no weights)"
EPILOG = """examples:
  lora-llava plan llava-1.5-7b/qlora --gpu-memory 24GB
  lora-llava plan my.yaml data.max_length=4096 --gpu-memory 80GB
  lora-llava plan quickstart

the model is built from the backbone's config on PyTorch's meta device (offline, the registered Hub
backbones come from built-in configs), and one training step runs there at the recipe's batch and the
longest sample after image expansion (from the data when it can be read, else data.max_length); prints
4-bit and 16-bit weights, LoRA, projector, optimizer state, gradients, activations and logits, and with
--gpu-memory whether it fits and the largest train.batch_size (with the train.grad_accum that keeps the
recipe's global batch) that does"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_recipe_arguments(p)
    p.add_argument(
        "--gpu-memory", metavar="SIZE", help="the card's memory (24GB, 80GiB): check the fit, suggest a batch"
    )
    p.add_argument(
        "--seq-len", type=int, metavar="N", help="plan for samples of N tokens instead of the data's longest"
    )


def run(args: argparse.Namespace) -> int:
    recipe = recipe_from_args(args)  # a mistake in the recipe is reported before the heavy imports
    from lora_llava.plan import plan_memory

    plan = plan_memory(recipe, gpu_memory=args.gpu_memory, seq_len=args.seq_len)
    print(plan.table())
    return 0
