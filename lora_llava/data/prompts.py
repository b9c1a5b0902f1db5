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


# Chat-style stage-1 alignment (``stage: align`` with a conversation ``chat.format``): a caption that
# answers no question gets one of these instructions, drawn per sample (stable across runs).
BRIEF_DESCRIPTION_PROMPTS = (
    "Describe the image briefly.",
    "Give a short description of this picture.",
    "Summarize what the photo shows in one sentence.",
    "What does this image show? Keep it short.",
    "Write a brief caption for the image.",
    "In a few words, what is in the picture?",
    "Provide a one-line description of the photo.",
    "Caption this image concisely.",
    "Tell me briefly what you see.",
    "Sum up the contents of the image in a sentence.",
    "What is depicted here? Answer in one sentence.",
    "Offer a compact description of the scene.",
)


def add_brief_instruction(messages: list[tuple[str, str]], key: str) -> list[tuple[str, str]]:
    """``messages`` with a brief-description instruction in every user turn that holds only images.

    The instruction is chosen by a checksum of ``key`` (source and sample id), so a sample gets the
    same one on every run and machine; the ``<image>`` placeholders stay first.
    """
    import zlib

    out = []
    for role, text in messages:
        if role == "user" and not text.replace("<image>", "").strip():
            prompt = BRIEF_DESCRIPTION_PROMPTS[zlib.crc32(key.encode()) % len(BRIEF_DESCRIPTION_PROMPTS)]
            text = "<image>\n" * text.count("<image>") + prompt
        out.append((role, text))
    return out
