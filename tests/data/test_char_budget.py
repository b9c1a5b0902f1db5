"""Text longer in characters than any tokenizer fits in data.max_length tokens is over-long without being
tokenized, under every data.overlength policy; truncate_turns never tokenizes such a run of turns either."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lora_llava.config import load_recipe
from lora_llava.data.budget import CHARS_PER_TOKEN, fit_sample
from lora_llava.data.chat import chat_format
from lora_llava.data.check import prepare_data
from lora_llava.data.encode import Encoder
from lora_llava.data.formats import Sample
from lora_llava.errors import UserError

MAX_LENGTH = 96
BUDGET = MAX_LENGTH * CHARS_PER_TOKEN  # 1536 characters
HUGE = "Saturn has rings of ice and rock. " * 30_000  # 1,020,000 characters


def turns(*texts: str) -> list[dict]:
    return [{"from": "human" if k % 2 == 0 else "gpt", "value": t} for k, t in enumerate(texts)]


RECORDS = [
    {"id": "short", "conversations": turns("Which planet has rings?", "Saturn.")},
    {"id": "huge-answer", "conversations": turns("Tell me about Saturn.", HUGE)},
    {"id": "huge-later", "conversations": turns("Rings?", "Yes.", "All of it, please.", HUGE)},
]


@pytest.fixture
def encoder(tiny_processor, monkeypatch) -> Encoder:
    """The tiny backbone's encoder, recording the characters of every sample it tokenizes."""
    enc = Encoder(tiny_processor, chat_format("vicuna_v1", stop=tiny_processor.tokenizer.eos_token, system=""))
    tokens = enc.tokens
    enc.seen = []  # type: ignore[attr-defined]

    def spy(sample: Sample, sizes: list) -> tuple[list[int], list[int]]:
        enc.seen.append(sum(len(t) for _, t in sample.messages))  # type: ignore[attr-defined]
        return tokens(sample, sizes)

    monkeypatch.setattr(enc, "tokens", spy)
    return enc


def recipe(tmp_path: Path, overlength: str, **data):
    path = tmp_path / "planets.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    train = [{"path": str(path)}]
    raw = {"backbone": "tiny", "output_dir": str(tmp_path / "run"), "data": {"train": train, **data}}
    return load_recipe({**raw, "data": {**raw["data"], "max_length": MAX_LENGTH, "overlength": overlength}})


def reason(chars: int) -> str:
    return (
        f"{chars} characters of text, over data.max_length={MAX_LENGTH} with any tokenizer (more than "
        f"{CHARS_PER_TOKEN} characters a token, {BUDGET} characters); not tokenized"
    )


def chars_of(*texts: str) -> int:
    return sum(len(t) for t in texts)


def test_over_the_character_budget_is_a_bad_sample_never_tokenized(tmp_path, encoder):
    with pytest.raises(UserError) as err:
        prepare_data(recipe(tmp_path, "bad_sample"), encoder, tmp_path / "run")
    n = chars_of("Tell me about Saturn.", HUGE)
    assert f"planets.jsonl line 2 (id huge-answer): {reason(n)}" in str(err.value)
    assert str(err.value).startswith("2 bad sample(s) of 3:")
    assert max(encoder.seen) <= BUDGET  # the million characters never reached the tokenizer

    report = prepare_data(recipe(tmp_path, "bad_sample"), encoder, enforce=False)
    assert report.over_chars == 2 and len(report.full_lengths) == 1
    assert f"over data.max_length={MAX_LENGTH}: 2 sample(s);" in report.overlength_line()
    assert "truncate_turns: 1 shortened + 1 dropped" in report.overlength_line()
    summary = report.summary()
    assert "length histogram (3 readable samples, before data.overlength):" in summary
    assert summary.splitlines()[-2].split()[:2] == [f">{MAX_LENGTH}", "2"]


def test_drop_and_truncate_turns_apply_to_samples_over_by_characters(tmp_path, encoder):
    report = prepare_data(recipe(tmp_path, "drop"), encoder, tmp_path / "drop")
    assert [s.id for s in report.train] == ["short"]
    assert [(b.id, b.reason) for b in report.dropped] == [
        ("huge-answer", f"{reason(chars_of('Tell me about Saturn.', HUGE))}; dropped"),
        ("huge-later", f"{reason(chars_of('Rings?', 'Yes.', 'All of it, please.', HUGE))}; dropped"),
    ]

    encoder.seen.clear()
    report = prepare_data(recipe(tmp_path, "truncate_turns"), encoder, tmp_path / "cut")
    assert [s.id for s in report.train] == ["short", "huge-later"]
    kept = report.train[1]
    assert kept.messages == [("user", "Rings?"), ("assistant", "Yes.")]  # the first exchange, whole
    assert [b.id for b in report.dropped] == ["huge-answer"]
    assert report.dropped[0].reason.endswith("; first exchange alone is too long")
    assert (report.stats[0].truncated, report.stats[0].dropped) == (1, 1)
    assert max(encoder.seen) <= BUDGET  # no cut holding the huge turn was tokenized to find where to cut


def test_fit_sample_counts_characters_before_tokenizing(encoder):
    just = "x" * (BUDGET - len("Q?"))
    at_budget = Sample("mem", 0, "a", [("user", "Q?"), ("assistant", just)])
    over = Sample("mem", 1, "b", [("user", "Q?"), ("assistant", just + "x")])
    fit = fit_sample(encoder, at_budget, MAX_LENGTH, "drop")
    assert fit.full_length is not None and fit.full_length > MAX_LENGTH and encoder.seen == [BUDGET]
    fit = fit_sample(encoder, over, MAX_LENGTH, "truncate_turns")
    assert (fit.action, fit.full_length, fit.chars, fit.sample) == ("over", None, BUDGET + 1, None)
    assert encoder.seen == [BUDGET]
