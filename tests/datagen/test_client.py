"""The OpenAI-compatible client's safety: redirects are refused, the key is not sent over plain http to another
host, no form of the key reaches an error, the journal, the report or the output, and responses are bounded
(size, truncation, total time). Servers are http.server on 127.0.0.1 in threads."""

from __future__ import annotations

import base64
import json
import re
import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from lora_llava.datagen import generators
from lora_llava.datagen.config import load_datagen_config
from lora_llava.datagen.generators import GenerationFailed, KeyEchoed, KeyScrubber, OpenAIGenerator
from lora_llava.datagen.run import generate_data
from lora_llava.errors import UserError

KEY = "sk-canary-0d1e2f3a4b5c6d7e"  # 26 characters, as a real key would be (20-60)
ENV = "DATAGEN_CLIENT_KEY"
MESSAGES = [{"role": "system", "content": "write a conversation"}, {"role": "user", "content": "- A red square."}]
ANSWER = "Question: What color is the shape?\nAnswer: The shape is red."


def b64(data: str, urlsafe: bool = False, pad: bool = True) -> str:
    out = (base64.urlsafe_b64encode if urlsafe else base64.b64encode)(data.encode()).decode()
    return out if pad else out.rstrip("=")


# every way a server or a model could echo the key
ECHOES = {
    "plain": KEY,
    "json_unicode_escapes": "".join(f"\\u{ord(c):04x}" for c in KEY),
    "json_mixed_escapes": KEY[:5] + "".join(f"\\u{ord(c):04X}" for c in KEY[5:12]) + KEY[12:],
    "all_but_one_character": KEY[:-1],
    "the_last_half": KEY[13:],
    "base64": b64(KEY),
    "base64_unpadded": b64(KEY, pad=False),
    "base64_urlsafe": b64(KEY, urlsafe=True),
    "base64_urlsafe_unpadded": b64(KEY, urlsafe=True, pad=False),
    "basic_auth": "Basic " + b64("user:" + KEY),  # the key at another base64 alignment
    "spaced": " ".join(KEY),
    "line_wrapped": KEY[:11] + "\n  " + KEY[11:],
    "json_string": json.dumps({"echo": KEY})[1:-1],
}


