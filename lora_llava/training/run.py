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
from dataclasses import dataclass
from pathlib import Path

import torch

from lora_llava.annotations import Log, Model
from lora_llava.artifacts import RunDir, write_adapter
from lora_llava.compat import allow_training_quantized_base
from lora_llava.config.load import save_recipe
from lora_llava.config.schema import Recipe
from lora_llava.data.encode import EncodedDataset
from lora_llava.errors import UserError
from lora_llava.model.loading import load_base
from lora_llava.model.parts import check_policy, format_part_table
from lora_llava.model.trainability import attach_adapters
from lora_llava.training.callbacks import (
    CountingCollator,
    MetricsCallback,
    MetricsLog,
    PaddingStats,
    StopOnNonFinite,
)
from lora_llava.training.checkpoint import PublishCheckpoints, checkpoint_global_step, clean_staging, resume_point
from lora_llava.training.optim import optimizer_groups
from lora_llava.training.prepare import PreparedRun, describe_format, prepare_run
from lora_llava.training.trainer import LlavaTrainer, training_arguments


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
) -> TrainResult:
    """Train ``recipe``. An output_dir holding an earlier run is refused unless ``overwrite`` (or the recipe
    resumes); ``run_id`` is given by a caller that already claimed the directory (``RunDir.start``), and
    ``prepared`` is a ``prepare_run(recipe, run_dir)`` already at hand."""
    from transformers import set_seed

    run = RunDir(recipe.output_dir)
    run_id = run_id or run.start(overwrite=overwrite, resume=recipe.train.resume)
    save_recipe(recipe, run.recipe)
    t0 = time.time()
    prepared = prepared or prepare_run(recipe, run.path, log)
    _report_data(prepared, run, log)
    resume = resume_point(recipe, run.path) if recipe.train.resume else None

    set_seed(recipe.train.seed)
    model, _ = load_base(prepared.spec, recipe.quantization, max_tiles=recipe.images.max_tiles)
    model = attach_adapters(model, prepared.spec, recipe)
    log(format_part_table(check_policy(model, prepared.spec, recipe)))
    if getattr(model, "is_quantized", False) and not hasattr(model, "peft_config"):
        allow_training_quantized_base(model)  # stage 1 on a 4-bit LM; check_policy verified only 16-bit parts train

    stats = PaddingStats()
    trainer = _trainer(recipe, prepared, model, run, stats, resume, run_id)
    metrics_cb = next(cb for cb in trainer.callback_handler.callbacks if isinstance(cb, MetricsCallback))
    metrics_cb.mean_loss = trainer.mean_loss  # the end-of-run row reports the whole run's mean, resumed or not
    if resume is not None:
        log(f"resuming from {resume}")
    out = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    clean_staging(run.checkpoints)
    loss = trainer.mean_loss()  # over every step of the run, also when it was resumed
    logged = [r.get("loss", 0.0) for r in trainer.state.log_history]
    if not math.isfinite(loss) or not math.isfinite(float(out.training_loss)) or not all(map(math.isfinite, logged)):
        raise UserError(
            "training loss became NaN/inf; no adapter was written",
            hint="lower train.learning_rate, or use compute_dtype bfloat16/float32",
        )
    steps = trainer.state.global_step
    extra = {
        "train_loss": loss,
        "steps": steps,
        "train_samples": len(prepared.report.train),
        "seconds": round(time.time() - t0, 1),
        "hardware": hardware(),
    }
    write_adapter(run.adapter, model, prepared.processor, prepared.spec, recipe, prepared.fmt, extra)
    seconds = time.time() - t0
    log(
        f"trained {steps} steps in {seconds:.0f}s, mean loss {loss:.4f}, padding {stats.fraction:.1%}; "
        f"adapter: {run.adapter}"
    )
    return TrainResult(run.path, run.adapter, loss, steps, seconds, stats.fraction, len(prepared.report.train))


def hardware() -> str:
    """Where this process trains: the GPU's name, or the CPU."""
    import platform

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)} (CUDA {torch.version.cuda})"
    return f"CPU ({platform.machine()}, {torch.get_num_threads()} thread(s))"


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
    stats: PaddingStats,
    resume: Path | None,
    run_id: str,
) -> LlavaTrainer:
    report = prepared.report
    grouped = recipe.train.group_by_length
    metrics = MetricsLog(run.metrics, keep_until=checkpoint_global_step(resume) if resume else None)
    optimizer = torch.optim.AdamW(optimizer_groups(model, prepared.spec, recipe), lr=recipe.train.learning_rate)
    run.checkpoints.mkdir(exist_ok=True)
    return LlavaTrainer(
        spec=prepared.spec,
        recipe=recipe,
        lengths=[report.length_of(s) for s in report.train] if grouped else None,
        has_image=[bool(s.images) for s in report.train] if grouped else None,
        run_id=run_id,
        model=model,
        args=training_arguments(recipe, run.path),
        train_dataset=EncodedDataset(report.train, prepared.encoder),
        data_collator=CountingCollator(prepared.processor.tokenizer.pad_token_id, stats),
        optimizers=(optimizer, None),
        callbacks=[MetricsCallback(metrics, stats), StopOnNonFinite(), PublishCheckpoints(run.checkpoints)],
    )
