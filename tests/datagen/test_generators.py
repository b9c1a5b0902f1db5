"""Generators: the OpenAI-compatible client against a loopback server (retries, 429, errors, the key)
and the local transformers LM on the built-in tiny-qwen2."""

from __future__ import annotations

import socket

import pytest

from lora_llava.datagen.config import load_datagen_config
from lora_llava.datagen.generators import GenerationFailed, LocalGenerator, OpenAIGenerator
from lora_llava.errors import UserError

CANARY = "sk-canary-0d1e2f3a4b5c6d7e"
MESSAGES = [{"role": "system", "content": "write a conversation"}, {"role": "user", "content": "- A red square."}]


def client(openai_config, monkeypatch=None, **gen) -> tuple[OpenAIGenerator, list[float]]:
    cfg = load_datagen_config(openai_config(**gen)).generator
    waits: list[float] = []
    return OpenAIGenerator(cfg, sleep=waits.append), waits


def test_a_completion_and_its_usage(openai_config, server):
    gen, waits = client(openai_config)
    c = gen.complete(MESSAGES, "1/conversation")
    assert c.text.startswith("Question: What color is the shape?\nAnswer: The shape is red.")
    assert (c.finished, c.prompt_tokens) == (True, 100) and not waits
    body = server.requests[0]["body"]
    assert body["model"] == "canned" and body["messages"] == MESSAGES and body["max_tokens"] == 768
    assert server.requests[0]["authorization"] is None  # no api_key_env: no header


def test_errors_are_retried_with_exponential_backoff(openai_config, server):
    server.script = [(500, {}, "boom"), (503, {}, "busy"), (200, {}, "not json")]
    gen, waits = client(openai_config, backoff_s=0.5)
    assert gen.complete(MESSAGES, "k").text.startswith("Question:")
    assert len(server.requests) == 4 and gen.stats.retries == 3
    assert [round(w / b, 1) <= 1.25 and w >= b for w, b in zip(waits, [0.5, 1.0, 2.0])] == [True] * 3


def test_429_honours_retry_after_capped_and_pauses(openai_config, server):
    server.script = [(429, {"Retry-After": "3"}, "slow down"), (429, {"Retry-After": "999"}, "slower")]
    gen, waits = client(openai_config, max_backoff_s=20)
    gen.complete(MESSAGES, "k")
    assert gen.stats.rate_limited == 2
    # each Retry-After is waited out (999 s capped at max_backoff_s); the first also held the next attempt
    assert 3.0 in waits and 20.0 in waits and len(server.requests) == 3


def test_giving_up_after_max_retries(openai_config, server):
    server.script = [(502, {}, "bad gateway")] * 3
    gen, waits = client(openai_config, max_retries=2)
    with pytest.raises(GenerationFailed, match="gave up after 3 attempts; last: HTTP 502: bad gateway"):
        gen.complete(MESSAGES, "k")
    assert len(waits) == 2


def test_a_400_fails_only_that_request_and_is_not_retried(openai_config, server):
    server.script = [(400, {}, '{"error": "context too long"}')]
    gen, _ = client(openai_config)
    with pytest.raises(GenerationFailed, match="HTTP 400"):
        gen.complete(MESSAGES, "k")
    assert len(server.requests) == 1


def test_the_key_is_sent_as_a_header_and_scrubbed_from_errors(openai_config, server, monkeypatch):
    monkeypatch.setenv("DATAGEN_TEST_KEY", CANARY)
    gen, _ = client(openai_config, api_key_env="DATAGEN_TEST_KEY")
    gen.complete(MESSAGES, "k")
    assert server.requests[0]["authorization"] == f"Bearer {CANARY}"
    server.script = [(400, {}, f"bad key {CANARY}"), (401, {}, f"invalid key {CANARY}")]
    with pytest.raises(GenerationFailed) as e:
        gen.complete(MESSAGES, "k")
    assert CANARY not in str(e.value) and "bad key ***" in str(e.value)
    with pytest.raises(UserError) as u:
        gen.complete(MESSAGES, "k")
    assert "HTTP 401" in str(u.value) and "$DATAGEN_TEST_KEY" in str(u.value) and CANARY not in str(u.value)


def test_a_missing_key_variable_and_a_wrong_url_are_user_errors(openai_config, server, monkeypatch):
    monkeypatch.delenv("DATAGEN_UNSET_KEY", raising=False)
    with pytest.raises(UserError, match="DATAGEN_UNSET_KEY is not set"):
        client(openai_config, api_key_env="DATAGEN_UNSET_KEY")
    gen, _ = client(openai_config, base_url=server.base_url.replace("/v1", "/v2"))
    with pytest.raises(UserError, match="HTTP 404"):
        gen.complete(MESSAGES, "k")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    gen, waits = client(openai_config, base_url=f"http://127.0.0.1:{port}/v1", max_retries=1)
    with pytest.raises(UserError, match="cannot reach"):
        gen.complete(MESSAGES, "k")
    assert len(waits) == 1


def test_a_length_finish_is_not_finished(openai_config, server):
    server.finish_reason = lambda body: "length"
    gen, _ = client(openai_config)
    assert gen.complete(MESSAGES, "k").finished is False


@pytest.fixture(scope="module")
def tiny_lm():
    cfg = load_datagen_config(
        {
            "annotations": {"path": "a", "image_folder": "b"},
            "output": "o.json",
            "generator": {"model": "tiny-qwen2", "max_new_tokens": 6, "few_shot": 0, "temperature": 0},
        }
    ).generator
    return LocalGenerator(cfg)


def test_local_tiny_lm_generates_deterministically(tiny_lm):
    from lora_llava.datagen.prompts import build_messages

    messages = build_messages("conversation", "Captions:\n- A red square.", few_shot=0)
    a, b = tiny_lm.complete(messages, "1/conversation"), tiny_lm.complete(messages, "1/conversation")
    assert a == b and a.text  # random weights: gibberish, but the same gibberish
    assert a.prompt_tokens > 100 and 1 <= a.completion_tokens <= 6
    assert tiny_lm.name == "local:tiny-qwen2"


def test_local_prompt_longer_than_the_context_is_a_user_error(tiny_lm, monkeypatch):
    from lora_llava.datagen.prompts import build_messages

    monkeypatch.setattr(tiny_lm, "context", 50)
    with pytest.raises(UserError, match="longer than the model's context of 50 tokens"):
        tiny_lm.complete(build_messages("detail", "Captions:\n- A red square.", few_shot=0), "k")


def test_local_model_names_that_are_not_causal_lms(openai_config):
    from lora_llava.datagen.generators import _local_model

    with pytest.raises(UserError, match="not a causal LM; use tiny-qwen2"):
        _local_model("tiny")
    with pytest.raises(UserError, match="no such directory"):
        _local_model("./nowhere/model")
