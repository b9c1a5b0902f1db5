"""Batch prediction: answers for a data file or a folder of images, written as they come, resumable.

Usage::

    samples, bad = samples_from_images("photos/", "What is shown?")     # or read_source(DataSource(...))
    settings = predict_settings(open_artifact("runs/x"), images="photos/", prompt="What is shown?", max_new_tokens=64)
    summary = predict(load_model("runs/x"), samples, bad, "preds.jsonl", settings=settings)
    rows = read_predictions("preds.jsonl")      # the answers, without the header

The file's first line records what wrote it: ``{"lora_llava_predictions": {settings}}`` (the model as
resolved, the data and its options or the image folder and prompt, max_new_tokens, decoding, reference).
Each sample then becomes one JSON line ``{"id", "prompt", "prediction"}`` (``image`` when it has one;
``reference`` and ``correct`` with ``reference=True``, scored as ``eval`` scores); a sample that cannot
be read becomes ``{"id", "error"}`` with the data layer's reason, so a folder never stops half-way.
Lines are written and flushed batch by batch; a re-run with the same settings skips the ids already
written, and a line cut off by a kill is dropped on the next run, so every sample ends up in the file
exactly once. A re-run with other settings is refused, naming what differs (``overwrite`` starts the file
again); a file that is no predictions file is never changed. Batches are sorted by prompt length and
left-padded. One run at a time writes a file: a run holds ``.<name>.lock`` beside it (``predictions_lock``)
from before the file is read until it ends, and a second run into the same file is refused, naming the
holder's pid (two runs would otherwise each answer, and append, every sample).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from lora_llava.artifacts import Artifact
from lora_llava.data.formats import IMAGE, BadSample, Sample
from lora_llava.data.images import ImageError, load_image
from lora_llava.errors import UserError
from lora_llava.infer import Loaded, exact_match, generate
from lora_llava.layout import RunDir, hold_lock, lock_beside, release_lock

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


# ------------------------------------------------------------------------------------- the predictions file

HEADER = "lora_llava_predictions"  # the key of a predictions file's first line: {HEADER: {what wrote it}}

# what a predictions file records of the run that wrote it, in the order a difference is named, named as
# the user set it (a flag of lora-llava predict, or words)
SETTING_NAMES = {
    "model": "model",
    "model_run_id": "the model's run id",
    "load_in_4bit": "--load-in-4bit",
    "data": "--data",
    "image_folder": "--image-folder",
    "format": "--format",
    "split": "--split",
    "columns": "--columns",
    "roles": "--roles",
    "prompt_style": "--prompt-style",
    "images": "--images",
    "prompt": "--prompt",
    "max_new_tokens": "--max-new-tokens",
    "decoding": "decoding",
    "reference": "--reference",
}
DECODING = "greedy"  # what generate() does (infer: greedy, one beam)


def model_reference(art: Artifact) -> str:
    """The model as resolved: an adapter's or a model directory's absolute path, or a backbone's name."""
    folder = art.adapter_dir or art.path
    return str(folder.resolve()) if folder is not None else art.ref


def predict_settings(
    art: Artifact,
    *,
    max_new_tokens: int,
    data: str | Path | None = None,
    image_folder: str | Path | None = None,
    data_format: str = "auto",
    split: str | None = None,
    columns: str | dict[str, Any] | None = None,
    roles: str | dict[str, Any] | None = None,
    prompt_style: str = "plain",
    images: str | Path | None = None,
    prompt: str | None = None,
    reference: bool = False,
    load_in_4bit: bool = False,
) -> dict[str, Any]:
    """What a predictions file records of the run that writes it: the model as resolved (its run id when it
    is a run's), the data (``data`` with its options, or ``images`` asked ``prompt``; paths absolute,
    ``columns``/``roles`` YAML text as mappings), and the generation settings. A re-run resumes the file
    only with equal settings (``open_predictions``)."""
    import yaml

    settings: dict[str, Any] = {"model": model_reference(art)}
    run_dir = art.run_dir
    run_id = RunDir(run_dir).run_id() if run_dir is not None else None
    if run_id:
        settings["model_run_id"] = run_id
    settings["load_in_4bit"] = load_in_4bit
    if images is not None:
        settings.update(images=str(Path(images).resolve()), prompt=prompt)
    else:
        settings.update(
            data=str(Path(data).resolve()) if data is not None else None,
            image_folder=str(Path(image_folder).resolve()) if image_folder is not None else None,
            format=data_format,
            split=split,
            columns=yaml.safe_load(columns) if isinstance(columns, str) else columns,
            roles=yaml.safe_load(roles) if isinstance(roles, str) else roles,
            prompt_style=prompt_style,
        )
    settings.update(max_new_tokens=max_new_tokens, decoding=DECODING, reference=reference)
    return settings


