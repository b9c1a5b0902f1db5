"""What the generator LLM is asked: a system prompt per kind and hand-written in-context examples.

Usage::

    messages = build_messages("conversation", context_text, few_shot=2)
    # [{"role": "system", ...}, {"role": "user", <example context>}, {"role": "assistant", <example>}, ...,
    #  {"role": "user", context_text}]
    detail_question("139", seed=0)     # the question a detailed description answers, drawn per image

Written for this project in the spirit of LLaVA's data recipe (a text-only LLM sees captions and
boxes and writes as if it saw the image). ``PROMPT_VERSION`` is recorded with every sample; change it
whenever a prompt or an example changes, so a journal written with other prompts is not resumed.
"""

from __future__ import annotations

import zlib

from lora_llava.data.prompts import BRIEF_DESCRIPTION_PROMPTS

PROMPT_VERSION = "2"  # 2: conversations also ask complex questions with detailed answers

_SHARED = (
    "You write training data for a vision-language assistant. Each request gives you a symbolic "
    "description of one image: captions written by people who saw it and, when available, a list of "
    "objects as label: [x1, y1, x2, y2], coordinates between 0 and 1 with the origin at the top left. "
    "You cannot see the image, but write as someone looking at it would: never mention captions, "
    "descriptions, boxes, coordinates or annotations, and never repeat the numbers. Use the boxes only "
    "to reason about where things are, how large they are, how many there are and what is near what. "
    "Say only what the description supports; when something cannot be told from the image, say so "
    "instead of guessing."
)

SYSTEM_PROMPTS = {
    "conversation": _SHARED
    + "\n\nTask: write a conversation between a person asking about the image and an assistant who "
    "answers. Ask 3 to 6 varied questions a curious person would ask about what is visible: what the "
    "objects are, how many, what they are doing, where they are relative to each other, their colors. "
    "Include at least one harder question too, one that needs more than a look: background knowledge "
    "about the objects, the events going on in the scene, or the reasons behind what is seen. Ask only "
    "questions the image answers with confidence, and do not ask about details that cannot be made out. "
    "Answers are friendly, complete sentences; answer a harder question in depth, with concrete "
    "examples or the steps of the reasoning, in more than one paragraph when that helps.\n"
    "Format: every question on a line that starts with 'Question:', every answer starting on a line "
    "that starts with 'Answer:' (an answer may run over several lines; separate its paragraphs with a "
    "blank line), alternating, beginning with a question and ending with an answer. Write nothing else: "
    "no introduction before the first question and no closing remark after the last answer.",
    "detail": _SHARED
    + "\n\nTask: write a detailed description of the image in one or two paragraphs: the setting, the "
    "main objects and what they are doing, where they are relative to each other, and notable details "
    "such as colors. Separate paragraphs with a blank line. Write only the description, without a "
    "title or a list: start with the image itself, not with an introduction, and end without a "
    "closing remark to the reader.",
    "complex_reasoning": _SHARED
    + "\n\nTask: write one question about the image that takes reasoning beyond describing it (the "
    "purpose of something, what is likely to happen next, why the scene looks the way it does, what "
    "someone there should watch out for) and a thorough answer that reasons from what is visible.\n"
    "Format: one line that starts with 'Question:', then the answer starting with 'Answer:' (it may run "
    "over several lines; separate its paragraphs with a blank line). Write nothing else.",
}

_KITCHEN = (
    "Captions:\n"
    "- A woman slices vegetables on a wooden counter next to a window.\n"
    "- Someone preparing a salad in a bright kitchen.\n"
    "Objects (label: [x1, y1, x2, y2], normalized to 0-1, origin at the top left):\n"
    "- person: [0.210, 0.120, 0.580, 0.990]\n"
    "- knife: [0.430, 0.610, 0.520, 0.680]\n"
    "- cutting board: [0.350, 0.640, 0.720, 0.760]\n"
    "- bowl: [0.700, 0.590, 0.880, 0.720]\n"
    "- potted plant: [0.820, 0.080, 0.960, 0.330]"
)
_STREET = (
    "Captions:\n"
    "- A red double-decker bus waits at a stop while people line up beside it.\n"
    "- A city street with a bus, two pedestrians and a parked bicycle on a cloudy day.\n"
    "Objects (label: [x1, y1, x2, y2], normalized to 0-1, origin at the top left):\n"
    "- bus: [0.050, 0.180, 0.640, 0.850]\n"
    "- person: [0.660, 0.450, 0.730, 0.900]\n"
    "- person: [0.740, 0.470, 0.800, 0.910]\n"
    "- bicycle: [0.820, 0.600, 0.990, 0.880]\n"
    "- traffic light: [0.900, 0.050, 0.950, 0.250]"
)

