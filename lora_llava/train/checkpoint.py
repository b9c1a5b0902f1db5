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
