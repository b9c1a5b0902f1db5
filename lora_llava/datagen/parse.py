"""Turn a generation into conversation turns, or reject it with a reason.

Usage::

    turns = parse_generation("conversation", text, finished=True, image_id="139")
    # [("human", "What is the dog doing?"), ("gpt", "It is jumping ..."), ...]   (no <image> yet)
    try: ...
    except Rejected as r: r.reason, r.detail      # "mentions_annotations", 'says "according to the caption"'

Rejection reasons (``REASONS``): ``empty`` (nothing generated), ``truncated`` (cut off by
max_new_tokens), ``turn_structure`` (not Question:/Answer: lines alternating from a question to an
answer, text outside them, or not exactly one pair for complex_reasoning), ``framing`` (words to
the requester around the data: a preamble such as "Sure! Here is a detailed description:" before a
description or the first question, a sign-off such as "Let me know if you need anything else!" at the
end of a description or an answer), ``empty_answer``, ``too_short`` (a detailed description under 8
words), ``mentions_annotations`` (the text talks about captions, boxes, coordinates or annotations
instead of the image, or copies a box) and ``control_text`` (a chat format's role marker or special
token, which ``lora-llava check`` refuses).

Framing is rejected, not cut away, as text around the turns of a conversation is: a generation that
talks to its requester did not follow the prompt, and a rejection is counted and shown in the quality
report, where a cut would change the data unseen. Paragraph breaks (a blank line) inside a description
or an answer are kept, as LLaVA-Instruct's own data has them; line endings become ``\n`` and longer
runs of blank lines one blank line.
"""

from __future__ import annotations

import re
from functools import cache
from typing import get_args

from lora_llava.datagen.prompts import detail_question

REASONS = (
    "empty",
    "truncated",
    "turn_structure",
    "framing",
    "empty_answer",
    "too_short",
    "mentions_annotations",
    "control_text",
    "echoes_key",  # the reply holds the API key (datagen.generators.KeyEchoed): its text is dropped
)

# A preamble: the generation answers its requester before the data starts ("Sure! Here is ...:").
_PREAMBLE = re.compile(
    r"^\W*(?:"
    r"(?:sure|certainly|of\s+course|absolutely|okay|ok|alright|gladly)\b\s*[!,.:]"
    r"|here(?:'s|\s+is|\s+are)\s+(?:a|an|the|my|your|some)\s+(?:[\w-]+\s+){0,3}?"
    r"(?:description|account|overview|summary|breakdown|conversation|questions?|answers?|dialogue)s?\b"
    r"|below\s+is\b"
    r"|(?:i'd|i\s+would|i'll|i\s+will|i\s+am|i'm)\s+(?:be\s+)?(?:happy|glad|delighted)\s+to\b"
    r"|as\s+an\s+ai\b"
    r")",
    re.IGNORECASE,
)
# A sign-off: a sentence to the requester after the data ("Let me know if you need anything else!").
_SIGNOFF = re.compile(
    r"(?:^|[.!?]\s+)\W*(?:"
    r"let\s+me\s+know\b"
    r"|feel\s+free\s+to\s+(?:ask|let\s+me|reach\s+out)"
    r"|(?:i\s+)?hope\s+(?:this|that|the\s+above)\s+(?:helps|is\s+helpful|description|conversation|answer)"
    r"|if\s+you\s+(?:have|need|would\s+like|want)\s+(?:any\s+)?(?:more|other|further|additional)?\s*"
    r"(?:questions|details|information|help|changes)"
    r"|is\s+there\s+anything\s+else"
    r"|(?:please\s+)?(?:do\s+not|don't)\s+hesitate\s+to"
    r"|happy\s+to\s+help"
    r")",
    re.IGNORECASE,
)
_LABEL = re.compile(r"^\s*(?:[-*]\s*)?(?:\*\*)?(question|answer)(?:\*\*)?\s*:\s*(?:\*\*)?\s*", re.IGNORECASE)
_NOUNS = r"(?:captions?|descriptions?|annotations?|bounding\s+box(?:es)?|boxes|coordinates|object\s+list|labels)"
_MENTIONS = [
    re.compile(p, re.IGNORECASE)
    for p in (
        rf"\b(?:according\s+to|based\s+on|as\s+(?:stated|mentioned|described|noted|given|listed|shown)\s+in|from)"
        rf"\s+(?:the|these|this)\s+(?:given\s+|provided\s+|image\s+)?{_NOUNS}",
        r"\b(?:the|these|this|each|given|provided)\s+(?:given\s+|provided\s+)?(?:captions?|annotations?|coordinates)\b",
        r"\bbounding\s+box",
        r"\bnormalized\s+(?:coordinates?|values?|positions?)\b",
        r"\bcaptions?\s+(?:says?|mentions?|states?|describes?|notes?)\b",
        r"\[\s*[01]?\.\d+\s*,\s*[01]?\.\d+\s*,\s*[01]?\.\d+\s*,\s*[01]?\.\d+\s*\]",  # a box copied from the context
    )
]


