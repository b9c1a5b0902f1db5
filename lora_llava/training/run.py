"""Train one recipe: checked data -> model -> part policy -> trainer -> self-describing adapter.

Usage::

    result = train(load_recipe("recipes/quickstart.yaml", ["train.max_steps=20"]))
    result.adapter_dir, result.train_loss, result.steps

The run directory (``recipe.output_dir``) receives ``recipe.yaml`` (resolved), ``metrics.jsonl``,
``rejected.jsonl`` (samples left out), ``checkpoints/`` (with ``train.save_steps``) and ``adapter/``,
written whole or not at all (see ``lora_llava.artifacts``). Stage 1's aligned model is written by
the layer above (``lora_llava.workflows``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from lora_llava import thirdparty
from lora_llava.annotations import Log, Model
from lora_llava.compat import allow_training_quantized_base
from lora_llava.config.load import save_recipe
from lora_llava.config.schema import Recipe
from lora_llava.data.encode import Collator, EncodedDataset
from lora_llava.data.packing import PackedDataset, pack_indices
from lora_llava.errors import TrainingStopped, UserError
from lora_llava.layout import RunDir
from lora_llava.model.loading import load_base
from lora_llava.model.parts import check_policy, format_part_table
from lora_llava.model.saving import write_adapter
from lora_llava.model.trainability import attach_adapters
from lora_llava.training.callbacks import MetricsCallback, MetricsLog, ProgressBar
from lora_llava.training.checkpoint import (
    PublishCheckpoints,
    best_checkpoint,
    checkpoint_eval,
    checkpoint_global_step,
    clean_staging,
    resume_point,
)
from lora_llava.training.evaluation import EvalDuringTraining
from lora_llava.training.optim import make_optimizer
from lora_llava.training.prepare import PreparedRun, describe_format, prepare_run
from lora_llava.training.stop import StopCallback, StopSignals
from lora_llava.training.tracking import wandb_run
from lora_llava.training.trainer import LlavaTrainer, training_arguments
from lora_llava.versions import hardware


@dataclass
class TrainResult:
    """What a finished training run produced (numbers only; the weights are in ``adapter_dir``)."""

    run_dir: Path
    adapter_dir: Path
    train_loss: float
    steps: int
    seconds: float
    padding_fraction: float
    train_samples: int


def train(
    recipe: Recipe,
    log: Log = print,
    prepared: PreparedRun | None = None,
    overwrite: bool = False,
    run_id: str | None = None,
    before_load: Callable[[], str | None] | None = None,
) -> TrainResult:
    """Train ``recipe``. An output_dir holding an earlier run is refused unless ``overwrite`` (or the recipe
    resumes); ``run_id`` is given by a caller that already claimed the directory (``RunDir.start``), and
    ``prepared`` is a ``prepare_run(recipe, run_dir)`` already at hand; ``before_load`` is called once the data
    is checked and before any weight loads, and what it returns (a warning line) is logged.

    Raises ``TrainingStopped`` when SIGTERM/SIGINT stopped the run (a checkpoint was saved), and a UserError
    when ``train.max_bad_steps`` NaN/inf steps in a row stopped it; neither writes an adapter."""
    from transformers import set_seed

    run = RunDir(recipe.output_dir)
    run_id = run_id or run.start(overwrite=overwrite, resume=recipe.train.resume)
    thirdparty.log_into(run.third_party_log)  # a lora-llava command's third-party lines, beside the run
    save_recipe(recipe, run.recipe)
    t0 = time.time()
    prepared = prepared or prepare_run(recipe, run.path, log)
    _report_data(prepared, run, log)
    resume = resume_point(recipe, run.path, log) if recipe.train.resume else None

    warning = before_load() if before_load is not None else None  # e.g. the memory plan's warning on CUDA
    if warning:
        log(warning)
    set_seed(recipe.train.seed)
    model, _ = load_base(prepared.spec, recipe.quantization, max_tiles=recipe.images.max_tiles)
    model = attach_adapters(model, prepared.spec, recipe)
    log(format_part_table(check_policy(model, prepared.spec, recipe)))
    for config in (model.config, getattr(model.config, "text_config", None)):
        if config is not None:  # training keeps no KV cache (with one, packed rows would get no block mask)
            config.use_cache = False
    if getattr(model, "is_quantized", False) and not hasattr(model, "peft_config"):
        allow_training_quantized_base(model)  # stage 1 on a 4-bit LM; check_policy verified only 16-bit parts train

    with StopSignals() as stops, wandb_run(recipe, run, run_id):
        trainer, publish = _trainer(recipe, prepared, model, run, resume, run_id, stops, log)
        if resume is not None:
            log(f"resuming from {resume}")
        trainer.train(resume_from_checkpoint=str(resume) if resume else None)
        clean_staging(run.checkpoints)
        steps = trainer.state.global_step
        if trainer.aborted:
            latest = run.latest_checkpoint()
            kept = f"the last checkpoint, {latest}, is intact" if latest else "no checkpoint was written"
            raise UserError(
                f"training stopped at step {steps}: {trainer.aborted}; no adapter was written ({kept})",
                hint="check those samples (with the data file fixed, train.resume=true continues from the last "
                "checkpoint), or train again with a lower train.learning_rate or quantization.compute_dtype "
                "bfloat16/float32",
            )
        if stops.requested and steps < trainer.state.max_steps:
            raise TrainingStopped(stops.requested, steps, trainer.state.max_steps, run.path, publish.latest)
        loss = trainer.mean_loss()  # over every good step of the run, also when it was resumed
        if not math.isfinite(loss):
            raise UserError("training loss became NaN/inf; no adapter was written", hint="lower train.learning_rate")
        counts = trainer.sync_counts()
        extra = {
            "train_loss": loss,
            "steps": steps,
            "train_samples": len(prepared.report.train),
            "seconds": round(time.time() - t0, 1),
            "hardware": hardware(),
        }
        write_adapter(run.adapter, model, prepared.processor, prepared.spec, recipe, prepared.fmt, extra)
    _draw_curves(run, log)
    seconds = time.time() - t0
    skipped = trainer.bad_before + trainer.bad_steps
    log(
        f"trained {steps} steps in {seconds:.0f}s, mean loss {loss:.4f}, padding {counts.fraction:.1%}"
        + (f", {skipped} NaN/inf step(s) skipped" if skipped else "")
        + f"; adapter: {run.adapter}"
    )
    best = best_checkpoint(run.checkpoints) if run.checkpoints.is_dir() else None
    if best is not None:
        ev = checkpoint_eval(best) or {}
        log(f"best checkpoint by eval accuracy: {best} ({ev.get('accuracy', 0.0):.3f} at step {ev.get('step')})")
    return TrainResult(run.path, run.adapter, loss, steps, seconds, counts.fraction, len(prepared.report.train))


def _draw_curves(run: RunDir, log: Log) -> None:
    from lora_llava.curves import plot_run

    try:
        log(f"curves: {plot_run(run.path)}")
    except UserError as e:  # a run too short to have logged anything: no curves, said so
        log(f"warning: no curves drawn: {e}")


def _report_data(prepared: PreparedRun, run: RunDir, log: Log) -> None:
    report = prepared.report
    log(describe_format(prepared.fmt))
    log(report.summary())
    run.data_report.write_text(describe_format(prepared.fmt) + "\n" + report.summary() + "\n")
    if report.bad or report.dropped:
        left_out = len(report.bad) + len(report.dropped)
        log(f"left out {left_out} sample(s) ({len(report.bad)} bad); listed in {run.rejected}")
    if prepared.recipe.train.group_by_length:
        log(f"batches grouped by length, image and text-only apart (seed {prepared.recipe.train.seed})")


def _trainer(
    recipe: Recipe,
    prepared: PreparedRun,
    model: Model,
    run: RunDir,
    resume: Path | None,
    run_id: str,
    stops: StopSignals,
    log: Log,
) -> tuple[LlavaTrainer, PublishCheckpoints]:
    from transformers.trainer_callback import ProgressCallback

    report = prepared.report
    grouped = recipe.train.group_by_length and not recipe.train.packing  # packed rows need no grouping
    dataset = _train_dataset(recipe, prepared, log)
    metrics = MetricsLog(run.metrics, keep_until=checkpoint_global_step(resume) if resume else None)
    optimizer = make_optimizer(model, prepared.spec, recipe)
    run.checkpoints.mkdir(exist_ok=True)
    progress = ProgressBar(log)
    say = progress.say  # lines above the progress bar while it runs

    publish = PublishCheckpoints(run.checkpoints, keep=recipe.train.keep_checkpoints)
    metrics_cb = MetricsCallback(metrics)
    trainer = LlavaTrainer(
        spec=prepared.spec,
        recipe=recipe,
        processor=prepared.processor,
        fmt=prepared.fmt,
        samples=report.train,
        lengths=[report.length_of(s) for s in report.train] if grouped else None,
        has_image=[bool(s.images) for s in report.train] if grouped else None,
        run_id=run_id,
        log=say,
        model=model,
        args=training_arguments(recipe, run.path),
        train_dataset=dataset,
        data_collator=Collator(prepared.processor.tokenizer.pad_token_id),
        optimizers=(optimizer, None),
        callbacks=[metrics_cb, progress, StopCallback(stops), no_save := _NoSaveWhenAborted(), publish],
    )
    no_save.trainer = trainer
    trainer.remove_callback(ProgressCallback)
    metrics_cb.mean_loss = trainer.mean_loss  # the end-of-run row reports the whole run's mean, resumed or not
    if recipe.train.eval_steps and not report.eval:
        log("warning: train.eval_steps is set but the eval data has no usable sample; no eval during training")
    elif recipe.train.eval_steps:
        samples = report.eval[: recipe.eval.max_samples] if recipe.eval.max_samples else report.eval
        evaluation = EvalDuringTraining(
            trainer, samples, prepared.encoder, prepared.processor, recipe, run, publish, say
        )
        trainer.add_callback(evaluation)
        # before the checkpoint of the same step is sealed, so it carries its eval result
        trainer.callback_handler.callbacks.remove(evaluation)
        trainer.callback_handler.callbacks.insert(trainer.callback_handler.callbacks.index(publish), evaluation)
    return trainer, publish


def _train_dataset(recipe: Recipe, prepared: PreparedRun, log: Log) -> Any:
    """The training samples one per row, or with ``train.packing`` packed into rows of data.max_length."""
    report = prepared.report
    if not recipe.train.packing:
        return EncodedDataset(report.train, prepared.encoder, with_index=True)
    lengths = [report.length_of(s) for s in report.train]
    packs = pack_indices(lengths, recipe.data.max_length)
    fill = sum(lengths) / max(len(packs) * recipe.data.max_length, 1)
    log(
        f"packing: {len(lengths)} samples into {len(packs)} rows of at most {recipe.data.max_length} tokens "
        f"({fill:.1%} full; train.batch_size counts rows)"
    )
    return PackedDataset(report.train, prepared.encoder, packs, with_index=True)


class _NoSaveWhenAborted(TrainerCallback):
    """No checkpoint at the step that stopped a run on bad steps: the last one stays the last good one."""

    trainer: LlavaTrainer | None = None

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.trainer is not None and self.trainer.aborted:
            control.should_save = False
