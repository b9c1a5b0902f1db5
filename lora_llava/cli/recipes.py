"""lora-llava recipes: list, show and copy built-in recipes; list backbones and recipe keys."""

from __future__ import annotations

import argparse

HELP = "list built-in recipes, show or copy one, list backbones (--backbones) or every recipe key (--keys)"
EPILOG = """examples:
  lora-llava recipes
  lora-llava recipes show llava-1.5-7b/qlora
  lora-llava recipes copy llava-1.5-7b/qlora my-run.yaml
  lora-llava recipes copy llava-1.5-7b/qlora          (to ./llava-1.5-7b-qlora.yaml)
      (DEST must be new: an existing file, or a symbolic link, dangling or not, is refused and left as it is)
  lora-llava recipes --backbones
  lora-llava recipes --keys
  lora-llava recipes --validate      (every built-in recipe, structurally: no weights, no network)"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", nargs="?", choices=["list", "show", "copy"], default="list")
    p.add_argument("name", nargs="?", help="recipe name (show, copy)")
    p.add_argument(
        "dest", nargs="?", help="destination file, new (copy; default: NAME with / as -, .yaml; never overwritten)"
    )
    p.add_argument("--backbones", action="store_true", help="list registered backbones")
    p.add_argument("--keys", action="store_true", help="list every recipe key with its type, default and help")
    p.add_argument("--validate", action="store_true", help="validate every built-in recipe without loading weights")


def run(args: argparse.Namespace) -> int:
    from lora_llava.recipes import list_recipes, recipe_path

    if args.backbones:
        from lora_llava.backbones.registry import registered_backbones

        for s in registered_backbones():
            print(f"{s.name:<16} {s.source:<28} {s.family:<11} recipe: {s.recipe or '-':<22} {s.description}")
        return 0
    if args.validate:
        from lora_llava.recipes import check_builtin_recipes

        for name, how in check_builtin_recipes().items():
            print(f"{name:<28} ok   backbone: {how}")
        return 0
    if args.keys:
        from lora_llava.config import describe_keys

        for key, typ, default, help_ in describe_keys():
            print(f"{key:<34} {typ:<28} {default:<14} {help_}")
        return 0
    from lora_llava.cli.common import list_show_or_copy

    default = (args.name or "").replace("/", "-") + ".yaml"  # llava-1.5-7b/qlora -> llava-1.5-7b-qlora.yaml
    if args.action == "copy" and args.name:  # a new file only, never through a symbolic link (copy_new)
        from pathlib import Path

        from lora_llava.recipes import copy_new

        dest = Path(args.dest or default)
        copy_new(recipe_path(args.name), dest)
        print(f"copied {args.name} to {dest}")
        return 0
    return list_show_or_copy(args.action, args.name, args.dest, list_recipes, recipe_path, default, "recipes", "recipe")
