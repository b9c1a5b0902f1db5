"""The whole job in one call: base eval -> train -> eval -> merge (verified) -> eval of the merged model.

Usage::

    summary = run_pipeline(load_recipe(recipe_path("quickstart")))
    summary["accuracy"]   # {"base": ..., "adapter": ..., "merged": ...}

The summary is printed and saved as ``<output_dir>/summary.json``.
"""

from __future__ import annotations

import json
import time

from lora_llava.annotations import Log
from lora_llava.config.load import input_paths
from lora_llava.config.schema import Recipe
from lora_llava.data.check import DataReport
from lora_llava.errors import UserError
from lora_llava.layout import RunDir
from lora_llava.workflows import EvalPlan, recipe_eval_plan


def _eval_plan(recipe: Recipe, report: DataReport) -> EvalPlan:
    """The run's eval data as training read it, with the recipe's eval settings (``recipe_eval_plan``)."""
    if not report.eval:
        raise UserError("the pipeline needs evaluation data", hint="add data.eval sources to the recipe")
    return recipe_eval_plan(recipe, report.eval)


def run_pipeline(recipe: Recipe, log: Log = print, overwrite: bool = False) -> dict:
    t0 = time.time()
    run = RunDir(recipe.output_dir)
    # before any work: refuse or clear, and hold the directory until the summary is written
    run_id = run.start(overwrite=overwrite, resume=recipe.train.resume, inputs=input_paths(recipe))
    try:
        return _run(recipe, run, run_id, log, t0)
    finally:
        run.release()


def _run(recipe: Recipe, run: RunDir, run_id: str, log: Log, t0: float) -> dict:
    from lora_llava.data.encode import Encoder
    from lora_llava.infer import evaluate, format_predictions, load_model
    from lora_llava.merging import merge
    from lora_llava.training.prepare import prepare_run
    from lora_llava.workflows import train

    run_dir, merged_dir = run.path, run.merged
    prepared = prepare_run(recipe, run_dir)  # the data is read and checked once, for eval and training
    spec, encoder, report = prepared.spec, prepared.encoder, prepared.report
    plan = _eval_plan(recipe, report)
    samples, max_new_tokens, batch_size = plan.samples, plan.max_new_tokens, plan.batch_size

    log(f"== 1/5 base model ({spec.name}) on {len(samples)} eval samples")
    base_model = load_model(spec.name, max_tiles=recipe.images.max_tiles)
    # prompted exactly as the run trains (chat format, system prompt, image padding)
    base_model.encoder = Encoder(base_model.processor, encoder.fmt, pad_to_square=recipe.images.pad_to_square)
    base = evaluate(base_model, samples, max_new_tokens, batch_size)
    if base.note:
        log(base.note)
    log(format_predictions(base, 4))
    log(f"base accuracy {base.accuracy:.3f}")

    log("== 2/5 train")
    trained = train(recipe, log=log, prepared=prepared, run_id=run_id)

    log("== 3/5 trained adapter")
    after = evaluate(load_model(str(run_dir)), samples, max_new_tokens, batch_size)
    log(format_predictions(after, 4))
    log(f"adapter accuracy {after.accuracy:.3f}")

    log("== 4/5 merge")
    merged_report = merge(str(run_dir), str(merged_dir), log=log)

    log("== 5/5 merged model")
    merged = evaluate(load_model(str(merged_dir)), samples, max_new_tokens, batch_size)
    same = sum(a["prediction"] == b["prediction"] for a, b in zip(after.predictions, merged.predictions))
    parity = merged_report.parity
    summary = {
        "backbone": spec.name,
        "eval_samples": len(samples),
        "accuracy": {"base": base.accuracy, "adapter": after.accuracy, "merged": merged.accuracy},
        "merged_equals_adapter": f"{same}/{len(samples)}",
        "merge_max_abs_logit_diff": parity.max_abs_logit_diff,
        "train_steps": trained.steps,
        "train_loss": trained.train_loss,
        "train_seconds": round(trained.seconds, 1),
        "wall_seconds": round(time.time() - t0, 1),
        "run_dir": str(run_dir),
        "merged_dir": str(merged_dir),
    }
    run.summary.write_text(json.dumps(summary, indent=2))
    run.eval_predictions.write_text(
        json.dumps({"base": base.to_json(), "adapter": after.to_json(), "merged": merged.to_json()}, indent=1)
    )
    log("== summary")
    log(
        f"accuracy  base {base.accuracy:.3f} -> adapter {after.accuracy:.3f} -> merged {merged.accuracy:.3f} "
        f"({len(samples)} eval samples)"
    )
    log(
        f"merged == adapter answers: {same}/{len(samples)}; merge logit max |diff| "
        f"{parity.max_abs_logit_diff if parity.max_abs_logit_diff is not None else float('nan'):.2e}"
    )
    log(f"wall time {summary['wall_seconds']:.0f}s (training {summary['train_seconds']:.0f}s, {trained.steps} steps)")
    log(f"run: {run_dir}   merged model: {merged_dir}")
    return summary
