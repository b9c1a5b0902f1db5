"""lora-llava merge: fold an adapter into a plain 16-bit transformers checkpoint, verified."""

from __future__ import annotations

import argparse

from lora_llava.config.schema import DTYPE_NAMES, MERGE_BASES

HELP = "fold a trained adapter into deployable 16-bit weights and verify them against the adapter"
EPILOG = """examples:
  lora-llava merge runs/quickstart runs/quickstart/merged
  lora-llava merge runs/my-run merged/ --dtype float16
  lora-llava merge runs/my-run merged/ --base original     (fold into the original 16-bit weights)

the output loads with LlavaForConditionalGeneration.from_pretrained(OUT_DIR); merge_report.json holds
the parity numbers (logit differences and greedy answers, merged vs adapter)"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", metavar="RUN_DIR", help="run directory (or its adapter/ directory)")
    p.add_argument("out_dir", metavar="OUT_DIR", help="new directory for the merged checkpoint")
    p.add_argument(
        "--dtype",
        choices=DTYPE_NAMES,
        default=None,
        help="dtype of the merged weights (default: the recipe's merge.dtype)",
    )
    p.add_argument(
        "--base",
        choices=MERGE_BASES,
        default=None,
        help="QLoRA runs: fold into the dequantized NF4 base as trained (default) or the original weights",
    )


def run(args: argparse.Namespace) -> int:
    from lora_llava.artifacts import adapter_meta_of, open_artifact
    from lora_llava.cli.common import cpu_threads_for
    from lora_llava.merging import merge

    cpu_threads_for(adapter_meta_of(open_artifact(args.run_dir)).backbone)
    merge(args.run_dir, args.out_dir, dtype=args.dtype, base_mode=args.base)
    return 0
