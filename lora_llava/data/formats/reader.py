"""Open a data source, decide its format, and read the records asked for into Samples and BadSamples.

Usage::

    reader = open_source(DataSource(path="train.jsonl", image_folder="images"))
    len(reader), reader.format           # number of records; "llava" | "sharegpt" | "messages"
    read = reader.read()                 # every record (or reader.read([0, 7, 9]))
    read.samples, read.bad, read.warnings
    samples, bad = read_source(src)      # shorthand: everything (limit=N: the first N records)

``format: auto`` reads records holding ``messages`` (or ``images``) and no ``conversations`` as
format messages, everything else as llava. The source's ``prompt_style`` is applied to every sample.
"""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from lora_llava.annotations import Log
from lora_llava.config.schema import DataSource
from lora_llava.data.formats.conversation import RecordSpec, parse_record
from lora_llava.data.formats.sample import BadSample, Sample
from lora_llava.data.formats.storage import open_storage
from lora_llava.data.prompts import apply_prompt_style
from lora_llava.errors import UserError

_SNIFF = 20  # records looked at to decide format auto


@dataclass
class SourceRead:
    samples: list[Sample] = field(default_factory=list)
    bad: list[BadSample] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


class SourceReader:
    def __init__(self, src: DataSource, check_images: bool = True) -> None:
        self.src = src
        self.check_images = check_images
        self.storage = open_storage(src)
        self.format = src.format if src.format != "auto" else self._detect()
        self.spec = RecordSpec.for_source(src, self.format)

    def __len__(self) -> int:
        return len(self.storage)

    def _detect(self) -> str:
        c = self.src.columns
        for _, _, rec in self.storage.records(range(min(_SNIFF, len(self.storage)))):
            if isinstance(rec, dict):
                if c.conversations is None:
                    return "messages" if "messages" in rec and "conversations" not in rec else "llava"
                return "messages" if c.image is None and "images" in rec and "image" not in rec else "llava"
        return "llava"

    def read(self, indices: Iterable[int] | None = None) -> SourceRead:
        out = SourceRead()
        source = str(self.src.path)
        indices = range(len(self.storage)) if indices is None else indices
        counts: Counter[str] = Counter()
        for index, line, rec in self.storage.records(indices):
            sid = _record_id(rec, self.spec.id_key)
            try:
                sid, messages, images = parse_record(
                    rec, self.spec, self.src.image_folder, self.check_images, self.src.image_roots
                )
            except ValueError as e:
                out.bad.append(BadSample(source, index, sid, str(e), line))
                continue
            except Exception as e:  # data no rule foresaw still gets a line with its reason, never a traceback
                out.bad.append(BadSample(source, index, sid, f"unreadable sample ({type(e).__name__}: {e})", line))
                continue
            if sid is not None:
                counts[sid] += 1
            messages = apply_prompt_style(messages, self.src.prompt_style)
            sample_id = sid if sid is not None else str(index)
            out.samples.append(Sample(source, index, sample_id, messages, images, line, has_id=sid is not None))
        self._check_image_folder(out)
        dups = sorted(k for k, v in counts.items() if v > 1)
        if dups:
            out.warnings.append(
                f"{source}: {len(dups)} duplicate id(s) ({sum(counts[d] for d in dups)} samples), "
                f"e.g. {', '.join(dups[:3])}"
            )
        return out

    def _check_image_folder(self, out: SourceRead) -> None:
        """Say which image folder was used, and why it does not apply, instead of failing every sample."""
        folder = self.src.image_folder
        if folder is None:
            return
        by_path = sum(isinstance(i, Path) for s in out.samples for i in s.images)
        missing = by_path + sum("not found in" in b.reason for b in out.bad)
        if not Path(folder).is_dir() and missing:
            raise UserError(
                f"image folder {folder!r} (image_folder of data source {self.src.path!r}) does not exist; "
                f"{missing} sample(s) give images by path relative to it",
                hint="check data.*.image_folder (relative paths start at the current directory); overriding only "
                "data.*.path keeps the recipe's image_folder",
            )
        embedded = sum(not isinstance(i, Path) for s in out.samples for i in s.images)
        if embedded and not by_path:
            out.warnings.append(
                f"{self.src.path}: image_folder {folder!r} is not used: the images of this source are stored in its rows"
            )


def _record_id(rec: object, key: str) -> str | None:
    """The id a record gives, as text, to name it in a bad-sample report (None when it has none, or one that
    cannot be written out, such as a list nested past the recursion limit)."""
    sid = rec.get(key) if isinstance(rec, dict) else None
    try:
        return None if sid is None else str(sid)
    except (RecursionError, ValueError):
        return None


def open_source(src: DataSource, check_images: bool = True) -> SourceReader:
    """A reader of ``src``; raises UserError when the file itself is unusable (missing, not JSON, ...)."""
    return SourceReader(src, check_images)


def read_source(
    src: DataSource, check_images: bool = True, limit: int | None = None, warn: Log | None = None
) -> tuple[list[Sample], list[BadSample]]:
    """Read ``src`` (its first ``limit`` records, or all); warnings (duplicate ids, an unused image folder)
    go to ``warn``, by default one ``warning:`` line each on stderr."""
    reader = open_source(src, check_images)
    read = reader.read(range(min(limit, len(reader))) if limit is not None else None)
    for w in read.warnings:
        (warn or _stderr_warning)(w)
    return read.samples, read.bad


def _stderr_warning(text: str) -> None:
    print(f"warning: {text}", file=sys.stderr)


__all__ = ["SourceRead", "SourceReader", "open_source", "read_source"]
