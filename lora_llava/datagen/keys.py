"""Every key of the datagen config, with a one-line description, read from its schema (``config.py``).

Usage::

    for key, line in describe_config_keys(): ...     # ("generator.concurrency", "openai: requests in ... [4]")
    print(keys_epilog())                              # the block ``lora-llava data generate --help`` ends with

Generated from the dataclasses, so ``--help`` lists exactly the keys the loader accepts: a key added to
the schema appears here with its help text, nothing to keep in step by hand.
"""

from __future__ import annotations

import dataclasses
import json
import re
import typing
from typing import Any

from lora_llava.datagen.config import DatagenConfig

_SENTENCE_END = re.compile(r"[.!?]\s+(?=[A-Z])")


def describe_config_keys(cls: type = DatagenConfig, prefix: str = "") -> list[tuple[str, str]]:
    """(dotted key, one line: the first sentence of its help text, then [required] or [default]),
    sections before their keys, in schema order."""
    rows: list[tuple[str, str]] = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        section = _section(hints[f.name])
        first = first_sentence(str(f.metadata.get("help", "")))
        if f.metadata.get("required"):
            tail = " [required]"
        elif section is not None:
            tail = ""
        else:
            tail = f" [default: {_text(f.default_factory() if callable(f.default_factory) else f.default)}]"
        rows.append((key, first + tail))
        if section is not None:
            rows += describe_config_keys(section, key + ".")
    return rows


def first_sentence(text: str) -> str:
    """``text`` up to the end of its first sentence: a full stop (or ! ?) outside parentheses followed by
    a capital ("e.g. instances", "(e.g. OPENAI_API_KEY)" and "a .csv file" do not end one)."""
    text = " ".join(text.split())
    for m in _SENTENCE_END.finditer(text):
        head = text[: m.start() + 1]
        if head.count("(") == head.count(")") and not head.endswith(("e.g.", "i.e.")):
            return head
    return text


def keys_epilog(width: int = 30) -> str:
    """The config keys as a help block: one ``  key  description`` line each."""
    rows = describe_config_keys()
    width = max(width, max(len(k) for k, _ in rows) + 2)
    lines = [f"  {key:<{width}}{text}" for key, text in rows]
    return "config keys (in the YAML, or as key=value overrides):\n" + "\n".join(lines)


def _section(tp: Any) -> type | None:
    """The dataclass a field holds (``GeneratorConfig | None`` too), or None for a plain value."""
    for t in (tp, *typing.get_args(tp)):
        if isinstance(t, type) and dataclasses.is_dataclass(t):
            return t
    return None


def _text(value: Any) -> str:
    """A default as YAML shows it: null, true, [a, b], 0.7."""
    if isinstance(value, list):
        return "[" + ", ".join(_text(v) for v in value) + "]"
    return value if isinstance(value, str) else json.dumps(value)