_HOLDING: dict[Path, int] = {}  # predictions locks this process holds, by lock path: how many holds of each


@contextmanager
def predictions_lock(out: str | Path) -> Iterator[None]:
    """Hold the output's lock (``layout.lock_beside``) for the block: a second process writing ``out`` is refused with a
    UserError naming the holder's pid. Holds nest within one process (the CLI's, then ``predict``'s): the lock is
    released when the outermost block ends, and its file removed; a file of the user's at its name (not an empty
    or pid-only file, a folder, a link) is refused and left as it is."""
    path, lock = Path(out), lock_beside(out)
    key = lock.absolute()
    if key not in _HOLDING:
        if path.is_dir():
            raise UserError(f"--out {str(out)!r} is a folder: give a file for the answers")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            hold_lock(lock, f"--out {str(out)!r}")  # a file of the user's at the lock's name is refused there
        except OSError as e:
            raise UserError(f"--out {str(out)!r}: cannot write beside it ({e.strerror or e})") from None
    _HOLDING[key] = _HOLDING.get(key, 0) + 1
    try:
        yield
    finally:
        _HOLDING[key] -= 1
        if not _HOLDING[key]:
            del _HOLDING[key]
            release_lock(lock)


@dataclass
class PredictionsFile:
    """An output file as a run of predict finds it: what it keeps and what this run adds to it."""

    path: Path
    settings: dict[str, Any]  # this run's
    done: set[str] = field(default_factory=set)  # ids already answered (skipped)
    keep: int | None = None  # bytes of whole lines kept (a cut-off last line dropped); None: start the file
    warning: str | None = None  # a line for the user (a file that records no settings, resumed)


class _NotPredictions(Exception):
    """The file is not a lora_llava predictions file; the reason in words."""


def open_predictions(out: str | Path, settings: dict[str, Any], overwrite: bool = False) -> PredictionsFile:
    """Check ``out`` for a run with ``settings``; nothing is written here (``predict`` writes).

    Missing, empty, or only a line cut off by a kill: the file is started, header first. A predictions file
    with the same settings is resumed (its ids skipped); with other settings it is refused, naming what
    differs, unless ``overwrite`` (started again) or it holds no answer yet. A file written before settings
    were recorded (no header) is resumed with a warning. Anything else (a picture, a JSON array, training
    data) is refused and left as it is, with ``overwrite`` too."""
    path = Path(out)
    name = str(out)
    target = PredictionsFile(path, settings)
    if path.is_dir():
        raise UserError(f"--out {name!r} is a folder: give a file for the answers")
    if not path.exists():
        return target
    try:
        data = path.read_bytes()
    except OSError as e:
        raise UserError(f"--out {name!r}: cannot read it ({e.strerror or e})") from None
    try:
        recorded, done, end = _read_predictions(data)
    except _NotPredictions as e:
        raise UserError(
            f"--out {name!r} is not a lora-llava predictions file ({e}); it is left as it is: write to another --out"
        ) from None
    if end == 0 or overwrite:  # nothing kept: an empty or cut-off file, or started again on purpose
        return target
    if recorded is None:
        target.warning = (
            f"warning: {name} does not record what wrote it (an earlier lora-llava did): its {len(done)} answer(s) "
            "are kept as this run's; pass --overwrite to start it again"
        )
    elif recorded != settings:
        if not done:  # a header alone: nothing to lose
            return target
        raise UserError(
            f"{name} was written {_differences(recorded, settings)}; write to another --out, or pass --overwrite "
            "to start it again"
        )
    target.done, target.keep = done, end
    return target


def _read_predictions(data: bytes) -> tuple[dict[str, Any] | None, set[str], int]:
    """A predictions file's recorded settings (None: written before they were), its ids, and the bytes of its
    whole lines (0: nothing to keep). Raises _NotPredictions for anything else."""
    end = data.rfind(b"\n") + 1
    if not data[:end].strip():
        tail = data[end:].lstrip()
        if not tail or tail.startswith((b'{"' + HEADER.encode(), b'{"id": ')):  # empty, or its first line cut off
            return None, set(), 0
        raise _NotPredictions("it is not JSON lines")
    try:
        text = data[:end].decode("utf-8")
    except UnicodeDecodeError:
        raise _NotPredictions("it is not UTF-8 text") from None
    recorded: dict[str, Any] | None = None
    ids: set[str] = set()
    first = True
    for number, line in enumerate(text.split("\n"), 1):  # "\n" only: an answer may hold U+2028
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            raise _NotPredictions(f"line {number} is not JSON") from None
        if first and isinstance(row, dict) and isinstance(row.get(HEADER), dict):
            recorded = row[HEADER]
        elif isinstance(row, dict) and "id" in row and ("prediction" in row or "error" in row):
            ids.add(str(row["id"]))
        else:
            raise _NotPredictions(f'line {number} is not an answer {{"id", "prediction"}} or {{"id", "error"}}')
        first = False
    return recorded, ids, end


