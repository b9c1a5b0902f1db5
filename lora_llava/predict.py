"""Batch prediction: answers for a data file or a folder of images, written as they come, resumable.

Usage::

    samples, bad = samples_from_images("photos/", "What is shown?")     # or read_source(DataSource(...))
    summary = predict(load_model("runs/x"), samples, bad, "preds.jsonl", reference=True)

Each sample becomes one JSON line ``{"id", "prompt", "prediction"}`` (``image`` when it has one;
``reference`` and ``correct`` with ``reference=True``, scored as ``eval`` scores); a sample that cannot
be read becomes ``{"id", "error"}`` with the data layer's reason, so a folder never stops half-way.
Lines are written and flushed batch by batch; a re-run skips the ids already written, and a line
cut off by a kill is dropped on the next run, so every sample ends up in the file exactly once.
Batches are sorted by prompt length and left-padded.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from lora_llava.data.formats import IMAGE, BadSample, Sample
from lora_llava.data.images import ImageError, load_image
from lora_llava.errors import UserError
from lora_llava.infer import Loaded, generate, normalize

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"}


@dataclass
class PredictSummary:
    written: int  # samples answered by this run
    skipped: int  # already in the output file from an earlier run
    errors: int  # samples that could not be read (written as error lines)
    correct: int | None = None  # with reference: of this run's answers
    scored: int = 0


def samples_from_images(folder: str | Path, prompt: str) -> tuple[list[Sample], list[BadSample]]:
    """One sample per image file under ``folder`` (sorted, recursive), asking ``prompt``; unreadable ones are bad."""
    root = Path(folder)
    if not root.is_dir():
        raise UserError(f"--images {str(folder)!r} is not a folder")
    good, bad = [], []
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise UserError(f"no images in {str(folder)!r} ({', '.join(sorted(IMAGE_SUFFIXES))})")
    for i, path in enumerate(files):
        sid = str(path.relative_to(root))
        try:
            load_image(path)
        except ImageError as e:
            bad.append(BadSample(str(root), i, sid, str(e)))
            continue
        good.append(Sample(str(root), i, sid, [("user", f"{IMAGE}\n{prompt}"), ("assistant", "")], [path]))
    return good, bad


def done_ids(out: Path) -> set[str]:
    """Ids already written to ``out``; a last line cut off by a kill is removed from the file first."""
    if not out.is_file():
        return set()
    data = out.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data):  # a partial last line: drop it, its sample is predicted again
        with open(out, "r+b") as f:
            f.truncate(end)
    ids = set()
    for line in data[:end].decode("utf-8").splitlines():
        if line.strip():
            ids.add(str(json.loads(line)["id"]))
    return ids


def predict(
    loaded: Loaded,
    samples: list[Sample],
    bad: list[BadSample],
    out: str | Path,
    reference: bool = False,
    batch_size: int = 8,
    max_new_tokens: int = 64,
    progress: bool = True,
) -> PredictSummary:
    """Answer ``samples`` into the JSON-lines file ``out`` (appending; ids already there are skipped)."""
    from tqdm.auto import tqdm

    path = Path(out)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        done = done_ids(path)
    except (OSError, ValueError, KeyError) as e:
        raise UserError(
            f"--out {str(out)!r}: cannot read or write it as JSON lines ({e})", hint="choose a new file"
        ) from None
    todo = [s for s in samples if s.id not in done]
    errors = [b for b in bad if str(b.id) not in done]
    summary = PredictSummary(written=0, skipped=len(samples) + len(bad) - len(todo) - len(errors), errors=len(errors))
    if reference:
        summary.correct = 0
    prompts = {id(s): loaded.encoder.prompt(s)[0] for s in todo}
    todo.sort(key=lambda s: len(prompts[id(s)]))  # similar lengths together: less padding
    with open(path, "a", encoding="utf-8") as f:
        for b in errors:
            _write(f, {"id": b.id, "error": b.reason})
        bar = tqdm(total=len(todo), unit="sample", disable=not progress, desc="predict")
        for start in range(0, len(todo), batch_size):
            batch = todo[start : start + batch_size]
            answers = generate(loaded, batch, max_new_tokens, batch_size)
            for s, answer in zip(batch, answers):
                row: dict = {"id": s.id, "prompt": _question(s), "prediction": answer}
                if s.images:
                    first = s.images[0]
                    row["image"] = str(first) if isinstance(first, Path) else first.name
                if reference:
                    ref = s.messages[-1][1]
                    row.update(reference=ref, correct=normalize(answer) == normalize(ref))
                    summary.correct = (summary.correct or 0) + int(row["correct"])
                    summary.scored += 1
                _write(f, row)
            f.flush()
            os.fsync(f.fileno())
            summary.written += len(batch)
            bar.update(len(batch))
        bar.close()
    return summary


def _question(s: Sample) -> str:
    return s.messages[-2][1].replace(IMAGE, "").strip() if len(s.messages) >= 2 else ""


def _write(f: TextIO, row: dict) -> None:
    f.write(json.dumps(row, ensure_ascii=False) + "\n")  # one write per line: a kill leaves whole lines
