"""lora-llava eval: exact-match accuracy of greedy answers on a run's eval data or any data file."""

from __future__ import annotations

import argparse
import json
import sys

from lora_llava.cli.sources import add_source_arguments

HELP = "score a run, adapter, merged model or backbone by exact match of greedy answers"
EPILOG = """examples:
  lora-llava eval runs/quickstart                       (the run's own eval data, generation settings of its recipe)
  lora-llava eval runs/quickstart --data runs/quickstart/data/eval.json --image-folder runs/quickstart/data/images
  lora-llava eval runs/quickstart/merged --data eval.json --image-folder images --json
  lora-llava eval tiny --data eval.json --image-folder images          (the untrained base)
  lora-llava eval runs/x --data support.jsonl --columns '{conversations: dialog, image: img_path}' \
      --roles '{user: [customer], assistant: [agent]}' --prompt-style short_answer
  lora-llava eval runs/x --data vqa_folder --split test                 (a DatasetDict folder's test split)

each sample's last answer is the reference; case, quotes and trailing punctuation are ignored, but an
answer that is only punctuation (?, ...) must match as written and an empty answer never scores.
--max-new-tokens and --batch-size default to the run's recipe (eval section; for a merged model, the recipe
of the adapter it was merged from), else 16 and 8"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL", help="run directory, adapter directory, merged directory or backbone name")
    add_source_arguments(p)
    p.add_argument("--json", action="store_true", help="print one JSON object (accuracy, n, correct, predictions)")
    p.add_argument("--max-samples", type=_positive, default=None, help="score the first N samples")
    p.add_argument("--max-new-tokens", type=_positive, default=None, help="longest answer (default: the run's)")
    p.add_argument("--batch-size", type=_positive, default=None, help="samples generated together (default: the run's)")
    p.add_argument("--skip-bad", action="store_true", help="score the good samples and list the bad ones")


def _positive(text: str) -> int:
    import argparse

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def run(args: argparse.Namespace) -> int:
    from lora_llava.artifacts import open_artifact
    from lora_llava.cli.common import cpu_threads_for
    from lora_llava.infer import evaluate, format_predictions, load_model
    from lora_llava.workflows import eval_plan

    art = open_artifact(args.model)
    cpu_threads_for(getattr(art.meta, "backbone", None) or args.model)
    loaded = load_model(args.model)
    plan = eval_plan(
        args.model, args.data, image_folder=args.image_folder, data_format=args.format, split=args.split,
        columns=args.columns, roles=args.roles, prompt_style=args.prompt_style, max_samples=args.max_samples,
        max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, bad="skip" if args.skip_bad else "error",
        encoder=loaded.encoder,
    )  # fmt: skip
    result = evaluate(loaded, plan.samples, plan.max_new_tokens, plan.batch_size)
    if result.note:
        print(result.note, file=sys.stderr)
    if args.json:
        print(json.dumps(result.to_json()))
    else:
        print(format_predictions(result))
        print(
            f"accuracy {result.accuracy:.3f} ({result.correct}/{result.n}) — {loaded.kind} {loaded.ref} on {plan.where}"
        )
    return 0
