"""Resumable checkpoints that are whole or absent, verifiable, bounded in number, and adapters.

Usage::

    args = training_arguments(recipe, run_dir)      # the Trainer writes checkpoints into a staging folder ...
    PublishCheckpoints(run.checkpoints, keep=2)     # ... this callback seals each, renames it into place, rotates
    ckpt = resume_point(recipe, run_dir, log)       # the checkpoint train.resume continues from, checked

Every ``train.save_steps`` steps (and when a stop signal arrives) the Trainer writes ``checkpoint-N``
into ``<output_dir>/checkpoints/.staging``: an adapter (LoRA, projector, processor, recipe, metadata:
``eval``, ``chat``, ``predict`` and ``merge`` take it like the final one), the optimizer, scheduler,
RNG and trainer state. Once written (the Trainer's ``on_save``), its files are flushed to disk and listed
with their sizes and SHA-256 in ``manifest.json``, and the folder is renamed to
``<output_dir>/checkpoints/checkpoint-N``: a save interrupted half-way never appears under its final name,
and resuming takes the newest checkpoint whose files still match their manifest. With
``train.keep_checkpoints`` older checkpoints are deleted only after the new one is in place; the best by
eval accuracy (``eval.json``, with ``train.eval_steps``) is kept besides. The frozen base is never copied.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from lora_llava.annotations import Log
from lora_llava.config.load import load_recipe, recipe_to_dict
from lora_llava.config.schema import Recipe
from lora_llava.distributed import barrier, world
from lora_llava.errors import UserError
from lora_llava.layout import (
    CHECKPOINT_EVAL_FILE,
    CHECKPOINT_PREFIX,
    RECIPE_FILE,
    RUN_FILE,
    TRAINER_STATE_FILE,
    RunDir,
    checkpoint_run_id,
    checkpoint_step,
    drift_warning,
    fsync_dir,
    read_meta,
    write_manifest,
)

STAGING = ".staging"
# keys a resumed run may change: how long to train, how often to save/log, where metrics go, eval/merge
RESUMABLE_CHANGES = {
    "output_dir",
    "train.resume",
    "train.max_steps",
    "train.epochs",
    "train.save_steps",
    "train.keep_checkpoints",
    "train.eval_steps",
    "train.max_bad_steps",
    "train.logging_steps",
    "train.report_to",
    "train.wandb_project",
    "train.dataloader_workers",
    "train.supervised_logits",
}
RESUMABLE_SECTIONS = ("eval.", "merge.")


class PublishCheckpoints(TrainerCallback):
    """Seals each checkpoint the Trainer wrote (eval result, manifest, fsync), renames it into place, and
    deletes the ones ``keep`` (keep-last-N) no longer needs — never the best by eval accuracy."""

    def __init__(
        self,
        checkpoints: Path,
        keep: int | None = None,
        eval_at: Callable[[int], dict | None] | None = None,
        main: bool = True,
    ) -> None:
        self.checkpoints = checkpoints
        self.main = main  # several processes: each wrote its part of the staged checkpoint, the first one seals it
        self.keep = keep
        self.eval_at = eval_at  # the in-training eval's result at a step: {"step", "accuracy", "eval_loss", ...}
        self.latest: Path | None = None  # the checkpoint this run published last

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        barrier()  # every process's files (their random-number states) are in the staged checkpoint
        name = f"{CHECKPOINT_PREFIX}{state.global_step}"
        self.latest = self.checkpoints / name
        if not self.main:
            return
        staged = Path(args.output_dir) / name
        result = self.eval_at(state.global_step) if self.eval_at is not None else None
        if result is not None:
            (staged / CHECKPOINT_EVAL_FILE).write_text(json.dumps(result))
        write_manifest(staged)
        target = self.checkpoints / name
        if target.exists():
            shutil.rmtree(target)
        staged.rename(target)
        fsync_dir(self.checkpoints)
        self.latest = target
        if self.keep:
            for old in rotate(self.checkpoints, self.keep):
                shutil.rmtree(old, ignore_errors=True)


def _world_size_of(ckpt: Path) -> int:
    """How many processes trained the run up to ``ckpt`` (1 for checkpoints written before it was recorded)."""
    try:
        return int(json.loads((ckpt / RUN_FILE).read_text()).get("world_size") or 1)
    except (OSError, ValueError, AttributeError):
        return 1


def checkpoint_eval(path: Path) -> dict | None:
    try:
        return json.loads((path / CHECKPOINT_EVAL_FILE).read_text())
    except (OSError, ValueError):
        return None


def best_checkpoint(checkpoints: Path) -> Path | None:
    """The checkpoint with the highest eval accuracy (then the lowest eval loss, then the earliest), or None."""
    scored: list[tuple[Path, dict]] = []
    for p in RunDir(checkpoints.parent).checkpoint_dirs():
        e = checkpoint_eval(p)
        if e is not None and e.get("accuracy") is not None:
            scored.append((p, e))
    if not scored:
        return None
    return max(scored, key=lambda pe: (pe[1]["accuracy"], -(pe[1].get("eval_loss") or 0.0), -checkpoint_step(pe[0])))[0]


def rotate(checkpoints: Path, keep: int) -> list[Path]:
    """The checkpoints keep-last-``keep`` deletes: all but the newest ``keep`` and the best by eval accuracy."""
    newest_first = RunDir(checkpoints.parent).checkpoint_dirs()
    best = best_checkpoint(checkpoints)
    return [p for p in newest_first[keep:] if p != best]


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


def resume_point(recipe: Recipe, run_dir: str | os.PathLike, log: Log = print) -> Path:
    """The checkpoint ``train.resume`` continues from: the newest whose every file matches its manifest's
    SHA-256 (damaged newer ones are skipped with a warning), checked to fit the recipe (no model loaded)."""
    run = RunDir(run_dir)
    skipped: list[str] = []
    ckpt = run.latest_checkpoint(hashes=True, skipped=skipped)
    for line in skipped:
        log(f"warning: skipping {line}")
    warning = drift_warning(read_meta(ckpt), ckpt) if ckpt is not None else None
    if warning:
        log(warning)
    if ckpt is None:
        raise UserError(
            f"train.resume: no complete checkpoint in {run.checkpoints}"
            + (f" ({len(skipped)} damaged or incomplete: {'; '.join(skipped)})" if skipped else ""),
            hint="train once with train.save_steps set; or start the run over: drop train.resume and add --overwrite",
        )
    if (ckpt / RECIPE_FILE).is_file():
        then = _flat(recipe_to_dict(load_recipe(ckpt / RECIPE_FILE)))
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
    then_world, now_world = _world_size_of(ckpt), world().size
    if then_world != now_world:
        raise UserError(
            f"train.resume: {ckpt} was trained by {then_world} process(es), this run has {now_world}: each optimizer "
            "step's samples and the place in the epoch depend on that number, so the resumed run would train on "
            "samples twice or skip some",
            hint=f"resume with {then_world} process(es)"
            + (f" (torchrun --nproc_per_node {then_world} -m lora_llava train ...)" if then_world > 1 else
               " (lora-llava train ..., without torchrun)"),
        )  # fmt: skip
    step = checkpoint_global_step(ckpt)
    if recipe.train.max_steps is not None and step >= recipe.train.max_steps:
        raise UserError(
            f"train.resume: {ckpt.name} already reached train.max_steps={recipe.train.max_steps}; nothing to resume",
            hint="raise train.max_steps to train further",
        )
    return ckpt
