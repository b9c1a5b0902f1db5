"""The ``lora-llava`` command: one table of verbs, one small module each.

Usage::

    lora-llava quickstart
    lora-llava train RECIPE [key=value ...]
    lora-llava --help
"""

from __future__ import annotations

import argparse
import sys
from importlib import import_module
from typing import NoReturn

from lora_llava.errors import TrainingStopped, UserError

# verb -> module under lora_llava.cli; each has HELP, EPILOG, add_arguments(parser), run(args) -> int
VERBS = {
    "quickstart": "quickstart",
    "train": "train",
    "check": "check",
    "plan": "plan",
    "eval": "evaluate",
    "merge": "merge",
    "chat": "chat",
    "predict": "predict",
    "data": "data",
    "demo": "demo",
    "push": "push",
    "plot": "plot",
    "env": "env",
    "recipes": "recipes",
}


class Parser(argparse.ArgumentParser):
    """argparse with lora_llava's error shape: one ``error:`` line and a ``hint:`` (the nearest verb, or the
    verb's --help), exit status 2, no usage block."""

    def error(self, message: str) -> NoReturn:
        import difflib
        import re

        hint = f"{self.prog} --help lists the arguments"
        wrong = re.match(r"argument VERB: invalid choice: '([^']*)'", message)
        if wrong:
            close = difflib.get_close_matches(wrong.group(1), list(VERBS), n=1)
            message = f"unknown command {wrong.group(1)!r}"
            hint = (f"did you mean '{close[0]}'? " if close else "") + "lora-llava --help lists the commands"
        elif message.startswith("unrecognized arguments") and self.prog == "lora-llava":
            verb = next((a for a in sys.argv[1:] if a in VERBS), None) if _ARGV is None else _verb_of(_ARGV)
            hint = f"lora-llava {verb} --help lists its arguments" if verb else hint
        self.exit(2, f"error: {message}\nhint: {hint}\n")


_ARGV: list[str] | None = None  # the arguments main() parses (for the hint of an unrecognized one)


def _verb_of(argv: list[str]) -> str | None:
    return next((a for a in argv if a in VERBS), None)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="lora-llava",
        description="Fine-tune LLaVA vision-language models with QLoRA on one GPU (or a CPU, with the tiny backbone).",
        epilog="examples:\n  lora-llava quickstart\n  lora-llava recipes\n  lora-llava train llava-1.5-7b/qlora "
        "data.train.0.path=train.json data.train.0.image_folder=images",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    from lora_llava import __version__

    parser.add_argument("--version", action="version", version=f"lora-llava {__version__}")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    for verb, mod_name in VERBS.items():
        mod = import_module(f"lora_llava.cli.{mod_name}")
        p = sub.add_parser(
            verb,
            help=mod.HELP,
            description=mod.HELP,
            epilog=mod.EPILOG,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


# flags of the recipe verbs that may come anywhere among the key=value overrides
_RECIPE_FLAGS = {"train": {"--overwrite"}, "quickstart": {"--overwrite"}}


def _flags_first(argv: list[str]) -> list[str]:
    """``train R k=v --overwrite k2=v2`` as ``train --overwrite R k=v k2=v2`` (overrides are positional)."""
    if not argv or argv[0] not in _RECIPE_FLAGS:
        return argv
    flags = [a for a in argv[1:] if a in _RECIPE_FLAGS[argv[0]]]
    return [argv[0], *flags, *(a for a in argv[1:] if a not in _RECIPE_FLAGS[argv[0]])]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    from lora_llava.thirdparty import settle

    settle(argv[0] if argv and argv[0] in VERBS else "lora-llava")  # before any third-party import
    parser = build_parser()
    global _ARGV
    _ARGV = argv
    args = parser.parse_args(_flags_first(argv))
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except TrainingStopped as e:
        from lora_llava.cli.common import stopped_message

        print(stopped_message(e), file=sys.stderr)
        return e.exit_code
    except OSError as e:
        if e.filename is None:  # not a file a user named or can fix: a real failure, shown as one
            raise
        print(f"error: {e.strerror or e}: {e.filename}", file=sys.stderr)
        print("hint: check that the path exists and that you may read or write it (and that the disk has room)",
              file=sys.stderr)  # fmt: skip
        return 2
    except KeyboardInterrupt:
        from lora_llava.cli.common import interrupted_message

        print(interrupted_message(), file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