class Rejected(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@cache
def control_strings() -> tuple[str, ...]:
    """Role markers and stop strings of every chat format, and common special tokens."""
    from lora_llava.config.schema import ChatFormatName
    from lora_llava.data.chat import CONVERSATION_FORMATS, chat_format

    out = {"<image>", "<s>", "</s>", "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|eot_id|>"}
    for name in set(CONVERSATION_FORMATS) | set(get_args(ChatFormatName)):
        if isinstance(name, str):
            fmt = chat_format(name)
            out |= set(fmt.markers) | ({fmt.stop} if fmt.stop else set())
    return tuple(sorted(s for s in out if s.strip()))


def parse_generation(kind: str, text: str, finished: bool, image_id: str, seed: int = 0) -> list[tuple[str, str]]:
    """The (human|gpt, text) turns of one generation of ``kind``; raises Rejected."""
    text = _paragraphs(text or "")
    if not text:
        raise Rejected("empty", "nothing was generated")
    if not finished:
        raise Rejected("truncated", "the generation reached max_new_tokens before it ended")
    for s in control_strings():
        if s in text:
            raise Rejected("control_text", f"holds {s!r}, a chat-format marker or special token")
    if kind == "detail":
        if _LABEL.match(text):
            raise Rejected("turn_structure", "a description was asked for, a Question:/Answer: text came back")
        first = text.split("\n", 1)[0]
        if _PREAMBLE.match(first) or ("\n" in text and first.strip("*#_ ").endswith(":")):
            raise Rejected("framing", f"a preamble before the description: {_clip(first)}")
        if len(text.split()) < 8:
            raise Rejected("too_short", f"{len(text.split())} words")
        turns = [("human", detail_question(image_id, seed)), ("gpt", text)]
    else:
        turns = _qa_turns(text)
        if kind == "complex_reasoning" and len(turns) != 2:
            raise Rejected("turn_structure", f"expected one question and one answer, got {len(turns) // 2} pairs")
    _, last = turns[-1]
    last_line = last.rsplit("\n", 1)[-1]
    signoff = _SIGNOFF.search(last_line)
    if signoff:
        what = "description" if kind == "detail" else "last answer"
        said = last_line[signoff.start() :].lstrip(".!? ")
        raise Rejected("framing", f"a sign-off at the end of the {what}: {_clip(said)}")
    for role, value in turns:
        for pattern in _MENTIONS:
            m = pattern.search(value)
            if m:
                raise Rejected(
                    "mentions_annotations", f'{"question" if role == "human" else "answer"} says "{m.group(0)}"'
                )
    return turns


def _paragraphs(text: str) -> str:
    """``text`` with ``\n`` line endings, no trailing spaces, and a paragraph break (one blank line) where the
    generation left one or more blank lines; stripped."""
    lines = [line.rstrip() for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n")]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def _clip(line: str) -> str:
    line = line.strip()
    return repr(line if len(line) <= 60 else line[:57] + "...")


def _qa_turns(text: str) -> list[tuple[str, str]]:
    turns: list[list[str]] = []  # [label, text]
    blank = False  # a blank line since the turn's last line: a paragraph break, if the turn goes on
    for line in text.split("\n"):
        m = _LABEL.match(line)
        if m:
            turns.append([m.group(1).lower(), line[m.end() :].strip()])
        elif line.strip():
            if not turns:
                if _PREAMBLE.match(line) or line.strip("*#_ ").endswith(":"):
                    raise Rejected("framing", f"a preamble before the first question: {_clip(line)}")
                raise Rejected("turn_structure", f"text before the first Question: {line.strip()[:40]!r}")
            sep = "\n\n" if blank else "\n"
            turns[-1][1] = f"{turns[-1][1]}{sep}{line.strip()}".strip()
        blank = not line.strip()
    if not turns:
        raise Rejected("turn_structure", "no Question:/Answer: lines")
    labels = [t[0] for t in turns]
    expected = ["question", "answer"] * (len(turns) // 2 + 1)
    if labels != expected[: len(labels)]:
        first_bad = next(i for i, (a, b) in enumerate(zip(labels, expected)) if a != b)
        raise Rejected(
            "turn_structure", f"turn {first_bad + 1} is {labels[first_bad]!r}, expected {expected[first_bad]!r}"
        )
    if labels[-1] != "answer":
        raise Rejected("turn_structure", "ends with a question that has no answer")
    for i, (label, value) in enumerate(turns):
        if not value:
            raise Rejected("empty_answer", f"{label} {i // 2 + 1} is empty")
    return [("human" if label == "question" else "gpt", value) for label, value in turns]
