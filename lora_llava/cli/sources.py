"""The data-source options of eval and predict: --data and what a recipe's data entry takes."""

from __future__ import annotations

import argparse


def add_source_arguments(
    p: argparse.ArgumentParser, required: bool = False, data_default: str = "the run's eval data"
) -> None:
    """--data and the options a recipe's data entry takes (eval, predict)."""
    p.add_argument(
        "--data",
        default=None,
        required=required,
        help=f"data file or datasets folder (any format a recipe source reads); default: {data_default}",
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
