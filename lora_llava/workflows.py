"""What a user runs, above training: train (with stage 1's aligned model), and eval data of a run.

Usage::

    result = train(recipe)             # training.run.train, then for stage align the aligned model in <run>/model
    samples = run_eval_samples(recipe, encoder)     # the run's own eval sources (and eval_split)
"""

from __future__ import annotations

from lora_llava.annotations import Log
from lora_llava.config.schema import Recipe
from lora_llava.data.encode import Encoder
from lora_llava.data.formats import Sample
from lora_llava.errors import UserError
from lora_llava.layout import RunDir
from lora_llava.training.prepare import PreparedRun
from lora_llava.training.run import TrainResult
from lora_llava.training.run import train as train_adapter


def train(
    recipe: Recipe,
    log: Log = print,
    prepared: PreparedRun | None = None,
    overwrite: bool = False,
    run_id: str | None = None,
) -> TrainResult:
    """Train ``recipe``; a stage-1 (align) run then writes its aligned model, stage 2's backbone.

    An output_dir holding an earlier run is refused unless ``overwrite`` (see ``RunDir.start``)."""
    run = RunDir(recipe.output_dir)
    if recipe.stage == "align" and run.aligned.exists() and not run.aligned.is_dir():
        raise UserError(f"{run.aligned} is a file; stage 1 writes its aligned model there")
    from lora_llava import plan

    result = train_adapter(
        recipe, log=log, prepared=prepared, overwrite=overwrite, run_id=run_id,
        before_load=lambda: plan.preload_warning(recipe),  # on CUDA: the memory plan before weights load
    )  # fmt: skip
    if recipe.stage == "align":
        from lora_llava.merging import merge

        # the LM was frozen: keep its original weights, so stage 2 quantizes exactly what stage 1 saw
        merge(run.path, run.aligned, base_mode="original", replace=True, aligned=True, log=log)
        log(f"stage 1 done: {run.aligned} is the aligned LLaVA; start stage 2 with backbone: {run.path}")
    return result


def run_eval_samples(recipe: Recipe, encoder: Encoder) -> list[Sample]:
    """The samples a run evaluates on: its data.eval sources, plus its eval_split (carved from the training
    data exactly as training carved it, so only then is the training data read)."""
    bad: list = []
    if recipe.data.eval_split:
        from lora_llava.data.check import prepare_data

        report = prepare_data(recipe, encoder, run_dir=None, enforce=False)
        samples, bad = report.eval, report.bad
    else:
        from lora_llava.data.formats import read_source

        samples = []
        for src in recipe.data.eval:
            good, wrong = read_source(src)
            samples += good
            bad += wrong
    if bad:
        listing = "\n  ".join(b.describe() for b in bad[:20])
        raise UserError(f"{len(bad)} bad sample(s) in the run's eval data:\n  {listing}", hint="or pass --data")
    return samples