EXAMPLES: dict[str, list[tuple[str, str]]] = {
    "conversation": [
        (
            _KITCHEN,
            "Question: What is the woman doing?\n"
            "Answer: She is cutting vegetables on a wooden cutting board; it looks like she is making a salad.\n"
            "Question: Where is the bowl compared to the cutting board?\n"
            "Answer: The bowl sits just to the right of the cutting board, near the edge of the counter.\n"
            "Question: Is there a plant in the room?\n"
            "Answer: Yes, a potted plant stands in the upper right corner, by the window.\n"
            "Question: What should she keep in mind to prepare the salad safely and keep it fresh?\n"
            "Answer: The main risk is the knife. She should keep the fingers of her other hand curled "
            "away from the blade, cut on the board rather than in her hand, and keep the board steady "
            "on the counter so it does not slide while she cuts.\n"
            "\n"
            "Freshness is about timing. Vegetables that are cut too early dry out and lose their crunch, "
            "so it is best to slice them shortly before eating, add any dressing at the last moment, and "
            "keep the bowl somewhere cool if the salad has to wait.",
        ),
        (
            _STREET,
            "Question: What vehicle is in the picture?\n"
            "Answer: A red double-decker bus, stopped at a bus stop.\n"
            "Question: How many people are standing next to the bus?\n"
            "Answer: Two people are standing beside it, close together.\n"
            "Question: Is there a bicycle?\n"
            "Answer: Yes, a bicycle is parked on the far right of the scene, near the two people.\n"
            "Question: What is the weather like?\n"
            "Answer: The sky is grey and overcast, so it seems to be a cloudy day.\n"
            "Question: Why do buses in some cities have two decks?\n"
            "Answer: A second deck lets one bus carry many more passengers without taking up more room "
            "on the road, which matters in crowded city centres where streets are narrow and stops are "
            "busy. One driver moves more people per trip, so the service costs less per passenger.\n"
            "\n"
            "The extra height has its price: the bus needs routes free of low bridges and branches, and "
            "it takes a little longer to board, as people climb the stairs to the upper deck.",
        ),
    ],
    "detail": [
        (
            _KITCHEN,
            "A woman stands at a wooden kitchen counter, slicing vegetables with a knife on a cutting board "
            "in front of her. She fills most of the left half of the picture, and the board runs across the "
            "counter towards the right, where a bowl waits to be filled, which suggests she is preparing a "
            "salad.\n"
            "\n"
            "Daylight comes in through a window, and a potted plant sits in the upper right corner, "
            "giving the bright kitchen a homely feel.",
        ),
        (
            _STREET,
            "A red double-decker bus takes up most of the left side of this city street scene, stopped at a "
            "bus stop. Two people stand close together just to the right of the bus, as if waiting to get "
            "on. Further right a bicycle is parked by the kerb, and a traffic light rises high in the top "
            "right corner. The sky is grey and the light is flat, typical of a cloudy day in town.",
        ),
    ],
    "complex_reasoning": [
        (
            _KITCHEN,
            "Question: What is the woman probably going to do with the bowl next to her?\n"
            "Answer: She is cutting vegetables on a board right beside an empty bowl, so the bowl is most "
            "likely meant for the pieces she is cutting. Once she has sliced enough, she will probably slide "
            "them from the board into the bowl and mix them into a salad. Keeping the bowl within arm's "
            "reach on the counter saves her from carrying the cut vegetables across the kitchen.",
        ),
        (
            _STREET,
            "Question: What should the people beside the bus be careful about?\n"
            "Answer: They are standing close to a large bus at a stop on a busy city street. When it pulls "
            "away, its rear end swings out, so they should stay clear of the kerb edge until it has left. "
            "There is also a bicycle nearby and a traffic light at the corner, which means cyclists and "
            "cars pass here; before crossing they should wait for the light and check for bikes coming "
            "along the kerb.",
        ),
    ],
}

DETAIL_QUESTIONS = (
    "Describe this image in detail.",
    "Give a thorough description of what you see in the picture.",
    "What is happening in this image? Describe it carefully.",
    "Walk me through the contents of this photo in detail.",
    "Provide a detailed account of the scene shown here.",
    "Explain everything you notice in this image.",
    "Write an in-depth description of the picture.",
    "Tell me about this image in as much detail as you can.",
)


def build_messages(kind: str, context: str, few_shot: int = 2) -> list[dict[str, str]]:
    """The chat messages that ask for one generation of ``kind`` about the image described by ``context``."""
    messages = [{"role": "system", "content": SYSTEM_PROMPTS[kind]}]
    for example_context, answer in EXAMPLES[kind][:few_shot]:
        messages += [{"role": "user", "content": example_context}, {"role": "assistant", "content": answer}]
    messages.append({"role": "user", "content": context})
    return messages


def _pick(options: tuple[str, ...], key: str, seed: int) -> str:
    return options[zlib.crc32(f"{seed}:{key}".encode()) % len(options)]


def detail_question(image_id: str, seed: int = 0) -> str:
    """The question a detailed description answers: one of DETAIL_QUESTIONS, stable per image and seed."""
    return _pick(DETAIL_QUESTIONS, image_id, seed)


def brief_question(image_id: str, seed: int = 0) -> str:
    """Stage 1: one of the brief-description prompts the data layer uses, stable per image and seed."""
    return _pick(BRIEF_DESCRIPTION_PROMPTS, image_id, seed)
