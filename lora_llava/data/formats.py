"""Read training data into one conversation type, reporting every bad sample with its reason.

Usage::

    samples, bad = read_source(DataSource(path="train.json", image_folder="images"))
    for b in bad: print(b.describe())

LLaVA-Instruct JSON (a list) and JSONL (one object a line) are read. Each sample is
``{"id", "image" (optional: a path or a list of paths), "conversations": [{"from", "value"}, ...]}``
with ``from`` in human/user, gpt/assistant, system.

The ``<image>`` rule: a sample with N images needs N ``<image>`` placeholders in its human
turns, or none at all, in which case they are put at the start of the first human turn. As in
LLaVA-1.5, a single image's placeholder is moved to the start of the first human turn
("image first"). A placeholder in a sample without images is an error.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from lora_llava.config.schema import DataSource
from lora_llava.data.images import ImageError, load_image, resolve_image_path
from lora_llava.errors import UserError

IMAGE = "<image>"
_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


@dataclass
class Sample:
    source: str
    index: int
    id: str
    messages: list[tuple[str, str]]
    images: list[Path] = field(default_factory=list)
    line: int | None = None

    def where(self) -> str:
        return _where(self.source, self.index, self.id, self.line)


@dataclass
class BadSample:
    source: str
    index: int
    id: str | None
    reason: str
    line: int | None = None

    def describe(self) -> str:
        return f"{_where(self.source, self.index, self.id, self.line)}: {self.reason}"

    def to_json(self) -> dict:
        return {"source": self.source, "index": self.index, "id": self.id, "line": self.line, "reason": self.reason}


def _where(source: str, index: int, id: str | None, line: int | None) -> str:
    loc = f"line {line}" if line is not None else f"sample {index}"
    return f"{source} {loc}" + (f" (id {id})" if id is not None else "")


def _records(path: Path) -> list[tuple[int, int | None, object]]:
    """(index, line, record) for JSON or JSONL; raises UserError if the file itself is unusable."""
    if not path.is_file():
        raise UserError(
            f"data file {str(path)!r} not found",
            hint="check data.*.path (relative paths start at the current directory)",
        )
    raw = path.read_bytes()
    if path.suffix == ".jsonl":
        out = []
        for n, line in enumerate(raw.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                out.append((len(out), n, json.loads(line.decode("utf-8"))))
            except UnicodeDecodeError as e:
                out.append((len(out), n, ValueError(f"not UTF-8 ({e.reason} at byte {e.start})")))
            except json.JSONDecodeError as e:
                out.append((len(out), n, ValueError(f"broken JSON line ({e.msg}, column {e.colno})")))
        return out
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise UserError(f"data file {str(path)!r} is not UTF-8 (byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise UserError(
            f"data file {str(path)!r}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}"
        ) from None
    if not isinstance(data, list):
        raise UserError(f"data file {str(path)!r}: expected a JSON list of samples, got {type(data).__name__}")
    return [(i, None, rec) for i, rec in enumerate(data)]


def _parse(rec: object, src: DataSource, check_images: bool) -> tuple[str | None, list[tuple[str, str]], list[Path]]:
    """Validate one record; return (id, messages, image paths) or raise ValueError with the reason."""
    if isinstance(rec, ValueError):
        raise rec
    if not isinstance(rec, dict):
        raise ValueError(f"expected an object, got {type(rec).__name__}")
    sid = rec.get("id")
    sid = None if sid is None else str(sid)
    conv = rec.get("conversations")
    if conv is None:
        raise ValueError("missing field 'conversations'")
    if not isinstance(conv, list) or not conv:
        raise ValueError("'conversations' is empty or not a list")
    messages: list[tuple[str, str]] = []
    for t, turn in enumerate(conv):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise ValueError(f"turn {t} needs 'from' and 'value'")
        role = _ROLES.get(turn["from"]) if isinstance(turn["from"], str) else None
        if role is None:
            raise ValueError(f"turn {t}: unknown speaker {turn['from']!r} (human, gpt, system)")
        if not isinstance(turn["value"], str):
            raise ValueError(f"turn {t}: 'value' must be a string, got {type(turn['value']).__name__}")
        messages.append((role, turn["value"]))
    body = messages[1:] if messages[0][0] == "system" else messages
    if any(r == "system" for r, _ in body):
        raise ValueError("a system turn may only come first")
    for t, (role, _) in enumerate(body):
        if role != ("user" if t % 2 == 0 else "assistant"):
            raise ValueError(
                f"wrong role order at turn {t + len(messages) - len(body)}: turns must alternate human, gpt, ..."
            )
    if not body or body[-1][0] != "assistant":
        raise ValueError("no answer to learn: the conversation must end with a gpt turn")
    if any(not v.strip() for r, v in body if r == "assistant"):
        raise ValueError("an answer is empty: nothing to learn")

    image = rec.get("image")
    names = [] if image is None else image if isinstance(image, list) else [image]
    if not all(isinstance(n, str) for n in names):
        raise ValueError("'image' must be a path or a list of paths")
    placeholders = sum(v.count(IMAGE) for r, v in messages if r != "assistant")
    if any(IMAGE in v for r, v in messages if r == "assistant"):
        raise ValueError(f"{IMAGE} in an answer")
    if placeholders and placeholders != len(names):
        what = "no image" if not names else f"{len(names)} image(s)"
        raise ValueError(f"{placeholders} {IMAGE} placeholder(s) but {what}")
    paths: list[Path] = []
    for n in names:
        try:
            p = resolve_image_path(n, src.image_folder)
            if check_images:
                load_image(p)
        except ImageError as e:
            raise ValueError(str(e)) from None
        paths.append(p)
    if names:
        if len(names) == 1:  # image first: move the single placeholder to the start
            messages = [(r, v.replace(IMAGE, "").strip()) if IMAGE in v else (r, v) for r, v in messages]
        if len(names) == 1 or placeholders == 0:
            first = next(i for i, (r, _) in enumerate(messages) if r == "user")
            role, text = messages[first]
            messages[first] = (role, (IMAGE + "\n") * len(names) + text)
    return sid, messages, paths


def read_source(src: DataSource, check_images: bool = True) -> tuple[list[Sample], list[BadSample]]:
    """Read every record of ``src``; good ones become Samples, the rest BadSamples with a reason."""
    path = Path(src.path)
    samples: list[Sample] = []
    bad: list[BadSample] = []
    seen: dict[str, int] = {}
    for index, line, rec in _records(path):
        if src.max_samples is not None and len(samples) + len(bad) >= src.max_samples:
            break
        sid = str(rec.get("id")) if isinstance(rec, dict) and rec.get("id") is not None else None
        try:
            sid, messages, images = _parse(rec, src, check_images)
        except ValueError as e:
            bad.append(BadSample(str(path), index, sid, str(e), line))
            continue
        if sid is not None:
            seen[sid] = seen.get(sid, 0) + 1
        samples.append(Sample(str(path), index, sid if sid is not None else str(index), messages, images, line))
    dups = sorted(k for k, v in seen.items() if v > 1)
    if dups:
        import warnings

        warnings.warn(f"{path}: {len(dups)} duplicate id(s), e.g. {', '.join(dups[:3])}", stacklevel=2)
    return samples, bad
