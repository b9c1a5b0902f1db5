"""The transformers Trainer as lora_llava runs it: arguments from the recipe, trained-parts checkpoints,
the modality-length grouped sampler, and batches that reach no trainable weight.

Usage::

    args = training_arguments(recipe, run_dir)
    trainer = LlavaTrainer(spec=spec, recipe=recipe, lengths=lengths, has_image=has_image, model=model, args=args,
                           train_dataset=dataset, data_collator=collator, optimizers=(optimizer, None),
                           callbacks=[...])
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from lora_llava.annotations import Model
from lora_llava.artifacts import LORA_WEIGHTS_FILE, RECIPE_FILE, RUN_FILE, RunDir
from lora_llava.backbones.registry import BackboneSpec
from lora_llava.compat import CompatTrainer
from lora_llava.config.load import save_recipe
from lora_llava.config.schema import Recipe
from lora_llava.data.sampler import ModalityLengthGroupedSampler
from lora_llava.model.trained_parts import has_lora, restore_trained_parts, save_trained_parts
from lora_llava.training.checkpoint import STAGING


def training_arguments(recipe: Recipe, run_dir: Path) -> Any:
    """The recipe's ``train`` section as TrainingArguments (checkpoints go to the staging folder)."""
    from transformers import TrainingArguments

    t = recipe.train
    cuda = torch.cuda.is_available()
    bf16 = cuda and recipe.quantization.compute_dtype == "bfloat16"
    fp16 = cuda and recipe.quantization.compute_dtype == "float16"
    if t.report_to == "wandb":
        if t.wandb_project:
            os.environ.setdefault("WANDB_PROJECT", t.wandb_project)
        os.environ.setdefault("WANDB_DIR", str(run_dir))  # wandb's files beside the run, not in the current directory
    return TrainingArguments(
        output_dir=str(RunDir(run_dir).checkpoints / STAGING),
        per_device_train_batch_size=t.batch_size,
        gradient_accumulation_steps=t.grad_accum,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler,
        warmup_steps=min(t.warmup_ratio, 0.999),  # transformers reads a value >= 1 as a number of steps
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        num_train_epochs=t.epochs,
        max_steps=t.max_steps or -1,
        logging_steps=t.logging_steps,
        save_strategy="steps" if t.save_steps else "no",
        save_steps=t.save_steps or 500,
        report_to=[] if t.report_to == "none" else [t.report_to],
        seed=t.seed,
        data_seed=t.seed,
        bf16=bf16,
        fp16=fp16,
        use_cpu=not cuda,
        remove_unused_columns=False,
        dataloader_num_workers=t.dataloader_workers,
        gradient_checkpointing=False,  # enabled on the model itself (non-reentrant)
        disable_tqdm=False,
        logging_first_step=True,
    )


class LlavaTrainer(CompatTrainer):
    """Checkpoints hold the trained parts and the recipe; ``lengths`` (one per training sample, with
    ``has_image``) switch on LLaVA's modality-length grouped batches."""

    def __init__(
        self,
        *args: Any,
        spec: BackboneSpec,
        recipe: Recipe,
        lengths: list[int] | None = None,
        has_image: list[bool] | None = None,
        run_id: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.spec = spec
        self.recipe = recipe
        self.lengths = lengths
        self.has_image = has_image
        self.run_id = run_id
        self.loss_before = 0.0  # summed step losses of the steps a resumed run did not train itself
        self._loss_sum: Any = 0.0  # summed step losses trained here (a tensor on the training device)

    def training_step(self, model: Model, inputs: dict, num_items_in_batch: Any = None) -> Any:
        loss = super().training_step(model, inputs, num_items_in_batch)
        self._loss_sum = self._loss_sum + loss.detach()
        return loss

    def loss_sum(self) -> float:
        """The summed per-step training loss of the whole run, resumed steps included."""
        return self.loss_before + float(self._loss_sum)

    def mean_loss(self) -> float:
        """The run's mean training loss over all its steps: what an uninterrupted run reports."""
        return self.loss_sum() / max(self.state.global_step, 1)

    def train_sampler(self, dataset: Any) -> Any:
        if self.lengths is None or self.has_image is None:
            return None
        if len(dataset) != len(self.lengths):
            raise RuntimeError(
                f"length-grouped sampler built for {len(self.lengths)} samples, dataset has {len(dataset)}"
            )
        return ModalityLengthGroupedSampler(self.lengths, self.has_image, self.args.train_batch_size, self.args.seed)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """What a checkpoint holds: the trained parts, and the recipe resuming checks against."""
        out = Path(output_dir or self.args.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        save_trained_parts(self.model, self.spec, self.recipe, out)
        save_recipe(self.recipe, out / RECIPE_FILE)
        # whose checkpoint this is, and the loss summed so far (a resumed run reports the whole run's mean)
        (out / RUN_FILE).write_text(json.dumps({"run_id": self.run_id, "loss_sum": self.loss_sum()}))

    def load_checkpoint_weights(self, checkpoint: str, model: Model) -> None:
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        ckpt = Path(checkpoint)
        if has_lora(ckpt):
            result = set_peft_model_state_dict(model, load_file(ckpt / LORA_WEIGHTS_FILE))
            missing = [k for k in result.missing_keys if "lora_" in k]
            if missing:
                raise ValueError(f"{ckpt}: checkpoint lacks LoRA weights {missing[:3]}")
        trainable = {id(p) for p in model.parameters() if p.requires_grad}
        restore_trained_parts(model, self.spec, ckpt)
        if (ckpt / RUN_FILE).is_file():
            self.loss_before = float(json.loads((ckpt / RUN_FILE).read_text()).get("loss_sum") or 0.0)
        for p in model.parameters():  # restoring must not change what trains
            p.requires_grad_(id(p) in trainable)

    def compute_loss(
        self, model: Model, inputs: dict, return_outputs: bool = False, num_items_in_batch: Any = None
    ) -> Any:
        out = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        loss = out[0] if return_outputs else out
        if not loss.requires_grad:
            # a batch that reaches no trainable weight (text-only samples while only image-side parts
            # train): a zero-gradient step keeps the run going instead of failing in backward
            p = next(p for p in model.parameters() if p.requires_grad)
            loss = loss + 0.0 * p.reshape(-1)[0]
            out = (loss, *out[1:]) if return_outputs else loss
        return out
