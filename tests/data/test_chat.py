"""Chat formats: upstream LLaVA's prompts byte by byte, saved templates, labels on every generated token for every tokenizer style."""

from __future__ import annotations

import pytest

from lora_llava.artifacts import resolve_backbone
from lora_llava.backbones.registry import registered_backbones
from lora_llava.data.chat import (
    CHAT_FORMATS,
    VICUNA_SYSTEM,
    chat_format,
    default_system,
    format_for,
    stop_token_id,
    tokenize_with_labels,
)

SPECIALS = {
    "vicuna_v1": (["<s>", "</s>", "<pad>"], "</s>", "<s>"),
    "mistral_instruct": (["<s>", "</s>", "<pad>"], "</s>", "<s>"),
    "chatml": (["<|endoftext|>", "<|im_start|>", "<|im_end|>"], "<|im_end|>", None),
    "chatml_direct": (["<|endoftext|>", "<|im_start|>", "<|im_end|>"], "<|im_end|>", None),
    "llama3": (
        ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
        "<|eot_id|>",
        "<|begin_of_text|>",
    ),
}


CONVERSATION = [
    ("system", "Answer briefly."),
    ("user", "What color is the car?"),
    ("assistant", "Red."),
    ("user", "And the sky?"),
    ("assistant", "Blue, with clouds."),
]


def _tokenizer(fmt: str):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials, eos, bos = SPECIALS[fmt]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = ["What color is the car? Red. And the sky? Blue, with clouds. Answer briefly. USER ASSISTANT INST"] * 8
    tok.train_from_iterator(
        corpus,
        trainers.BpeTrainer(
            vocab_size=300,
            special_tokens=specials,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        ),
    )
    if bos:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", special_tokens=[(bos, tok.token_to_id(bos))]
        )
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos, bos_token=bos, pad_token=specials[-1])


EXPECTED_TEXT = {
    "vicuna_v1": "Answer briefly. USER: What color is the car? ASSISTANT: Red.</s>USER: And the sky? "
    "ASSISTANT: Blue, with clouds.</s>",
    "mistral_instruct": "[INST] <<SYS>>\nAnswer briefly.\n<</SYS>>\n\nWhat color is the car? [/INST] Red. </s>"
    "[INST] And the sky? [/INST] Blue, with clouds. </s>",
    "chatml_direct": "<|im_start|>system\nAnswer briefly.<|im_end|><|im_start|>user\nWhat color is the car?<|im_end|>"
    "<|im_start|>assistant\nRed.<|im_end|><|im_start|>user\nAnd the sky?<|im_end|><|im_start|>assistant\n"
    "Blue, with clouds.<|im_end|>",
    "chatml": "<|im_start|>system\nAnswer briefly.<|im_end|>\n<|im_start|>user\nWhat color is the car?<|im_end|>\n"
    "<|im_start|>assistant\nRed.<|im_end|>\n<|im_start|>user\nAnd the sky?<|im_end|>\n<|im_start|>assistant\n"
    "Blue, with clouds.<|im_end|>\n",
    "llama3": "<|start_header_id|>system<|end_header_id|>\n\nAnswer briefly.<|eot_id|><|start_header_id|>user"
    "<|end_header_id|>\n\nWhat color is the car?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nRed."
    "<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nAnd the sky?<|eot_id|><|start_header_id|>assistant"
    "<|end_header_id|>\n\nBlue, with clouds.<|eot_id|>",
}


# what the labelled tokens decode to, run by run (a leading space belongs to the answer's first token)
EXPECTED_LABELLED = {
    "vicuna_v1": [" Red.</s>", " Blue, with clouds.</s>"],
    "mistral_instruct": [" Red. </s>", " Blue, with clouds. </s>"],
    "chatml_direct": ["Red.<|im_end|>", "Blue, with clouds.<|im_end|>"],
    "chatml": ["Red.<|im_end|>", "Blue, with clouds.<|im_end|>"],
    "llama3": ["Red.<|eot_id|>", "Blue, with clouds.<|eot_id|>"],
}


def _runs(ids, labels):
    runs, cur = [], []
    for i, lab in zip(ids, labels):
        if lab == -100:
            if cur:
                runs.append(cur)
                cur = []
        else:
            assert lab == i
            cur.append(i)
    return runs + ([cur] if cur else [])


