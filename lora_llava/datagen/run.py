"""``lora-llava data generate``: annotations -> symbolic contexts -> generator -> parsed, checked LLaVA data.

Usage::

    config = load_datagen_config("coco.yaml")
    result = generate_data(config, limit=20)          # a dry sample of 20 images
    result.output, result.samples, print(result.report_text)

For each image and each kind: the symbolic context (captions, normalized boxes) goes to the generator
with the kind's system prompt and in-context examples; the answer is parsed into turns or rejected
with a reason; every outcome is one journal line (resumable, crash-safe). At the end the kept samples
of the images asked for are written atomically as LLaVA-Instruct JSON (``<image>`` first in the first
human turn, provenance per sample), read back with the data layer's own reader, and the quality
report is printed and saved beside them.

Nothing of the user's is written over: the output and its companions (journal, report) may not be an
input of the run; an existing output is replaced only when this output's journal records writing it,
or with ``overwrite`` when it is an earlier output of ``data generate`` (a file that is not is never
replaced); a file at the journal's or the report's name that is not one is refused untouched. One
run at a time holds the journal's lock (``<journal>.lock``).
"""

from __future__ import annotations

import concurrent.futures as cf
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lora_llava.datagen.annotations import ImageAnnotation, read_annotations
from lora_llava.datagen.config import LLM_KINDS, DatagenConfig
from lora_llava.datagen.context import render_context
from lora_llava.datagen.generators import Completion, GenerationFailed, Generator, KeyEchoed, build_generator
from lora_llava.datagen.journal import Journal, is_llava_output, lock_path, write_llava_json, write_text_atomic
from lora_llava.datagen.parse import Rejected, parse_generation
from lora_llava.datagen.prompts import PROMPT_VERSION, brief_question, build_messages
from lora_llava.datagen.report import QualityReport, is_report
from lora_llava.errors import UserError
from lora_llava.layout import hold_lock, release_lock

BRIEF_GENERATOR = "captions"  # provenance of stage-1 pairs: the caption itself, no LLM
RAW_KEPT = 2000  # characters of a rejected generation kept in the journal, to see why


@dataclass
class GenerateResult:
    output: Path
    journal: Path
    report_path: Path
    images: int  # images asked for (after --limit)
    samples: int  # samples in the output
    asked: int  # generations made by this run (requests, or brief pairs)
    resumed: int  # (image, kind) pairs already done by an earlier run
    skipped_images: list[str]
    report: QualityReport
    report_text: str


def companion(output: Path, suffix: str) -> Path:
    """``data/gen.json`` -> ``data/gen.journal.jsonl`` / ``data/gen.report.txt``."""
    return output.with_name(output.stem + suffix)


def generate_data(
    config: DatagenConfig,
    limit: int | None = None,
    output: str | Path | None = None,
    log: Callable[[str], None] = print,
    progress: bool = True,
    generator: Generator | None = None,
    n_samples: int = 2,
    overwrite: bool = False,
) -> GenerateResult:
    """Generate ``config``'s data into ``output`` (default: the config's). An existing output is replaced only
    when its journal records writing it, or with ``overwrite`` when it is an earlier output of data generate."""
    out = Path(output or config.output)
    if out.suffix != ".json":
        raise UserError(f"--output {str(out)!r}: must be a .json file (LLaVA-Instruct JSON)")
    _check_not_an_input(out, config)
    if out.is_dir():
        raise UserError(f"--output {str(out)!r} is a folder: give a .json file", hint="choose another --output")
    images, skipped = read_annotations(config.annotations)
    total_images = len(images)
    if limit is not None:
        images = images[:limit]
    log(
        f"annotations: {total_images} usable images in {config.annotations.path}"
        + (f", {len(skipped)} skipped" if skipped else "")
        + (f"; --limit {limit}: the first {len(images)}" if limit is not None else "")
    )
    for line in skipped[:10]:
        log(f"  skipped {line}")
    if len(skipped) > 10:
        log(f"  ... and {len(skipped) - 10} more skipped")
    journal_path = companion(out, ".journal.jsonl")
    lock = lock_path(journal_path)
    _claim_lock_file(lock, out)
    hold_lock(lock, f"journal {str(journal_path)!r}")  # one run per journal: a second one is refused, naming the pid
    try:
        journal = Journal(journal_path)  # checked before anything is written: a file that is not one stays as it is
        _check_output_is_ours(out, journal, overwrite)
        journal.start(out.name)
        try:
            return _generate(config, images, skipped, out, journal, log, progress, generator, n_samples)
        finally:
            journal.close()
    finally:
        release_lock(lock)


def _same_file(a: Path, b: Path) -> bool:
    if a.resolve() == b.resolve():
        return True
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def _check_not_an_input(out: Path, config: DatagenConfig) -> None:
    """Refuse an output, journal or report that is one of the run's inputs (whatever the flags)."""
    ann = config.annotations
    inputs = [("annotations.path", ann.path), ("annotations.image_folder", ann.image_folder)]
    inputs += [("annotations.boxes", ann.boxes)] if ann.boxes else []
    ours = [
        ("", out),
        ("its journal ", companion(out, ".journal.jsonl")),
        ("its report ", companion(out, ".report.txt")),
    ]
    for what, path in ours:
        for key, given in inputs:
            if _same_file(path, Path(given)):
                where = f"--output {str(out)!r}: {what}{str(path)!r}" if what else f"--output {str(out)!r}"
                raise UserError(
                    f"{where} is {key}, an input of this run; data generate never writes over its inputs",
                    hint="choose another --output",
                )


