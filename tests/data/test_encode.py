"""Encoding samples: answer-only labels token by token, exact image-token expansion (AnyRes, real sizes), padding, collation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import N_IMAGE_TOKENS
from PIL import Image

from lora_llava.artifacts import resolve_backbone
from lora_llava.config.schema import DataSource
from lora_llava.data.batching import Collator, EncodedDataset
from lora_llava.data.chat import VICUNA_SYSTEM, chat_format, format_for, tokenize_with_labels
from lora_llava.data.encode import Encoder
from lora_llava.data.formats import read_source
from lora_llava.model.loading import load_processor


@pytest.mark.parametrize("name", ["tiny", "tiny-next"])
def test_pad_to_square_pads_with_the_mean_color_and_counts_the_padded_size(name, aspect_data):
    processor = load_processor(resolve_backbone(name).local_path())
    fmt = format_for("vicuna_v1", processor.tokenizer)
    plain, padded = Encoder(processor, fmt), Encoder(processor, fmt, pad_to_square=True)
    wide = next(s for s in aspect_data if s.id == "100x40")
    img = padded.load(wide.images[0])
    mean = tuple(int(255 * m) for m in processor.image_processor.image_mean)  # truncated, as upstream LLaVA
    assert img.size == (100, 100) and img.getpixel((50, 2)) == mean and img.getpixel((50, 97)) == mean
    assert padded.image_sizes(wide) == [(100, 100)] and plain.image_sizes(wide) == [(100, 40)]
    item = padded.encode(wide)
    assert padded.length(wide) == len(item["input_ids"])
    if name == "tiny-next":  # AnyRes token counts follow the padded (square) size
        assert padded.length(wide) != plain.length(wide)
        assert item["image_sizes"].tolist() == [[100, 100]]
    else:
        assert padded.length(wide) == plain.length(wide)
        assert not torch.equal(item["pixel_values"], plain.encode(wide)["pixel_values"])


@pytest.fixture
def shape_samples(shapes):
    good, bad = read_source(DataSource(path=str(shapes / "train.json"), image_folder=str(shapes / "images")))
    assert not bad
    return good[:12]


def expanded_tokens(encoder: Encoder, sample) -> tuple[list[int], list[int]]:
    """The plain path: expand every placeholder into all its image tokens, then tokenize."""

    counts = encoder.image_token_counts(encoder.image_sizes(sample))
    text, spans = encoder.fmt.render(encoder.expand(sample.messages, counts))
    return tokenize_with_labels(encoder.tokenizer, text, spans, encoder.stop_id)


def _tokenizer(style: str, image_token: str = "<image>"):
    """A small BPE tokenizer of another family: Metaspace (SentencePiece-like) or a Prepend normalizer (legacy Llama)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    # merges learned within words, as sentencepiece learns them ("\u2581" only ever starts a piece)
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    corpus = ["USER: What color is the shape? ASSISTANT: Red.", "Is there a shape in the image? Yes."] * 20
    trainer = trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "<s>", "</s>", "<pad>", image_token])
    tok.train_from_iterator(corpus, trainer=trainer)
    if style == "prepend":  # legacy Llama: no pre-tokenizer, spaces become "\u2581" in a normalizer
        tok.pre_tokenizer = pre_tokenizers.Sequence([])
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
        extra_special_tokens={"image_token": image_token},
    )  # fmt: skip


@pytest.mark.parametrize("kind", ["tiny", "metaspace", "prepend"])
def test_repeated_image_token_equals_expanding_before_tokenizing(kind, tiny_processor, shape_samples):
    from transformers import LlavaProcessor

    processor = tiny_processor
    if kind != "tiny":
        processor = LlavaProcessor(
            image_processor=tiny_processor.image_processor, tokenizer=_tokenizer(kind), patch_size=8,
            vision_feature_select_strategy="default",
        )  # fmt: skip
    enc = Encoder(processor, chat_format("vicuna_v1", stop="</s>"))
    for s in shape_samples:
        ids, labels = enc.tokens(s, enc.image_sizes(s))
        assert (ids, labels) == expanded_tokens(enc, s), s.id
        assert ids.count(enc.image_token_id) == sum(enc.image_token_counts(enc.image_sizes(s))) > 0


