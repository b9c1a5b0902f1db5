"""lora-llava chat: talk to a run, adapter, merged model or backbone in the terminal, answers streamed."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lora_llava.chat import ChatSession

HELP = "chat with a model in the terminal: multi-turn, an image, answers streamed as they are generated"
EPILOG = """examples:
  lora-llava chat runs/quickstart --image runs/quickstart/data/images/eval_0000.png
  lora-llava chat merged/my-llava --load-in-4bit --temperature 0.7
  echo "What color is the shape?" | lora-llava chat runs/quickstart --image shape.png   (answers and exits)

in the chat:
  /image PATH   talk about another image (a new conversation)
  /reset        start the conversation again (same image)
  /save FILE    append the conversation to FILE as a LLaVA-Instruct record (a way to collect corrections)
  /help         these commands
Ctrl-C stops an answer (or clears the line); Ctrl-D exits"""

COMMANDS = "/image PATH, /reset, /save FILE, /help; Ctrl-C stops an answer, Ctrl-D exits"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL", help="run directory, adapter, merged directory or backbone name")
    p.add_argument("--image", default=None, help="the image to talk about (changeable with /image)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--load-in-4bit", action="store_true", help="a merged model's language model in 4-bit NF4")


def run(args: argparse.Namespace) -> int:
    from lora_llava.artifacts import open_artifact
    from lora_llava.chat import ChatSession, GenerationSettings
    from lora_llava.cli.common import cpu_threads_for
    from lora_llava.errors import UserError
    from lora_llava.infer import load_model

    if args.max_new_tokens < 1 or args.temperature < 0 or not 0 < args.top_p <= 1:
        raise UserError("--max-new-tokens must be >= 1, --temperature >= 0, and --top-p in (0, 1]")
    art = open_artifact(args.model)
    if args.load_in_4bit and not art.is_model_dir:
        raise UserError(
            f"--load-in-4bit is for a merged or plain model directory; {args.model!r} is {art.description}",
            hint="a run or adapter already loads its base as it was trained",
        )
    cpu_threads_for(getattr(art.meta, "backbone", None) or args.model)
    loaded = load_model(args.model, quantize=args.load_in_4bit)
    settings = GenerationSettings(args.max_new_tokens, args.temperature, args.top_p)
    session = ChatSession(loaded, args.image, settings)
    interactive = sys.stdin.isatty()
    if interactive:
        _enable_history()
        fmt = loaded.encoder.fmt
        print(f"lora-llava chat: {loaded.kind} {loaded.ref} (chat format {fmt.name}); image: {session.image or 'none'}")
        print(f"commands: {COMMANDS}")
    while True:
        try:
            line = input("you> " if interactive else "")
        except EOFError:
            if interactive:
                print()
            return 0
        except KeyboardInterrupt:  # Ctrl-C at the prompt: a fresh line
            print()
            continue
        line = line.strip()
        if not line:
            continue
        try:
            if line.startswith("/"):
                _command(session, line)
                continue
            _answer(session, line, interactive)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)


def _answer(session: ChatSession, line: str, interactive: bool) -> None:
    if interactive:
        print("model> ", end="", flush=True)
    try:
        session.ask(line, on_text=lambda piece: print(piece, end="", flush=True))
        print()
    except KeyboardInterrupt:  # Ctrl-C while answering: the answer stops, the chat goes on
        session.stop()
        print(" [stopped]")


def _command(session: ChatSession, line: str) -> None:
    from lora_llava.errors import UserError

    name, _, arg = line.partition(" ")
    arg = arg.strip()
    if name == "/image":
        if not arg:
            raise UserError("/image needs a path: /image photo.jpg")
        session.set_image(arg)
        print(f"image: {session.image} (a new conversation)")
    elif name == "/reset":
        session.reset()
        print("conversation reset")
    elif name == "/save":
        if not arg:
            raise UserError("/save needs a file: /save corrections.json")
        print(f"saved to {session.save(arg)}")
    elif name in ("/help", "/?"):
        print(f"commands: {COMMANDS}")
    else:
        raise UserError(f"unknown command {name!r}; commands: {COMMANDS}")


def _enable_history() -> None:
    """Readline line editing and a history kept between chats."""
    try:
        import atexit
        import readline

        from lora_llava.backbones.tiny import cache_root

        history = Path(cache_root()) / "chat_history"
        history.parent.mkdir(parents=True, exist_ok=True)
        if history.is_file():
            readline.read_history_file(str(history))
        readline.set_history_length(1000)
        atexit.register(readline.write_history_file, str(history))
    except (ImportError, OSError):
        pass
