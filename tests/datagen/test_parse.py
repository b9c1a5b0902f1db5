"""Accepting well-formed generations and rejecting malformed ones, each with its reason."""

from __future__ import annotations

import pytest

from lora_llava.datagen.parse import REASONS, Rejected, parse_generation
from lora_llava.datagen.prompts import DETAIL_QUESTIONS, EXAMPLES, PROMPT_VERSION, SYSTEM_PROMPTS, build_messages


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
        ("conversation", "Here is a conversation:\nQuestion: Q?\nAnswer: A.", "framing"),
        ("conversation", "The picture shows a dog.\nQuestion: Q?\nAnswer: A.", "turn_structure"),
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


LIGHTHOUSE = "A white lighthouse with a red lantern room stands on a rocky point, waves breaking on the stones below."


@pytest.mark.parametrize(
    "kind, text, said",
    [
        ("detail", f"Of course! Here's a detailed description of the photograph:\n\n{LIGHTHOUSE}", "Of course!"),
        ("detail", f"Certainly, I'd describe it like this. {LIGHTHOUSE}", "Certainly"),
        ("detail", f"### Scene overview:\n{LIGHTHOUSE}", "Scene overview:"),
        ("detail", f"{LIGHTHOUSE}\n\nI hope this description helps! Tell me if you want it shorter.", "I hope this"),
        ("detail", f"{LIGHTHOUSE} Feel free to ask if anything is unclear.", "Feel free to ask"),
        (
            "conversation",
            f"Question: What stands on the point?\nAnswer: {LIGHTHOUSE}\n"
            "Is there anything else you would like to know about the coast?",
            "Is there anything else",
        ),  # fmt: skip
        (
            "complex_reasoning",
            "Question: Why paint it white?\nAnswer: To be seen by day.\n\n"
            "If you have any further questions, do not hesitate to ask.",
            "If you have any further",
        ),  # fmt: skip
        (
            "conversation",
            f"Absolutely! Below is the dialogue.\nQuestion: What is it?\nAnswer: {LIGHTHOUSE}",
            "Absolutely",
        ),
    ],
)
def test_words_to_the_requester_around_the_data_are_rejected_not_kept(kind, text, said):
    with pytest.raises(Rejected) as e:
        parse_generation(kind, text, True, "lh-3")
    assert e.value.reason == "framing" and said in e.value.detail, e.value.detail
    assert "framing" in REASONS


@pytest.mark.parametrize(
    "text",
    [
        f"{LIGHTHOUSE}\n\nIf you look closely, a gull perches on the railing of the gallery.",
        f"Here the coast turns north. {LIGHTHOUSE}",
        f"{LIGHTHOUSE} A hand-painted sign by the door reads: keep off the rocks.",
    ],
)
def test_a_description_that_only_resembles_chatter_is_kept(text):
    assert parse_generation("detail", text, True, "lh-3")[1] == ("gpt", text)


def test_paragraph_breaks_are_kept_as_one_blank_line():
    described = parse_generation(
        "detail", f"{LIGHTHOUSE}  \r\n\r\n\r\nAt its foot a path winds to a hut.\r\n", True, "9"
    )
    assert described[1][1] == f"{LIGHTHOUSE}\n\nAt its foot a path winds to a hut."
    talk = (
        "Question: Could ships use it at night?\n"
        "Answer: Yes. The lantern room at the top holds the light.\n"
        "\n"
        "\n"
        "Its beam sweeps the sea, so a ship can tell where the rocks are.\n"
        "It also marks the harbour mouth.\n"
        "\n"
        "Question: What colour is the lantern room?\n"
        "Answer:\n"
        "\n"
        "It is red."
    )
    assert parse_generation("conversation", talk, True, "9") == [
        ("human", "Could ships use it at night?"),
        ("gpt", "Yes. The lantern room at the top holds the light.\n\n"
         "Its beam sweeps the sea, so a ship can tell where the rocks are.\nIt also marks the harbour mouth."),
        ("human", "What colour is the lantern room?"),
        ("gpt", "It is red."),
    ]  # fmt: skip


def test_the_conversation_prompt_asks_for_harder_questions_with_detailed_answers():
    system = build_messages("conversation", "ctx", few_shot=0)[0]["content"]
    assert "harder question" in system and "in depth" in system and "paragraph" in system
    answers = [t for _, ex in EXAMPLES["conversation"] for t in parse_generation("conversation", ex, True, "x")]
    assert any(role == "gpt" and "\n\n" in text for role, text in answers)  # the examples show a long answer
    for kind in SYSTEM_PROMPTS:  # and every prompt asks for the data alone, paragraphs apart
        assert "blank line" in SYSTEM_PROMPTS[kind]
    assert PROMPT_VERSION != "1"  # journals written with the old prompts are not resumed into new outputs
