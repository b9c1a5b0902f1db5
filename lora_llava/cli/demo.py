"""lora-llava demo: a browser demo of a model (needs the demo extra: pip install 'lora_llava[demo]')."""

from __future__ import annotations

import argparse

HELP = "serve a browser demo: upload an image, chat, answers streamed, the model's lineage beside (Gradio)"
EPILOG = """examples:
  lora-llava demo runs/quickstart                   (http://127.0.0.1:7860, this machine only)
  lora-llava demo merged/my-llava --port 8080 --load-in-4bit
  lora-llava demo runs/my-run --host 0.0.0.0        (reachable from the network: anyone who can reach it can use it)

uploads over 64 MiB are refused, and an image the training loader refuses (pixels, aspect, format) is refused
and deleted; uploads live in a temporary folder of their own, deleted after an hour and all at exit; errors
are shown with server paths replaced by <local>/<last part>.

needs Gradio: pip install 'lora_llava[demo]'"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL", help="run directory, adapter, merged directory or backbone name")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--load-in-4bit", action="store_true", help="a merged model's language model in 4-bit NF4")


def run(args: argparse.Namespace) -> int:
    from lora_llava.artifacts import open_artifact
    from lora_llava.cli.common import cpu_threads_for
    from lora_llava.errors import UserError

    try:
        import gradio  # noqa: F401
    except ImportError:
        raise UserError("the demo needs Gradio", hint="pip install 'lora_llava[demo]'") from None
    from lora_llava.card import scrub
    from lora_llava.demo import build_app, launch_options, lineage, private_uploads
    from lora_llava.infer import load_model

    art = open_artifact(args.model)
    cpu_threads_for(getattr(art.meta, "backbone", None) or args.model)
    loaded = load_model(args.model, quantize=args.load_in_4bit)
    with private_uploads():  # Gradio's uploads and copies, removed at exit
        app = build_app(loaded, lineage(args.model), title=f"lora-llava demo: {scrub(args.model)}")
        print(f"demo of {loaded.kind} {loaded.ref} at http://{args.host}:{args.port} (Ctrl-C stops it)", flush=True)
        app.queue().launch(**launch_options(args.host, args.port))
    return 0
