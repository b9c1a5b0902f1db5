"""Token budget: exact lengths after image-token expansion, and what happens to a sample over budget.

Usage::

    fit = fit_sample(encoder, sample, max_length=2048, policy="truncate_turns")
    fit.sample, fit.length, fit.supervised, fit.full_length, fit.action   # action: ok | truncated | over
    print(histogram([fit.full_length, ...], max_length=2048))

Lengths count every token the model sees, with each ``<image>`` expanded to the number of image
tokens the backbone's processor produces for that image (AnyRes grids included). A sample over
``max_length`` is never cut inside it: ``truncate_turns`` keeps the longest run of whole leading
exchanges (system turn, then human + answer pairs) that fits, together with exactly the images
whose placeholders it keeps; when even the first exchange does not fit, the action is ``over``
(the caller drops or rejects it). Every kept sample ends with an answer that carries loss.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from lora_llava.data.encode import Encoder
from lora_llava.data.formats import IMAGE, Sample


@dataclass
class Fit:
    sample: Sample | None  # the sample to use (shortened for "truncated"); None for "over"
    length: int  # tokens of ``sample`` (of the original when over)
    supervised: int  # answer tokens of ``sample``
    full_length: int  # tokens of the original sample
    action: str  # ok | truncated | over
    kept_turns: int = 0  # with truncated: how many of the original turns remain


def measure(encoder: Encoder, sample: Sample) -> tuple[int, int]:
    """(tokens, answer tokens) of ``sample``; ValueError when it cannot be aligned or has nothing to learn."""
    ids, labels = encoder.tokens(sample, encoder.image_sizes(sample))
    supervised = sum(1 for x in labels if x != -100)
    if not supervised:
        raise ValueError("no answer tokens to learn from")
    return len(ids), supervised


def first_exchanges(sample: Sample, k: int) -> Sample:
    """``sample`` cut after its k-th human+answer exchange, keeping the images of the kept placeholders."""
    lead = 1 if sample.messages[0][0] == "system" else 0
    messages = sample.messages[: lead + 2 * k]
    used = sum(text.count(IMAGE) for role, text in messages if role == "user")
    return dataclasses.replace(sample, messages=messages, images=sample.images[:used])


def fit_sample(encoder: Encoder, sample: Sample, max_length: int, policy: str) -> Fit:
    """Measure ``sample`` and, for policy truncate_turns, shorten it by whole exchanges to fit."""
    length, supervised = measure(encoder, sample)
    if length <= max_length:
        return Fit(sample, length, supervised, length, "ok")
    if policy == "truncate_turns":
        lead = 1 if sample.messages[0][0] == "system" else 0
        lo, hi, best = 1, (len(sample.messages) - lead) // 2 - 1, None
        while lo <= hi:  # lengths grow with the number of exchanges kept: binary search the most that fit
            mid = (lo + hi) // 2
            cut = first_exchanges(sample, mid)
            n, sup = measure(encoder, cut)
            if n <= max_length:
                best, lo = (cut, n, sup), mid + 1
            else:
                hi = mid - 1
        if best is not None:
            cut, n, sup = best
            return Fit(cut, n, sup, length, "truncated", kept_turns=len(cut.messages))
    return Fit(None, length, supervised, length, "over")


def histogram(lengths: list[int], max_length: int, bins: int = 8, width: int = 30) -> str:
    """Text histogram of ``lengths``: ``bins`` equal ranges up to ``max_length``, then one for longer."""
    step = -(-max_length // bins)
    edges = [(i * step + 1, min((i + 1) * step, max_length)) for i in range(bins)]
    counts = [sum(lo <= n <= hi for n in lengths) for lo, hi in edges]
    over = sum(n > max_length for n in lengths)
    rows = [(f"{lo}-{hi}", c) for (lo, hi), c in zip(edges, counts)] + [(f">{max_length}", over)]
    top = max([c for _, c in rows] + [1])
    label = max([len(r) for r, _ in rows] + [len("tokens")])
    lines = [f"  {'tokens':<{label}}  {'samples':>8}"]
    for r, c in rows:
        bar = "#" * (round(c / top * width) if c else 0)
        lines.append(f"  {r:<{label}}  {c:>8}  {bar}".rstrip())
    return "\n".join(lines)
