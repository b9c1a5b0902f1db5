"""Evaluation: exact-match accuracy and answer normalization."""

from __future__ import annotations


def test_evaluate(trained_run, eval_samples):
    from lora_llava.infer import evaluate, load_model

    result = evaluate(load_model(str(trained_run)), eval_samples, max_new_tokens=4)
    assert result.n == len(eval_samples) == 16
    assert 0.0 <= result.accuracy <= 1.0
    assert result.accuracy == result.correct / 16
    assert result.correct == sum(r["correct"] for r in result.predictions)
    assert [r["id"] for r in result.predictions] == [s.id for s in eval_samples]


def test_normalize():
    from lora_llava.infer import normalize

    assert normalize("Red.") == normalize(" red") == "red"
    assert normalize('"Blue!"') == "blue"
    assert normalize("red") != normalize("green")
