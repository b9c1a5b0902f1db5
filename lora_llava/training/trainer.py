"""The transformers Trainer as lora_llava runs it: arguments from the recipe, checkpoints that are
adapters, a NaN/inf guard on every optimizer step, token throughput, the modality-length grouped
sampler, and batches that reach no trainable weight.

Usage::

    args = training_arguments(recipe, run_dir)
    trainer = LlavaTrainer(spec=spec, recipe=recipe, processor=processor, fmt=fmt, samples=train_samples,
                           model=model, args=args, train_dataset=EncodedDataset(samples, encoder, with_index=True),
                           data_collator=Collator(pad_id))
    trainer.train(); trainer.abort.reason   # None, or why the run stopped on bad steps

The optimizer is the recipe's (``optim.make_optimizer``: one group per trained part), made where the Trainer
makes its own (``create_optimizer``), so it sees the model as the Trainer runs it.

The guard: a step whose micro-batch loss or gradient norm is NaN/inf changes neither the weights nor the
optimizer state (the learning-rate schedule moves on), is counted, and named with its samples;
``train.max_bad_steps`` such steps in a row stop the run.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lora_llava.annotations import Log, Model, Processor
from lora_llava.backbones.registry import BackboneSpec
from lora_llava.compat.trainer import CompatTrainer
from lora_llava.config.schema import Recipe
from lora_llava.data.chat import ChatFormat
from lora_llava.data.formats import Sample
from lora_llava.data.sampler import DistributedEpochSampler, ModalityLengthGroupedSampler
from lora_llava.distributed import any_rank, total, world
from lora_llava.layout import LORA_WEIGHTS_FILE, RUN_FILE, RunDir
from lora_llava.model.saving import write_adapter_files
from lora_llava.model.trained_parts import has_lora, restore_trained_parts
from lora_llava.training.callbacks import TokenCounts
from lora_llava.training.checkpoint import STAGING
from lora_llava.training.faults import FaultPlan
from lora_llava.training.loss import supervised_loss
from lora_llava.training.optim import SkippableStep, make_optimizer
from lora_llava.versions import hardware


@dataclass
class Abort:
    """Why a run stops on bad steps (None while it does not): set by the trainer, read by the callback that keeps
    the stopping step from being saved and by the caller."""

    reason: str | None = None


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
        gradient_accumulation_steps=t.accumulation(world().size),
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
        # several processes (DDP): a micro-batch without images leaves the projector (and a trained vision tower)
        # unused on its process; DDP then reduces zeros for it from there, and leaves a part no process used
        # without a gradient, as one process would
        ddp_find_unused_parameters=True,
        disable_tqdm=False,
        logging_first_step=True,
    )


class LlavaTrainer(CompatTrainer):
    """Checkpoints that are adapters and resume; a NaN/inf guard on every optimizer step; token throughput
    in the logs. ``lengths`` (one per training sample, with ``has_image``) switch on LLaVA's
    modality-length grouped batches. An optimizer passed in must be a ``SkippableStep`` (optim.make_optimizer)
    for bad steps to be skipped; without one, the recipe's is made."""

    def __init__(
        self,
        *args: Any,
        spec: BackboneSpec,
        recipe: Recipe,
        processor: Processor | None = None,
        fmt: ChatFormat | None = None,
        samples: list[Sample] | None = None,
        lengths: list[int] | None = None,
        has_image: list[bool] | None = None,
        run_id: str | None = None,
        log: Log = print,
        abort: Abort | None = None,
        faults: FaultPlan | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.abort = abort or Abort()
        self.faults = faults  # the tests' injected faults (LORA_LLAVA_FAULTS); None in every real run
        self.spec = spec
        self.recipe = recipe
        self.processor = processor
        self.fmt = fmt
        self.samples = samples or []
        self.lengths = lengths
        self.has_image = has_image
        self.run_id = run_id
        self.say = log
        self.counts = TokenCounts()
        # the run before a resume: its summed good-step losses and its skipped steps
        self.loss_before = 0.0
        self.bad_before = 0
        self._loss_sum: Any = 0.0  # summed losses of the good steps trained here (on the training device)
        self._step_loss: Any = 0.0  # the current optimizer step's micro-batch losses
        self._step_micro: list[tuple[Any, Any]] = []  # (loss is finite, sample indices) per micro-batch
        self._tokens: Any = None  # (all, padding, supervised) since the last sync, on the training device
        self.bad_steps = 0  # skipped here (not counting the run before a resume)
        self.bad_in_a_row = 0
        self._epoch_sampler: DistributedEpochSampler | None = None  # several processes: told the epoch on a resume
        self._last_log: tuple[float | None, int, int] = (None, 0, 0)  # (time, real, supervised tokens) at the last log
        self._interval = [0, 0]  # good and skipped steps since the last log
        self._interval_loss: Any = 0.0  # summed losses of the good steps since the last log

    def create_optimizer(self, model: Model | None = None) -> Any:
        """The recipe's optimizer (``train.optimizer``, one group per trained part), guarded against bad steps."""
        made: Any = getattr(self, "optimizer", None)
        if made is None:
            made = self.optimizer = make_optimizer(self.model if model is None else model, self.spec, self.recipe)
        return made

    # -------------------------------------------------------------------------------------- per step

    def training_step(self, model: Model, inputs: dict, num_items_in_batch: Any = None) -> Any:
        index = inputs.pop("sample_index", None)
        if self._last_log[0] is None:  # throughput counts from the first step (of this process), not from loading
            self._last_log = (time.time(), self.counts.real, self.counts.supervised)  # a resume's tokens are earlier
        real = inputs.pop("token_mask", None)  # packed rows have no attention_mask: their real tokens
        mask, labels = (real if real is not None else inputs["attention_mask"]), inputs["labels"]
        counted = torch.stack([mask.new_tensor(mask.numel()), (mask == 0).sum(), (labels != -100).sum()])
        self._tokens = counted if self._tokens is None else self._tokens + counted
        loss = super().training_step(model, inputs, num_items_in_batch)
        detached = loss.detach()
        self._step_micro.append((torch.isfinite(detached), index))
        self._step_loss = self._step_loss + torch.nan_to_num(detached, nan=0.0, posinf=0.0, neginf=0.0)
        return loss

    def before_optimizer_step(self, grad_norm: float | None) -> None:
        """Decide whether this step's update happens: not when a micro-batch loss or the gradient norm is
        NaN/inf (an fp16 loss-scale overflow is the scaler's to skip, not a bad step)."""
        finite = [bool(ok) for ok, _ in self._step_micro]
        scaler = getattr(self.accelerator, "scaler", None) is not None
        norm_bad = grad_norm is not None and not math.isfinite(grad_norm) and not scaler
        bad = any_rank(not all(finite) or norm_bad)  # several processes: each skips the step, or none
        self._interval[1 if bad else 0] += 1
        if not bad:
            self._loss_sum = self._loss_sum + self._step_loss
            self._interval_loss = self._interval_loss + self._step_loss
            self.bad_in_a_row = 0
        else:
            step = self.state.global_step + 1
            culprits = [i for (ok, idx), f in zip(self._step_micro, finite) if not f and idx is not None for i in idx]
            if not culprits and norm_bad:  # only the gradient norm: every micro-batch of the step
                culprits = [i for _, idx in self._step_micro if idx is not None for i in idx]
            what = "loss" if not all(finite) else "gradient norm" if norm_bad else "loss (on another process)"
            names = ", ".join(self._where(int(i)) for i in culprits[:8]) or "another process's"
            more = f" and {len(culprits) - 8} more" if len(culprits) > 8 else ""
            self.bad_steps += 1
            self.bad_in_a_row += 1
            self.say(f"warning: step {step} skipped: {what} is NaN/inf (no update); its batch: {names}{more}")
            if self.optimizer is not None:
                _guarded(self.optimizer).skip = True
            if self.bad_in_a_row >= self.recipe.train.max_bad_steps:
                self.abort.reason = (
                    f"{self.bad_in_a_row} optimizer steps in a row (to step {step}) had a NaN/inf {what}; each was "
                    f"skipped, so the weights are those of step {step - self.bad_in_a_row}. The last batch: {names}{more}"
                )
                self.control.should_training_stop = True
        self._step_loss = 0.0
        self._step_micro = []

    def compute_loss(
        self, model: Model, inputs: dict, return_outputs: bool = False, num_items_in_batch: Any = None
    ) -> Any:
        if self.recipe.train.supervised_logits and not return_outputs and "labels" in inputs:
            # logits only where there are labels; the loss the model's own forward computes (training.loss)
            items = num_items_in_batch if self.model_accepts_loss_kwargs else None
            out = supervised_loss(model, inputs, items)
            if items is not None and self.args.average_tokens_across_devices:
                # the tokens were counted over every process; the gradients are averaged over them (as the
                # Trainer's own compute_loss scales)
                out = out * self.accelerator.num_processes
        else:
            out = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        loss = out[0] if return_outputs else out
        if not loss.requires_grad:
            # a batch that reaches no trainable weight (text-only samples while only image-side parts
            # train): a zero-gradient step keeps the run going instead of failing in backward
            p = next(p for p in model.parameters() if p.requires_grad)
            loss = loss + 0.0 * p.reshape(-1)[0]
        if self.faults is not None:
            loss = self.faults.on_loss(self.state.global_step + 1, loss)
        return (loss, *out[1:]) if return_outputs else loss

    # ------------------------------------------------------------------------------------ the numbers

    def sync_counts(self) -> TokenCounts:
        """The token counts so far, brought over from the training device."""
        if self._tokens is not None or self.args.world_size > 1:  # several processes: each one's, summed
            mine = [float(x) for x in self._tokens.tolist()] if self._tokens is not None else [0.0, 0.0, 0.0]
            tokens, pad, supervised = (int(x) for x in total(mine))
            self.counts.tokens += tokens
            self.counts.pad += pad
            self.counts.supervised += supervised
            self._tokens = None
        return self.counts

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Adds tokens/s (real and supervised, since the last log), the padding share and skipped steps."""
        if "learning_rate" in logs:  # a training row
            good, skipped = self._interval
            if skipped:  # the Trainer fills a NaN step with an average; report the good steps' mean, or none
                logs.pop("loss", None)
                if good:  # several processes: the mean of theirs, as the Trainer's own loss
                    logs["loss"] = total([float(self._interval_loss)])[0] / self.args.world_size / good
            self._interval, self._interval_loss = [0, 0], 0.0
            c = self.sync_counts()
            now = time.time()
            then, real, supervised = self._last_log
            elapsed = max(now - (then or now), 1e-9)
            logs["tokens_per_s"] = round((c.real - real) / elapsed, 1)
            logs["supervised_tokens_per_s"] = round((c.supervised - supervised) / elapsed, 1)
            self._last_log = (now, c.real, c.supervised)
            if torch.cuda.is_available() and self.args.device.type == "cuda":  # this process's GPU, peak so far
                logs["gpu_memory_gib"] = round(torch.cuda.max_memory_allocated(self.args.device) / 2**30, 2)
        if "train_loss" in logs:  # the run's mean over its good steps, resumed or not (not the Trainer's average)
            logs["train_loss"] = self.mean_loss()
        if "learning_rate" in logs or "train_loss" in logs:
            logs["padding_fraction"] = round(self.sync_counts().fraction, 4)
            logs["skipped_steps"] = self.bad_before + self.bad_steps
        super().log(logs, start_time)

    def _where(self, index: int) -> str:
        """A training sample named as bad-sample reports name it (file, sample or line, id)."""
        return self.samples[index].where() if index < len(self.samples) else f"training sample {index}"

    def loss_sum(self) -> float:
        """The summed training loss of the run's good steps, resumed steps included."""
        return self.loss_before + total([float(self._loss_sum)])[0] / self.args.world_size

    def good_steps(self) -> int:
        return self.state.global_step - self.bad_before - self.bad_steps

    def mean_loss(self) -> float:
        """The run's mean training loss over its good steps: what an uninterrupted run reports."""
        return self.loss_sum() / max(self.good_steps(), 1)

    def train_sampler(self, dataset: Any) -> Any:
        if self.lengths is not None and len(dataset) != len(self.lengths):
            raise RuntimeError(
                f"length-grouped sampler built for {len(self.lengths)} samples, dataset has {len(dataset)}"
            )
        if self.args.world_size > 1:  # whole global batches, cut per process (the dataset: data.batching.Repeats)
            self._epoch_sampler = DistributedEpochSampler(
                len(dataset), self.args.per_device_train_batch_size, self.args.world_size, self.args.seed,
                self.lengths, self.has_image,
            )  # fmt: skip
            return self._epoch_sampler
        if self.lengths is None or self.has_image is None:
            return None
        return ModalityLengthGroupedSampler(self.lengths, self.has_image, self.args.train_batch_size, self.args.seed)

    def get_resumed_dataloader(self, dataloader: Any, num_batches: int) -> Any:
        """Resuming in the middle of an epoch: that epoch's order. The Trainer then sets the epoch on the
        skipping loader, which does not reach a sampler under accelerate's per-process batch sharding, so the
        sampler of several processes is told here (the batches trained before this epoch, over its length)."""
        if self._epoch_sampler is not None:
            done = self.state.global_step * self.args.gradient_accumulation_steps - num_batches
            self._epoch_sampler.set_epoch(done // max(len(dataloader), 1))
        return super().get_resumed_dataloader(dataloader, num_batches)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """What a checkpoint holds besides the Trainer's states: an adapter (so every checkpoint can be
        evaluated, chatted with, merged), and the run's id and loss so far (for resuming)."""
        if self.processor is None or self.fmt is None:
            raise TypeError("LlavaTrainer needs processor= and fmt= to write checkpoints")
        out = Path(output_dir or self.args.output_dir)
        step = self.state.global_step
        # every process takes part in the sums; the first one writes
        loss_sum, mean_loss = self.loss_sum(), self.mean_loss()
        c = self.sync_counts()  # the run's token counts so far: a resumed run reports its whole padding share
        if not self.args.should_save:
            return
        out.mkdir(parents=True, exist_ok=True)
        extra = {"train_loss": mean_loss, "steps": step, "train_samples": len(self.samples), "hardware": hardware()}
        faults = self.faults
        between = (lambda: faults.in_save(step)) if faults is not None else None
        write_adapter_files(out, self.model, self.processor, self.spec, self.recipe, self.fmt, extra, between=between)
        run = {
            "run_id": self.run_id,
            "loss_sum": loss_sum,
            "bad_steps": self.bad_before + self.bad_steps,
            "tokens": {"all": c.tokens, "padding": c.pad, "supervised": c.supervised},
            "world_size": self.args.world_size,
        }
        (out / RUN_FILE).write_text(json.dumps(run))

    def load_checkpoint_weights(self, checkpoint: str, model: Model) -> None:
        """The checkpoint's trained parts into ``model``, every saved tensor into its module and every trained
        module from a saved tensor (else a UserError naming file, keys and the versions it was saved with)."""
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        from lora_llava.layout import AdapterMeta, read_meta
        from lora_llava.model.trained_parts import readable_weights, require_trained_files, verify_adapter_weights

        ckpt = Path(checkpoint)
        meta = read_meta(ckpt)
        meta = meta if isinstance(meta, AdapterMeta) else None
        require_trained_files(ckpt, self.recipe, meta)
        if has_lora(ckpt):
            with readable_weights(ckpt / LORA_WEIGHTS_FILE, meta.versions if meta is not None else {}):
                set_peft_model_state_dict(model, load_file(ckpt / LORA_WEIGHTS_FILE))
            # the fully trained parts the adapter also carries (modules_to_save) load from their own files below
            full = [
                (self.recipe.projector.policy, self.spec.projector),
                (self.recipe.vision_tower.policy, self.spec.vision_tower),
            ]
            apart = tuple(path for policy, path in full if policy == "full")
            verify_adapter_weights(model, ckpt, meta.versions if meta is not None else {}, restored_apart=apart)
        trainable = {id(p) for p in model.parameters() if p.requires_grad}
        restore_trained_parts(model, self.spec, ckpt)
        if (ckpt / RUN_FILE).is_file():
            saved = json.loads((ckpt / RUN_FILE).read_text())
            self.loss_before = float(saved.get("loss_sum") or 0.0)
            self.bad_before = int(saved.get("bad_steps") or 0)
            tokens = saved.get("tokens") or {}  # absent in checkpoints written before token counts were kept
            self.counts = TokenCounts(
                int(tokens.get("all", 0)), int(tokens.get("padding", 0)), int(tokens.get("supervised", 0))
            )
        for p in model.parameters():  # restoring must not change what trains
            p.requires_grad_(id(p) in trainable)


def _guarded(optimizer: Any) -> SkippableStep:
    """The skippable optimizer inside accelerate's wrapper."""
    inner = getattr(optimizer, "optimizer", optimizer)
    if not isinstance(inner, SkippableStep):
        raise TypeError(f"LlavaTrainer needs a SkippableStep optimizer to skip bad steps, got {type(inner).__name__}")
    return inner