def _claim_lock_file(lock: Path, out: Path) -> None:
    """Make the output's folder (the lock file beside the output, which fsutil.hold_lock checks: a file of the
    user's at its name is refused, never emptied)."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"--output {str(out)!r}: cannot write beside it ({e.strerror or e})") from None


def _check_output_is_ours(out: Path, journal: Journal, overwrite: bool) -> None:
    """Refuse to replace an existing output (or report) that this job did not write, before anything is written."""
    report = companion(out, ".report.txt")
    if report.is_dir() or (report.exists() and not is_report(report)):
        raise UserError(
            f"--output {str(out)!r}: {str(report)!r} exists and is not a report of lora-llava data generate; "
            "it is left as it is",
            hint="choose another --output, or move that file away",
        )
    if not out.exists():
        return
    if not is_llava_output(out):
        raise UserError(
            f"--output {str(out)!r} exists and is not an output of lora-llava data generate; it is left as it is",
            hint="choose another --output, or move that file away",
        )
    if overwrite or (journal.found and journal.output in (None, out.name)):
        return  # an earlier run of this job wrote it (re-runs resume and rewrite it), or replacing it was asked
    why = (
        f"its journal {str(journal.path)!r} belongs to {journal.output!r}"
        if journal.found
        else f"no journal at {str(journal.path)!r} records writing it"
    )
    raise UserError(
        f"--output {str(out)!r} exists: an earlier output of lora-llava data generate, but {why}",
        hint="pass --overwrite to replace it, or choose another --output",
    )


def _generate(
    config: DatagenConfig,
    images: list[ImageAnnotation],
    skipped: list[str],
    out: Path,
    journal: Journal,
    log: Callable[[str], None],
    progress: bool,
    generator: Generator | None,
    n_samples: int,
) -> GenerateResult:
    pairs = [(im, kind) for im in images for kind in config.kinds]
    todo = [(im, kind) for im, kind in pairs if not journal.done((im.id, kind))]
    resumed = len(pairs) - len(todo)
    llm_todo = [(im, k) for im, k in todo if k in LLM_KINDS]
    if llm_todo and generator is None:
        assert config.generator is not None  # the config's cross-check requires one for these kinds
        generator = build_generator(config.generator)
    name = generator.name if generator is not None else None
    _check_same_generator(journal, name, [(im.id, k) for im, k in pairs])
    if resumed:
        log(f"resuming: {resumed} of {len(pairs)} generations are already in {journal.path}")
    for im, kind in todo:
        if kind == "brief":
            journal.append(_brief_entry(im, config))
    if llm_todo:
        assert generator is not None
        log(f"generating {len(llm_todo)} ({', '.join(k for k in config.kinds if k in LLM_KINDS)}) with {name}, "
            f"{generator.concurrency} at a time")  # fmt: skip
        _run_requests(config, generator, llm_todo, journal, progress)
    entries = [journal.entries[(im.id, k)] for im, k in pairs if (im.id, k) in journal.entries]
    samples = [e["sample"] for e in entries if e["status"] == "kept"]
    write_llava_json(out, samples)
    if samples:
        _read_back(out, config)
    report = QualityReport.of(entries, config.kinds)
    contexts = {im.id: render_context(im) for im in images}
    stats = getattr(generator, "stats", None)
    lines = [report.render(contexts, n_samples)]
    if stats is not None and (stats.retries or stats.rate_limited):
        lines.insert(1, f"requests: {stats.retries} retried, {stats.rate_limited} rate-limited (HTTP 429)")
    failed = sum(st.failed for st in report.kinds.values())
    lines.append(
        f"output: {out} ({len(samples)} samples from {len(images)} images)"
        + (f"; {failed} failed request(s) are asked again by a re-run" if failed else "")
    )
    text = "\n".join(lines)
    report_path = companion(out, ".report.txt")
    write_text_atomic(report_path, text + "\n")
    log(text)
    return GenerateResult(
        out, journal.path, report_path, len(images), len(samples), len(todo), resumed, skipped, report, text
    )


def _check_same_generator(journal: Journal, name: str | None, keys: list[tuple[str, str]]) -> None:
    """Refuse to mix generations of another generator or prompt version into one output."""
    seen: dict[tuple[str, str], int] = {}
    for key in keys:
        e = journal.entries.get(key)
        if e is not None and e.get("kind") in LLM_KINDS and e.get("status") != "failed":
            sig = (str(e.get("generator")), str(e.get("prompt_version")))
            seen[sig] = seen.get(sig, 0) + 1
    other = {sig: n for sig, n in seen.items() if sig != (str(name), PROMPT_VERSION)}
    if other and name is not None:
        (gen, version), n = next(iter(other.items()))
        raise UserError(
            f"journal {str(journal.path)!r} holds {n} generation(s) by {gen} with prompt version {version}; "
            f"this run uses {name} with prompt version {PROMPT_VERSION}",
            hint="give another --output (or delete the journal and add --overwrite to start over); one output holds "
            "one generator's data",
        )


def _sample(im: ImageAnnotation, kind: str, turns: list[tuple[str, str]], generator: str) -> dict[str, Any]:
    conversations = [{"from": role, "value": value} for role, value in turns]
    conversations[0]["value"] = "<image>\n" + conversations[0]["value"]
    return {
        "id": f"{im.id}-{kind}",
        "image": im.image,
        "conversations": conversations,
        "provenance": {"kind": kind, "generator": generator, "prompt_version": PROMPT_VERSION, "annotation_id": im.id},
    }


def _brief_entry(im: ImageAnnotation, config: DatagenConfig) -> dict[str, Any]:
    seed = config.generator.seed if config.generator else 0
    turns = [("human", brief_question(im.id, seed)), ("gpt", im.captions[0])]
    sample = _sample(im, "brief", turns, BRIEF_GENERATOR)
    return {"image_id": im.id, "kind": "brief", "status": "kept", "generator": BRIEF_GENERATOR,
            "prompt_version": PROMPT_VERSION, "sample": sample}  # fmt: skip


def _run_requests(
    config: DatagenConfig,
    gen: Generator,
    todo: Sequence[tuple[ImageAnnotation, str]],
    journal: Journal,
    progress: bool,
) -> None:
    """Ask for every (image, kind), ``gen.concurrency`` at a time; journal each outcome as it comes."""
    from tqdm.auto import tqdm

    assert config.generator is not None
    g = config.generator
    scrub = getattr(gen, "scrub", lambda s: s)
    counts = {"kept": 0, "rejected": 0, "failed": 0}
    tokens = [0, 0]

    def ask(im: ImageAnnotation, kind: str) -> Completion:
        return gen.complete(build_messages(kind, render_context(im), g.few_shot), key=f"{im.id}/{kind}")

    bar = tqdm(total=len(todo), unit="gen", desc="generate", disable=not progress, dynamic_ncols=True)
    pool = cf.ThreadPoolExecutor(max_workers=gen.concurrency)
    pending: dict[cf.Future, tuple[int, ImageAnnotation, str]] = {}
    queue = iter(enumerate(todo))
    try:
        while True:
            while len(pending) < 2 * gen.concurrency:  # bounded: never the whole list in flight
                nxt = next(queue, None)
                if nxt is None:
                    break
                i, (im, kind) = nxt
                pending[pool.submit(ask, im, kind)] = (i, im, kind)
            if not pending:
                break
            finished, _ = cf.wait(pending, return_when=cf.FIRST_COMPLETED)
            fatal: BaseException | None = None
            for fut in sorted(finished, key=lambda f: pending[f][0]):  # in order; every answer journaled first
                _, im, kind = pending.pop(fut)
                entry: dict[str, Any] = {"image_id": im.id, "kind": kind, "generator": gen.name,
                                         "prompt_version": PROMPT_VERSION}  # fmt: skip
                try:
                    c = fut.result()
                except KeyEchoed as e:  # the reply holds the API key: rejected (its text dropped), not asked again
                    entry.update(status="rejected", reason=e.reason, detail=e.detail)
                except GenerationFailed as e:
                    entry.update(status="failed", reason="request_failed", detail=scrub(str(e)))
                except BaseException as e:  # a UserError (401, 404, ...) or an interrupt: stop after this batch
                    fatal = fatal or e
                    continue
                else:
                    entry.update(prompt_tokens=c.prompt_tokens, completion_tokens=c.completion_tokens)
                    tokens[0] += c.prompt_tokens
                    tokens[1] += c.completion_tokens
                    try:
                        turns = parse_generation(kind, c.text, c.finished, im.id, g.seed)
                        entry.update(status="kept", sample=_sample(im, kind, turns, gen.name))
                    except Rejected as r:
                        entry.update(status="rejected", reason=r.reason, detail=r.detail, text=scrub(c.text)[:RAW_KEPT])
                journal.append(entry)
                counts[entry["status"]] += 1
                bar.set_postfix(**counts, tok_in=tokens[0], tok_out=tokens[1], refresh=False)
                bar.update(1)
            if fatal is not None:
                raise fatal
    except BaseException:  # Ctrl-C, a fatal UserError: what finished is journaled; do not wait for the rest
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    else:
        pool.shutdown(wait=True)
    finally:
        bar.close()


def _read_back(out: Path, config: DatagenConfig) -> None:
    """Read the output with the data layer's reader: every sample must parse (what ``check`` reads first)."""
    from lora_llava.config.schema import DataSource
    from lora_llava.data.formats import read_source

    src = DataSource(path=str(out), image_folder=config.annotations.image_folder, format="llava")
    samples, bad = read_source(src, check_images=False, warn=lambda w: None)
    if bad:
        raise RuntimeError(f"generated data failed its own read-back: {bad[0].describe()}")  # a bug, not a user error
