"""Mixtures: which records of each source are used, how often, and the eval split carved from them.

Usage::

    indices = select_indices(len(reader), src, seed=42)    # all, or a seeded draw (fraction / max_samples)
    mixed = mix(parts, eval_split=0.05, seed=42, supervised=answer_tokens)   # parts: per source, good samples
    mixed.train, mixed.carved                                  # repeats applied; the eval split carved out
    print(format_mixture(mixed.rows, seed=42))                 # the table ``check`` prints

Every draw is seeded: the same recipe (and data) gives the same samples on every machine. A
source's draw depends on the seed and its path only, so adding a source leaves the others' draws
unchanged. The eval split is drawn from the unique training samples before ``repeats``: a carved sample
leaves training with its repeats and with every copy of it under another id or in another source.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from lora_llava.config.schema import DataSource
from lora_llava.data.formats import Sample
from lora_llava.errors import UserError


def select_indices(n: int, src: DataSource, seed: int) -> list[int]:
    """Record indices of ``src`` to read: all of them, or a seeded draw of ``fraction`` / ``max_samples``."""
    k = n
    if src.fraction is not None:
        k = max(1, round(src.fraction * n)) if n else 0
    if src.max_samples is not None:
        k = min(k, src.max_samples)
    if k >= n:
        return list(range(n))
    return sorted(random.Random(f"{seed}:{src.path}").sample(range(n), k))


def eval_split_size(eval_split: int | float | None, pool: int) -> int:
    """How many samples ``data.eval_split`` carves from ``pool`` unique training samples."""
    if eval_split is None or pool == 0:
        return 0
    if isinstance(eval_split, float):
        return max(1, round(eval_split * pool))
    return eval_split


@dataclass
class MixtureRow:
    source: str
    format: str
    records: int  # records in the source
    used: int  # records drawn (fraction / max_samples)
    repeats: int
    samples: int  # training samples from this source, repeats included
    supervised: int  # answer tokens of those samples, repeats included
    sample_share: float = 0.0
    token_share: float = 0.0


@dataclass
class Part:
    """One training source as read: its good unique samples, and how many records it has and were drawn."""

    source: DataSource
    format: str
    records: int
    used: int
    samples: list[Sample]


@dataclass
class Mix:
    train: list[Sample] = field(default_factory=list)  # repeats applied, the eval split taken out
    carved: list[Sample] = field(default_factory=list)  # the eval split (data.eval_split)
    rows: list[MixtureRow] = field(default_factory=list)  # the mixture table, shares filled in
    twins: int = 0  # training copies of carved samples, left out of training with them


def content_key(sample: Sample) -> tuple:
    """What makes two samples the same training example, whatever their ids: the same conversation and the same
    images (a file by its resolved path, an image embedded in a dataset by its name)."""
    images = tuple(str(i.resolve()) if isinstance(i, Path) else f"embedded:{i.name}" for i in sample.images)
    return (tuple(sample.messages), images)


def mix(parts: list[Part], eval_split: int | float | None, seed: int, supervised: Callable[[Sample], int]) -> Mix:
    """The training mixture of ``parts``: the eval split carved from their unique samples, then each source's
    rest repeated ``repeats`` times; ``supervised(sample)``: its answer tokens, for the token shares.

    Samples with the same content (``content_key``: a record copied under another id, or the same record in
    two sources) are carved together: one of them is the eval sample, none stays in training, so the split
    never scores a sample the model trained on. ``Mix.twins`` counts the training copies that left with them.
    """
    pools = [p.samples for p in parts]
    groups: dict[tuple, list[tuple[int, int]]] = {}  # content -> (source, position) of each copy, in order
    for i, pool in enumerate(pools):
        for j, s in enumerate(pool):
            groups.setdefault(content_key(s), []).append((i, j))
    unique = list(groups.values())
    k = eval_split_size(eval_split, len(unique))
    if k and k >= len(unique):
        raise UserError(
            f"data.eval_split={eval_split} would take all {len(unique)} usable training samples"
            + (f" ({sum(map(len, unique))} with copies)" if sum(map(len, unique)) > len(unique) else ""),
            hint="lower data.eval_split",
        )
    chosen = sorted(random.Random(f"{seed}:eval_split").sample(range(len(unique)), k)) if k else []
    leaving = {at for g in chosen for at in unique[g]}
    out = Mix(carved=[pools[unique[g][0][0]][unique[g][0][1]] for g in chosen])
    out.twins = len(leaving) - len(chosen)
    for i, (part, pool) in enumerate(zip(parts, pools)):
        src = part.source
        kept = [s for j, s in enumerate(pool) if (i, j) not in leaving]
        out.train.extend(kept * src.repeats)
        tokens = sum(supervised(s) for s in kept) * src.repeats
        out.rows.append(
            MixtureRow(src.path, part.format, part.records, part.used, src.repeats, len(kept) * src.repeats, tokens)
        )
    finish_rows(out.rows)
    return out


def finish_rows(rows: list[MixtureRow]) -> list[MixtureRow]:
    """Fill in each row's share of the training samples and of the answer (supervised) tokens."""
    samples = sum(r.samples for r in rows) or 1
    tokens = sum(r.supervised for r in rows) or 1
    for r in rows:
        r.sample_share = r.samples / samples
        r.token_share = r.supervised / tokens
    return rows


def format_mixture(rows: list[MixtureRow], seed: int) -> str:
    width = max([len(r.source) for r in rows] + [6])
    head = (
        f"  {'source':<{width}}  {'format':<8} {'records':>8} {'used':>7} {'repeats':>7} {'samples':>8} "
        f"{'share':>6} {'answer-token share':>18}"
    )
    lines = [f"mixture (seed {seed}): {sum(r.samples for r in rows)} training samples", head]
    for r in rows:
        lines.append(
            f"  {r.source:<{width}}  {r.format:<8} {r.records:>8} {r.used:>7} {r.repeats:>7} {r.samples:>8} "
            f"{r.sample_share:>6.1%} {r.token_share:>18.1%}"
        )
    return "\n".join(lines)
