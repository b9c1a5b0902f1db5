"""The NaN/inf guard on every optimizer step: a bad step changes neither the weights nor the optimizer state,
is counted and named with its samples; train.max_bad_steps bad steps in a row stop the run, the last good
checkpoint intact. Faults are injected with LORA_LLAVA_FAULTS (lora_llava.training.faults)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from helpers import adapter_tensors

from lora_llava.errors import UserError
from lora_llava.layout import RunDir, checkpoint_problem
from lora_llava.workflows import train


def _adam_state(ckpt):
    state = torch.load(ckpt / "optimizer.pt", weights_only=True)["state"]
    return {(i, k): v for i, s in state.items() for k, v in s.items()}


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_nan_step_is_skipped_without_touching_weights_or_optimizer_state(make_recipe, tmp_path, monkeypatch):
    monkeypatch.setenv("LORA_LLAVA_FAULTS", "nan_loss@3")
    lines: list[str] = []
    # logging every 4 steps: the guard does not wait for a logging step
    recipe = make_recipe(train={"max_steps": 4, "save_steps": 1, "logging_steps": 4, "batch_size": 2, "grad_accum": 2})
    result = train(recipe, log=lines.append)
    ckpt = RunDir(recipe.output_dir).checkpoints
    c2, c3, c4 = (ckpt / f"checkpoint-{n}" for n in (2, 3, 4))
    assert _equal(adapter_tensors(c2), adapter_tensors(c3))  # step 3 changed no weight ...
    assert _equal(_adam_state(c2), _adam_state(c3))  # ... and no moment, nor Adam's step count
    assert not _equal(adapter_tensors(c3), adapter_tensors(c4))  # step 4 trained again
    assert all(torch.isfinite(t).all() for t in adapter_tensors(result.adapter_dir).values())

    warning = [ln for ln in lines if ln.startswith("warning: step 3 skipped")]
    assert len(warning) == 1, lines
    # both micro-batches of step 3 (2 samples each) are named, as bad-sample reports name samples
    named = warning[0].split("its batch: ")[1].split(", ")
    assert len(named) == 4 and all("train.json sample " in n and "(id train-" in n for n in named), warning
    assert "1 NaN/inf step(s) skipped" in lines[-1]
    rows = [json.loads(x) for x in (RunDir(recipe.output_dir).metrics).read_text().splitlines()]
    step4 = next(r for r in rows if r.get("step") == 4 and "loss" in r)
    assert step4["skipped_steps"] == 1 and math.isfinite(step4["loss"])
    # the run's mean loss is over its 3 good steps (the NaN one left out)
    meta = json.loads((result.adapter_dir / "lora_llava.json").read_text())
    assert math.isfinite(meta["train_loss"]) and meta["train_loss"] == result.train_loss


def test_max_bad_steps_in_a_row_stop_the_run_naming_the_batch(make_recipe, tmp_path, monkeypatch):
    monkeypatch.setenv("LORA_LLAVA_FAULTS", "nan_loss@3,nan_loss@4")
    recipe = make_recipe(train={"max_steps": 6, "save_steps": 2, "max_bad_steps": 2, "batch_size": 2})
    with pytest.raises(UserError) as e:
        train(recipe, log=lambda *_: None)
    msg = str(e.value)
    assert "training stopped at step 4: 2 optimizer steps in a row (to step 4) had a NaN/inf loss" in msg
    assert "the weights are those of step 2" in msg and "The last batch: " in msg and "train.json sample " in msg
    run = RunDir(recipe.output_dir)
    assert f"the last checkpoint, {run.checkpoints / 'checkpoint-2'}, is intact" in msg
    assert not run.adapter.exists()
    # no checkpoint of the step that stopped the run: the last one is the last good one
    assert [p.name for p in run.checkpoint_dirs()] == ["checkpoint-2"]
    assert checkpoint_problem(run.checkpoints / "checkpoint-2", hashes=True) is None


def test_bad_steps_that_are_not_in_a_row_do_not_stop_the_run(make_recipe, monkeypatch):
    monkeypatch.setenv("LORA_LLAVA_FAULTS", "nan_loss@2,nan_loss@4")
    result = train(make_recipe(train={"max_steps": 5, "max_bad_steps": 2}), log=lambda *_: None)
    assert result.steps == 5 and math.isfinite(result.train_loss)
