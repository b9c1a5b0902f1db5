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

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from lora_llava import thirdparty
from lora_llava.annotations import Log
from lora_llava.config.load import input_paths, save_recipe
from lora_llava.config.schema import Recipe
from lora_llava.distributed import barrier, start
from lora_llava.errors import UserError
from lora_llava.layout import RunDir
from lora_llava.model.saving import write_adapter
from lora_llava.training.checkpoint import best_checkpoint, checkpoint_eval, resume_point
from lora_llava.training.prepare import PreparedRun, prepare_run, report_data
from lora_llava.training.session import TrainingSession
from lora_llava.training.trainable import build_trainable
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

    _refuse_sharding()
    world = start()  # under torchrun / accelerate launch: one process per GPU, the first one writes and logs
    log = log if world.main else _quiet
    recipe.train.accumulation(world.size)  # a global batch this many processes cannot make: refused before any write
    run = RunDir(recipe.output_dir)
    t0 = time.time()
    with run.claimed(overwrite, recipe.train.resume, input_paths(recipe), run_id) as run_id:
        # a resume is checked against its checkpoint first: a refused one leaves the run's files as they were
        resume = resume_point(recipe, run.path, log) if recipe.train.resume else None
        if world.main:
            thirdparty.log_into(run.third_party_log)  # a lora-llava command's third-party lines, beside the run
            save_recipe(recipe, run.recipe)
        prepared = prepared or prepare_run(recipe, run.path if world.main else None, log)
        if world.main:
            report_data(prepared, run, log)
        log(recipe.train.batch_line(world.size))
        warning = before_load() if before_load is not None else None  # e.g. the memory plan's warning on CUDA
        if warning:
            log(warning)
        model = build_trainable(recipe, prepared, log)
        with TrainingSession(recipe, prepared, model, run, run_id, resume, log) as session:
            outcome = session.train()
            extra = {
                "train_loss": outcome.loss,
                "steps": outcome.steps,
                "train_samples": len(prepared.report.train),
                "seconds": round(time.time() - t0, 1),
                "hardware": hardware(),
            }
            if world.main:
                write_adapter(run.adapter, model, prepared.processor, prepared.spec, recipe, prepared.fmt, extra)
            barrier()  # the others end once the adapter is whole
        if world.main:
            _draw_curves(run, log)
        seconds = time.time() - t0
        here = (
            f"trained {outcome.steps} steps in {seconds:.0f}s,"
            if outcome.resumed_at is None
            else f"trained steps {outcome.resumed_at + 1}-{outcome.steps} in {seconds:.0f}s (resumed at step "
            f"{outcome.resumed_at}); the run's {outcome.steps} steps:"
        )
        log(
            f"{here} mean loss {outcome.loss:.4f}, padding {outcome.counts.fraction:.1%}"
            + (f", {outcome.skipped} NaN/inf step(s) skipped" if outcome.skipped else "")
            + f"; adapter: {run.adapter}"
        )
        best = best_checkpoint(run.checkpoints) if run.checkpoints.is_dir() else None
        if best is not None:
            ev = checkpoint_eval(best) or {}
            log(f"best checkpoint by eval accuracy: {best} ({ev.get('accuracy', 0.0):.3f} at step {ev.get('step')})")
        return TrainResult(
            run.path,
            run.adapter,
            outcome.loss,
            outcome.steps,
            seconds,
            outcome.counts.fraction,
            len(prepared.report.train),
        )


def _refuse_sharding() -> None:
    """accelerate launched with an FSDP or DeepSpeed config: refused before anything is written."""
    import os

    for var, name in (("ACCELERATE_USE_FSDP", "FSDP"), ("ACCELERATE_USE_DEEPSPEED", "DeepSpeed")):
        if os.environ.get(var, "").lower() in ("1", "true", "yes"):
            raise UserError(
                f"accelerate launched this run with {name}; lora_llava trains on several GPUs with DDP (every GPU "
                "holds the whole 4-bit model and the processes average their gradients), not with sharded weights",
                hint="launch with a DDP config (recipes/accelerate/ddp.yaml) or torchrun --nproc_per_node N -m "
                "lora_llava train ...; for a model too large for one GPU, see docs/several-gpus.md",
            )


def _quiet(*_: object) -> None:
    """The log of every process but the first."""


def _draw_curves(run: RunDir, log: Log) -> None:
    from lora_llava.curves import plot_run

    try:
        log(f"curves: {plot_run(run.path)}")
    except UserError as e:  # a run too short to have logged anything: no curves, said so
        log(f"warning: no curves drawn: {e}")