@pytest.mark.parametrize("name", sorted(SPECIALS))
def test_answer_only_labels_token_by_token(name):
    tok = _tokenizer(name)
    fmt = format_for(name, tok)
    text, spans = fmt.render(CONVERSATION)
    assert text == EXPECTED_TEXT[name]
    stop_id = tok.convert_tokens_to_ids(fmt.stop)
    ids, labels = tokenize_with_labels(tok, text, spans, stop_id)
    runs = _runs(ids, labels)
    assert [tok.decode(r) for r in runs] == EXPECTED_LABELLED[name]
    assert all(r[-1] == stop_id for r in runs)
    # every other token is masked: the system prompt, role headers, questions, the BOS
    unlabelled = tok.decode([i for i, lab in zip(ids, labels) if lab == -100])
    for part in ("Answer briefly.", "What color is the car?", "And the sky?"):
        assert part in unlabelled
    assert "Red" not in unlabelled and "clouds" not in unlabelled
    assert sum(lab != -100 for lab in labels) == sum(len(r) for r in runs)


@pytest.mark.parametrize("name", sorted(SPECIALS))
def test_saved_template_renders_the_training_text(name):
    tok = _tokenizer(name)
    fmt = format_for(name, tok)
    messages = [{"role": r, "content": c} for r, c in CONVERSATION]
    assert tok.apply_chat_template(messages, chat_template=fmt.jinja, tokenize=False) == fmt.render(CONVERSATION)[0]
    prompt = tok.apply_chat_template(messages[:4], chat_template=fmt.jinja, tokenize=False, add_generation_prompt=True)
    assert prompt == fmt.render(CONVERSATION[:4], add_generation_prompt=True)[0]
    assert prompt.endswith(fmt.generation_prompt)


@pytest.mark.parametrize("name", ["chatml", "chatml_direct", "llama3"])
def test_a_format_the_tokenizer_does_not_speak_fails_loudly(name):
    tok = _tokenizer("vicuna_v1")  # knows </s>, not <|im_end|> / <|eot_id|>
    fmt = chat_format(name)
    text, spans = fmt.render(CONVERSATION)
    with pytest.raises(ValueError, match="does not end with the stop token"):
        tokenize_with_labels(tok, text, spans, tok.eos_token_id)


def test_stop_string_follows_the_format():
    tok = _tokenizer("chatml")
    assert format_for("chatml", tok).stop == "<|im_end|>"
    assert format_for("vicuna_v1", _tokenizer("vicuna_v1")).stop == "</s>"
    assert format_for("llama3", _tokenizer("llama3")).stop == "<|eot_id|>"


CONV_ITEMS = [
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Is there a shape?"}]},
    {"role": "assistant", "content": [{"type": "text", "text": "Yes."}]},
    {"role": "user", "content": [{"type": "text", "text": "What color is it?"}]},
    {"role": "assistant", "content": [{"type": "text", "text": "Red"}]},
]


CONV_STRINGS = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "<image>\nIs there a shape?"},
    {"role": "assistant", "content": "Yes."},
    {"role": "user", "content": "What color is it?"},
    {"role": "assistant", "content": "Red"},
]


def _as_messages(conv: list[dict]) -> list[tuple[str, str]]:
    out = []
    for m in conv:
        c = m["content"]
        if not isinstance(c, str):
            c = "<image>\n" * sum(i["type"] == "image" for i in c) + "".join(
                i["text"] for i in c if i["type"] == "text"
            )
        out.append((m["role"], c))
    return out


