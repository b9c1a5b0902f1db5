"""The ``lora-llava`` command: one table of verbs, one small module each.

Usage::

    lora-llava quickstart
    lora-llava train RECIPE [key=value ...]
    lora-llava --help
"""

from __future__ import annotations

import argparse
import errno
import os
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


def _options_first(parser: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """``plan R k=v --gpu-memory 24GB k2=v2`` as ``plan --gpu-memory 24GB R k=v k2=v2``: a verb that takes
    key=value overrides (a positional list) accepts its options anywhere among them, with their values."""
    sub = next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)
    verb = sub.choices.get(argv[0]) if sub is not None and argv else None
    if verb is None or not any(not a.option_strings and a.nargs in ("*", "+") for a in verb._actions):
        return argv
    takes_value = {o: a.nargs != 0 for a in verb._actions for o in a.option_strings}
    options, rest, i = [], [], 1
    while i < len(argv):
        a = argv[i]
        if a == "--":
            rest += argv[i:]
            break
        if a.startswith("-") and a.split("=", 1)[0] in takes_value:
            options.append(a)
            if takes_value[a.split("=", 1)[0]] and "=" not in a and i + 1 < len(argv):
                options.append(argv[i + 1])
                i += 1
        else:
            rest.append(a)
        i += 1
    return [argv[0], *options, *rest]


def _disk_full(e: BaseException) -> bool:
    """A full disk, as an OSError (ENOSPC) or as a library's error around one (safetensors: "StorageFull")."""
    while e is not None:
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            return True
        if "No space left on device" in str(e) or "StorageFull" in str(e):
            return True
        e = e.__cause__ or e.__context__  # type: ignore[assignment]
    return False


PEER_GRACE_S = 3.0  # how long another process waits before it reports an error the first one may report too


def _after_the_first(rank: int) -> None:
    """Several processes: a mistake in the recipe or the data is every process's, and would print once per
    process. The first process reports at once; the others wait, and when the first one failed too, the
    launcher (torchrun, accelerate launch) ends them in the meantime (SIGTERM), so the error shows once. An
    error only one process meets (its GPU, a file on its machine) still shows, a moment later."""
    if rank:
        import signal
        import time

        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # ended quietly when the launcher tears the group down
        time.sleep(PEER_GRACE_S)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    from lora_llava.thirdparty import settle

    settle(argv[0] if argv and argv[0] in VERBS else "lora-llava")  # before any third-party import
    from lora_llava.distributed import barrier, world

    rank = world().rank
    if rank:  # several processes (torchrun, accelerate launch): the first one speaks; the others only on errors
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    parser = build_parser()
    global _ARGV
    _ARGV = argv
    args = parser.parse_args(_options_first(parser, argv))
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    try:
        code = int(args._run(args) or 0)
        sys.stdout.flush()  # a closed pipe is found here, not at interpreter exit
        return code
    except BrokenPipeError:  # the reader stopped (lora-llava recipes --keys | head): no traceback, no more output
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except UserError as e:
        _after_the_first(rank)
        print(f"error{f' (process {rank})' if rank else ''}: {e}", file=sys.stderr)
        return 2
    except TrainingStopped as e:
        from lora_llava.cli.common import stopped_message

        if world().size > 1:  # every process saved its part and stopped: they leave together, with this status
            import signal

            signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the launcher stops the rest once one has left
            barrier()
        if not rank:  # the first process says where the checkpoint is and how to resume
            print(stopped_message(e), file=sys.stderr)
        return e.exit_code
    except Exception as e:
        if not _disk_full(e):
            if not isinstance(e, OSError) or e.filename is None:  # not a file a user named or can fix: shown as is
                raise
            _after_the_first(rank)
            print(f"error{f' (process {rank})' if rank else ''}: {e.strerror or e}: {e.filename}", file=sys.stderr)
            print("hint: check that the path exists and that you may read or write it (and that the disk has room)",
                  file=sys.stderr)  # fmt: skip
            return 2
        where = f": {e.filename}" if isinstance(e, OSError) and e.filename else ""
        print(f"error: no space left on the device{where}", file=sys.stderr)
        print("hint: free space (or write elsewhere: output_dir=..., another merge target) and run the command "
              "again; a training run continues from its last whole checkpoint with train.resume=true", file=sys.stderr)  # fmt: skip
        return 2
    except KeyboardInterrupt:
        from lora_llava.cli.common import interrupted_message

        print(interrupted_message(), file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
