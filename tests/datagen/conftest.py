"""Fixtures for the datagen tests: a small annotated image set and a loopback OpenAI-compatible server.

The server (http.server on 127.0.0.1, port 0, in a thread) answers chat completions with a canned,
valid answer of the kind the system prompt asks for, built from the caption in the request; a test
can queue faults (`server.script`: status, headers, body, consumed first) or replace the answer.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

COLORS = {"red": (220, 30, 30), "green": (30, 170, 50), "blue": (30, 60, 220), "yellow": (240, 210, 20)}


def kind_of(body: dict) -> str:
    system = body["messages"][0]["content"]
    if "write a conversation" in system:
        return "conversation"
    if "detailed description" in system:
        return "detail"
    return "complex_reasoning"


def canned(body: dict) -> str:
    """A valid answer of the requested kind about the image the last user message describes."""
    m = re.search(r"- A (\w+) (\w+)", body["messages"][-1]["content"])
    color, shape = m.groups() if m else ("gray", "thing")
    return {
        "conversation": f"Question: What color is the shape?\nAnswer: The shape is {color}.\n"
        f"Question: What kind of shape is it?\nAnswer: It is a {shape}.",
        "detail": f"The picture shows a single {color} {shape} drawn on a plain light gray background, "
        "with nothing else around it.",
        "complex_reasoning": f"Question: Why might someone draw one {color} {shape} on an empty background?\n"
        f"Answer: A lone {color} {shape} on a plain background looks like a test pattern, so it was "
        "probably made to check how colors and shapes are recognized.",
    }[kind_of(body)]


class FakeOpenAI:
    def __init__(self) -> None:
        self.requests: list[dict] = []  # {"body", "authorization"}
        self.script: list[tuple[int, dict, str]] = []  # faults, consumed first
        self.answer: Callable[[dict], str] = canned
        self.finish_reason: Callable[[dict], str] = lambda body: "stop"
        self.lock = threading.Lock()
        self.canned, self.kind_of = canned, kind_of  # for tests that alter some answers
        self.delay = 0.0  # seconds each answer takes
        self.in_flight = self.max_in_flight = 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            timeout = 10

            def log_message(self, *args: object) -> None:  # quiet
                pass

            def do_POST(self) -> None:  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    server.requests.append({"body": body, "authorization": self.headers.get("Authorization")})
                    fault = server.script.pop(0) if server.script else None
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                time.sleep(server.delay)
                with server.lock:
                    server.in_flight -= 1
                if self.path != "/v1/chat/completions":
                    fault = (404, {}, '{"error": "no such route"}')
                if fault is None:
                    content = server.answer(body)
                    reply = {
                        "id": "x",
                        "object": "chat.completion",
                        "choices": [
                            {
                                "index": 0,
                                "message": {"role": "assistant", "content": content},
                                "finish_reason": server.finish_reason(body),
                            }
                        ],
                        "usage": {"prompt_tokens": 100, "completion_tokens": len(content.split())},
                    }
                    fault = (200, {}, json.dumps(reply))
                status, headers, text = fault
                data = text.encode()
                self.send_response(status)
                for k, v in {"Content-Type": "application/json", **headers}.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)

    def asked(self) -> list[tuple[str, str]]:
        """(first caption, kind) of every request, in order."""
        out = []
        for r in self.requests:
            m = re.search(r"- (.+)", r["body"]["messages"][-1]["content"])
            out.append((m.group(1) if m else "", kind_of(r["body"])))
        return out


@pytest.fixture
def server():
    s = FakeOpenAI()
    yield s
    s.close()


def _make_images(root: Path, n: int = 6) -> list[dict]:
    """n PNGs (a colored square or circle on gray) under root/images; their COCO image records + boxes."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        color, shape = list(COLORS)[i % 4], ("square", "circle")[i % 2]
        w, h, x, y, s = 64, 48, 4 + 3 * i, 6 + 2 * i, 16
        img = Image.new("RGB", (w, h), (235, 235, 235))
        draw = ImageDraw.Draw(img)
        (draw.rectangle if shape == "square" else draw.ellipse)([x, y, x + s, y + s], fill=COLORS[color])
        name = f"img{i}.png"
        img.save(root / "images" / name)
        out.append({"id": i, "file_name": name, "width": w, "height": h, "color": color, "shape": shape,
                    "bbox": [x, y, s, s]})  # fmt: skip
    return out


@pytest.fixture
def coco(tmp_path) -> Path:
    """tmp_path/coco.json (6 images, 2 captions and 1 box each) and tmp_path/images."""
    images = _make_images(tmp_path)
    anns = []
    for im in images:
        anns.append({"id": 100 + im["id"], "image_id": im["id"], "caption": f"A {im['color']} {im['shape']} on gray."})
        anns.append({"id": 200 + im["id"], "image_id": im["id"], "caption": f"One {im['color']} {im['shape']}."})
        anns.append({"id": 300 + im["id"], "image_id": im["id"], "bbox": im["bbox"], "category_id": 1 + (im["id"] % 2)})
    data = {
        "images": [{k: im[k] for k in ("id", "file_name", "width", "height")} for im in images],
        "annotations": anns,
        "categories": [{"id": 1, "name": "square"}, {"id": 2, "name": "circle"}],
    }
    path = tmp_path / "coco.json"
    path.write_text(json.dumps(data))
    return path


@pytest.fixture
def make_images(tmp_path) -> Callable[[int], list[dict]]:
    """make_images(n) -> n images under tmp_path/images, as COCO image records with color, shape, bbox."""
    return lambda n=6: _make_images(tmp_path, n)


@pytest.fixture
def openai_config(coco, server) -> Callable[..., dict]:
    """openai_config(**generator_keys) -> a datagen config dict: coco + the loopback server."""
    return lambda **generator: _openai_config(coco, server, **generator)


def _openai_config(coco: Path, server: FakeOpenAI, **generator) -> dict:
    return {
        "annotations": {"path": str(coco), "image_folder": str(coco.parent / "images")},
        "output": str(coco.parent / "out" / "gen.json"),
        "generator": {
            "type": "openai",
            "model": "canned",
            "base_url": server.base_url,
            "backoff_s": 0.0,
            "concurrency": 3,
            **generator,
        },
    }
