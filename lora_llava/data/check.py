"""Check a recipe's data before a model step: every sample read, rendered, budgeted; every problem listed.

Usage::

    report = prepare_data(recipe, encoder)       # UserError listing every bad sample (on_bad_sample=error)
    print(report.summary())                      # sources, mixture, lengths + histogram, over-length, warnings
    report.train, report.eval                    # samples ready for EncodedDataset (train: repeats included)

    report = prepare_data(recipe, encoder, enforce=False)   # collect everything, raise nothing ...
    enforce_policy(report, recipe.data, run_dir)             # ... then apply on_bad_sample (what `check` does)

With ``on_bad_sample: skip`` the bad samples are left out, written to ``<output_dir>/rejected.jsonl``
with their reasons, and counted in the summary; more than ``max_bad_fraction`` bad aborts the run.
Samples over ``max_length`` follow ``data.overlength``: bad samples (default), dropped, or cut by
whole turns; dropped ones are listed in ``rejected.jsonl`` too.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from lora_llava.config.schema import DataConfig, DataSource, Recipe
from lora_llava.data.budget import fit_sample, histogram, over_reason
from lora_llava.data.encode import Encoder
from lora_llava.data.formats import BadSample, Sample, open_source
from lora_llava.data.mixture import MixtureRow, Part, content_key, format_mixture, mix, select_indices
from lora_llava.data.prompts import add_brief_instruction
from lora_llava.errors import UserError
from lora_llava.layout import RunDir

MAX_LISTED = 50  # bad samples printed; the whole list goes to a file


@dataclass
class SourceStats:
    split: str
    path: str
    samples: int
    bad: int
    tokens: int = 0
    supervised: int = 0
    format: str = ""
    records: int = 0
    used: int = 0
    dropped: int = 0
    truncated: int = 0


@dataclass
class OverLength:
    """How many samples are over max_length, and what each policy would do with them."""

    samples: int = 0
    truncatable: int = 0  # truncate_turns would shorten these ...
    untruncatable: int = 0  # ... and drop these (the first exchange alone is too long)


@dataclass
class DataReport:
    train: list[Sample] = field(default_factory=list)
    eval: list[Sample] = field(default_factory=list)
    lengths: dict[int, int] = field(default_factory=dict)  # id(sample) -> tokens
    supervised: dict[int, int] = field(default_factory=dict)  # id(sample) -> answer tokens
    bad: list[BadSample] = field(default_factory=list)
    dropped: list[BadSample] = field(default_factory=list)  # over max_length, left out by data.overlength
    stats: list[SourceStats] = field(default_factory=list)
    mixture: list[MixtureRow] = field(default_factory=list)
    full_lengths: list[int] = field(default_factory=list)  # every readable sample, before the length policy ...
    over_chars: int = 0  # ... but those over the character budget (over max_length, never tokenized)
    over: OverLength = field(default_factory=OverLength)
    warnings: list[str] = field(default_factory=list)
    eval_split: int = 0
    max_length: int = 0
    overlength: str = "bad_sample"
    seed: int = 0
    total: int = 0  # samples read (good + bad)
    totals: dict[str, int] = field(default_factory=dict)  # per split: samples read, for max_bad_fraction
    bad_counts: dict[str, int] = field(default_factory=dict)  # per split: bad samples

    def length_of(self, sample: Sample) -> int:
        return self.lengths[id(sample)]

    def summary(self) -> str:
        lines = [f"{'split':<6} {'samples':>8} {'bad':>5} {'tokens':>9} {'answer tokens':>14}  source"]
        for s in self.stats:
            lines.append(f"{s.split:<6} {s.samples:>8} {s.bad:>5} {s.tokens:>9} {s.supervised:>14}  {s.path}")
        lens = sorted(self.lengths[id(s)] for s in {id(s): s for s in self.train + self.eval}.values())
        if lens:
            lines.append(
                f"lengths (tokens, after image expansion): min {lens[0]}, median {lens[len(lens) // 2]}, "
                f"max {lens[-1]}; data.max_length {self.max_length}"
            )
        if self.mixture:
            lines.append(format_mixture(self.mixture, self.seed))
        if self.eval_split:
            lines.append(f"eval split: {self.eval_split} samples carved from the training mixture (seed {self.seed})")
        if self.full_lengths or self.over_chars:
            readable = len(self.full_lengths) + self.over_chars
            lines.append(f"length histogram ({readable} readable samples, before data.overlength):")
            lines.append(histogram(self.full_lengths, self.max_length, unmeasured=self.over_chars))
        lines.append(self.overlength_line())
        lines.extend(f"warning: {w}" for w in self.warnings)
        return "\n".join(lines)

    def overlength_line(self) -> str:
        o = self.over
        if not o.samples:
            return f"over data.max_length={self.max_length}: none"
        return (
            f"over data.max_length={self.max_length}: {o.samples} sample(s); overlength=bad_sample: {o.samples} bad, "
            f"drop: {o.samples} dropped, truncate_turns: {o.truncatable} shortened + {o.untruncatable} dropped "
            f"(first exchange too long); using {self.overlength}"
        )


def _read(
    split: str, sources: list[DataSource], encoder: Encoder, recipe: Recipe, report: DataReport
) -> list[tuple[DataSource, SourceStats, list[Sample]]]:
    """Read, budget and count every source of ``split``; returns (source, stats, good unique samples)."""
    d = recipe.data
    out = []
    for src in sources:
        reader = open_source(src)
        indices = select_indices(len(reader), src, report.seed)
        read = reader.read(indices)
        st = SourceStats(split, src.path, 0, len(read.bad), format=reader.format, records=len(reader))
        st.used = len(indices)
        bad, good = list(read.bad), []
        chat_style_align = recipe.stage == "align" and not encoder.fmt.user_images_only
        for s in read.samples:
            if chat_style_align:  # captions answer a brief-description instruction (LLaVA-1.0's stage 1)
                s = dataclasses.replace(s, messages=add_brief_instruction(s.messages, f"{s.source}:{s.id}"))
            try:
                fit = fit_sample(encoder, s, d.max_length, d.overlength)
            except ValueError as e:
                bad.append(BadSample(s.source, s.index, s.id, str(e), s.line))
                continue
            except Exception as e:  # e.g. a tokenizer failing on some text: reported like any bad sample
                bad.append(BadSample(s.source, s.index, s.id, f"cannot be tokenized ({type(e).__name__}: {e})", s.line))
                continue
            if fit.full_length is None:  # over the character budget: over max_length, never tokenized
                report.over_chars += 1
            else:
                report.full_lengths.append(fit.full_length)
            if fit.full_length is None or fit.full_length > d.max_length:
                report.over.samples += 1
                if fit.action == "truncated" or (d.overlength != "truncate_turns" and _truncatable(encoder, s, d)):
                    report.over.truncatable += 1
                else:
                    report.over.untruncatable += 1
            if fit.sample is None:
                reason = over_reason(fit, d.max_length)
                if d.overlength == "bad_sample":
                    bad.append(BadSample(s.source, s.index, s.id, reason, s.line))
                else:
                    why = "first exchange alone is too long" if d.overlength == "truncate_turns" else "dropped"
                    report.dropped.append(BadSample(s.source, s.index, s.id, f"{reason}; {why}", s.line))
                    st.dropped += 1
                continue
            if fit.action == "truncated":
                st.truncated += 1
            report.lengths[id(fit.sample)] = fit.length
            report.supervised[id(fit.sample)] = fit.supervised
            st.samples += 1
            st.tokens += fit.length
            st.supervised += fit.supervised
            good.append(fit.sample)
        st.bad = len(bad)
        report.total += len(read.samples) + len(read.bad)
        report.totals[split] = report.totals.get(split, 0) + len(read.samples) + len(read.bad)
        report.bad_counts[split] = report.bad_counts.get(split, 0) + len(bad)
        report.bad.extend(sorted(bad, key=lambda b: b.index))
        report.warnings.extend(read.warnings)
        report.stats.append(st)
        out.append((src, st, good))
    return out


def _truncatable(encoder: Encoder, sample: Sample, d: DataConfig) -> bool:
    """Whether truncate_turns would keep part of ``sample`` (for the what-if counts)."""
    try:
        return fit_sample(encoder, sample, d.max_length, "truncate_turns").action == "truncated"
    except Exception:  # a sample over by characters was never checked whole: its first exchanges may be bad
        return False


def prepare_data(
    recipe: Recipe, encoder: Encoder, run_dir: str | os.PathLike | None = None, enforce: bool = True
) -> DataReport:
    """Read every source, apply the mixture and length policy; with ``enforce``, apply on_bad_sample too."""
    d = recipe.data
    seed = d.seed if d.seed is not None else recipe.train.seed
    report = DataReport(max_length=d.max_length, overlength=d.overlength, seed=seed)
    train_parts = _read("train", d.train, encoder, recipe, report)
    eval_parts = _read("eval", d.eval, encoder, recipe, report)
    report.warnings.extend(leakage_warnings(d, train_parts, eval_parts))
    parts = [Part(src, st.format, st.records, st.used, good) for src, st, good in train_parts]
    mixed = mix(parts, d.eval_split, seed, supervised=lambda s: report.supervised[id(s)])
    report.eval_split = len(mixed.carved)
    report.eval = [s for _, _, good in eval_parts for s in good] + mixed.carved
    report.train, report.mixture = mixed.train, mixed.rows
    if mixed.twins:
        report.warnings.append(
            f"data.eval_split: {mixed.twins} training sample(s) are copies (same conversation and images, another "
            "id or source) of carved eval samples; they left training with them"
        )
    if enforce:
        enforce_policy(report, d, run_dir)
    return report


def leakage_warnings(d: DataConfig, train_parts: list, eval_parts: list) -> list[str]:
    """What makes evaluation score training samples, or counts samples twice without saying so: the same
    file twice, the same file for training and evaluation, eval samples equal to training samples,
    the same id in several training sources."""
    out = []

    def key(src: DataSource) -> tuple:
        return (str(Path(src.path).resolve()), src.split)

    seen: dict[tuple, str] = {}
    for i, (src, _, _) in enumerate(train_parts):
        name = f"data.train.{i}"
        if key(src) in seen:
            out.append(f"{name} and {seen[key(src)]} are the same file ({src.path}): its samples count twice "
                       "(repeats: 2 upsamples a source on purpose)")  # fmt: skip
        seen.setdefault(key(src), name)
    for j, (src, _, _) in enumerate(eval_parts):
        if key(src) in seen:
            out.append(f"data.eval.{j} is the same file as {seen[key(src)]} ({src.path}): evaluation would score "
                       "training samples (data.eval_split carves a held-out share instead)")  # fmt: skip

    trained = {content_key(s) for _, _, good in train_parts for s in good}
    overlap = [s for _, _, good in eval_parts for s in good if content_key(s) in trained]
    if overlap and not any("is the same file as" in w for w in out):
        out.append(f"{len(overlap)} eval sample(s) also appear in the training data (same conversation and images), "
                   f"e.g. {overlap[0].where()}")  # fmt: skip
    owners: dict[str, set[int]] = {}
    for i, (_, _, good) in enumerate(train_parts):
        for s in good:
            if s.has_id:
                owners.setdefault(s.id, set()).add(i)
    shared = sorted(k for k, v in owners.items() if len(v) > 1)
    if shared:
        out.append(f"{len(shared)} id(s) appear in several training sources, e.g. {', '.join(shared[:3])}")
    return out


def enforce_policy(
    report: DataReport,
    d: DataConfig,
    run_dir: str | os.PathLike | None,
    max_listed: int = MAX_LISTED,
    list_file: Path | None = None,
) -> None:
    """Apply ``data.on_bad_sample``: raise UserError listing bad samples, or write rejected.jsonl (skip).

    At most ``max_listed`` bad samples are printed; with more, the whole list goes to ``list_file``
    (default ``<run_dir>/bad_samples.jsonl``) and the message says where. ``data.max_bad_fraction``
    judges each split (train, eval) on its own count.
    """
    listed = report.bad[:max_listed]
    listing = "\n  ".join(b.describe() for b in listed)
    more = ""
    if len(report.bad) > len(listed):
        more = f"\n  ... and {len(report.bad) - len(listed)} more"
        list_file = list_file or (RunDir(run_dir).bad_samples if run_dir is not None else None)
        if list_file is not None:
            write_rejected(report.bad, list_file)
            more += f"; all {len(report.bad)} in {list_file}"
    if report.bad and d.on_bad_sample == "error":
        raise UserError(
            f"{len(report.bad)} bad sample(s) of {report.total}:\n  {listing}{more}",
            hint="fix them, or set data.on_bad_sample=skip to leave them out (they are then listed in rejected.jsonl)",
        )
    if run_dir is not None and (report.bad or report.dropped):
        write_rejected(report.bad + report.dropped, RunDir(run_dir).rejected)
    for split, total in report.totals.items():
        bad = report.bad_counts.get(split, 0)
        frac = bad / max(total, 1)
        if bad and frac > d.max_bad_fraction:
            raise UserError(
                f"{bad} of {total} {split} samples are bad ({frac:.1%}), over data.max_bad_fraction="
                f"{d.max_bad_fraction}:\n  {listing}{more}"
            )
    if not report.train:
        raise UserError("no usable training samples", hint="check data.train paths and the bad-sample list above")


def write_rejected(bad: list[BadSample], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for b in bad:
            f.write(json.dumps(b.to_json()) + "\n")
