"""Crash-safe, resumable output: a JSON-lines journal of every generation, then the LLaVA JSON.

Usage::

    journal = Journal(Path("data/gen.journal.jsonl"))       # reads what an earlier run wrote
    journal.done(("139", "conversation"))                  # kept or rejected before: not asked again
    journal.append({"image_id": "139", "kind": "conversation", "status": "kept", "sample": {...}})
    write_llava_json(Path("data/gen.json"), samples)         # atomically: a temporary file, then a rename

One line per (image, kind) attempt, written with a single write and fsync'd, so a kill leaves whole
lines; a line cut off by a kill is dropped when the journal is opened again. ``kept`` and ``rejected``
entries are done (a rejected generation is not paid for twice); a ``failed`` one (the request itself
failed after its retries) is asked again by the next run.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from lora_llava.errors import UserError

DONE = ("kept", "rejected")


class Journal:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.entries: dict[tuple[str, str], dict[str, Any]] = {}  # the last entry of each (image, kind)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            if path.is_file():
                self._read()
            self._file = open(path, "a", encoding="utf-8")
        except OSError as e:
            raise UserError(f"journal {str(path)!r}: cannot read or write it ({e.strerror or e})") from None

    def _read(self) -> None:
        data = self.path.read_bytes()
        end = data.rfind(b"\n") + 1
        if end < len(data):  # a partial last line from a kill: drop it, that generation is asked again
            with open(self.path, "r+b") as f:
                f.truncate(end)
        for n, line in enumerate(data[:end].decode("utf-8", "replace").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
                key = (str(entry["image_id"]), str(entry["kind"]))
            except (json.JSONDecodeError, KeyError, TypeError):
                raise UserError(
                    f"journal {str(self.path)!r} line {n} is not a journal entry",
                    hint="this is not a file lora-llava data generate wrote; choose another --output",
                ) from None
            self.entries[key] = entry

    def done(self, key: tuple[str, str]) -> bool:
        entry = self.entries.get(key)
        return entry is not None and entry.get("status") in DONE

    def append(self, entry: dict[str, Any]) -> None:
        self._file.write(json.dumps(entry, ensure_ascii=False) + "\n")  # one write per line: a kill leaves whole lines
        self._file.flush()
        os.fsync(self._file.fileno())
        self.entries[(str(entry["image_id"]), str(entry["kind"]))] = entry

    def close(self) -> None:
        self._file.close()


def write_llava_json(path: Path, samples: list[dict[str, Any]]) -> None:
    """A JSON list, one sample a line, written to a temporary sibling and renamed into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write("[\n" + ",\n".join(json.dumps(s, ensure_ascii=False) for s in samples) + "\n]\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_text_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