@pytest.mark.parametrize(
    "conv, expected_full",
    [
        (
            CONV_ITEMS,
            VICUNA_SYSTEM + " USER: <image>\nIs there a shape? ASSISTANT: Yes.</s>USER: What color is it? "
            "ASSISTANT: Red</s>",
        ),
        (
            CONV_STRINGS,
            "Answer briefly. USER: <image>\nIs there a shape? ASSISTANT: Yes.</s>"
            "USER: What color is it? ASSISTANT: Red</s>",
        ),
    ],
    ids=["item-lists", "strings-with-system"],
)
def test_render_equals_saved_chat_template(tiny_processor, conv, expected_full):
    fmt = chat_format("vicuna_v1", stop=tiny_processor.tokenizer.eos_token)
    assert tiny_processor.chat_template == fmt.jinja

    full, spans = fmt.render(_as_messages(conv))
    assert full == expected_full
    assert tiny_processor.apply_chat_template(conv, tokenize=False) == full
    assert [full[a:b] for a, b in spans] == [" Yes.</s>", " Red</s>"]

    prompt, spans = fmt.render(_as_messages(conv[:-1]), add_generation_prompt=True)
    assert prompt == expected_full[: -len(" Red</s>")]
    assert prompt.endswith("What color is it? ASSISTANT:")
    assert tiny_processor.apply_chat_template(conv[:-1], tokenize=False, add_generation_prompt=True) == prompt
    assert [prompt[a:b] for a, b in spans] == [" Yes.</s>"]


def test_stop_token_id_not_emitted_raises(tiny_processor):
    tok = tiny_processor.tokenizer
    fmt = chat_format("vicuna_v1", stop="<|im_end|>", system="")  # not a token of the tiny tokenizer
    text, spans = fmt.render([("user", "What color?"), ("assistant", "Red")])
    assert text == "USER: What color? ASSISTANT: Red<|im_end|>"
    gt = tok.convert_tokens_to_ids(">")
    with pytest.raises(ValueError) as err:
        tokenize_with_labels(tok, text, spans, tok.eos_token_id)
    assert str(err.value) == (
        f"answer at characters 28-42 does not end with the stop token id {tok.eos_token_id} (got {gt}): "
        "the chat format does not match the tokenizer"
    )
    # a stop id the tokenizer never emits for the rendered stop string fails too
    text, spans = chat_format("vicuna_v1", stop=tok.eos_token, system="").render([("user", "Q?"), ("assistant", "Red")])
    with pytest.raises(ValueError, match=r"does not end with the stop token id 3 \(got 2\)"):
        tokenize_with_labels(tok, text, spans, tok.pad_token_id)
    # and a span no token covers
    with pytest.raises(ValueError, match="maps to no token"):
        tokenize_with_labels(tok, text, [(len(text), len(text) + 3)], tok.eos_token_id)


TWO_TURNS = [
    ("user", "<image>\nWhat is in the picture?"),
    ("assistant", "A dog on a sofa."),
    ("user", "What color is the dog?"),
    ("assistant", "2 brown spots."),
]


# Upstream LLaVA's rendering of TWO_TURNS (conversation.py get_prompt with each backbone's conv template:
# conv_vicuna_v1, conv_mistral_instruct, conv_chatml_direct), written out as data.
UPSTREAM = {
    "vicuna_v1": VICUNA_SYSTEM + " USER: <image>\nWhat is in the picture? ASSISTANT: A dog on a sofa.</s>"
    "USER: What color is the dog? ASSISTANT: 2 brown spots.</s>",
    "mistral_instruct": "[INST] <image>\nWhat is in the picture? [/INST] A dog on a sofa. </s>"
    "[INST] What color is the dog? [/INST] 2 brown spots. </s>",
    "chatml_direct": "<|im_start|>system\nAnswer the questions.<|im_end|><|im_start|>user\n<image>\nWhat is in the "
    "picture?<|im_end|><|im_start|>assistant\nA dog on a sofa.<|im_end|><|im_start|>user\nWhat color is the dog?"
    "<|im_end|><|im_start|>assistant\n2 brown spots.<|im_end|>",
}


# ... and the generation prompt before the second answer
UPSTREAM_PROMPT = {
    "vicuna_v1": VICUNA_SYSTEM + " USER: <image>\nWhat is in the picture? ASSISTANT: A dog on a sofa.</s>"
    "USER: What color is the dog? ASSISTANT:",
    "mistral_instruct": "[INST] <image>\nWhat is in the picture? [/INST] A dog on a sofa. </s>"
    "[INST] What color is the dog? [/INST]",
    "chatml_direct": "<|im_start|>system\nAnswer the questions.<|im_end|><|im_start|>user\n<image>\nWhat is in the "
    "picture?<|im_end|><|im_start|>assistant\nA dog on a sofa.<|im_end|><|im_start|>user\nWhat color is the dog?"
    "<|im_end|><|im_start|>assistant\n",
}


