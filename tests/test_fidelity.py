"""Fidelity to what the checkpoints were trained with: each backbone's prompt byte by byte against upstream
LLaVA's, labels on every generated token (sentencepiece-style tokenization included), the saved chat template,
LLaVA-1.5's image padding under stock transformers, and LLaVA-1.5's plain stage-1 format.

Usage: ``python -m pytest -q tests/test_fidelity.py``
"""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from lora_llava.backbones.registry import registered_backbones, resolve_backbone
from lora_llava.data.chat import (
    CHAT_FORMATS,
    VICUNA_SYSTEM,
    chat_format,
    format_for,
    stop_token_id,
    tokenize_with_labels,
)

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


# ------------------------------------------------------------- labels: every generated token, any tokenizer

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


def test_answer_2_on_the_sentencepiece_backbone_token_by_token(_offline_cache):
    """tiny-sp: " 2" after "ASSISTANT:" is a lone "\u2581" then "2"; all three generated tokens carry loss."""
    from lora_llava.data.encode import Encoder
    from lora_llava.data.formats import Sample
    from lora_llava.model.loading import load_processor

    processor = load_processor(resolve_backbone("tiny-sp").local_path())
    tok = processor.tokenizer
    enc = Encoder(processor, format_for("vicuna_v1", tok))
    sample = Sample("mem", 0, "two", [("user", "How many?"), ("assistant", "2")])
    ids, labels = enc.tokens(sample, [])
    pieces = tok.convert_ids_to_tokens(ids)
    assert pieces[-4:] == ["\u2581ASSISTANT:", "\u2581", "2", "</s>"]
    assert [lab != -100 for lab in labels[-4:]] == [False, True, True, True]
    assert sum(lab != -100 for lab in labels) == 3
    # the system prompt, the question and the BOS carry none
    assert tok.decode(ids[: len(ids) - 3], skip_special_tokens=True) == VICUNA_SYSTEM + " USER: How many? ASSISTANT:"


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


# ------------------------------------------------------------------------------ trained runs, saved artifacts


def test_trained_adapter_renders_and_records_the_system_prompt(trained_run):
    from transformers import AutoProcessor

    adapter = trained_run / "adapter"
    meta = json.loads((adapter / "lora_llava.json").read_text())
    assert (meta["chat_format"], meta["system_prompt"]) == ("vicuna_v1", VICUNA_SYSTEM)
    stock = AutoProcessor.from_pretrained(adapter)
    text = stock.apply_chat_template([{"role": "user", "content": "Hi?"}], tokenize=False, add_generation_prompt=True)
    assert text == VICUNA_SYSTEM + " USER: Hi? ASSISTANT:"


def test_system_prompt_switch_reaches_training_eval_and_the_template(make_recipe, tmp_path):
    from transformers import AutoProcessor

    from lora_llava.infer import load_model
    from lora_llava.training.prepare import prepare_run
    from lora_llava.workflows import train

    recipe = make_recipe(chat={"system_prompt": ""}, train={"max_steps": 1})
    train(recipe, log=lambda *_: None)
    adapter = tmp_path / "run" / "adapter"
    assert json.loads((adapter / "lora_llava.json").read_text())["system_prompt"] == ""
    stock = AutoProcessor.from_pretrained(adapter)
    assert stock.apply_chat_template([{"role": "user", "content": "Hi?"}], tokenize=False) == "USER: Hi? "
    sample = prepare_run(recipe, log=lambda *_: None).report.train[0]
    loaded = load_model(str(tmp_path / "run"))
    ids, _ = loaded.encoder.tokens(sample, [(64, 64)])
    assert loaded.processor.tokenizer.decode(ids, skip_special_tokens=True).startswith("USER: ")


