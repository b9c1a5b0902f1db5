"""Answer-only loss, token by token: chat rendering, image-token expansion, labels and padding.

Usage: ``python -m pytest -q tests/test_chat_masking.py``
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from lora_llava.config.schema import DataSource
from lora_llava.data.chat import VICUNA_SYSTEM, chat_format, tokenize_with_labels
from lora_llava.data.encode import Collator, Encoder
from lora_llava.data.formats import read_source

IMG = "<image>"
N_IMAGE_TOKENS = 16  # tiny: 32 px image, 8 px patches -> 4 x 4 (CLS dropped by the "default" strategy)

TWO_TURNS = {
    "id": "two",
    "image": "red.png",
    "conversations": [
        {"from": "human", "value": "<image>\nIs there a shape in the image?"},
        {"from": "gpt", "value": "Yes."},
        {"from": "human", "value": "What color is the shape?"},
        {"from": "gpt", "value": "Red"},
    ],
}
TEXT_ONLY = {
    "id": "text",
    "conversations": [{"from": "human", "value": "What color is red?"}, {"from": "gpt", "value": "Red"}],
}
ONE_TURN_BLUE = {
    "id": "blue",
    "image": "blue.png",
    "conversations": [{"from": "human", "value": "What color is the shape?"}, {"from": "gpt", "value": "Blue"}],
}

# (token string, carries loss?) for TWO_TURNS as the tiny tokenizer produces it.
EXPECTED_TWO_TURNS = (
    [("<s>", False), ("USER", False), (":", False), ("Ġ", False)]
    + [(IMG, False)] * N_IMAGE_TOKENS
    + [
        ("Ċ", False), ("I", False), ("s", False), ("Ġthere", False), ("Ġa", False), ("Ġshape", False),
        ("Ġin", False), ("Ġthe", False), ("Ġimage", False), ("?", False), ("ĠASSISTANT", False), (":", False),
        ("ĠY", True), ("es", True), (".", True), ("</s>", True),
        ("USER", False), (":", False), ("ĠWhat", False), ("Ġcolor", False), ("Ġis", False), ("Ġthe", False),
        ("Ġshape", False), ("?", False), ("ĠASSISTANT", False), (":", False),
        ("ĠR", True), ("ed", True), ("</s>", True),
    ]
)  # fmt: skip


@pytest.fixture
def data_dir(tmp_path) -> Path:
    Image.new("RGB", (64, 64), (220, 30, 30)).save(tmp_path / "red.png")
    Image.new("RGB", (48, 40), (30, 60, 220)).save(tmp_path / "blue.png")
    (tmp_path / "data.json").write_text(json.dumps([TWO_TURNS, TEXT_ONLY, ONE_TURN_BLUE]))
    return tmp_path


@pytest.fixture
def samples(data_dir):
    good, bad = read_source(DataSource(path=str(data_dir / "data.json"), image_folder=str(data_dir)))
    assert bad == []
    return {s.id: s for s in good}


@pytest.fixture
def encoder(tiny_processor) -> Encoder:
    """vicuna_v1 without its system prompt (chat.system_prompt: ''), so the token lists stay short."""
    return Encoder(tiny_processor, chat_format("vicuna_v1", stop=tiny_processor.tokenizer.eos_token, system=""))


def _runs(ids: list[int], labels: list[int]) -> list[list[int]]:
    """Maximal runs of consecutive labelled positions."""
    runs: list[list[int]] = []
    prev = False
    for i, lab in zip(ids, labels):
        if lab != -100:
            if not prev:
                runs.append([])
            runs[-1].append(i)
        prev = lab != -100
    return runs


def test_two_turn_label_mask_token_by_token(encoder, samples, tiny_processor):
    tok = tiny_processor.tokenizer
    item = encoder.encode(samples["two"])
    ids, labels = item["input_ids"].tolist(), item["labels"].tolist()
    got = [(t, lab != -100) for t, lab in zip(tok.convert_ids_to_tokens(ids), labels)]
    assert got == EXPECTED_TWO_TURNS
    # labels are copies of the ids where they carry loss
    assert all(lab in (-100, i) for i, lab in zip(ids, labels))
    runs = _runs(ids, labels)
    assert [tok.decode(r) for r in runs] == [" Yes.</s>", " Red</s>"]
    assert [r[-1] for r in runs] == [tok.eos_token_id, tok.eos_token_id]
    # BOS and every image token carry no loss
    assert ids[0] == tok.bos_token_id and labels[0] == -100
    image_id = tok.convert_tokens_to_ids(IMG)
    assert [lab for i, lab in zip(ids, labels) if i == image_id] == [-100] * N_IMAGE_TOKENS
    assert item["pixel_values"].shape == (1, 3, 32, 32)


def test_image_token_count_matches_processor_and_model(encoder, samples, tiny_processor, tiny_path):
    from transformers import LlavaForConditionalGeneration

    counts = tiny_processor._get_num_multimodal_tokens(image_sizes=[(64, 64), (40, 48)])
    assert list(counts.num_image_tokens) == [N_IMAGE_TOKENS, N_IMAGE_TOKENS]
    assert encoder.image_token_counts([(64, 64), (48, 40)]) == [N_IMAGE_TOKENS, N_IMAGE_TOKENS]

    items = [encoder.encode(samples[k]) for k in ("two", "text", "blue")]
    batch = Collator(tiny_processor.tokenizer.pad_token_id)(items)
    model = LlavaForConditionalGeneration.from_pretrained(tiny_path).eval()
    image_id = model.config.image_token_id
    assert image_id == tiny_processor.tokenizer.convert_tokens_to_ids(IMG)
    per_sample = (batch["input_ids"] == image_id).sum(dim=1).tolist()
    assert per_sample == [N_IMAGE_TOKENS, 0, N_IMAGE_TOKENS]
    with torch.no_grad():
        feats = model.model.get_image_features(
            pixel_values=batch["pixel_values"],
            vision_feature_layer=model.config.vision_feature_layer,
            vision_feature_select_strategy=model.config.vision_feature_select_strategy,
        ).pooler_output
        assert [f.shape[0] for f in feats] == [N_IMAGE_TOKENS, N_IMAGE_TOKENS]
        out = model(**batch)
    assert torch.isfinite(out.loss)
    # the model really checks the count: one image token less is refused
    broken = dict(batch)
    broken["input_ids"] = batch["input_ids"].clone()
    first = int((broken["input_ids"][0] == image_id).nonzero()[0])
    broken["input_ids"][0, first] = tiny_processor.tokenizer.convert_tokens_to_ids("Ġa")
    with torch.no_grad(), pytest.raises(ValueError, match="Image features and image tokens do not match"):
        model(**broken)


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


def test_encoder_with_foreign_stop_string_fails_loudly(tiny_processor, samples):
    """A stop string the tokenizer splits into pieces must not silently train on those pieces."""
    enc = Encoder(tiny_processor, chat_format("vicuna_v1", stop="<|im_end|>"))
    with pytest.raises(ValueError, match="the chat format does not match the tokenizer"):
        enc.encode(samples["text"])
    with pytest.raises(ValueError, match="the chat format does not match the tokenizer"):
        enc.length(samples["two"])


def test_collator_right_pads_and_concatenates_images(encoder, samples, tiny_processor):
    pad = tiny_processor.tokenizer.pad_token_id
    items = [encoder.encode(samples[k]) for k in ("two", "text", "blue")]
    assert "pixel_values" not in items[1]
    lengths = [len(it["input_ids"]) for it in items]
    assert lengths == [49, 13, 33]
    batch = Collator(pad)(items)
    assert set(batch) == {"input_ids", "attention_mask", "labels", "pixel_values"}
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (3, 49)
    for row, (it, n) in enumerate(zip(items, lengths)):
        assert torch.equal(batch["input_ids"][row, :n], it["input_ids"])
        assert torch.equal(batch["labels"][row, :n], it["labels"])
        assert batch["attention_mask"][row, :n].tolist() == [1] * n
        assert batch["input_ids"][row, n:].tolist() == [pad] * (49 - n)
        assert batch["labels"][row, n:].tolist() == [-100] * (49 - n)
        assert batch["attention_mask"][row, n:].tolist() == [0] * (49 - n)
    # pixel values of the image samples only, in order: red, then blue
    assert batch["pixel_values"].shape == (2, 3, 32, 32)
    assert torch.equal(batch["pixel_values"][0], items[0]["pixel_values"][0])
    assert torch.equal(batch["pixel_values"][1], items[2]["pixel_values"][0])
    assert batch["pixel_values"][0, 0].mean() > batch["pixel_values"][0, 2].mean()  # red image: R > B
    assert batch["pixel_values"][1, 2].mean() > batch["pixel_values"][1, 0].mean()  # blue image: B > R
    # text-only batch: no pixel_values at all
    assert "pixel_values" not in Collator(pad)([items[1]])
    # left padding puts the pad in front
    left = Collator(pad, padding_side="left")(items)
    assert left["attention_mask"][1].tolist() == [0] * 36 + [1] * 13
    assert left["labels"][1, :36].tolist() == [-100] * 36