FORMAT_OF = {
    "tiny": "vicuna_v1",
    "tiny-sp": "vicuna_v1",
    "tiny-next": "vicuna_v1",
    "llava-1.5-7b": "vicuna_v1",
    "llava-1.5-13b": "vicuna_v1",
    "llava-v1.6-vicuna-7b": "vicuna_v1",
    "llava-v1.6-vicuna-13b": "vicuna_v1",
    "llava-v1.6-mistral-7b": "mistral_instruct",
    "llava-v1.6-34b": "chatml_direct",
}


def _upstream(style: str, messages: list[tuple[str, str | None]], system: str | None = None) -> str:
    """Upstream's separator styles, restated: TWO (vicuna_v1), LLAMA_2 (mistral_instruct), MPT (chatml_direct).

    ``messages`` alternate user / assistant; an assistant ``None`` asks for the generation prompt. ``system``
    replaces the template's system prompt; ``""`` leaves the system section out entirely (lora_llava's
    chat.system_prompt: '', a switch upstream does not have).
    """
    if style == "vicuna_v1":
        out = (VICUNA_SYSTEM if system is None else system) + " " if system != "" else ""
        for i, (role, msg) in enumerate(messages):
            name = "USER" if role == "user" else "ASSISTANT"
            out += f"{name}: {msg}{' ' if i % 2 == 0 else '</s>'}" if msg is not None else f"{name}:"
        return out
    if style == "mistral_instruct":
        system = system or ""
        out = ""
        for i, (role, msg) in enumerate(messages):
            if msg is None:
                continue
            if i == 0 and system:
                msg = f"<<SYS>>\n{system}\n<</SYS>>\n\n" + msg
            out += f"[INST] {msg} [/INST]" if role == "user" else f" {msg} </s>"
        return out
    if style == "chatml_direct":
        sys_text = "Answer the questions." if system is None else system
        out = f"<|im_start|>system\n{sys_text}<|im_end|>" if sys_text else ""
        for role, msg in messages:
            out += f"<|im_start|>{role}\n" + (f"{msg}<|im_end|>" if msg is not None else "")
        return out
    raise ValueError(style)


def _as_items(messages):
    """transformers chat messages with content item lists (images first), as users pass them."""
    out = []
    for role, text in messages:
        images = text.count("<image>")
        items = [{"type": "image"}] * images + [{"type": "text", "text": text.replace("<image>\n", "")}]
        out.append({"role": role, "content": items})
    return out


@pytest.mark.parametrize("name", sorted(FORMAT_OF))
def test_each_registered_backbone_renders_its_upstream_training_prompt(name, tiny_processor):
    spec = resolve_backbone(name)
    assert spec.chat_format == FORMAT_OF[name]
    fmt = chat_format(spec.chat_format)
    text, spans = fmt.render(TWO_TURNS)
    assert text == UPSTREAM[spec.chat_format]
    prompt, _ = fmt.render(TWO_TURNS[:3], add_generation_prompt=True)
    assert prompt == UPSTREAM_PROMPT[spec.chat_format]
    # what is generated after each generation prompt is exactly what carries loss
    assert [text[a:b] for a, b in spans] == [
        text[len(fmt.render(TWO_TURNS[:1], add_generation_prompt=True)[0]) : spans[0][1]],
        text[len(prompt) : spans[1][1]],
    ]
    assert spans[1][1] == len(text)
    # the saved chat template renders the same bytes, for string and item-list content
    tok = tiny_processor.tokenizer
    as_strings = [{"role": r, "content": c} for r, c in TWO_TURNS]
    for messages in (as_strings, _as_items(TWO_TURNS)):
        assert tok.apply_chat_template(messages, chat_template=fmt.jinja, tokenize=False) == text
        assert (
            tok.apply_chat_template(messages[:3], chat_template=fmt.jinja, tokenize=False, add_generation_prompt=True)
            == prompt
        )


def test_every_registered_backbone_is_pinned_here():
    assert {s.name for s in registered_backbones()} == set(FORMAT_OF)


