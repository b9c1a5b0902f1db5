"""The quality report printed at the end of ``lora-llava data generate``.

Usage::

    report = QualityReport.of(entries, kinds)        # journal entries of the images in this run
    print(report.render(contexts, n_samples=2))

Per kind: generated, rejected (by reason), failed requests, kept; an answer-length histogram (words
per answer, per kind); then a few kept samples printed side by side with their symbolic context.
"""

from __future__ import annotations

import textwrap
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BINS = (10, 20, 40, 80, 160)  # words per answer: 1-10, 11-20, ..., >160
COLUMN = 56
TABLE_HEAD = f"{'kind':<18} {'generated':>9} {'rejected':>8} {'kept':>6} {'failed':>6}  rejected by reason"


def is_report(path: Path) -> bool:
    """Whether ``path`` is a quality report ``data generate`` wrote (it begins with the table's head)."""
    try:
        with open(path, "rb") as f:
            return f.readline(len(TABLE_HEAD) + 2).rstrip(b"\r\n") == TABLE_HEAD.encode()
    except OSError:
        return False


@dataclass
class KindStats:
    generated: int = 0
    kept: int = 0
    failed: int = 0
    rejected: Counter = field(default_factory=Counter)
    answer_words: list[int] = field(default_factory=list)


@dataclass
class QualityReport:
    kinds: dict[str, KindStats]
    prompt_tokens: int = 0
    completion_tokens: int = 0
    kept_samples: list[dict[str, Any]] = field(default_factory=list)
    rejected_examples: dict[str, dict[str, Any]] = field(default_factory=dict)  # reason -> its first entry

    @classmethod
    def of(cls, entries: list[dict[str, Any]], kinds: Sequence[str]) -> QualityReport:
        report = cls({k: KindStats() for k in kinds})
        for e in entries:
            st = report.kinds.setdefault(e["kind"], KindStats())
            report.prompt_tokens += int(e.get("prompt_tokens") or 0)
            report.completion_tokens += int(e.get("completion_tokens") or 0)
            if e["status"] == "failed":
                st.failed += 1
                continue
            st.generated += 1
            if e["status"] == "rejected":
                st.rejected[e["reason"]] += 1
                report.rejected_examples.setdefault(e["reason"], e)
            else:
                st.kept += 1
                report.kept_samples.append(e["sample"])
                st.answer_words += [len(t["value"].split()) for t in e["sample"]["conversations"] if t["from"] == "gpt"]
        return report

    def table(self) -> str:
        lines = [TABLE_HEAD]
        for kind, st in self.kinds.items():
            reasons = ", ".join(f"{r} {n}" for r, n in st.rejected.most_common()) or "-"
            rej = sum(st.rejected.values())
            lines.append(f"{kind:<18} {st.generated:>9} {rej:>8} {st.kept:>6} {st.failed:>6}  {reasons}")
        lines.append(f"tokens: {self.prompt_tokens} prompt, {self.completion_tokens} completion")
        for reason, e in self.rejected_examples.items():
            text = " ".join(str(e.get("text", "")).split())
            text = text if len(text) <= 70 else text[:67] + "..."
            lines.append(f"  e.g. {reason} ({e['image_id']}/{e['kind']}): {e.get('detail', '')}; generated {text!r}")
        return "\n".join(lines)

    def histogram(self) -> str:
        kinds = [k for k, st in self.kinds.items() if st.answer_words]
        if not kinds:
            return "answer lengths: no kept answers"
        labels = [f"{lo + 1}-{hi}" for lo, hi in zip((0,) + BINS, BINS)] + [f">{BINS[-1]}"]
        header = f"  {'words':<8}" + "".join(f"  {k:<18}" for k in kinds)
        lines = ["answer lengths (words per answer):", header.rstrip()]
        counts = {k: Counter(_bin(w) for w in self.kinds[k].answer_words) for k in kinds}
        for i, label in enumerate(labels):
            cells = ""
            for k in kinds:
                n = counts[k][i]
                bar = "#" * round(11 * n / max(counts[k].values()))
                cells += f"  {n:<4} {bar:<13}"
            lines.append(f"  {label:<8}{cells}".rstrip())
        return "\n".join(lines)

    def render(self, contexts: dict[str, str], n_samples: int = 2) -> str:
        parts = [self.table(), self.histogram()]
        shown: list[dict[str, Any]] = []
        for kind in self.kinds:  # one sample of each kind first, then more
            shown += [s for s in self.kept_samples if s["provenance"]["kind"] == kind][:1]
        shown += [s for s in self.kept_samples if s not in shown]
        for s in shown[:n_samples]:
            parts.append(side_by_side(contexts.get(s["provenance"]["annotation_id"], ""), s))
        return "\n\n".join(parts)


def _bin(words: int) -> int:
    return next((i for i, hi in enumerate(BINS) if words <= hi), len(BINS))


def side_by_side(context: str, sample: dict[str, Any]) -> str:
    """The symbolic context (left) and the sample generated from it (right)."""
    left = _wrap(context)
    right: list[str] = []
    for t in sample["conversations"]:
        right += _wrap(f"{t['from'].upper()}: {t['value'].replace(chr(10), ' ')}")
    p = sample["provenance"]
    head = f"--- {sample['id']} ({p['kind']}, {p['generator']}, prompt v{p['prompt_version']}) image {sample['image']}"
    rows = [head, f"{'context':<{COLUMN}} | sample"]
    for i in range(max(len(left), len(right))):
        a = left[i] if i < len(left) else ""
        b = right[i] if i < len(right) else ""
        rows.append(f"{a:<{COLUMN}} | {b}".rstrip())
    return "\n".join(rows)


def _wrap(text: str) -> list[str]:
    out: list[str] = []
    for line in text.splitlines():
        out += textwrap.wrap(line, COLUMN, subsequent_indent="  ") or [""]
    return out