def leaks(text: str) -> list[str]:
    """What of the key ``text`` still shows: an 8-character run of it (spaces and escapes undone), or a base64 form."""
    flat = re.sub(r"\\u([0-9a-fA-F]{4})", lambda m: chr(int(m.group(1), 16)), text)
    flat = re.sub(r"[\s\\]+", "", flat)
    found = [KEY[i : i + 8] for i in range(len(KEY) - 7) if KEY[i : i + 8] in flat]
    for prefix in ("", "user:"):
        for urlsafe in (False, True):
            core = b64(prefix + KEY, urlsafe, pad=False)[len(prefix) * 4 // 3 + 2 : -2]
            found += [core] if core in text else []
    return found


class Raw:
    """A loopback HTTP server answering every request with ``respond(handler)``; it records what it was sent."""

    def __init__(self, respond: Callable[[BaseHTTPRequestHandler], None], tls: ssl.SSLContext | None = None) -> None:
        self.seen: list[dict] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            timeout = 10
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def handle_one_request(self) -> None:
                try:
                    super().handle_one_request()
                except OSError:  # the client hung up (as it should on a bad response)
                    self.close_connection = True

            def _any(self) -> None:
                n = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(n) if n else b""
                server.seen.append(
                    {
                        "method": self.command,
                        "path": self.path,
                        "authorization": self.headers.get("Authorization"),
                        "body": body,
                    }  # fmt: skip
                )
                self.close_connection = True
                respond(self)

            do_GET = do_POST = do_PUT = _any  # noqa: N815

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        if tls is not None:
            self.httpd.socket = tls.wrap_socket(self.httpd.socket, server_side=True)
        scheme = "https" if tls is not None else "http"
        self.url = f"{scheme}://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def raw():
    made: list[Raw] = []

    def make(respond: Callable[[BaseHTTPRequestHandler], None]) -> Raw:
        made.append(Raw(respond))
        return made[-1]

    yield make
    for s in made:
        s.close()


def send(h: BaseHTTPRequestHandler, status: int, body: bytes | str, headers: dict | None = None) -> None:
    data = body.encode() if isinstance(body, str) else body
    h.send_response(status)
    for k, v in {"Content-Type": "application/json", "Content-Length": str(len(data)), **(headers or {})}.items():
        h.send_header(k, v)
    h.end_headers()
    h.wfile.write(data)


def completion(content: str = ANSWER) -> str:
    choice = {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}
    return json.dumps({"choices": [choice], "usage": {"prompt_tokens": 10, "completion_tokens": 12}})


def make_client(base_url: str, key: bool = True, monkeypatch=None, **gen) -> OpenAIGenerator:
    raw_cfg = {
        "annotations": {"path": "a.json", "image_folder": "images"},
        "output": "o.json",
        "generator": {"type": "openai", "model": "m", "base_url": base_url, "backoff_s": 0.0, **gen},
    }
    if key:
        raw_cfg["generator"]["api_key_env"] = ENV
    cfg = load_datagen_config(raw_cfg).generator
    return OpenAIGenerator(cfg, sleep=lambda s: None)


@pytest.fixture(autouse=True)
def _key(monkeypatch):
    monkeypatch.setenv(ENV, KEY)


# --------------------------------------------------------------------------------------------- redirects


@pytest.mark.parametrize("code", [301, 302, 303, 307, 308])
def test_a_redirect_is_refused_and_the_key_never_reaches_another_origin(raw, code):
    other = raw(lambda h: send(h, 200, completion()))  # another port: another origin
    target = f"{other.url}/v1/chat/completions?token={KEY}"
    api = raw(lambda h: send(h, code, "moved", {"Location": target}))
    gen = make_client(api.url + "/v1", max_retries=3)
    with pytest.raises(UserError) as e:
        gen.complete(MESSAGES, "k")
    message = str(e.value).splitlines()[0]  # the error line (a hint line follows)
    assert f"redirected the request (HTTP {code}) to {other.url}/v1/chat/completions?token=***" in message
    assert not leaks(str(e.value))
    assert other.seen == []  # never contacted, so never sent the Authorization header
    assert [r["authorization"] for r in api.seen] == [f"Bearer {KEY}"]  # one request, not retried


def test_a_relative_redirect_is_named_in_full_and_not_followed(raw):
    api = raw(lambda h: send(h, 308, "", {"Location": "/v2/chat/completions"}))
    gen = make_client(api.url + "/v1")
    with pytest.raises(UserError, match=f"to {api.url}/v2/chat/completions; redirects are not followed"):
        gen.complete(MESSAGES, "k")
    assert len(api.seen) == 1


# ---------------------------------------------------------------------------------------- plain http


@pytest.mark.parametrize("host", ["10.1.2.3:8000", "example.com", "192.168.1.20", "[fd00::5]:8000", "vllm:8000"])
def test_the_key_over_plain_http_to_another_host_is_refused_unless_allowed(host, capsys):
    with pytest.raises(UserError) as e:
        make_client(f"http://{host}/v1")
    assert "generator.allow_plain_http" in str(e.value) and KEY not in str(e.value)
    make_client(f"http://{host}/v1", allow_plain_http=True)  # the user's choice: a trusted network
    make_client(f"https://{host}/v1")  # TLS
    make_client(f"http://{host}/v1", key=False)  # no key: nothing to protect
    assert capsys.readouterr() == ("", "")


@pytest.mark.parametrize(
    "host", ["127.0.0.1:8000", "127.3.4.5", "localhost:8080", "LOCALHOST", "[::1]:8000", "0.0.0.0:8000"]
)
def test_plain_http_to_this_machine_is_normal_and_silent(host, capsys, recwarn):
    make_client(f"http://{host}/v1")
    assert capsys.readouterr() == ("", "") and len(recwarn) == 0


# -------------------------------------------------------------------------------------------- the key


@pytest.mark.parametrize("form", list(ECHOES))
def test_an_error_body_echoing_the_key_is_scrubbed_in_every_form(raw, form):
    api = raw(lambda h: send(h, 400, f'{{"error": "bad request with key {ECHOES[form]} rejected"}}'))
    gen = make_client(api.url + "/v1")
    with pytest.raises(GenerationFailed) as e:
        gen.complete(MESSAGES, "k")
    assert "***" in str(e.value) and not leaks(str(e.value)), str(e.value)
    assert "bad request with key" in str(e.value)


def test_the_key_past_the_shown_300_characters_is_scrubbed_before_the_cut(raw):
    # the key straddles the cut: before, the first 21 of its 26 characters reached the message
    api = raw(lambda h: send(h, 400, "x" * 279 + KEY + " tail"))
    gen = make_client(api.url + "/v1")
    with pytest.raises(GenerationFailed) as e:
        gen.complete(MESSAGES, "k")
    assert not leaks(str(e.value)) and str(e.value).startswith("HTTP 400: xxx")


@pytest.mark.parametrize("status", [401, 404, 500])
def test_fatal_and_retried_errors_are_scrubbed_too(raw, status):
    api = raw(lambda h: send(h, status, f"key {ECHOES['json_unicode_escapes']} / {ECHOES['basic_auth']}"))
    gen = make_client(api.url + "/v1", max_retries=1)
    with pytest.raises((UserError, GenerationFailed)) as e:
        gen.complete(MESSAGES, "k")
    assert f"HTTP {status}" in str(e.value) and not leaks(str(e.value))


def test_the_scrubber_masks_runs_of_the_key_not_ordinary_words():
    s = KeyScrubber(KEY)
    text = "The canary sang; the sky was clear, and a 0d1e ID was printed."  # short pieces: not the key
    assert s.scrub(text) == text and not s.echoes(text)
    assert s.scrub(f"got {KEY[2:10]} then") == "got *** then"  # 8 characters in a row: a partial echo
    assert s.scrub(f"got {KEY[:7]}!") == f"got {KEY[:7]}!"  # 7: not
    # keys made of words: the words alone are not echoes, a long run or the whole key is
    words = KeyScrubber("password12")
    assert words.scrub("please reset your password now") == "please reset your password now"
    assert words.scrub("it was password1") == "it was ***"
    passphrase = KeyScrubber("correct-horse-battery-staple")
    assert passphrase.scrub("a horse, a battery and a staple") == "a horse, a battery and a staple"
    assert passphrase.scrub("try horse-battery-staple") == "try ***"
    letters = KeyScrubber("mysecretpass")  # letters only and under 16: only the whole of it
    assert letters.scrub("my secret is mysecretpass") == "my secret is ***"
    assert letters.scrub("this is mysecret") == "this is mysecret"
    # a key under 8 characters (EMPTY, dummy: placeholders of local servers) is masked only as a whole word
    short = KeyScrubber("EMPTY")
    assert short.scrub("key EMPTY, EMPTYING the bin") == "key ***, EMPTYING the bin"
    assert not short.echoes("the bin is EMPTY")  # a placeholder is no secret: its word is not rejected
    assert KeyScrubber("").scrub("anything at all") == "anything at all"


def test_the_scrubber_reads_a_large_text_quickly():
    s = KeyScrubber(KEY)
    text = ("An ordinary sentence about a red square on a gray background, again and again. " * 50_000) + KEY
    start = time.monotonic()
    out = s.scrub(text)
    assert out.endswith(" ***") and not leaks(out[-200:]) and time.monotonic() - start < 10


@pytest.mark.parametrize("form", list(ECHOES))
def test_a_completion_echoing_the_key_is_rejected_with_a_reason_without_it(raw, form):
    api = raw(lambda h: send(h, 200, completion(f"{ANSWER}\nQuestion: Key?\nAnswer: It is {ECHOES[form]}.")))
    gen = make_client(api.url + "/v1", max_retries=2)
    with pytest.raises(KeyEchoed) as e:
        gen.complete(MESSAGES, "k")
    assert e.value.reason == "echoes_key" and not leaks(str(e.value)) and not leaks(e.value.detail)
    assert len(api.seen) == 1  # a generation, not a transport failure: not asked again here


def test_no_form_of_the_key_reaches_the_journal_the_report_or_the_output(openai_config, server):
    forms = list(ECHOES.values())

    def answer(body: dict) -> str:  # every request echoes the key (in turn, each form), image 0's kinds aside
        text = server.canned(body)
        if "- A red square on gray." in body["messages"][-1]["content"]:
            return text
        return text + f"\nQuestion: And the key?\nAnswer: {forms[len(server.requests) % len(forms)]}"

    server.answer = answer
    server.script = [(400, {}, f"bad {form}") for form in forms[:4]] + [(500, {}, f"err {forms[5]}")]
    config = load_datagen_config(openai_config(api_key_env=ENV, max_retries=0, concurrency=1))
    result = generate_data(config, log=lambda line: None, progress=False)
    out = result.output.parent
    texts = {p.name: p.read_text() for p in out.iterdir() if p.is_file()}
    assert set(texts) >= {"gen.json", "gen.journal.jsonl", "gen.report.txt"}
    for name, text in texts.items():
        assert not leaks(text), (name, leaks(text))
    kept = json.loads(texts["gen.json"])
    assert kept and {s["provenance"]["annotation_id"] for s in kept} <= {"0", "4"}  # the red squares: no key
    entries = [json.loads(line) for line in texts["gen.journal.jsonl"].splitlines()]
    echoed = [e for e in entries if "echoes_key" in e.get("detail", "") + e.get("reason", "")]
    assert echoed and all(e["status"] == "rejected" and e["reason"] == "echoes_key" and "text" not in e for e in echoed)


# ---------------------------------------------------------------------------------------------- bounds


def test_a_response_over_the_size_limit_is_an_error_naming_it_and_is_not_read_whole(raw, monkeypatch):
    monkeypatch.setattr(generators, "MAX_RESPONSE_BYTES", 64 * 1024, raising=False)
    sent = []

    def endless(h: BaseHTTPRequestHandler) -> None:  # no Content-Length: the body ends when the connection does
        h.send_response(200)
        h.send_header("Content-Type", "application/json")
        h.end_headers()
        h.wfile.write(b'{"choices": [{"message": {"content": "')
        for _ in range(256):  # 16 MiB at most, should the client read on
            h.wfile.write(b"a" * 65536)
            sent.append(1)
        h.wfile.write(b'"}}]}')

    api = raw(endless)
    gen = make_client(api.url + "/v1", max_retries=3)
    with pytest.raises(GenerationFailed, match=r"larger than 65536 bytes, the limit for one chat completion"):
        gen.complete(MESSAGES, "k")
    assert len(api.seen) == 1  # the same request would get the same answer: not retried
    time.sleep(0.2)
    assert len(sent) < 64  # the client hung up after the limit, it did not read 16 MiB

    declared = raw(lambda h: send(h, 200, "", {"Content-Length": str(10**9)}))
    with pytest.raises(GenerationFailed, match="larger than 65536 bytes"):
        make_client(declared.url + "/v1").complete(MESSAGES, "k")


@pytest.mark.parametrize("framing", ["content-length", "chunked", "no-length-json-cut"])
def test_a_truncated_response_is_one_clear_failure_retried_like_a_transport_error(raw, framing):
    body = completion().encode()

    def cut(h: BaseHTTPRequestHandler) -> None:
        h.send_response(200)
        h.send_header("Content-Type", "application/json")
        if framing == "content-length":
            h.send_header("Content-Length", str(len(body)))
            h.end_headers()
            h.wfile.write(body[:50])
        elif framing == "chunked":
            h.send_header("Transfer-Encoding", "chunked")
            h.end_headers()
            h.wfile.write(b"%x\r\n%s\r\n" % (50, body[:50]) + b"100\r\n" + body[50:70])
        else:
            h.end_headers()
            h.wfile.write(body[:50])
        h.wfile.flush()
        h.connection.shutdown(socket.SHUT_RDWR)

    api = raw(cut)
    gen = make_client(api.url + "/v1", max_retries=1)
    with pytest.raises(GenerationFailed) as e:
        gen.complete(MESSAGES, "k")
    message = str(e.value)
    assert message.startswith("gave up after 2 attempts; last: ") and len(api.seen) == 2
    if framing == "content-length":
        assert message.endswith(f"the response was cut off after 50 of {len(body)} bytes")
    elif framing == "chunked":
        assert "the response was cut off" in message
    else:
        assert "malformed response" in message  # without a length only the JSON shows the cut


def drip(body: bytes, every: float) -> Callable[[BaseHTTPRequestHandler], None]:
    def respond(h: BaseHTTPRequestHandler) -> None:
        h.send_response(200)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        for i in range(len(body)):
            h.wfile.write(body[i : i + 1])
            h.wfile.flush()
            time.sleep(every)

    return respond


def test_a_server_dripping_bytes_cannot_hold_a_request_past_timeout_s(raw):
    body = completion().encode()
    api = raw(drip(body, every=3.0 / len(body)))  # each byte well within the socket timeout; 3 s in all
    gen = make_client(api.url + "/v1", timeout_s=0.6, max_retries=0)
    start = time.monotonic()
    with pytest.raises(GenerationFailed, match=r"no complete response within generator.timeout_s=0.6 s"):
        gen.complete(MESSAGES, "k")
    assert time.monotonic() - start < 2.0


def test_malformed_responses_are_failures_not_tracebacks(raw):
    bodies = [
        "[" * 200_000,  # nesting deeper than the JSON reader's recursion limit
        '{"choices": [{"message": "a string"}]}',
        '{"choices": [{"message": {"content": "x"}, "finish_reason": "stop"}], "usage": {"prompt_tokens": 1e400}}',
        '{"choices": [{"message": {"content": "x"}}], "usage": [1, 2]}',
        '{"choices": {"0": 1}}',
        b"\xff\xfe not utf-8",
    ]
    api = raw(lambda h: send(h, 200, bodies[(len(api.seen) - 1) % len(bodies)]))
    gen = make_client(api.url + "/v1", max_retries=0)
    for _ in bodies:
        with pytest.raises(GenerationFailed, match="malformed response"):
            gen.complete(MESSAGES, "k")


# ------------------------------------------------------------------------------------------------ TLS


@pytest.fixture
def tls_server(tmp_path, monkeypatch):
    """A loopback HTTPS server (a self-signed certificate for 127.0.0.1, trusted through SSL_CERT_FILE)."""
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command to make a certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))
    made: list[Raw] = []

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(str(cert), str(key))

    def make(respond: Callable[[BaseHTTPRequestHandler], None]) -> str:
        made.append(Raw(respond, tls=context))
        return made[-1].url

    yield make
    for s in made:
        s.close()


