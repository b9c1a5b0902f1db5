"""Resumable checkpoints that are whole or absent, holding exactly the trained parts.

Usage::

    args = training_arguments(recipe, run_dir)      # the Trainer writes checkpoints into a staging folder ...
    PublishCheckpoints(run.checkpoints)             # ... and this callback renames each into place when whole
    ckpt = resume_point(recipe, run_dir)            # the checkpoint train.resume continues from, checked

Every ``train.save_steps`` steps the Trainer writes ``checkpoint-N`` into
``<output_dir>/checkpoints/.staging``: the LoRA weights (if any), the projector (and image newline),
the vision tower when trained fully, the recipe, the optimizer, scheduler, RNG and trainer state.
Once the Trainer has finished writing it (its ``on_save`` event), it is renamed to
``<output_dir>/checkpoints/checkpoint-N``: a checkpoint interrupted half-way never appears under its
final name, so resuming always starts from a whole one. The frozen base weights are not copied.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from lora_llava.artifacts import CHECKPOINT_PREFIX, TRAINER_STATE_FILE, RunDir, checkpoint_run_id
from lora_llava.config.load import load_recipe, recipe_to_dict
from lora_llava.config.schema import Recipe
from lora_llava.errors import UserError

STAGING = ".staging"
# keys a resumed run may change: how long to train, how often to save/log, where metrics go, eval/merge
RESUMABLE_CHANGES = {
    "output_dir",
    "train.resume",
    "train.max_steps",
    "train.epochs",
    "train.save_steps",
    "train.logging_steps",
    "train.report_to",
    "train.wandb_project",
    "train.dataloader_workers",
}
RESUMABLE_SECTIONS = ("eval.", "merge.")


class PublishCheckpoints(TrainerCallback):
    """Moves each checkpoint from the staging folder to its final name once the Trainer has written it."""

    def __init__(self, checkpoints: Path) -> None:
        self.checkpoints = checkpoints

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        name = f"{CHECKPOINT_PREFIX}{state.global_step}"
        staged = Path(args.output_dir) / name
        target = self.checkpoints / name
        if target.exists():
            shutil.rmtree(target)
        staged.rename(target)


def clean_staging(checkpoints: Path) -> None:
    """Remove what an interrupted save left in the staging folder (and the folders when empty)."""
    shutil.rmtree(checkpoints / STAGING, ignore_errors=True)
    if checkpoints.is_dir() and not any(checkpoints.iterdir()):
        checkpoints.rmdir()


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def checkpoint_global_step(checkpoint: Path) -> int:
    return json.loads((checkpoint / TRAINER_STATE_FILE).read_text()).get("global_step", 0)


def resume_point(recipe: Recipe, run_dir: str | os.PathLike) -> Path:
    """The checkpoint ``train.resume`` continues from, after checking it fits the recipe (no model loaded)."""
    run = RunDir(run_dir)
    ckpt = run.latest_checkpoint()
    if ckpt is None:
        raise UserError(
            f"train.resume: no complete checkpoint in {run.checkpoints}",
            hint="train once with train.save_steps set, or drop train.resume",
        )
    if (ckpt / "recipe.yaml").is_file():
        then = _flat(recipe_to_dict(load_recipe(ckpt / "recipe.yaml")))
        now = _flat(recipe_to_dict(recipe))
        changed = sorted(
            k
            for k in then.keys() | now.keys()
            if then.get(k) != now.get(k) and k not in RESUMABLE_CHANGES and not k.startswith(RESUMABLE_SECTIONS)
        )
        if changed:
            diffs = "\n  ".join(f"{k}: {then.get(k)!r} in {ckpt.name}, now {now.get(k)!r}" for k in changed)
            raise UserError(
                f"train.resume: the recipe differs from the one {ckpt} was trained with:\n  {diffs}",
                hint="resume with the same settings (only the length of training, saving, logging, eval and merge "
                "may change), or start a new output_dir",
            )
    ours, theirs = run.run_id(), checkpoint_run_id(ckpt)
    if ours and theirs and ours != theirs:
        raise UserError(
            f"train.resume: {ckpt} belongs to another run (id {theirs}) than {run.path}'s current one (id {ours})",
            hint="resume only the run that wrote the checkpoint; start a new output_dir (or --overwrite) otherwise",
        )
    step = checkpoint_global_step(ckpt)
    if recipe.train.max_steps is not None and step >= recipe.train.max_steps:
        raise UserError(
            f"train.resume: {ckpt.name} already reached train.max_steps={recipe.train.max_steps}; nothing to resume",
            hint="raise train.max_steps to train further",
        )
    return ckpt
