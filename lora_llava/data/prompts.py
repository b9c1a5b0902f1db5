"""Per-source prompt styles: LLaVA-1.5's answer-format instructions for short-answer data.

Usage::

    apply_prompt_style([("user", "<image>\\nWhat is it?"), ("assistant", "A cat")], "short_answer")
    # [("user", "<image>\\nWhat is it?\\nAnswer the question using a single word or phrase."), ("assistant", "A cat")]

Exactly which turns: every user (human) turn gets the instruction on a new line after its text,
as LLaVA-1.5's mix665k does for each question of a VQAv2/GQA/OCR-VQA conversation. System turns
and answers are untouched, and a turn that already ends with the instruction is left as it is (so
data prepared in that style is not doubled). The ``<image>`` placeholder stays first.
"""

from __future__ import annotations

INSTRUCTIONS = {
    "short_answer": "Answer the question using a single word or phrase.",
    "multiple_choice": "Answer with the option's letter from the given choices directly.",
}


def apply_prompt_style(messages: list[tuple[str, str]], style: str) -> list[tuple[str, str]]:
    """``messages`` with ``style``'s instruction appended to every user turn (``plain``: unchanged)."""
    if style == "plain":
        return messages
    instruction = INSTRUCTIONS[style]
    out = []
    for role, text in messages:
        if role == "user" and not text.rstrip().endswith(instruction):
            text = f"{text.rstrip()}\n{instruction}"
        out.append((role, text))
    return out
