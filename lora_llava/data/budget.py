"""Token budget: exact lengths after image-token expansion, and what happens to a sample over budget.

Usage::

    fit = fit_sample(encoder, sample, max_length=2048, policy="truncate_turns")
    fit.sample, fit.length, fit.supervised, fit.full_length, fit.action   # action: ok | truncated | over
    over_reason(fit, 2048)      # '3000 tokens after image expansion, over data.max_length=2048', or by characters
    print(histogram([fit.full_length, ...], max_length=2048))

Lengths count every token the model sees, with each ``<image>`` expanded to the number of image
tokens the backbone's processor produces for that image (AnyRes grids included). A sample over
``max_length`` is never cut inside it: ``truncate_turns`` keeps the longest run of whole leading
exchanges (system turn, then human + answer pairs) that fits, together with exactly the images
whose placeholders it keeps; when even the first exchange does not fit, the action is ``over``
(the caller drops or rejects it). Every kept sample ends with an answer that carries loss.

Text is tokenized only within a character budget, ``CHARS_PER_TOKEN`` characters a token of
``max_length``: a sample (or a run of leading exchanges, for truncate_turns) holding more characters
than that is over ``max_length`` whatever the tokenizer, and is judged so without being tokenized
(``Fit.full_length`` None), so that a 50 MB answer costs a length check, not minutes and gigabytes.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from lora_llava.data.encode import Encoder
from lora_llava.data.formats import IMAGE, Sample

# Characters a token may hold, on average over a whole sample, before text is judged over-long without
# tokenizing it. Tokenizers average about 4 characters a token on English (Llama, Mistral, Qwen, Vicuna's
# vocabularies), 2-3 on code and other scripts, and about 1 on CJK; only runs of one repeated character
# (a line of 30 '=', long indentation) reach 16 and more per token, and a whole sample never averages
# that. 16 is four times the English average, so no real sample under max_length is judged over.
CHARS_PER_TOKEN = 16


@dataclass
class Fit:
    sample: Sample | None  # the sample to use (shortened for "truncated"); None for "over"
    length: int  # tokens of ``sample`` (of the original when over; 0 when over by characters)
    supervised: int  # answer tokens of ``sample``
    full_length: int | None  # tokens of the original sample; None: over the character budget, never tokenized
    action: str  # ok | truncated | over
    kept_turns: int = 0  # with truncated: how many of the original turns remain
    chars: int = 0  # characters of the original sample's text


def char_budget(max_length: int) -> int:
    """The most characters of text tokenized for a budget of ``max_length`` tokens."""
    return max_length * CHARS_PER_TOKEN


def text_chars(sample: Sample) -> int:
    return sum(len(text) for _, text in sample.messages)


def over_reason(fit: Fit, max_length: int) -> str:
    """Why a sample is over ``max_length``: its token count, or its characters when it was not tokenized."""
    if fit.full_length is None:
        return (
            f"{fit.chars} characters of text, over data.max_length={max_length} with any tokenizer (more than "
            f"{CHARS_PER_TOKEN} characters a token, {char_budget(max_length)} characters); not tokenized"
        )
    return f"{fit.full_length} tokens after image expansion, over data.max_length={max_length}"


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
    """Measure ``sample`` and, for policy truncate_turns, shorten it by whole exchanges to fit. Text over
    the character budget is never tokenized: such a sample is over (``full_length`` None), and cut
    candidates over it are too long without being measured."""
    chars, budget = text_chars(sample), char_budget(max_length)
    if chars > budget:
        length, supervised, full = 0, 0, None
    else:
        length, supervised = measure(encoder, sample)
        full = length
        if length <= max_length:
            return Fit(sample, length, supervised, length, "ok", chars=chars)
    if policy == "truncate_turns":
        lead = 1 if sample.messages[0][0] == "system" else 0
        lo, hi, best = 1, (len(sample.messages) - lead) // 2 - 1, None
        while lo <= hi:  # lengths grow with the number of exchanges kept: binary search the most that fit
            mid = (lo + hi) // 2
            cut = first_exchanges(sample, mid)  # over the character budget: too long, not tokenized
            n, sup = measure(encoder, cut) if text_chars(cut) <= budget else (max_length + 1, 0)
            if n <= max_length:
                best, lo = (cut, n, sup), mid + 1
            else:
                hi = mid - 1
        if best is not None:
            cut, n, sup = best
            return Fit(cut, n, sup, full, "truncated", kept_turns=len(cut.messages), chars=chars)
    return Fit(None, length, supervised, full, "over", chars=chars)


def histogram(lengths: list[int], max_length: int, bins: int = 8, width: int = 30, unmeasured: int = 0) -> str:
    """Text histogram of ``lengths``: ``bins`` equal ranges up to ``max_length``, then one for longer (with
    ``unmeasured`` samples more, over by characters and never tokenized)."""
    step = -(-max_length // bins)
    edges = [(i * step + 1, min((i + 1) * step, max_length)) for i in range(bins)]
    counts = [sum(lo <= n <= hi for n in lengths) for lo, hi in edges]
    over = sum(n > max_length for n in lengths) + unmeasured
    rows = [(f"{lo}-{hi}", c) for (lo, hi), c in zip(edges, counts)] + [(f">{max_length}", over)]
    top = max([c for _, c in rows] + [1])
    label = max([len(r) for r, _ in rows] + [len("tokens")])
    lines = [f"  {'tokens':<{label}}  {'samples':>8}"]
    for r, c in rows:
        bar = "#" * (round(c / top * width) if c else 0)
        lines.append(f"  {r:<{label}}  {c:>8}  {bar}".rstrip())
    return "\n".join(lines)
