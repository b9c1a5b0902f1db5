"""Answer-only labels for every chat format the registered backbones use, token by token, on multi-turn
samples; and each format's saved Jinja template renders exactly what training renders."""

from __future__ import annotations

import pytest

from lora_llava.data.chat import chat_format, format_for, tokenize_with_labels

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
