"""Accepting well-formed generations and rejecting malformed ones, each with its reason."""

from __future__ import annotations

import pytest

from lora_llava.datagen.parse import Rejected, parse_generation
from lora_llava.datagen.prompts import DETAIL_QUESTIONS, EXAMPLES, build_messages


def test_a_conversation_becomes_alternating_turns():
    text = "Question: What is it?\nAnswer: A dog.\n**Question:** Where is it?\nAnswer: On the grass,\nnear a tree."
    assert parse_generation("conversation", text, True, "1") == [
        ("human", "What is it?"),
        ("gpt", "A dog."),
        ("human", "Where is it?"),
        ("gpt", "On the grass,\nnear a tree."),
    ]


def test_a_detail_answers_a_question_drawn_per_image():
    text = "A brown dog runs across a green lawn towards a red ball lying near a wooden fence."
    turns = parse_generation("detail", text, True, "7")
    assert turns[0][0] == "human" and turns[0][1] in DETAIL_QUESTIONS and turns[1] == ("gpt", text)
    assert parse_generation("detail", text, True, "7") == turns  # stable per image
    assert len({parse_generation("detail", text, True, str(i))[0][1] for i in range(40)}) > 3  # and varied


def test_the_hand_written_examples_pass_the_parser():
    for kind, examples in EXAMPLES.items():
        for _, answer in examples:
            assert parse_generation(kind, answer, True, "x")
    assert len(build_messages("conversation", "ctx", few_shot=1)) == 4
    assert build_messages("detail", "ctx", few_shot=0)[-1] == {"role": "user", "content": "ctx"}


@pytest.mark.parametrize(
    "kind, text, reason",
    [
        ("conversation", "", "empty"),
        ("conversation", "Here is a conversation:\nQuestion: Q?\nAnswer: A.", "turn_structure"),
        ("conversation", "Answer: A.\nQuestion: Q?", "turn_structure"),
        ("conversation", "Question: Q?\nQuestion: Q2?\nAnswer: A.", "turn_structure"),
        ("conversation", "Question: Q?\nAnswer: A.\nQuestion: Q2?", "turn_structure"),
        ("conversation", "just some words without any structure", "turn_structure"),
        ("conversation", "Question: Q?\nAnswer:   \nQuestion: Q2?\nAnswer: A.", "empty_answer"),
        ("conversation", "Question: What is it?\nAnswer: According to the caption, a dog.", "mentions_annotations"),
        ("conversation", "Question: Where?\nAnswer: The bounding box puts it left.", "mentions_annotations"),
        ("conversation", "Question: Where?\nAnswer: At [0.12, 0.30, 0.45, 0.98].", "mentions_annotations"),
        ("conversation", "Question: What do the captions say?\nAnswer: A dog.", "mentions_annotations"),
        ("conversation", "Question: Q?\nAnswer: A.<|im_end|>", "control_text"),
        ("conversation", "Question: Q?\nAnswer: A. USER: more", "control_text"),
        ("complex_reasoning", "Question: Q?\nAnswer: A.\nQuestion: Q2?\nAnswer: A2.", "turn_structure"),
        ("detail", "Question: Q?\nAnswer: A.", "turn_structure"),
        ("detail", "A dog.", "too_short"),
        ("detail", "Based on the given description, the image shows a dog on a lawn.", "mentions_annotations"),
    ],
)
def test_malformed_generations_are_rejected_with_a_reason(kind, text, reason):
    with pytest.raises(Rejected) as e:
        parse_generation(kind, text, True, "1")
    assert e.value.reason == reason, e.value.detail


def test_a_cut_off_generation_is_rejected_even_when_it_parses():
    with pytest.raises(Rejected) as e:
        parse_generation("conversation", "Question: Q?\nAnswer: A", False, "1")
    assert e.value.reason == "truncated"
