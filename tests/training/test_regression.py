"""Pinned losses: the tiny recipe's training loss at fixed steps, so a silent numerical change fails CI.

The run is bit-exact on CPU (one thread, fixed seeds; two identical runs give identical losses, see
test_run.py). Tolerance: 1e-3 absolute, far below what any real change does (lora.alpha 16 -> 17
moves step 2 by 9e-3 and step 8 by 3e-2) and far above last-bit differences between CPU kernels.
When a change is meant to move the numbers, re-pin them from `metrics.jsonl` and say why.
"""

from __future__ import annotations

import json

import pytest

from lora_llava.workflows import train

# step -> training loss of make_recipe(train.max_steps=8, train.logging_steps=1) on the shapes data
PINNED = {1: 7.545502, 2: 6.652815, 4: 5.530918, 8: 5.291215}
TOLERANCE = 1e-3


def test_tiny_recipe_losses_are_pinned(make_recipe, tmp_path):
    recipe = make_recipe(train={"max_steps": 8, "logging_steps": 1})
    train(recipe, log=lambda *_: None)
    rows = [json.loads(ln) for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = {r["step"]: r["loss"] for r in rows if "loss" in r}
    for step, expected in PINNED.items():
        assert losses[step] == pytest.approx(expected, abs=TOLERANCE), (step, losses)
