"""The LLMs that write the data: a local Hugging Face causal LM, or an OpenAI-compatible endpoint.

Usage::

    gen = build_generator(config.generator)            # LocalGenerator or OpenAIGenerator
    c = gen.complete(messages, key="139/conversation")  # Completion(text, finished, prompt_tokens, completion_tokens)
    gen.name                                            # "local:tiny-qwen2", "openai:my-model" (provenance)

``OpenAIGenerator`` posts to ``{base_url}/chat/completions`` (stdlib HTTP, thread-safe; the caller runs
``concurrency`` requests at once). Errors, timeouts, 5xx and 429 are retried with exponential backoff
and jitter; a 429's ``Retry-After`` is honoured and pauses every request, not only the one that got
it. 401/403/404 stop the run with one clear error; another 4xx fails only that request. The API key
is read from the environment variable ``api_key_env`` names, sent only in the Authorization header,
and scrubbed from every message that could reach a log or a file.
"""

from __future__ import annotations

import json
import os
import random
import threading
import time
import urllib.error
import urllib.request
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any, Protocol

from lora_llava.datagen.config import GeneratorConfig
from lora_llava.errors import UserError

RETRYABLE = {408, 409, 425, 429, 500, 502, 503, 504}


@dataclass
class Completion:
    text: str
    finished: bool  # False: cut off by max_new_tokens
    prompt_tokens: int = 0
    completion_tokens: int = 0


class GenerationFailed(Exception):
    """One request failed for good (after its retries); the run goes on, a re-run asks again."""


@dataclass
class RequestStats:
    retries: int = 0
    rate_limited: int = 0
    waits: list[float] = field(default_factory=list)  # every backoff / Retry-After wait, in seconds


class Generator(Protocol):
    name: str
    concurrency: int
    stats: RequestStats

    def complete(self, messages: list[dict[str, str]], key: str) -> Completion: ...


def build_generator(cfg: GeneratorConfig, sleep: Callable[[float], None] = time.sleep) -> Generator:
    if cfg.type == "openai":
        return OpenAIGenerator(cfg, sleep=sleep)
    return LocalGenerator(cfg)


# ------------------------------------------------------------------------------------------------ local


