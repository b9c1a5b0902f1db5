"""Check a recipe's data before a model step: every sample read, rendered, budgeted; every problem listed.

Usage::

    report = prepare_data(recipe, encoder)      # UserError listing every bad sample (on_bad_sample=error)
    print(report.summary())
    report.train, report.eval                    # good samples, ready for EncodedDataset

With ``on_bad_sample: skip`` the bad samples are left out, written to ``<output_dir>/rejected.jsonl``
with their reasons, and counted in the summary; more than ``max_bad_fraction`` bad aborts the run.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from lora_llava.config.schema import DataSource, Recipe
from lora_llava.data.encode import Encoder
from lora_llava.data.formats import BadSample, Sample, read_source
from lora_llava.errors import UserError

MAX_LISTED = 200


@dataclass
class SourceStats:
    split: str
    path: str
    samples: int
    bad: int
    tokens: int = 0
    supervised: int = 0


@dataclass
class DataReport:
    train: list[Sample] = field(default_factory=list)
    eval: list[Sample] = field(default_factory=list)
    lengths: dict[int, int] = field(default_factory=dict)  # id(sample) -> tokens
    bad: list[BadSample] = field(default_factory=list)
    stats: list[SourceStats] = field(default_factory=list)
    max_length: int = 0

    def summary(self) -> str:
        lines = [f"{'split':<6} {'samples':>8} {'bad':>5} {'tokens':>9} {'answer tokens':>14}  source"]
        for s in self.stats:
            lines.append(f"{s.split:<6} {s.samples:>8} {s.bad:>5} {s.tokens:>9} {s.supervised:>14}  {s.path}")
        lens = sorted(self.lengths.values())
        if lens:
            lines.append(
                f"lengths (tokens, after image expansion): min {lens[0]}, median {lens[len(lens) // 2]}, "
                f"max {lens[-1]}; data.max_length {self.max_length}"
            )
        return "\n".join(lines)


def _read(split: str, sources: list[DataSource], encoder: Encoder, max_length: int, report: DataReport) -> list[Sample]:
    good: list[Sample] = []
    for src in sources:
        samples, bad = read_source(src)
        st = SourceStats(split, src.path, 0, len(bad))
        for s in samples:
            try:
                ids, labels = encoder.tokens(s, _sizes(s))
            except ValueError as e:
                bad.append(BadSample(s.source, s.index, s.id, str(e), s.line))
                st.bad += 1
                continue
            n_sup = sum(1 for x in labels if x != -100)
            if not n_sup:
                reason = "no answer tokens to learn from"
            elif len(ids) > max_length:
                reason = f"{len(ids)} tokens after image expansion, over data.max_length={max_length}"
            else:
                reason = None
            if reason:
                bad.append(BadSample(s.source, s.index, s.id, reason, s.line))
                st.bad += 1
                continue
            report.lengths[id(s)] = len(ids)
            st.samples += 1
            st.tokens += len(ids)
            st.supervised += n_sup
            good.append(s)
        report.bad.extend(bad)
        report.stats.append(st)
    return good


def _sizes(sample: Sample) -> list[tuple[int, int]]:
    from lora_llava.data.images import image_size

    return [image_size(p) for p in sample.images]


def prepare_data(recipe: Recipe, encoder: Encoder, run_dir: str | os.PathLike | None = None) -> DataReport:
    d = recipe.data
    report = DataReport(max_length=d.max_length)
    report.train = _read("train", d.train, encoder, d.max_length, report)
    report.eval = _read("eval", d.eval, encoder, d.max_length, report)
    total = len(report.train) + len(report.eval) + len(report.bad)
    if report.bad:
        listing = "\n  ".join(b.describe() for b in report.bad[:MAX_LISTED])
        more = f"\n  ... and {len(report.bad) - MAX_LISTED} more" if len(report.bad) > MAX_LISTED else ""
        if d.on_bad_sample == "error":
            raise UserError(
                f"{len(report.bad)} bad sample(s) of {total}:\n  {listing}{more}",
                hint="fix them, or set data.on_bad_sample=skip to leave them out (they are then listed in rejected.jsonl)",
            )
        frac = len(report.bad) / max(total, 1)
        if run_dir is not None:
            write_rejected(report.bad, Path(run_dir) / "rejected.jsonl")
        if frac > d.max_bad_fraction:
            raise UserError(
                f"{len(report.bad)} of {total} samples are bad ({frac:.1%}), over data.max_bad_fraction="
                f"{d.max_bad_fraction}:\n  {listing}{more}"
            )
    if not report.train:
        raise UserError("no usable training samples", hint="check data.train paths and the bad-sample list above")
    return report


def write_rejected(bad: list[BadSample], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for b in bad:
            f.write(json.dumps(b.to_json()) + "\n")