def test_stock_autoprocessor_pads_like_training(make_recipe, shapes, tmp_path):
    """LLaVA-1.5's pad handling survives into the adapter and the merged model: stock transformers'
    AutoProcessor pads with the same color, and the pixel values equal those trained on."""
    from transformers import AutoProcessor

    from lora_llava.data.encode import Encoder
    from lora_llava.data.formats import Sample
    from lora_llava.merging import merge
    from lora_llava.model.loading import load_processor
    from lora_llava.workflows import train

    recipe = make_recipe(images={"pad_to_square": True}, train={"max_steps": 1})
    train(recipe, log=lambda *_: None)
    merge(str(tmp_path / "run"), str(tmp_path / "merged"), log=lambda *_: None)
    wide = tmp_path / "wide.png"
    Image.new("RGB", (97, 40), (10, 200, 30)).save(wide)
    base = load_processor(resolve_backbone("tiny").local_path())
    trained = Encoder(base, format_for("vicuna_v1", base.tokenizer), pad_to_square=True)
    expected = trained.encode(Sample("mem", 0, "w", [("user", "<image>\nQ"), ("assistant", "A")], [wide]))
    img = trained.load(wide)
    assert img.getpixel((48, 1)) == (122, 116, 104)  # int(255 * CLIP mean), as upstream's expand2square
    for folder in (tmp_path / "run" / "adapter", tmp_path / "merged"):
        stock = AutoProcessor.from_pretrained(folder)
        assert stock.image_processor.do_pad
        got = stock.image_processor(images=[Image.open(wide)], return_tensors="pt")["pixel_values"]
        assert torch.equal(got, expected["pixel_values"])
    unpadded = base.image_processor(images=[Image.open(wide)], return_tensors="pt")["pixel_values"]
    assert not torch.equal(unpadded, expected["pixel_values"])


def test_pad_to_square_is_refused_for_anyres_backbones(make_recipe):
    from lora_llava.errors import UserError
    from lora_llava.training.prepare import prepare_run

    with pytest.raises(UserError, match="images.pad_to_square is LLaVA-1.5's image handling; backbone tiny-next"):
        prepare_run(make_recipe(backbone="tiny-next", images={"pad_to_square": True}), log=lambda *_: None)


# ------------------------------------------------------------------------------------------------- stage 1


def _align_data(tmp_path, shapes, extra=()):
    recs = json.loads((shapes / "align.json").read_text())[:12] + list(extra)
    path = tmp_path / "align.json"
    path.write_text(json.dumps(recs))
    return {"train": [{"path": str(path), "image_folder": str(shapes / "images")}], "eval": []}


def test_stage1_plain_renders_image_and_caption_and_records_itself(make_recipe, shapes, tmp_path):
    from lora_llava.training.prepare import prepare_run
    from lora_llava.workflows import train

    recipe = make_recipe(stage="align", data=_align_data(tmp_path, shapes), train={"max_steps": 1})
    p = prepare_run(recipe, log=lambda *_: None)
    processor, encoder, report = p.processor, p.encoder, p.report
    assert encoder.fmt.name == "plain"
    sample = report.train[0]
    ids, labels = encoder.tokens(sample, [(64, 64)])
    tok = processor.tokenizer
    caption = sample.messages[-1][1]
    assert tok.decode(ids, skip_special_tokens=False).replace("<image>", "") == f"<s>{caption}\n"
    assert tok.decode([i for i, lab in zip(ids, labels) if lab != -100]) == caption + "\n"
    train(recipe, log=lambda *_: None)
    adapter_meta = json.loads((tmp_path / "run" / "adapter" / "lora_llava.json").read_text())
    model_meta = json.loads((tmp_path / "run" / "model" / "lora_llava.json").read_text())
    assert (adapter_meta["chat_format"], adapter_meta["backbone_chat_format"]) == ("plain", "vicuna_v1")
    assert (model_meta["chat_format"], model_meta["align_format"]) == ("vicuna_v1", "plain")
    assert model_meta["system_prompt"] == VICUNA_SYSTEM
    assert (tmp_path / "run" / "adapter" / "chat_template.jinja").read_text() == chat_format("plain").jinja
    model_template = (tmp_path / "run" / "model" / "chat_template.jinja").read_text()
    assert model_template == format_for("vicuna_v1", tok).jinja
    # stage 2 from the aligned model trains in the backbone's own format
    assert resolve_backbone(str(tmp_path / "run")).chat_format == "vicuna_v1"