class LocalGenerator:
    """A causal LM run here with transformers: a directory, a cached Hub id or a built-in (tiny-qwen2)."""

    concurrency = 1

    def __init__(self, cfg: GeneratorConfig) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.cfg = cfg
        self.name = f"local:{cfg.model}"
        self.stats = RequestStats()
        path, kwargs = _local_model(cfg.model)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
            self.device = "cuda" if torch.cuda.is_available() else "cpu"
            dtype = torch.bfloat16 if self.device == "cuda" else torch.float32
            self.model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs).to(self.device).eval()
        except (OSError, ValueError) as e:
            raise UserError(
                f"generator.model {cfg.model!r}: cannot load it as a causal LM ({str(e).splitlines()[0][:200]})",
                hint="give a directory holding a Hugging Face causal LM (config.json, weights, tokenizer)",
            ) from None
        config = self.model.config
        self.context = int(getattr(config, "max_position_embeddings", 0) or 0) or None
        self._lock = threading.Lock()

    def _prompt(self, messages: list[dict[str, str]]) -> str:
        if getattr(self.tokenizer, "chat_template", None):
            return str(self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
        # a base LM without a chat template: a plain transcript ending where the answer starts
        names = {"system": "System", "user": "User", "assistant": "Assistant"}
        return "".join(f"{names[m['role']]}: {m['content']}\n\n" for m in messages) + "Assistant:"

    def complete(self, messages: list[dict[str, str]], key: str) -> Completion:
        import torch

        enc = self.tokenizer(self._prompt(messages), return_tensors="pt", add_special_tokens=False)
        n_prompt = int(enc["input_ids"].shape[1])
        if self.context is not None and n_prompt + self.cfg.max_new_tokens > self.context:
            raise UserError(
                f"generator.model {self.cfg.model!r}: a prompt of {n_prompt} tokens plus generator.max_new_tokens="
                f"{self.cfg.max_new_tokens} is longer than the model's context of {self.context} tokens",
                hint="lower generator.few_shot or generator.max_new_tokens, or use a model with a longer context",
            )
        eos = self.tokenizer.eos_token_id
        with self._lock, torch.inference_mode():
            torch.manual_seed(self.cfg.seed ^ zlib.crc32(key.encode()))  # the same answer on a re-run
            sample = self.cfg.temperature > 0
            out = self.model.generate(
                **{k: v.to(self.device) for k, v in enc.items()},
                max_new_tokens=self.cfg.max_new_tokens,
                do_sample=sample,
                temperature=self.cfg.temperature if sample else None,
                top_p=None,
                top_k=None,
                pad_token_id=self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else eos,
            )
        new = out[0, n_prompt:].tolist()
        finished = eos is not None and eos in new
        if finished:
            new = new[: new.index(eos)]
        text = self.tokenizer.decode(new, skip_special_tokens=True)
        return Completion(text, finished, n_prompt, len(new) + int(finished))


def _local_model(ref: str) -> tuple[str, dict[str, Any]]:
    if Path(ref).is_dir():
        return ref, {}
    from lora_llava.backbones.tiny import BUILTINS, ensure_tiny

    if ref in BUILTINS:
        if ref != "tiny-qwen2":
            raise UserError(f"generator.model {ref!r} is a built-in LLaVA part, not a causal LM; use tiny-qwen2")
        return str(ensure_tiny(ref)), {}
    if Path(ref).exists() or ref.startswith((".", "/")) or ref.count("/") != 1:
        raise UserError(
            f"generator.model {ref!r}: no such directory, and not a Hugging Face id (owner/name) or tiny-qwen2"
        )
    from lora_llava.hub import hub_reachable, not_available

    if hub_reachable():
        return ref, {}
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(ref, local_files_only=True), {"local_files_only": True}
    except Exception:
        message, hint = not_available(ref, "the generator model")
        raise UserError(message, hint=hint) from None


# ----------------------------------------------------------------------------------------------- openai


class OpenAIGenerator:
    """Any OpenAI-compatible chat-completions endpoint (vLLM, llama.cpp server, hosted APIs)."""

    def __init__(
        self,
        cfg: GeneratorConfig,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.cfg = cfg
        self.name = f"openai:{cfg.model}"
        self.concurrency = cfg.concurrency
        self.url = (cfg.base_url or "").rstrip("/") + "/chat/completions"
        self.stats = RequestStats()
        self._sleep, self._clock = sleep, clock
        self._key = ""
        if cfg.api_key_env:
            self._key = os.environ.get(cfg.api_key_env, "")
            if not self._key:
                raise UserError(
                    f"generator.api_key_env: the environment variable {cfg.api_key_env} is not set or empty",
                    hint=f"export {cfg.api_key_env}=... before the command (the key is never read from the config)",
                )
        self._lock = threading.Lock()
        self._pause_until = 0.0  # a 429's Retry-After holds back every request until then
        self._rng = random.Random(cfg.seed)

    def scrub(self, text: str) -> str:
        return text.replace(self._key, "***") if self._key else text

    def _post(self, body: bytes) -> dict:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self._key:
            headers["Authorization"] = f"Bearer {self._key}"
        req = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        with urllib.request.urlopen(req, timeout=self.cfg.timeout_s) as resp:
            return json.loads(resp.read().decode("utf-8"))

    def complete(self, messages: list[dict[str, str]], key: str) -> Completion:
        payload: dict[str, Any] = {
            "model": self.cfg.model,
            "messages": messages,
            "temperature": self.cfg.temperature,
            "max_tokens": self.cfg.max_new_tokens,
            "seed": self.cfg.seed ^ zlib.crc32(key.encode()),
        }
        body = json.dumps(payload).encode("utf-8")
        last = ""
        for attempt in range(self.cfg.max_retries + 1):
            with self._lock:
                hold = self._pause_until - self._clock()
            if hold > 0:
                self._sleep(hold)
            delay: float | None = None
            try:
                return _completion(self._post(body))
            except urllib.error.HTTPError as e:
                detail = self.scrub(_error_text(e))
                if e.code in (401, 403):
                    where = f"the key in ${self.cfg.api_key_env}" if self.cfg.api_key_env else "no API key"
                    raise UserError(
                        f"generator: {self.url} refused the request (HTTP {e.code}) with {where}: {detail}",
                        hint="check generator.api_key_env and the key's permissions",
                    ) from None
                if e.code == 404:
                    raise UserError(
                        f"generator: {self.url} answered HTTP 404: {detail}",
                        hint="check generator.base_url (it usually ends in /v1) and generator.model",
                    ) from None
                if e.code not in RETRYABLE:
                    raise GenerationFailed(f"HTTP {e.code}: {detail}") from None
                last = f"HTTP {e.code}: {detail}"
                if e.code == 429:
                    retry_after = _retry_after(e.headers.get("Retry-After") if e.headers else None)
                    with self._lock:
                        self.stats.rate_limited += 1
                    if retry_after is not None:
                        delay = min(retry_after, self.cfg.max_backoff_s)
                        with self._lock:
                            self._pause_until = max(self._pause_until, self._clock() + delay)
            except (urllib.error.URLError, OSError) as e:  # refused, reset, DNS, timeout
                reason = getattr(e, "reason", e)
                last = self.scrub(f"{type(reason).__name__}: {reason}")
                if isinstance(reason, ConnectionRefusedError) and attempt == self.cfg.max_retries:
                    raise UserError(
                        f"generator: cannot reach {self.url} ({last})",
                        hint="start the server, or check generator.base_url",
                    ) from None
            except (ValueError, KeyError, IndexError, TypeError) as e:  # not a chat-completions answer
                last = self.scrub(f"malformed response: {e}")
            if attempt == self.cfg.max_retries:
                break
            if delay is None:
                delay = min(self.cfg.backoff_s * 2**attempt, self.cfg.max_backoff_s)
                with self._lock:
                    delay *= 1 + 0.25 * self._rng.random()
            with self._lock:
                self.stats.retries += 1
                self.stats.waits.append(delay)
            self._sleep(delay)
        raise GenerationFailed(f"gave up after {self.cfg.max_retries + 1} attempts; last: {last}")


def _completion(data: Any) -> Completion:
    choice = data["choices"][0]
    text = choice["message"].get("content") or ""
    if not isinstance(text, str):
        raise TypeError("message.content is not a string")
    usage = data.get("usage") or {}
    return Completion(
        text=text,
        finished=choice.get("finish_reason") != "length",
        prompt_tokens=int(usage.get("prompt_tokens") or 0),
        completion_tokens=int(usage.get("completion_tokens") or 0),
    )


def _error_text(e: urllib.error.HTTPError) -> str:
    try:
        raw = e.read()[:300].decode("utf-8", "replace")
    except OSError:
        raw = ""
    return " ".join(raw.split()) or str(e.reason)


def _retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header (a number of seconds or an HTTP date); None when absent or unreadable."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())
