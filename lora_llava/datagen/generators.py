"""The LLMs that write the data: a local Hugging Face causal LM, or an OpenAI-compatible endpoint.

Usage::

    gen = build_generator(config.generator)            # LocalGenerator or OpenAIGenerator
    c = gen.complete(messages, key="139/conversation")  # Completion(text, finished, prompt_tokens, completion_tokens)
    gen.name                                            # "local:tiny-qwen2", "openai:my-model" (provenance)

``OpenAIGenerator`` posts to ``{base_url}/chat/completions`` (stdlib HTTP, thread-safe; the caller runs
``concurrency`` requests at once). Errors, timeouts, 5xx and 429 are retried with exponential backoff
and jitter; a 429's ``Retry-After`` is honoured and pauses every request, not only the one that got
it. 401/403/404 stop the run with one clear error; another 4xx fails only that request. A redirect
stops the run too, naming where it points: it is never followed, since the Authorization header would
go along. A response is read up to ``MAX_RESPONSE_BYTES`` (a larger one fails that request, not
retried); a response cut short is a transport failure, retried; ``timeout_s`` bounds a whole attempt.

The API key is read from the environment variable ``api_key_env`` names and sent only in the
Authorization header; plain http to a host other than this machine is refused while there is a key
(unless ``allow_plain_http``). Every text from the server is scrubbed of the key (``KeyScrubber``: the
key, its JSON-escaped, URL-escaped, spaced and base64 forms, and runs of 8+ of its characters) before
anything cuts it; a generation that holds the key raises ``KeyEchoed`` (reason ``echoes_key``) and its
text goes nowhere.
"""

from __future__ import annotations

import base64
import bisect
import http.client
import ipaddress
import json
import math
import os
import random
import re
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from email.message import Message
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

MAX_RESPONSE_BYTES = 8 * 1024 * 1024  # a chat completion is a few KB: a larger body is refused, never read whole
ERROR_BODY_BYTES = 64 * 1024  # what is read of an error response: scrubbed whole, then its start is shown
SHOWN_ERROR_CHARS = 300
_READ_CHUNK = 64 * 1024


class KeyEchoed(GenerationFailed):
    """The generation holds the API key (whole, a long run of it, or an encoding of it). Its text is dropped: it
    is never kept, journaled or shown. ``reason`` and ``detail`` say so without the key."""

    reason = "echoes_key"
    detail = "the generation holds the API key (or a long part or an encoding of it); its text was dropped"

    def __init__(self) -> None:
        super().__init__(f"{self.reason}: {self.detail}")


