"""Eval during training (train.eval_steps): eval loss and exact match written per step, the answers in
eval/step-N.jsonl equal to what lora-llava eval answers from that step's checkpoint, and training exactly
as it is without eval."""

from __future__ import annotations

import json

import torch
from helpers import adapter_tensors, run_cli

from lora_llava.workflows import train

QUIET = {"log": lambda *_: None}


def test_eval_during_training_writes_answers_and_metrics_and_changes_no_weight(make_recipe, tmp_path, capsys):
    lines: list[str] = []
    with_eval = make_recipe(
        output_dir=str(tmp_path / "e"),
        train={"max_steps": 25, "eval_steps": 10, "save_steps": 10, "logging_steps": 5},
        eval={"max_samples": 6},
    )
    train(with_eval, log=lines.append)
    run = tmp_path / "e"
    # every eval_steps-th step, and the last one
    assert sorted(p.name for p in (run / "eval").iterdir()) == ["step-10.jsonl", "step-20.jsonl", "step-25.jsonl"]
    rows = [json.loads(x) for x in (run / "eval" / "step-20.jsonl").read_text().splitlines()]
    assert len(rows) == 6  # eval.max_samples
    assert all(set(r) == {"id", "source", "question", "prediction", "reference", "correct"} for r in rows)
    assert all(r["reference"] in {"Red", "Green", "Blue", "Yellow"} and "<image>" not in r["question"] for r in rows)
    assert all(r["correct"] == (r["prediction"].strip().lower().rstrip(".") == r["reference"].lower()) for r in rows)

    metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    evals = {r["step"]: r for r in metrics if "eval_loss" in r}
    # evaluating at a logging step does not swallow that step's training row
    assert [r["step"] for r in metrics if "loss" in r] == [1, 5, 10, 15, 20, 25]
    assert sorted(evals) == [10, 20, 25]
    for step, r in evals.items():
        answers = [json.loads(x) for x in (run / "eval" / f"step-{step}.jsonl").read_text().splitlines()]
        assert r["eval_accuracy"] == sum(a["correct"] for a in answers) / len(answers)
        assert r["eval_loss"] > 0
    assert any(ln.startswith("eval at step 20: loss ") for ln in lines)

    # the same answers from that step's checkpoint through lora-llava eval (the checkpoint is an adapter)
    capsys.readouterr()
    code, out, err = run_cli(capsys, "eval", run / "checkpoints" / "checkpoint-20", "--json")
    assert code == 0, err
    report = json.loads(out)
    assert [p["prediction"] for p in report["predictions"]][:6] == [r["prediction"] for r in rows]

    # evaluating restored every random number generator and train mode: same weights as a run without eval
    without = make_recipe(output_dir=str(tmp_path / "n"), train={"max_steps": 25, "logging_steps": 5})
    train(without, **QUIET)
    a, b = adapter_tensors(run / "adapter"), adapter_tensors(tmp_path / "n" / "adapter")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_eval_steps_without_eval_data_is_a_recipe_error(make_recipe):
    import pytest

    from lora_llava.errors import UserError

    with pytest.raises(UserError, match="train.eval_steps: there is no eval data"):
        make_recipe(train={"eval_steps": 2}, data={"eval": []})
