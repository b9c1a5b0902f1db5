"""lora-llava push: upload a run's adapter, or a merged model, to the Hugging Face Hub (private by default)."""

from __future__ import annotations

import argparse

HELP = "upload an adapter or a merged model to the Hugging Face Hub, with a model card (private unless --public)"
EPILOG = """examples:
  lora-llava push runs/my-run me/my-llava-adapter --dry-run      (the repo, visibility and exact files; uploads nothing)
  lora-llava push runs/my-run me/my-llava-adapter
  lora-llava push runs/my-run me/my-llava --merged                (the run's merged/ model)
  lora-llava push merged/my-llava me/my-llava --public --revision v1

the token comes from HF_TOKEN or `hf auth login`, never from a flag; it is never printed or written.
Uploaded: weights (safetensors), configs, processor and chat template, the recipe and metrics with local
paths scrubbed, the merge report, and a model card; never optimizer, scheduler or RNG state."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", metavar="RUN_OR_MERGED_DIR", help="a run directory, its adapter/, or a merged model")
    p.add_argument("repo_id", metavar="REPO_ID", help="owner/name on the Hub")
    p.add_argument(
        "--merged", action="store_true", help="push the run's merged model (RUN/merged) instead of its adapter"
    )
    p.add_argument("--public", action="store_true", help="make a new repo public (default: private)")
    p.add_argument(
        "--dry-run", action="store_true", help="print the repo, visibility, revision and files; upload nothing"
    )
    p.add_argument("--revision", default=None, metavar="BRANCH", help="push to this branch (created if missing)")


def run(args: argparse.Namespace) -> int:
    from lora_llava.publish import plan_push, push

    plan = plan_push(args.source, args.repo_id, merged=args.merged, public=args.public, revision=args.revision)
    print(plan.describe())
    if args.dry_run:
        print("nothing uploaded (--dry-run)")
        return 0
    print(f"pushed: {push(plan)}")
    return 0