class OpenAIGenerator:
    """Any OpenAI-compatible chat-completions endpoint (vLLM, llama.cpp server, hosted APIs).

    Safe with the key: redirects are never followed (the Authorization header would go along to wherever
    they point), the key is not sent over plain http to another machine unless ``allow_plain_http``, and
    every text from the server is scrubbed of it (``KeyScrubber``). Bounded: a response body is read up to
    ``MAX_RESPONSE_BYTES``, a body cut short is a transport failure, and ``timeout_s`` bounds a whole
    attempt (connecting, waiting and reading), not only each socket operation.
    """

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
            host = remote_plain_http_host(self.url)
            if host is not None and not cfg.allow_plain_http:
                raise UserError(
                    f"generator.base_url {cfg.base_url!r}: plain http to {host}, which is not this machine, would "
                    f"send the API key in ${cfg.api_key_env} unencrypted",
                    hint="use https://, or set generator.allow_plain_http=true for a server on a network you trust "
                    "(127.0.0.1, ::1 and localhost never need it)",
                )
            self._key = os.environ.get(cfg.api_key_env, "")
            if not self._key:
                raise UserError(
                    f"generator.api_key_env: the environment variable {cfg.api_key_env} is not set or empty",
                    hint=f"export {cfg.api_key_env}=... before the command (the key is never read from the config)",
                )
        self._scrubber = KeyScrubber(self._key)
        self._opener = urllib.request.build_opener(_NoRedirects, _DeadlineHTTPHandler, _DeadlineHTTPSHandler)
        self._lock = threading.Lock()
        self._pause_until = 0.0  # a 429's Retry-After holds back every request until then
        self._rng = random.Random(cfg.seed)

    def scrub(self, text: str) -> str:
        """``text`` with every form of the API key masked (see ``KeyScrubber``); run it before any cut."""
        return self._scrubber.scrub(text)

    def _post(self, body: bytes) -> _Reply:
        """One attempt: the status, headers and (bounded) body of any answer; _Transport when none came whole."""
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self._key:
            headers["Authorization"] = f"Bearer {self._key}"
        deadline = _Deadline()
        req = _Request(self.url, deadline, data=body, headers=headers, method="POST")
        timer = threading.Timer(self.cfg.timeout_s, deadline.expire)  # bounds the whole attempt
        timer.daemon = True
        timer.start()
        try:
            try:
                resp = self._opener.open(req, timeout=self.cfg.timeout_s)
            except urllib.error.HTTPError as e:  # 3xx (never followed), 4xx, 5xx: read the start of the body
                with e:
                    reply = _Reply(e.code, e.headers, _read_error_body(e), str(e.reason))
            else:
                with resp:
                    reply = _Reply(resp.status, resp.headers, _read_body(resp, MAX_RESPONSE_BYTES), resp.reason)
            if deadline.expired:  # the socket was shut mid-read: what came is not the whole answer
                raise _Transport("")
            return reply
        except _TooLarge:
            raise
        except (_Transport, urllib.error.URLError, OSError, http.client.HTTPException, ValueError) as e:
            if deadline.expired:  # whatever the shut socket made the read say
                raise _Transport(f"no complete response within generator.timeout_s={self.cfg.timeout_s:g} s") from None
            if isinstance(e, _Transport):
                raise
            reason = e.reason if isinstance(e, urllib.error.URLError) else e
            if isinstance(reason, http.client.IncompleteRead):
                raise _Transport(f"the response was cut off ({reason!r})") from None
            refused = isinstance(reason, ConnectionRefusedError)
            raise _Transport(f"{type(reason).__name__}: {reason}", refused=refused) from None
        finally:
            timer.cancel()

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
                reply = self._post(body)
            except _TooLarge as e:  # the same request would get the same answer: not asked again
                raise GenerationFailed(str(e)) from None
            except _Transport as e:
                last = self._one_line(e.text)
                if e.refused and attempt == self.cfg.max_retries:
                    raise UserError(
                        self.scrub(f"generator: cannot reach {self.url} ({last})"),
                        hint="start the server, or check generator.base_url",
                    ) from None
            else:
                if reply.status < 300:
                    try:
                        completion = _completion(json.loads(reply.body.decode("utf-8")))
                    except (ValueError, KeyError, IndexError, TypeError, AttributeError, RecursionError) as e:
                        last = f"malformed response: {type(e).__name__}: {self._one_line(str(e))}"
                    else:
                        if self._scrubber.echoes(completion.text):
                            raise KeyEchoed()
                        return completion
                else:
                    delay = self._http_error(reply)  # raises unless the status is worth another attempt
                    last = f"HTTP {reply.status}: {self._error_text(reply)}"
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

    def _http_error(self, reply: _Reply) -> float | None:
        """Raise for a status not worth retrying; the wait a 429's Retry-After asks for (None: the usual backoff)."""
        code = reply.status
        if 300 <= code < 400:  # followed, the Authorization header would go wherever Location points
            where = reply.headers.get("Location") if reply.headers else None
            shown = self.scrub(urllib.parse.urljoin(self.url, where))[:300] if where else "nowhere (no Location)"
            raise UserError(
                self.scrub(
                    f"generator: {self.url} redirected the request (HTTP {code}) to {shown}; redirects are "
                    "not followed, so an API key never goes anywhere but the configured host"
                ),
                hint="set generator.base_url to the endpoint itself (if the redirect points to it, its URL minus "
                "/chat/completions)",
            )
        detail = self._error_text(reply)
        if code in (401, 403):
            where = f"the key in ${self.cfg.api_key_env}" if self.cfg.api_key_env else "no API key"
            raise UserError(
                self.scrub(f"generator: {self.url} refused the request (HTTP {code}) with {where}: {detail}"),
                hint="check generator.api_key_env and the key's permissions",
            )
        if code == 404:
            raise UserError(
                self.scrub(f"generator: {self.url} answered HTTP 404: {detail}"),
                hint="check generator.base_url (it usually ends in /v1) and generator.model",
            )
        if code not in RETRYABLE:
            raise GenerationFailed(f"HTTP {code}: {detail}")
        if code != 429:
            return None
        with self._lock:
            self.stats.rate_limited += 1
        retry_after = _retry_after(reply.headers.get("Retry-After") if reply.headers else None)
        if retry_after is None:
            return None
        delay = min(retry_after, self.cfg.max_backoff_s)
        with self._lock:
            self._pause_until = max(self._pause_until, self._clock() + delay)
        return delay

    def _error_text(self, reply: _Reply) -> str:
        """The start of an error body on one line (its reason phrase when it has none)."""
        return self._one_line(reply.body.decode("utf-8", "replace")) or self._one_line(reply.reason)

    def _one_line(self, text: str) -> str:
        """``text`` scrubbed whole first (so no cut can split the key past the scrubber), then on one line and cut."""
        return " ".join(self.scrub(text).split())[:SHOWN_ERROR_CHARS]