def test_stage1_plain_reports_samples_it_cannot_render(make_recipe, shapes, tmp_path):
    from lora_llava.errors import UserError
    from lora_llava.training.prepare import prepare_run

    extra = [
        {"id": "text-only", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."}]},
        {"id": "two-turns", "image": "train_0000.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "A shape."},
            {"from": "human", "value": "Color?"}, {"from": "gpt", "value": "Red."}]},
    ]  # fmt: skip
    recipe = make_recipe(stage="align", data=_align_data(tmp_path, shapes, extra))
    with pytest.raises(UserError) as e:
        prepare_run(recipe, log=lambda *_: None)
    msg = str(e.value)
    assert msg.startswith("2 bad sample(s) of 14:")
    assert "(id text-only): chat format plain (stage-1 alignment) needs an image in every sample" in msg
    assert "(id two-turns): chat format plain (stage-1 alignment) takes one image and one caption per sample" in msg


def test_stage1_chat_style_gives_bare_captions_a_brief_instruction(make_recipe, shapes, tmp_path):
    from lora_llava.data.prompts import BRIEF_DESCRIPTION_PROMPTS
    from lora_llava.training.prepare import prepare_run

    bare = [{"id": f"bare-{i}", "image": "train_0001.png", "conversations": [
        {"from": "human", "value": "<image>"}, {"from": "gpt", "value": "A red circle."}]} for i in range(6)]  # fmt: skip
    data = _align_data(tmp_path, shapes, bare)
    recipe = make_recipe(stage="align", data=data, chat={"format": "vicuna_v1"})
    report = prepare_run(recipe, log=lambda *_: None).report
    prompts = {s.id: s.messages[0][1] for s in report.train if s.id.startswith("bare-")}
    assert all(
        p.startswith("<image>\n") and p[len("<image>\n") :] in BRIEF_DESCRIPTION_PROMPTS for p in prompts.values()
    )
    assert len(set(prompts.values())) > 1  # drawn per sample ...
    again = {s.id: s.messages[0][1] for s in prepare_run(recipe, log=lambda *_: None).report.train if s.id in prompts}
    assert again == prompts  # ... and the same on every run
    written = {s.id: s.messages[0][1] for s in report.train if not s.id.startswith("bare-")}
    assert all("<image>\n" in p and p.split("\n", 1)[1] for p in written.values())  # instructions kept as written


def test_plain_is_refused_for_instruction_tuning(make_recipe):
    from lora_llava.errors import UserError

    with pytest.raises(UserError, match="chat.format: plain is LLaVA-1.5's stage-1"):
        make_recipe(chat={"format": "plain"})


# ------------------------------------------------------------------------------------------------ recipes


def test_llava15_recipes_pad_and_v16_tile_caps_cap():
    from lora_llava.config import load_recipe
    from lora_llava.model.anyres import cap_tiles
    from lora_llava.recipes import list_recipes, recipe_path

    v16_grids = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
    for name, _ in list_recipes():
        r = load_recipe(recipe_path(name))
        if name.startswith("llava-1.5"):
            assert r.images.pad_to_square, name
        if name.startswith("llava-v1.6") and r.images.max_tiles:
            assert len(cap_tiles(v16_grids, 336, r.images.max_tiles)) < len(v16_grids), name
        text = recipe_path(name).read_text()
        if name.startswith("llava-"):
            assert f"global batch {r.train.batch_size * r.train.grad_accum} per optimizer step" in text, name


def test_a_tile_cap_that_caps_nothing_is_reported(make_recipe):
    from lora_llava.training.prepare import prepare_run

    report = prepare_run(make_recipe(backbone="tiny-next", images={"max_tiles": 4}), log=lambda *_: None).report
    assert "images.max_tiles=4 caps nothing: every AnyRes grid of tiny-next has at most 4 tiles" in report.summary()
    report = prepare_run(make_recipe(backbone="tiny-next", images={"max_tiles": 3}), log=lambda *_: None).report
    assert "caps nothing" not in report.summary()
