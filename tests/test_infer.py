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


def test_ordinary_answers_still_match_up_to_case_quotes_and_trailing_punctuation():
    from lora_llava.infer import exact_match

    assert exact_match("red", "Red.") and exact_match(" RED ", "red!") and exact_match('"Blue"', "blue")
    assert exact_match("3", "3.") and exact_match("(B)", "(b).") and exact_match("yes", "'Yes?'")
    assert not exact_match("red", "green") and not exact_match("3", "30") and not exact_match("(B)", "B")


def test_an_answer_made_only_of_punctuation_must_be_given_as_written():
    from lora_llava.infer import exact_match, normalize

    for ref in ["?", "!", "-", "...", ":", "?!", "'", '"', "。", "？"]:
        assert exact_match(ref, ref) and exact_match(f" {ref} ", ref), ref
        assert not exact_match("", ref) and not exact_match("   ", ref), ref  # an empty answer never scores
        assert normalize(ref) == ref.strip(), ref
    assert not exact_match(":", "...") and not exact_match(".", "...") and not exact_match("..", "...")
    assert not exact_match("?", "!") and not exact_match("?", "?!") and not exact_match("?", "？")
    assert not exact_match("-", "") and not exact_match("...", "") and exact_match("", "")


def test_full_width_punctuation_counts_as_trailing_punctuation():
    from lora_llava.infer import exact_match

    assert exact_match("はい", "はい。") and exact_match("赤", "「赤」") and exact_match("なに", "なに？")
    assert exact_match("“Blue”", "blue") and exact_match("ok…", "OK")
    assert not exact_match("", "。") and not exact_match("。", "？") and not exact_match("はい", "いいえ。")


def test_evaluate_scores_an_empty_or_punctuation_answer_by_the_rule(monkeypatch):
    """evaluate() (and so eval, predict and merge verification through normalize) uses the same rule."""
    import lora_llava.infer as infer
    from lora_llava.data.formats import Sample

    answers = ["", ":", "...", "Red", "？"]
    refs = ["...", "...", "...", "red.", "？"]
    samples = [Sample("mem", i, str(i), [("user", "q"), ("assistant", r)]) for i, r in enumerate(refs)]
    monkeypatch.setattr(infer, "generate", lambda loaded, s, *a, **k: answers[: len(s)])
    monkeypatch.setattr(infer, "_answer_tokens", lambda loaded, s: {})
    result = infer.evaluate(None, samples)  # type: ignore[arg-type]
    assert [r["correct"] for r in result.predictions] == [False, False, True, True, True]
    assert (result.correct, result.n) == (3, 5)


def test_a_reference_longer_than_max_new_tokens_is_never_cut_short(trained_run, eval_samples):
    """A one-token budget would cut every answer ("Blue" is three tokens here) and score 0 silently: the
    budget grows to the longest reference plus its stop token, and the result says so."""
    from lora_llava.infer import answer_budget, evaluate, exact_match, generate, load_model

    loaded = load_model(str(trained_run))
    need = answer_budget(loaded, eval_samples)
    assert need > 2
    roomy = evaluate(loaded, eval_samples, max_new_tokens=need)
    tight = evaluate(loaded, eval_samples, max_new_tokens=1)
    assert roomy.note is None and roomy.correct > 0
    cut = generate(loaded, eval_samples, 1)  # what one token would have scored: nothing
    assert not any(exact_match(p, s.messages[-1][1]) for p, s in zip(cut, eval_samples))
    assert tight.accuracy == roomy.accuracy
    assert [p["prediction"] for p in tight.predictions] == [p["prediction"] for p in roomy.predictions]
    assert tight.note.startswith(f"note: the longest reference answer takes {need - 1} tokens and the stop token")
    assert f"generated up to {need} tokens" in tight.note and tight.to_json()["note"] == tight.note


def test_a_long_free_form_reference_keeps_the_budget_and_is_reported(monkeypatch):
    """Beyond AUTO_BUDGET_LIMIT tokens the budget stays (eval cost stays bounded): the note counts the
    references that cannot match."""
    import lora_llava.infer as infer
    from lora_llava.data.formats import Sample

    refs = ["short", "a long free-form answer", "a long free-form answer"]
    samples = [Sample("mem", i, str(i), [("user", "q"), ("assistant", r)]) for i, r in enumerate(refs)]
    lengths = {"short": 2, "a long free-form answer": infer.AUTO_BUDGET_LIMIT + 10}
    budgets = []
    monkeypatch.setattr(infer, "_answer_tokens", lambda loaded, s: lengths)
    monkeypatch.setattr(infer, "generate", lambda loaded, s, n, *a: budgets.append(n) or ["short", "", ""])
    result = infer.evaluate(None, samples, max_new_tokens=8)  # type: ignore[arg-type]
    assert budgets == [8] and result.correct == 1
    assert result.note == (
        f"note: 2 of 3 reference answers are longer than max_new_tokens=8 (the longest: "
        f"{infer.AUTO_BUDGET_LIMIT + 10} tokens and the stop token): their answers are cut there and cannot match "
        "exactly (raise eval.max_new_tokens / --max-new-tokens to score them)"
    )