def _completion(data: Any) -> Completion:
    """The Completion of a chat-completions answer; ValueError (or TypeError ...) naming what is not one."""
    if not isinstance(data, dict) or not isinstance(data.get("choices"), list) or not data["choices"]:
        raise ValueError("no choices list")
    choice = data["choices"][0]
    message = choice.get("message") if isinstance(choice, dict) else None
    if not isinstance(message, dict):
        raise ValueError("choices[0].message is not an object")
    text = message.get("content") or ""
    if not isinstance(text, str):
        raise TypeError("message.content is not a string")
    usage = data.get("usage") or {}
    if not isinstance(usage, dict):
        raise ValueError("usage is not an object")
    return Completion(
        text=text,
        finished=choice.get("finish_reason") != "length",
        prompt_tokens=_count(usage.get("prompt_tokens")),
        completion_tokens=_count(usage.get("completion_tokens")),
    )


def _count(value: Any) -> int:
    """A usage count (None: 0); ValueError for anything but a finite, non-negative number (or such a string)."""
    if value is None:
        return 0
    if isinstance(value, str) and value.strip().isdigit():
        return int(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError("a usage token count is not a non-negative number")
    return int(value)


def _retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header (a number of seconds or an HTTP date); None when absent or unreadable."""
    if not value:
        return None
    try:
        seconds = float(value)
        return None if math.isnan(seconds) else max(0.0, seconds)  # inf: capped at max_backoff_s by the caller
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


# ------------------------------------------------------------------------------------------ http plumbing


@dataclass
class _Reply:
    status: int
    headers: Message
    body: bytes
    reason: str


class _Transport(Exception):
    """No whole answer came (refused, reset, cut off, timed out): retried like any transport failure."""

    def __init__(self, text: str, refused: bool = False) -> None:
        super().__init__(text)
        self.text, self.refused = text, refused


class _TooLarge(Exception):
    """A body over the limit: not read further, and not asked again."""

    def __init__(self, limit: int) -> None:
        super().__init__(
            f"the response is larger than {limit} bytes, the limit for one chat completion; not read further"
        )


def _read_body(resp: Any, limit: int) -> bytes:
    """At most ``limit`` bytes of a response, in chunks; _TooLarge past it, _Transport when it ends early."""
    declared = (resp.headers.get("Content-Length") or "").strip()
    expected = int(declared) if declared.isdigit() else None
    if expected is not None and expected > limit:
        raise _TooLarge(limit)
    chunks, total = [], 0
    while True:
        chunk = resp.read(min(_READ_CHUNK, limit + 1 - total))
        if not chunk:
            break
        chunks.append(chunk)
        total += len(chunk)
        if total > limit:
            raise _TooLarge(limit)
    if expected is not None and total < expected:  # http.client returns a short body silently
        raise _Transport(f"the response was cut off after {total} of {expected} bytes")
    return b"".join(chunks)


def _read_error_body(e: urllib.error.HTTPError) -> bytes:
    """The start of an error response's body (what can be read of it: it is only shown)."""
    try:
        return e.read(ERROR_BODY_BYTES)
    except (OSError, http.client.HTTPException, ValueError):
        return b""


class _Deadline:
    """Shuts a request's sockets down when its time is up, so a server that sends a byte now and then (each
    within the socket timeout) cannot hold a request forever."""

    def __init__(self) -> None:
        self.expired = False
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()

    def watch(self, sock: socket.socket) -> socket.socket:
        with self._lock:
            self._sockets.append(sock)
            expired = self.expired
        if expired:
            _shut(sock)
        return sock

    def expire(self) -> None:
        with self._lock:
            self.expired = True
            sockets = list(self._sockets)
        for sock in sockets:
            _shut(sock)


def _shut(sock: socket.socket) -> None:
    try:  # the plain socket's shutdown, also under TLS: the blocked read returns, in whatever thread it waits
        socket.socket.shutdown(sock, socket.SHUT_RDWR)
    except OSError:
        pass


class _Request(urllib.request.Request):
    def __init__(self, url: str, deadline: _Deadline, **kwargs: Any) -> None:
        super().__init__(url, **kwargs)
        self.deadline = deadline


class _WatchedHTTPConnection(http.client.HTTPConnection):
    deadline: _Deadline

    def connect(self) -> None:
        super().connect()
        self.deadline.watch(self.sock)


class _WatchedHTTPSConnection(http.client.HTTPSConnection):
    deadline: _Deadline

    def connect(self) -> None:
        super().connect()  # the plain socket is watched from its creation (the handshake); then the TLS one
        self.deadline.watch(self.sock)


def _watched(cls: type[http.client.HTTPConnection], req: urllib.request.Request) -> Callable[..., Any]:
    """A connection factory for urllib whose sockets ``req``'s deadline can shut."""
    deadline: _Deadline = getattr(req, "deadline", None) or _Deadline()

    def make(host: str, **kwargs: Any) -> http.client.HTTPConnection:
        conn = cls(host, **kwargs)
        conn.deadline = deadline  # type: ignore[attr-defined]
        create = conn._create_connection  # type: ignore[attr-defined]
        conn._create_connection = lambda *a, **k: deadline.watch(create(*a, **k))  # type: ignore[attr-defined]
        return conn

    return make


class _DeadlineHTTPHandler(urllib.request.HTTPHandler):
    def http_open(self, req: urllib.request.Request) -> Any:
        return self.do_open(_watched(_WatchedHTTPConnection, req), req)


class _DeadlineHTTPSHandler(urllib.request.HTTPSHandler):
    def do_open(self, http_class: Any, req: urllib.request.Request, **kwargs: Any) -> Any:
        return super().do_open(_watched(_WatchedHTTPSConnection, req), req, **kwargs)


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """A redirect is not followed: urllib would send the Authorization header along to wherever it points. The
    3xx comes back as an HTTPError and is reported with its Location."""

    def http_error_302(self, req: Any, fp: Any, code: int, msg: str, headers: Any) -> None:
        return None

    http_error_301 = http_error_303 = http_error_307 = http_error_308 = http_error_302


def remote_plain_http_host(url: str) -> str | None:
    """The host of a plain-http URL when it is not this machine (None for https or loopback)."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme.lower() != "http":
        return None
    host = parts.hostname or ""
    return None if is_loopback(host) else host or url


def is_loopback(host: str) -> bool:
    """This machine: localhost (and *.localhost), 127.0.0.0/8, ::1 (IPv4-mapped too), and 0.0.0.0 / :: (which
    connect here); other names are not resolved."""
    name = host.strip("[]").rstrip(".").lower()
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        ip = ipaddress.ip_address(name.split("%")[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback or ip.is_unspecified


# ---------------------------------------------------------------------------------------- the key scrubber

MASK = "***"
MIN_ECHO = 8  # this many of the key's characters in a row are an echo of it ...
WORD_ECHO = 16  # ... unless all letters: an ordinary word; a run of letters counts from this length (or whole)
_ZERO_WIDTH = "\u00ad\u200b\u200c\u200d\u2060\ufeff"
_SEP = rf"\s{_ZERO_WIDTH}"
_TOKEN = re.compile(
    r"\\u([0-9a-fA-F]{4})"  # 1: a JSON \u escape
    r"|\\([\"\\/bfnrt])"  # 2: another JSON escape
    r"|%([0-9a-fA-F]{2})"  # 3: a URL escape
    rf"|([{_SEP}]+)"  # 4: spaces, line breaks, zero-width characters between the characters
    rf"|([^\\%{_SEP}]+|.)",  # 5: plain text (or a lone \ or %)
    re.DOTALL,
)
_ESCAPES = {"b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t"}


class KeyScrubber:
    """Masks the API key in any text, in the forms a server, a proxy or a model could echo it.

    Usage::

        s = KeyScrubber(key)
        s.scrub(error_body)     # every form of the key replaced by ***; scrub first, then cut
        s.echoes(completion)    # True when a generation holds the key in any of these forms

    Forms: the key itself; JSON-escaped (``\\u0073\\u006b...``, ``\\/``) or URL-escaped; spaced out, wrapped
    over lines or split by zero-width characters; base64 (standard or urlsafe, padded or not, at any
    alignment, as inside ``Basic base64(user:key)``); and partial echoes: a run of ``MIN_ECHO`` (8) or more
    of its characters, in any of those forms. A run made only of letters counts from ``WORD_ECHO`` (16)
    characters, or when it is the whole key, so a key that holds a word (``password12``) does not mask the
    word (``password``) in ordinary text. A key under 8 characters (``EMPTY``, ``dummy``: placeholders of
    local servers) is masked only where it stands as a whole word, and ``echoes`` is False for it.
    """

    def __init__(self, key: str) -> None:
        self.key = key
        self._short: re.Pattern[str] | None = None
        self._secrets: list[str] = []
        if not key:
            return
        if len(key) < MIN_ECHO:
            forms = {key, json.dumps(key)[1:-1]} | _base64_forms(key.encode(), whole=True)
            alternatives = "|".join(re.escape(f) for f in sorted(forms, key=len, reverse=True))
            self._short = re.compile(rf"(?<![A-Za-z0-9])(?:{alternatives})(?![A-Za-z0-9])")
            return
        secrets = {_normalize(key)[0]} | _base64_forms(key.encode(), whole=False)
        self._secrets = [s for s in secrets if len(s) >= MIN_ECHO]
        self._grams = {s[i : i + MIN_ECHO] for s in self._secrets for i in range(len(s) - MIN_ECHO + 1)}
        alphabet = "".join(re.escape(c) for c in sorted(set("".join(self._secrets))))
        self._runs = re.compile(f"[{alphabet}]{{{MIN_ECHO},}}")

    def scrub(self, text: str) -> str:
        if not self.key or not text:
            return text
        if self._short is not None:
            return self._short.sub(MASK, text)
        spans = self._spans(text)
        for start, end in reversed(spans):
            text = text[:start] + MASK + text[end:]
        return text

    def echoes(self, text: str) -> bool:
        return bool(self._secrets) and bool(text) and bool(self._spans(text))

    def _spans(self, text: str) -> list[tuple[int, int]]:
        """Where ``text`` holds the key: merged (start, end) spans of the raw text."""
        flat, index = _normalize(text)
        marks: list[list[int]] = []
        for m in self._runs.finditer(flat):
            for i in range(m.start(), m.end() - MIN_ECHO + 1):
                if flat[i : i + MIN_ECHO] in self._grams:
                    if marks and i <= marks[-1][1]:
                        marks[-1][1] = i + MIN_ECHO
                    else:
                        marks.append([i, i + MIN_ECHO])
        out: list[tuple[int, int]] = []
        for a, b in marks:
            run = flat[a:b]
            if len(run) < WORD_ECHO and run.isalpha() and not any(s in run for s in self._secrets):
                continue  # an ordinary word the key happens to hold
            start, end = index.raw(a, b)
            if out and start <= out[-1][1]:
                out[-1] = (out[-1][0], max(out[-1][1], end))
            else:
                out.append((start, end))
        return out


@dataclass
class _Index:
    """Maps a span of the normalized text back to the raw text it came from."""

    flat_starts: list[int]
    raw_starts: list[int]
    raw_ends: list[int]
    plain: list[bool]

    def raw(self, a: int, b: int) -> tuple[int, int]:
        i = bisect.bisect_right(self.flat_starts, a) - 1
        j = bisect.bisect_right(self.flat_starts, b - 1) - 1
        start = self.raw_starts[i] + (a - self.flat_starts[i]) if self.plain[i] else self.raw_starts[i]
        end = self.raw_starts[j] + (b - self.flat_starts[j]) if self.plain[j] else self.raw_ends[j]
        return start, end


def _normalize(text: str) -> tuple[str, _Index]:
    """``text`` with JSON and URL escapes decoded and the spaces and zero-width characters dropped, and its map."""
    pieces: list[str] = []
    index = _Index([], [], [], [])
    n = 0
    for m in _TOKEN.finditer(text):
        group = m.lastindex
        if group == 4:
            continue
        if group == 5:
            piece = m.group(5)
        elif group == 1:
            piece = chr(int(m.group(1), 16))
        elif group == 2:
            piece = _ESCAPES.get(m.group(2), m.group(2))
        else:
            piece = chr(int(m.group(3), 16))
        if group != 5 and (piece.isspace() or piece in _ZERO_WIDTH or piece < " "):
            continue  # an escaped space or control character: a separator too
        pieces.append(piece)
        index.flat_starts.append(n)
        index.raw_starts.append(m.start())
        index.raw_ends.append(m.end())
        index.plain.append(group == 5)
        n += len(piece)
    return "".join(pieces), index


def _base64_forms(data: bytes, whole: bool) -> set[str]:
    """The key's base64 (standard and urlsafe): whole (padded and not), or as it shows at each of the three
    alignments inside a longer base64 text (the characters that depend on the key alone)."""
    out: set[str] = set()
    for offset in (0,) if whole else (0, 1, 2):
        encoded = base64.b64encode(b"\0" * offset + data).decode()
        if whole or offset == 0:
            forms = [encoded, encoded.rstrip("=")]
        else:
            forms = [encoded[-(-8 * offset // 6) : 8 * (offset + len(data)) // 6]]
        for form in forms:
            out |= {form, form.translate(str.maketrans("+/", "-_"))}
    return out