@pytest.mark.parametrize("style", sorted(UPSTREAM))
@pytest.mark.parametrize("system", [None, "", "Be brief and precise."])
def test_formats_equal_upstream_on_many_conversations(style, system, tiny_processor):
    import random

    rng = random.Random(f"{style}/{system}")
    words = ["2", "Up", "a dog", "東京", '"quoted"', "(b)", "line\nbreak", "  spaced ", "x" * 40, "-3.5 kg"]
    fmt = chat_format(style, system=system)
    for _ in range(30):
        turns = rng.randint(1, 4)
        messages = []
        for t in range(turns):
            q = " ".join(rng.choice(words) for _ in range(rng.randint(1, 3)))
            messages += [("user", ("<image>\n" if t == 0 else "") + q), ("assistant", rng.choice(words))]
        assert fmt.render(messages)[0] == _upstream(style, messages, system)
        gen = messages[:-1] + [("assistant", None)]
        assert fmt.render(messages[:-1], add_generation_prompt=True)[0] == _upstream(style, gen, system)
        chat = [{"role": r, "content": c} for r, c in messages]
        tok = tiny_processor.tokenizer
        assert tok.apply_chat_template(chat, chat_template=fmt.jinja, tokenize=False) == fmt.render(messages)[0]


def test_a_conversations_own_system_turn_replaces_the_default():
    conv = [("system", "Be brief."), *TWO_TURNS[:2]]
    assert chat_format("vicuna_v1").render(conv)[0] == (
        "Be brief. USER: <image>\nWhat is in the picture? ASSISTANT: A dog on a sofa.</s>"
    )
    assert chat_format("mistral_instruct").render(conv)[0] == (
        "[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\n<image>\nWhat is in the picture? [/INST] A dog on a sofa. </s>"
    )
    assert chat_format("chatml_direct").render(conv)[0].startswith("<|im_start|>system\nBe brief.<|im_end|><|im_")
    assert chat_format("vicuna_v1", system="").render(TWO_TURNS[:2])[0].startswith("USER: <image>")


ANSWERS = ["2", "42 apples", "7", '"Yes," she said.', "(b)", "東京タワー", "Up", "-3.5", "…", "été", "Red"]


EXTRA_SPECIALS = ["<|im_start|>", "<|im_end|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]


@pytest.fixture(scope="module")
def sp_tokenizer():
    """The built-in sentencepiece-style tokenizer, knowing every format's special tokens."""
    from lora_llava.backbones.tiny import build_tokenizer

    tok = build_tokenizer("sentencepiece")
    tok.add_special_tokens({"additional_special_tokens": EXTRA_SPECIALS}, replace_extra_special_tokens=False)
    return tok


@pytest.fixture(scope="module")
def bpe_tokenizer():
    from lora_llava.backbones.tiny import build_tokenizer

    tok = build_tokenizer("llama")
    tok.add_special_tokens({"additional_special_tokens": EXTRA_SPECIALS}, replace_extra_special_tokens=False)
    return tok


def _assert_generated_tokens_labelled(tok, fmt, messages) -> tuple[list[int], list[int]]:
    """Labels are exactly the tokens after each generation prompt through the stop token, and the prompt
    as tokenized at inference time is exactly the training prefix."""
    text, spans = fmt.render(messages)
    ids, labels = tokenize_with_labels(tok, text, spans, stop_token_id(tok, fmt.stop))
    expected, k = set(), 0
    for i, (role, _) in enumerate(messages):
        if role != "assistant":
            continue
        prompt = tok(fmt.render(messages[:i], add_generation_prompt=True)[0])["input_ids"]
        through_stop = tok(text[: spans[k][1]])["input_ids"]
        assert ids[: len(prompt)] == prompt, (fmt.name, text)
        assert ids[: len(through_stop)] == through_stop
        assert ids[len(through_stop) - 1] == stop_token_id(tok, fmt.stop)
        expected |= set(range(len(prompt), len(through_stop)))
        k += 1
    assert {i for i, lab in enumerate(labels) if lab != -100} == expected, (fmt.name, text)
    assert all(lab in (-100, i) for i, lab in zip(ids, labels))
    return ids, labels


@pytest.mark.parametrize("name", [n for n in CHAT_FORMATS if n != "plain"])
@pytest.mark.parametrize("tokenizer", ["sp_tokenizer", "bpe_tokenizer"])
def test_every_generated_token_is_labelled(name, tokenizer, request):
    tok = request.getfixturevalue(tokenizer)
    fmt = format_for(name, tok)
    for a, b in zip(ANSWERS, ANSWERS[1:] + ANSWERS[:1]):
        for system in ([], [("system", "Answer briefly.")]):
            conv = [
                *system,
                ("user", "<image>\nWhere is it?"),
                ("assistant", a),
                ("user", "And then?"),
                ("assistant", b),
            ]
            _assert_generated_tokens_labelled(tok, fmt, conv)


def test_plain_format_labels_the_caption_and_its_newline(sp_tokenizer, bpe_tokenizer):
    fmt = chat_format("plain")
    text, spans = fmt.render([("user", "<image>\nDescribe the image."), ("assistant", "2 red circles.")])
    assert (text, spans) == ("<image>2 red circles.\n", [(7, 22)])
    for tok in (sp_tokenizer, bpe_tokenizer):
        ids, labels = _assert_generated_tokens_labelled(tok, fmt, [("user", "<image>\nQ"), ("assistant", "A cat.")])
        assert tok.decode([i for i, lab in zip(ids, labels) if lab != -100]) == "A cat.\n"


def test_a_token_joining_prompt_and_answer_is_refused():
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "</s>": 1, "ASSISTANT": 2, ": ": 3, "Red": 4, "USER": 5, "Q": 6, " ": 7, ":": 8}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))  # ": " is one token: a colon can't end a prompt
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(": |ASSISTANT|USER|Q|Red| |:"), behavior="isolated")
    tok = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>")
    fmt = chat_format("vicuna_v1", stop="</s>", system="")
    text, spans = fmt.render([("user", "Q"), ("assistant", "Red")])
    with pytest.raises(
        ValueError, match="token ': ' at characters 17-19 joins the generation prompt and the answer at character 18"
    ):
        tokenize_with_labels(tok, text, spans, 1)


