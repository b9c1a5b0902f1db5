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
    result = infer.evaluate(None, samples)  # type: ignore[arg-type]
    assert [r["correct"] for r in result.predictions] == [False, False, True, True, True]
    assert (result.correct, result.n) == (3, 5)