def test_tls_answers_and_a_dripping_tls_server_is_bounded_too(tls_server):
    good = tls_server(lambda h: send(h, 200, completion()))
    assert make_client(good + "/v1").complete(MESSAGES, "k").text == ANSWER
    body = completion().encode()
    slow = tls_server(drip(body, every=3.0 / len(body)))
    gen = make_client(slow + "/v1", timeout_s=0.6, max_retries=0)
    start = time.monotonic()
    with pytest.raises(GenerationFailed, match="no complete response within generator.timeout_s=0.6 s"):
        gen.complete(MESSAGES, "k")
    assert time.monotonic() - start < 2.0


@pytest.mark.parametrize(
    "answer",
    [b"NOT HTTP AT ALL\r\n\r\n", b"HTTP/1.1 200 OK\r\nX-Long: " + b"a" * 70_000 + b"\r\n\r\n", b""],
    ids=["garbage_status_line", "header_line_too_long", "closed_without_answer"],
)
def test_a_broken_http_answer_is_a_transport_failure_not_a_traceback(raw, answer):
    def respond(h: BaseHTTPRequestHandler) -> None:
        h.wfile.write(answer)
        h.wfile.flush()
        h.connection.shutdown(socket.SHUT_RDWR)

    api = raw(respond)
    gen = make_client(api.url + "/v1", max_retries=1)
    with pytest.raises(GenerationFailed, match="gave up after 2 attempts; last: ") as e:
        gen.complete(MESSAGES, "k")
    assert len(api.seen) == 2 and "\n" not in str(e.value)


def test_timeout_s_is_bounded_and_listed_with_allow_plain_http_in_the_help():
    from lora_llava.datagen.keys import keys_epilog

    with pytest.raises(UserError, match="timeout_s"):
        make_client("http://127.0.0.1:1/v1", timeout_s=10**9)
    help_text = keys_epilog()
    assert "generator.allow_plain_http" in help_text and "generator.timeout_s" in help_text
