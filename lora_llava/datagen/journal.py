"""Crash-safe, resumable output: a JSON-lines journal of every generation, then the LLaVA JSON.

Usage::

    journal = Journal(Path("data/gen.journal.jsonl"))       # reads and checks what an earlier run wrote
    journal.start("gen.json")                              # then opens it to append (a new one: header first)
    journal.done(("139", "conversation"))                  # kept or rejected before: not asked again
    journal.append({"image_id": "139", "kind": "conversation", "status": "kept", "sample": {...}})
    write_llava_json(Path("data/gen.json"), samples)         # atomically: a temporary file, then a rename
    is_llava_output(Path("data/gen.json"))                   # True: a file write_llava_json wrote

A journal's first line names what wrote it and the output it belongs to
(``{"lora_llava_datagen_journal": 1, "output": "gen.json"}``; journals of earlier versions start with
an entry instead). Then one line per (image, kind) attempt, written with a single write and fsync'd,
so a kill leaves whole lines; a line cut off by a kill is dropped when the journal is started again.
A file that is neither is never changed: ``Journal`` refuses it with one line before anything is
written. ``kept`` and ``rejected`` entries are done (a rejected generation is not paid for twice); a
``failed`` one (the request itself failed after its retries) is asked again by the next run.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from lora_llava.errors import UserError

DONE = ("kept", "rejected")
STATUSES = (*DONE, "failed")
HEADER = "lora_llava_datagen_journal"  # the key of a journal's first line: {HEADER: 1, "output": name}
_LINE_STARTS = (b'{"' + HEADER.encode() + b'"', b'{"image_id": ')  # how every line append() writes begins


def lock_path(journal: Path) -> Path:
    """The lock one run holds on its journal: ``gen.journal.jsonl`` -> ``gen.journal.jsonl.lock``."""
    return journal.with_name(journal.name + ".lock")


class Journal:
    def __init__(self, path: Path) -> None:
        """Read and check the journal at ``path`` (none yet is fine); nothing is written until ``start``."""
        self.path = path
        self.entries: dict[tuple[str, str], dict[str, Any]] = {}  # the last entry of each (image, kind)
        self.output: str | None = None  # the output file name the header records (None: no header)
        self.found = False  # a journal (a header or an entry) is there: an earlier run of this output started
        self._keep: int | None = None  # bytes of whole lines; a longer file ends with a line cut off by a kill
        self._file: Any = None
        try:
            if path.is_dir():
                raise UserError(f"journal {str(path)!r} is a folder", hint="choose another --output")
            if path.exists():
                self._read(path.read_bytes())
        except OSError as e:
            raise UserError(f"journal {str(path)!r}: cannot read it ({e.strerror or e})") from None

    def _read(self, data: bytes) -> None:
        end = data.rfind(b"\n") + 1
        first = True
        for n, line in enumerate(data[:end].decode("utf-8", "replace").split("\n"), start=1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                entry = None
            if first and isinstance(entry, dict) and entry.get(HEADER) == 1:
                self.output = str(entry.get("output") or "")
            elif (
                isinstance(entry, dict) and "image_id" in entry and "kind" in entry and entry.get("status") in STATUSES
            ):
                self.entries[(str(entry["image_id"]), str(entry["kind"]))] = entry
            else:
                self._not_a_journal(f"line {n} is not a journal {'header or entry' if first else 'entry'}")
            first = False
        tail = data[end:]
        if tail.strip() and not tail.startswith(_LINE_STARTS[int(not first) :]):
            self._not_a_journal("it ends with text that is not a journal line cut off by a kill")
        self.found = not first or bool(tail.strip())
        self._keep = end if tail.strip() else None

    def _not_a_journal(self, why: str) -> None:
        raise UserError(
            f"journal {str(self.path)!r} is not a journal of lora-llava data generate ({why}); it is left as it is",
            hint="choose another --output, or move that file away",
        )

    def start(self, output: str) -> None:
        """Open the journal to append: a line cut off by a kill is dropped (that generation is asked again); a new
        journal starts with its header, naming ``output`` (the output file's name)."""
        try:
            if self._keep is not None:
                with open(self.path, "r+b") as f:
                    f.truncate(self._keep)
            self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed by close()
            if self.output is None and not self.entries:
                self._write({HEADER: 1, "output": output})
                self.output = output
        except OSError as e:
            raise UserError(f"journal {str(self.path)!r}: cannot write it ({e.strerror or e})") from None

    def done(self, key: tuple[str, str]) -> bool:
        entry = self.entries.get(key)
        return entry is not None and entry.get("status") in DONE

    def append(self, entry: dict[str, Any]) -> None:
        entry = {"image_id": entry["image_id"], **entry}  # image_id first: how a journal line is recognized
        self._write(entry)
        self.entries[(str(entry["image_id"]), str(entry["kind"]))] = entry

    def _write(self, line: dict[str, Any]) -> None:
        self._file.write(json.dumps(line, ensure_ascii=False) + "\n")  # one write per line: a kill leaves whole lines
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


def is_llava_output(path: Path) -> bool:
    """Whether ``path`` is a file ``write_llava_json`` wrote: ``[`` on its own line, then ``]`` or a first sample
    line carrying datagen's provenance. Reads only the first lines."""
    try:
        with open(path, "rb") as f:
            if f.readline(8).strip() != b"[":
                return False
            first = f.readline(16 << 20).strip() or f.readline(8).strip()  # no sample: "[", "", "]"
    except OSError:
        return False
    if first == b"]":
        return True
    try:
        sample = json.loads(first.removesuffix(b","))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False
    provenance = sample.get("provenance") if isinstance(sample, dict) else None
    return isinstance(provenance, dict) and {"kind", "generator", "prompt_version", "annotation_id"} <= set(provenance)


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
