"""One run's training session: the Trainer, its arguments, its callbacks in a fixed order, the stop signals.

Usage::

    with TrainingSession(recipe, prepared, model, run, run_id, resume, log) as session:
        outcome = session.train()      # Outcome(steps, loss, counts, skipped); TrainingStopped / UserError otherwise
        write_adapter(...)             # still inside: a stop signal waits until the adapter is whole

The callbacks are built in the order they act at the end of a step: metrics, the progress bar, stop
signals, no checkpoint at a step that stopped the run on bad steps, eval (``train.eval_steps``), and last
the checkpoint publisher, which seals each checkpoint with that step's eval result and rotates old ones.
"""

from __future__ import annotations

import math
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import TrainerCallback
from transformers.trainer_callback import ProgressCallback

from lora_llava.annotations import Log, Model
from lora_llava.config.schema import Recipe
from lora_llava.data.batching import Collator, EncodedDataset, Repeats
from lora_llava.data.packing import PackedDataset, pack_indices
from lora_llava.distributed import world
from lora_llava.errors import TrainingStopped, UserError
from lora_llava.layout import RunDir
from lora_llava.training.callbacks import MetricsCallback, MetricsLog, ProgressBar, TokenCounts
from lora_llava.training.checkpoint import PublishCheckpoints, checkpoint_global_step, clean_staging
from lora_llava.training.evaluation import EvalDuringTraining
from lora_llava.training.faults import FaultPlan
from lora_llava.training.prepare import PreparedRun
from lora_llava.training.stop import StopCallback, StopSignals
from lora_llava.training.tracking import wandb_run
from lora_llava.training.trainer import Abort, LlavaTrainer, training_arguments


@dataclass
class Outcome:
    """What the Trainer did: steps, the run's mean loss over its good steps, token counts, skipped steps."""

    steps: int
    loss: float
    counts: TokenCounts  # the whole run's, those before a resume included
    skipped: int
    resumed_at: int | None = None  # the checkpoint step this session continued from


