"""Resumable checkpoints that are whole or absent, holding exactly the trained parts.

Usage::

    trainer = CheckpointingTrainer(spec=spec, model=model, args=args, ...)   # a transformers Trainer
    trainer.train(resume_from_checkpoint=latest_checkpoint(run_dir))           # None starts afresh

Every ``train.save_steps`` steps ``<output_dir>/checkpoints/checkpoint-N`` is written into a hidden
staging folder and renamed into place when complete: the LoRA weights (if any), the projector (and
image newline), the vision tower when trained fully, the optimizer, scheduler, RNG and trainer
state. A checkpoint interrupted half-way never appears under its final name, so resuming always
starts from a whole one. The frozen base weights are not copied: they come from the backbone.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from transformers import Trainer

from lora_llava.model.load import has_lora, restore_trained_parts, save_trained_parts

PREFIX = "checkpoint-"
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


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def resume_point(recipe, run_dir: str | os.PathLike) -> Path:
    """The checkpoint ``train.resume`` continues from, after checking it fits the recipe (no model loaded)."""
    import json

    from lora_llava.config.load import load_recipe, recipe_to_dict
    from lora_llava.errors import UserError

    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        raise UserError(
            f"train.resume: no complete checkpoint in {Path(run_dir) / 'checkpoints'}",
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
    step = json.loads((ckpt / "trainer_state.json").read_text()).get("global_step", 0)
    if recipe.train.max_steps is not None and step >= recipe.train.max_steps:
        raise UserError(
            f"train.resume: {ckpt.name} already reached train.max_steps={recipe.train.max_steps}; nothing to resume",
            hint="raise train.max_steps to train further",
        )
    return ckpt


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The complete checkpoint with the most steps, or None."""
    folder = Path(run_dir) / "checkpoints"
    done = [p for p in folder.glob(f"{PREFIX}*") if (p / "trainer_state.json").is_file()]
    return max(done, key=lambda p: int(p.name[len(PREFIX) :]), default=None)


class CheckpointingTrainer(Trainer):
    def __init__(self, *args, spec, recipe, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.spec = spec
        self.recipe = recipe

    # what a checkpoint holds: the trained parts only
    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        out = Path(output_dir or self.args.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        save_trained_parts(self.model, self.spec, self.recipe, out)
        if self.recipe is not None:
            from lora_llava.config.load import save_recipe

            save_recipe(self.recipe, out / "recipe.yaml")  # what resuming checks the recipe against

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        ckpt = Path(resume_from_checkpoint)
        model = model or self.model
        if has_lora(ckpt):
            result = set_peft_model_state_dict(model, load_file(ckpt / "adapter_model.safetensors"))
            missing = [k for k in result.missing_keys if "lora_" in k]
            if missing:
                raise ValueError(f"{ckpt}: checkpoint lacks LoRA weights {missing[:3]}")
        trainable = {id(p) for p in model.parameters() if p.requires_grad}
        restore_trained_parts(model, self.spec, ckpt)
        for p in model.parameters():  # restoring must not change what trains
            p.requires_grad_(id(p) in trainable)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        out = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        loss = out[0] if return_outputs else out
        if not loss.requires_grad:
            # a batch that reaches no trainable weight (text-only samples while only image-side parts
            # train): a zero-gradient step keeps the run going instead of failing in backward
            p = next(p for p in model.parameters() if p.requires_grad)
            loss = loss + 0.0 * p.reshape(-1)[0]
            out = (loss, *out[1:]) if return_outputs else loss
        return out

    # whole or absent
    def _save_checkpoint(self, model, trial) -> None:
        final_root = Path(self.args.output_dir)
        staging = final_root / ".staging"
        shutil.rmtree(staging, ignore_errors=True)
        self.args.output_dir = str(staging)
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self.args.output_dir = str(final_root)
        name = f"{PREFIX}{self.state.global_step}"
        target = final_root / name
        if target.exists():
            shutil.rmtree(target)
        (staging / name).rename(target)
        shutil.rmtree(staging, ignore_errors=True)
