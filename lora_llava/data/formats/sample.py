"""The one conversation type every format is read into, and the record of a bad sample.

Usage::

    s = Sample(source="train.json", index=0, id="1", messages=[("user", "<image>\\nQ"), ("assistant", "A")],
               images=[Path("images/1.jpg")])
    s.where()                   # 'train.json sample 0 (id 1)'
    BadSample("train.jsonl", 3, "x", "broken JSON line (...)", line=4).describe()
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lora_llava.data.images import ImageRef

IMAGE = "<image>"  # the placeholder of one image in a user turn
MAX_REASON = 1000  # characters of a bad sample's reason kept


@dataclass
class Sample:
    source: str
    index: int
    id: str
    messages: list[tuple[str, str]]  # (role, text); role in system | user | assistant
    images: list[ImageRef] = field(default_factory=list)  # one per <image> placeholder, in order
    line: int | None = None
    has_id: bool = True  # False when the record had no id and ``id`` is its position

    def where(self) -> str:
        return where(self.source, self.index, self.id, self.line)


@dataclass
class BadSample:
    source: str
    index: int
    id: str | None
    reason: str
    line: int | None = None

    def __post_init__(self) -> None:  # a reason quoting a huge value (a megabyte speaker name) stays a line
        if len(self.reason) > MAX_REASON:
            self.reason = f"{self.reason[: MAX_REASON - 100]}... ({len(self.reason)} characters)"

    def describe(self) -> str:
        return f"{where(self.source, self.index, self.id, self.line)}: {self.reason}"

    def to_json(self) -> dict:
        return {"source": self.source, "index": self.index, "id": self.id, "line": self.line, "reason": self.reason}


def where(source: str, index: int, id: str | None, line: int | None) -> str:
    """``train.jsonl line 4 (id x)`` for line-based files, ``train.json sample 3 (id x)`` otherwise."""
    loc = f"line {line}" if line is not None else f"sample {index}"
    if id is not None and len(id) > 100:  # an id is a name: a huge one is shown by its start
        id = f"{id[:80]}... ({len(id)} characters)"
    return f"{source} {loc}" + (f" (id {id})" if id is not None else "")