class TrainingSession:
    """Owns the Trainer of one run; see the module docstring."""

    def __init__(
        self,
        recipe: Recipe,
        prepared: PreparedRun,
        model: Model,
        run: RunDir,
        run_id: str,
        resume: Path | None,
        log: Log = print,
    ) -> None:
        self.recipe, self.prepared, self.run, self.resume, self.log = recipe, prepared, run, resume, log
        self.run_id = run_id
        self.stops = StopSignals(announce=world().main)
        self.abort = Abort()
        report = prepared.report
        grouped = recipe.train.group_by_length and not recipe.train.packing  # packed rows need no grouping
        self.main = world().main  # several processes: the first one logs and writes in the run directory
        if self.main:
            run.checkpoints.mkdir(exist_ok=True)
        # read now: rotation (train.keep_checkpoints) may delete the checkpoint this session resumes from
        self.resumed_at = checkpoint_global_step(resume) if resume else None
        dataset = self._dataset() if world().size == 1 else Repeats(self._dataset())  # (sampler.epoch_order)
        collator = Collator(prepared.processor.tokenizer.pad_token_id)
        self.progress = ProgressBar(log)
        reporting: list[TrainerCallback] = []
        if self.main:
            reporting = [MetricsCallback(MetricsLog(run.metrics, keep_until=self.resumed_at)), self.progress]
        self.trainer = LlavaTrainer(
            spec=prepared.spec,
            recipe=recipe,
            processor=prepared.processor,
            fmt=prepared.fmt,
            samples=report.train,
            lengths=[report.length_of(s) for s in report.train] if grouped else None,
            has_image=[bool(s.images) for s in report.train] if grouped else None,
            run_id=run_id,
            log=self.progress.say if self.main else log,  # lines above the progress bar while it runs
            abort=self.abort,
            faults=FaultPlan.from_env(),
            model=model,
            args=training_arguments(recipe, run.path),
            train_dataset=dataset,
            data_collator=collator,
            callbacks=[*reporting, StopCallback(self.stops), _NoSaveWhenAborted(self.abort)],
        )
        self.trainer.remove_callback(ProgressCallback)
        evaluation = self._evaluation()
        if evaluation is not None:
            self.trainer.add_callback(evaluation)
        self.publish = PublishCheckpoints(
            run.checkpoints,
            keep=recipe.train.keep_checkpoints,
            eval_at=evaluation.result_at if evaluation else None,
            main=self.main,
        )
        self.trainer.add_callback(self.publish)
        self._wandb: Any = None

    def __enter__(self) -> TrainingSession:
        self.stops.__enter__()
        self._wandb = wandb_run(self.recipe, self.run, self.run_id)
        self._wandb.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        try:
            self._wandb.__exit__(*exc)
        finally:
            self.stops.__exit__(*exc)

    def train(self) -> Outcome:
        """Train to the end; a stop signal raises TrainingStopped (after its checkpoint), bad steps a UserError."""
        if self.resume is not None:
            self.log(f"resuming from {self.resume}")
        trainer = self.trainer
        try:
            trainer.train(resume_from_checkpoint=str(self.resume) if self.resume else None)
        except RuntimeError as e:
            lost = _peer_lost(e) if world().size > 1 else None
            if lost:  # a process of the run died (killed, out of memory, a lost machine)
                latest = self.run.latest_checkpoint()
                raise UserError(
                    f"another process of this run ended during step {trainer.state.global_step + 1}, so this one "
                    f"stopped too (its connection: {lost})",
                    hint="the launcher's report names the process and its exit code; "
                    + (
                        f"resume from {latest} with train.resume=true"
                        if latest
                        else "train.save_steps makes a run resumable"
                    ),
                ) from None
            raise
        except pickle.UnpicklingError as e:  # torch.load(weights_only=True) refused a file of the checkpoint
            if self.resume is None:
                raise
            raise UserError(
                f"checkpoint {self.resume} holds a file that is not plain tensors and was refused, not run "
                f"({str(e).splitlines()[0][:200]})",
                hint="resume from another checkpoint of the run, or train again without train.resume",
            ) from None
        if self.main:
            clean_staging(self.run.checkpoints)
        steps = trainer.state.global_step
        if self.abort.reason:
            latest = self.run.latest_checkpoint()
            kept = f"the last checkpoint, {latest}, is intact" if latest else "no checkpoint was written"
            raise UserError(
                f"training stopped at step {steps}: {self.abort.reason}; no adapter was written ({kept})",
                hint="check those samples (with the data file fixed, train.resume=true continues from the last "
                "checkpoint), or train again with a lower train.learning_rate or quantization.compute_dtype "
                "bfloat16/float32",
            )
        if self.stops.requested and steps < trainer.state.max_steps:
            raise TrainingStopped(
                self.stops.requested, steps, trainer.state.max_steps, self.run.path, self.publish.latest
            )
        loss = trainer.mean_loss()  # over every good step of the run, also when it was resumed
        if not math.isfinite(loss):
            raise UserError("training loss became NaN/inf; no adapter was written", hint="lower train.learning_rate")
        return Outcome(steps, loss, trainer.sync_counts(), trainer.bad_before + trainer.bad_steps, self.resumed_at)

    def _dataset(self) -> Any:
        """The training samples one per row, or with ``train.packing`` packed into rows of data.max_length."""
        recipe, report, encoder = self.recipe, self.prepared.report, self.prepared.encoder
        if not recipe.train.packing:
            return EncodedDataset(report.train, encoder, with_index=True)
        lengths = [report.length_of(s) for s in report.train]
        packs = pack_indices(lengths, recipe.data.max_length)
        fill = sum(lengths) / max(len(packs) * recipe.data.max_length, 1)
        self.log(
            f"packing: {len(lengths)} samples into {len(packs)} rows of at most {recipe.data.max_length} tokens "
            f"({fill:.1%} full; train.batch_size counts rows)"
        )
        return PackedDataset(report.train, encoder, packs, with_index=True)

    def _evaluation(self) -> EvalDuringTraining | None:
        recipe, report = self.recipe, self.prepared.report
        if not recipe.train.eval_steps or not self.main:  # several processes: the first one evaluates
            return None
        if not report.eval:
            self.log("warning: train.eval_steps is set but the eval data has no usable sample; no eval during training")
            return None
        samples = report.eval[: recipe.eval.max_samples] if recipe.eval.max_samples else report.eval
        return EvalDuringTraining(
            self.trainer, samples, self.prepared.encoder, self.prepared.processor, recipe, self.run, self.progress.say
        )


def _peer_lost(e: BaseException) -> str | None:
    """How a collective failed because another process of the run is gone (gloo's and NCCL's words), or None."""
    text = str(e)
    return next((words for marker, words in _PEER_LOST if marker in text), None)


_PEER_LOST = (  # (what the collective's error says, how the message names it)
    ("Connection closed by peer", "connection closed by peer"),
    ("remote worker", "a remote worker is gone"),
    ("Connection reset by peer", "connection reset by peer"),
    ("NCCL communicator", "NCCL communicator aborted"),
)


class _NoSaveWhenAborted(TrainerCallback):
    """No checkpoint at the step that stopped a run on bad steps: the last one stays the last good one."""

    def __init__(self, abort: Abort) -> None:
        self.abort = abort

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.abort.reason:
            control.should_save = False