def _differences(recorded: dict[str, Any], settings: dict[str, Any]) -> str:
    """``with --prompt "A" (this run: "B"), without --reference (this run: with)``: what differs, in words."""
    keys = [k for k in SETTING_NAMES if k in recorded or k in settings]
    keys += sorted(k for k in {*recorded, *settings} if k not in SETTING_NAMES)
    parts = []
    for key in keys:
        old, new = recorded.get(key), settings.get(key)
        if old == new:
            continue
        label = SETTING_NAMES.get(key, key)
        was = "without" if _absent(old) else "with"
        now = "without" if _absent(new) else _shown(new)[1:] or "with"  # [1:]: the value without its space
        parts.append(f"{was} {label}{_shown(old)} (this run: {now})")
    return ", ".join(parts)


def _absent(value: Any) -> bool:
    return value is None or value is False


def _shown(value: Any) -> str:
    """`` 3``, `` "text"``, `` {"a": "b"}``: a setting's value after its name ("" for an on/off one)."""
    if _absent(value) or value is True:
        return ""
    if isinstance(value, (int, float)):
        return f" {value}"
    return " " + json.dumps(value, ensure_ascii=False, sort_keys=True)


# --------------------------------------------------------------------------------------------- predict


def predict(
    loaded: Loaded,
    samples: list[Sample],
    bad: list[BadSample],
    out: str | Path,
    reference: bool = False,
    batch_size: int = 8,
    max_new_tokens: int = 64,
    progress: bool = True,
    settings: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> PredictSummary:
    """Answer ``samples`` into the JSON-lines file ``out``: started with a header recording ``settings``
    (``predict_settings``; by default the model, max_new_tokens, decoding and ``reference``), or resumed
    (appending; ids already there are skipped) when it recorded the same ones; see ``open_predictions``.
    The output's lock is held throughout (``predictions_lock``): a run into a file another process is writing
    is refused before the file is read."""
    with predictions_lock(out):
        return _predict(loaded, samples, bad, out, reference, batch_size, max_new_tokens, progress, settings, overwrite)


def _predict(
    loaded: Loaded,
    samples: list[Sample],
    bad: list[BadSample],
    out: str | Path,
    reference: bool,
    batch_size: int,
    max_new_tokens: int,
    progress: bool,
    settings: dict[str, Any] | None,
    overwrite: bool,
) -> PredictSummary:
    from tqdm.auto import tqdm

    if settings is None:
        settings = {"model": loaded.ref, "max_new_tokens": max_new_tokens, "decoding": DECODING, "reference": reference}
    target = open_predictions(out, settings, overwrite)
    path, done = target.path, target.done
    todo = [s for s in samples if s.id not in done]
    errors = [b for b in bad if str(b.id) not in done]
    summary = PredictSummary(written=0, skipped=len(samples) + len(bad) - len(todo) - len(errors), errors=len(errors))
    if reference:
        summary.correct = 0
    prompts = {id(s): loaded.encoder.prompt(s)[0] for s in todo}
    todo.sort(key=lambda s: len(prompts[id(s)]))  # similar lengths together: less padding
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if target.keep is not None and path.stat().st_size > target.keep:  # a line cut off by a kill
            with open(path, "r+b") as cut:
                cut.truncate(target.keep)
        f = open(path, "a" if target.keep is not None else "w", encoding="utf-8")
    except OSError as e:
        raise UserError(f"--out {str(out)!r}: cannot write it ({e.strerror or e})") from None
    with f:
        if target.keep is None:
            _write(f, {HEADER: settings})
        for b in errors:
            _write(f, {"id": b.id, "error": b.reason})
        f.flush()
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
                    row.update(reference=ref, correct=exact_match(answer, ref))
                    summary.correct = (summary.correct or 0) + int(row["correct"])
                    summary.scored += 1
                _write(f, row)
            f.flush()
            os.fsync(f.fileno())
            summary.written += len(batch)
            bar.update(len(batch))
        bar.close()
    return summary


def read_predictions(path: str | Path) -> list[dict[str, Any]]:
    """The answer lines of a predictions file (its header, which records what wrote it, left out)."""
    rows = [json.loads(line) for line in Path(path).read_text(encoding="utf-8").split("\n") if line.strip()]
    return [r for r in rows if HEADER not in r]


def _question(s: Sample) -> str:
    return s.messages[-2][1].replace(IMAGE, "").strip() if len(s.messages) >= 2 else ""


def _write(f: TextIO, row: dict) -> None:
    f.write(json.dumps(row, ensure_ascii=False) + "\n")  # one write per line: a kill leaves whole lines