def test_an_image_in_a_later_turn_trains_where_the_saved_template_serves_it(tiny_processor, tmp_path):
    import json

    from PIL import Image

    from lora_llava.config.schema import DataSource
    from lora_llava.data.formats import open_source

    Image.new("RGB", (40, 30), (200, 0, 0)).save(tmp_path / "red.png")
    turns = [("human", "Hello there."), ("gpt", "Hi."), ("human", "What color is this? <image>"), ("gpt", "Red")]
    record = {"id": "later", "image": "red.png", "conversations": [{"from": f, "value": v} for f, v in turns]}
    (tmp_path / "d.json").write_text(json.dumps([record]))
    (sample,) = open_source(DataSource(path=str(tmp_path / "d.json"), image_folder=str(tmp_path))).read().samples
    fmt = chat_format("vicuna_v1", stop=tiny_processor.tokenizer.eos_token)
    served = [  # as a client sends it: the image with the question that asks about it
        {"role": "user", "content": [{"type": "text", "text": "Hello there."}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Hi."}]},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What color is this?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Red"}]},
    ]
    trained, _ = fmt.render(sample.messages)
    assert tiny_processor.apply_chat_template(served, tokenize=False) == trained
    assert "USER: <image>\nWhat color is this? ASSISTANT: Red" in trained


@pytest.mark.parametrize(
    "name, system",
    [
        ("chatml", "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"),
        ("llama3", "<|start_header_id|>system<|end_header_id|>\n\nYou are a helpful language and vision assistant. "
                   "You are able to understand the visual content that the user provides, and assist the user with a "
                   "variety of tasks using natural language.<|eot_id|>"),
        ("chatml_direct", "<|im_start|>system\nAnswer the questions.<|im_end|>"),
    ],
)  # fmt: skip
def test_llava_next_formats_render_their_default_system_prompt(name, system):
    messages = [("user", "<image>\nWhat is it?"), ("assistant", "A cat.")]
    text, _ = chat_format(name).render(messages)
    assert text.startswith(system)
    assert default_system(name) in system
    bare, _ = chat_format(name, system="").render(messages)  # chat.system_prompt: "" turns it off
    assert bare == text[len(system) :]
    own, _ = chat_format(name).render([("system", "Be brief."), *messages])  # a sample's own system turn wins
    assert "Be brief." in own and default_system(name) not in own