def test_placeholders_and_image_tokens_must_match_the_images(tiny_processor, shape_samples):
    from transformers import LlavaProcessor

    s = shape_samples[0]
    enc = Encoder(tiny_processor, chat_format("vicuna_v1", stop=tiny_processor.tokenizer.eos_token))
    two = type(s)(s.source, s.index, s.id, [("user", "<image>\n" + s.messages[0][1])] + s.messages[1:], s.images)
    with pytest.raises(ValueError, match="^2 <image> placeholder\\(s\\) for 1 image\\(s\\)$"):
        enc.tokens(two, enc.image_sizes(two))
    # a backbone whose image token is not the placeholder: the token typed in the text is caught
    processor = LlavaProcessor(
        image_processor=tiny_processor.image_processor, tokenizer=_tokenizer("metaspace", "<img>"), patch_size=8,
        vision_feature_select_strategy="default", image_token="<img>",
    )  # fmt: skip
    enc = Encoder(processor, chat_format("vicuna_v1", stop="</s>"))
    typed = type(s)(s.source, s.index, s.id, [("user", s.messages[0][1] + " <img>")] + s.messages[1:], s.images)
    assert enc.tokens(s, enc.image_sizes(s))[0].count(enc.image_token_id) == 15
    with pytest.raises(ValueError, match="^2 image tokens after tokenizing, for 1 image\\(s\\): the text itself"):
        enc.tokens(typed, enc.image_sizes(typed))


def test_batched_encoding_and_collation_equal_one_by_one(tiny_processor, shape_samples):
    enc = Encoder(tiny_processor, chat_format("vicuna_v1", stop=tiny_processor.tokenizer.eos_token))
    ds = EncodedDataset(shape_samples, enc)
    batch = ds.__getitems__([3, 0, 7])
    for item, i in zip(batch, [3, 0, 7]):
        one = ds[i]
        assert item.keys() == one.keys()
        assert all(torch.equal(item[k], one[k]) for k in item)
    for side in ("right", "left"):
        out = Collator(tiny_processor.tokenizer.pad_token_id, padding_side=side)(batch)
        width = max(len(it["input_ids"]) for it in batch)
        for row, it in enumerate(batch):
            n = len(it["input_ids"])
            real = slice(0, n) if side == "right" else slice(width - n, width)
            pad = slice(n, width) if side == "right" else slice(0, width - n)
            assert torch.equal(out["input_ids"][row, real], it["input_ids"])
            assert torch.equal(out["labels"][row, real], it["labels"])
            assert out["attention_mask"][row, real].tolist() == [1] * n
            assert out["input_ids"][row, pad].tolist() == [tiny_processor.tokenizer.pad_token_id] * (width - n)
            assert out["labels"][row, pad].tolist() == [-100] * (width - n)
            assert out["attention_mask"][row, pad].tolist() == [0] * (width - n)
        assert out["pixel_values"].shape == (3, 3, 32, 32)
        # one storage for ids, labels and mask: a worker ships them as one block
        ptrs = {out[k].untyped_storage().data_ptr() for k in ("input_ids", "labels", "attention_mask")}
        assert len(ptrs) == 1 and all(out[k].is_contiguous() for k in ("input_ids", "labels", "attention_mask"))


IMG = "<image>"


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


def _processor(family: str, max_tiles: int | None = None):
    from transformers import LlavaNextProcessor, LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    from lora_llava.backbones.tiny import build_tokenizer
    from lora_llava.model.anyres import apply_max_tiles

    tok = build_tokenizer()
    size = {"shortest_edge": 336}
    crop = {"height": 336, "width": 336}
    if family == "llava":
        return LlavaProcessor(CLIPImageProcessorPil(size=size, crop_size=crop), tok, patch_size=14,
                              vision_feature_select_strategy="default", num_additional_image_tokens=1)  # fmt: skip
    pins = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
    proc = LlavaNextProcessor(LlavaNextImageProcessorPil(size=size, crop_size=crop, image_grid_pinpoints=pins), tok,
                              patch_size=14, vision_feature_select_strategy="default",
                              num_additional_image_tokens=1)  # fmt: skip
    apply_max_tiles(None, proc, max_tiles)
    return proc


def test_real_size_image_token_budgets():
    from lora_llava.data.chat import format_for
    from lora_llava.data.encode import Encoder

    l15 = Encoder(_processor("llava"), format_for("vicuna_v1", _processor("llava").tokenizer))
    assert l15.image_token_counts([(500, 375), (336, 336)]) == [576, 576]
    nxt = _processor("llava_next")
    enc = Encoder(nxt, format_for("vicuna_v1", nxt.tokenizer))
    # overview 24x24 + CLS dropped = 576, plus the unpadded grid and one newline per grid row
    assert enc.image_token_counts([(672, 672)]) == [576 + 48 * 48 + 48]
    assert enc.image_token_counts([(1008, 336)]) == [576 + 24 * 72 + 24]
    capped = _processor("llava_next", max_tiles=2)
    assert capped.image_processor.image_grid_pinpoints == [[336, 672], [672, 336]]
    enc2 = Encoder(capped, format_for("vicuna_v1", capped.tokenizer))
    assert enc2.image_token_counts([(672, 672)])[0] < enc.image_token_counts([(672, 672)])[0]
