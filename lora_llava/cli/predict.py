"""lora-llava predict: answers for a data file or a folder of images, written to JSON lines as they come."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Any

from lora_llava.cli.sources import add_source_arguments

if TYPE_CHECKING:
    from lora_llava.workflows import EvalPlan

HELP = "answer every sample of a data file, or every image of a folder, into a JSON-lines file (resumable)"
EPILOG = """examples:
  lora-llava predict runs/my-run --images photos/ --prompt "What is shown?" --out preds.jsonl
  lora-llava predict runs/my-run --data test.json --image-folder images --out preds.jsonl --reference
  lora-llava predict merged/my-llava --data support.jsonl --columns '{conversations: dialog}' --out p.jsonl

the first line records what wrote the file: {"lora_llava_predictions": {model, data or images and prompt,
max_new_tokens, ...}}; then one line per sample: {"id", "prompt", "prediction", "image"} (+ "reference",
"correct" with --reference); an unreadable sample is a line {"id", "error"} with the reason. Run it again
after an interruption: with the same settings, ids already in --out are skipped, so every sample is written
exactly once; with other settings (another model, --prompt, --data, --max-new-tokens, ...) it is refused,
naming what differs, unless --overwrite starts the file again. A file with no such first line (written by
an earlier lora-llava) is resumed with a warning. A file that is not a predictions file is never changed.
One run at a time per --out: a run holds .NAME.lock beside it, and a second one is refused, naming its pid."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL", help="run directory, adapter, merged directory or backbone name")
    add_source_arguments(p, data_default="none: give --data or --images")
    p.add_argument("--images", default=None, metavar="DIR", help="a folder of images (instead of --data)")
    p.add_argument("--prompt", default=None, help="with --images: the question asked about each image")
    p.add_argument("--out", required=True, help="the JSON-lines file answers are appended to")
    p.add_argument("--reference", action="store_true", help="score each answer against the sample's last answer")
    p.add_argument("--max-new-tokens", type=int, default=None, help="longest answer (default: the run's eval setting)")
    p.add_argument("--batch-size", type=int, default=None, help="samples generated together (default: the run's)")
    p.add_argument("--load-in-4bit", action="store_true", help="a merged model's language model in 4-bit NF4")
    p.add_argument(
        "--overwrite", action="store_true", help="start --out again (its answers dropped) instead of resuming it"
    )


def run(args: argparse.Namespace) -> int:
    from lora_llava.errors import UserError
    from lora_llava.predict import predict_settings, predictions_lock
    from lora_llava.workflows import eval_plan

    if (args.data is None) == (args.images is None):
        raise UserError("give either --data FILE or --images DIR (with --prompt)")
    if args.images is not None and not args.prompt:
        raise UserError("--images needs --prompt: the question asked about each image")
    if args.reference and args.images is not None:
        raise UserError("--reference needs --data: a folder of images has no reference answers")
    plan = eval_plan(
        args.model, args.data, image_folder=args.image_folder, data_format=args.format, split=args.split,
        columns=args.columns, roles=args.roles, prompt_style=args.prompt_style, images=args.images,
        prompt=args.prompt, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, bad="keep",
    )  # fmt: skip
    assert plan.artifact is not None
    settings = predict_settings(
        plan.artifact, data=args.data, image_folder=args.image_folder, data_format=args.format, split=args.split,
        columns=args.columns, roles=args.roles, prompt_style=args.prompt_style, images=args.images,
        prompt=args.prompt, max_new_tokens=plan.max_new_tokens, reference=args.reference,
        load_in_4bit=args.load_in_4bit,
    )  # fmt: skip
    with predictions_lock(args.out):  # one run per --out, from before it is read until the last answer is written
        return _run(args, plan, settings)


def _run(args: argparse.Namespace, plan: EvalPlan, settings: dict[str, Any]) -> int:
    from lora_llava.cli.common import cpu_threads_for
    from lora_llava.infer import load_model
    from lora_llava.predict import open_predictions, predict

    assert plan.artifact is not None
    found = open_predictions(args.out, settings, overwrite=args.overwrite)  # refused here, before the model loads
    if found.warning:
        print(found.warning, file=sys.stderr)
    for b in plan.bad:
        print(f"bad sample: {b.describe()}", file=sys.stderr)
    backbone = getattr(plan.artifact.meta, "backbone", None)
    cpu_threads_for(backbone or args.model)
    loaded = load_model(args.model, quantize=args.load_in_4bit)
    summary = predict(
        loaded, plan.samples, plan.bad, args.out, reference=args.reference, batch_size=plan.batch_size,
        max_new_tokens=plan.max_new_tokens, settings=settings, overwrite=args.overwrite,
    )  # fmt: skip
    line = f"wrote {summary.written} answer(s) to {args.out}"
    if summary.skipped:
        line += f"; {summary.skipped} already there (skipped)"
    if summary.errors:
        line += f"; {summary.errors} unreadable sample(s) written as error lines"
    print(line)
    if args.reference and summary.scored and summary.correct is not None:
        print(
            f"accuracy {summary.correct / summary.scored:.3f} ({summary.correct}/{summary.scored}) on this run's answers"
        )
    return 0
