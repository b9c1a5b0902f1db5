"""Batching: the modality-length grouped sampler (groups, modality separation, determinism, every
index once per epoch) and its wiring into transformers' Trainer; padding with and without grouping;
batched encoding and the image-token repeat equal the plain paths exactly.

Usage: ``python -m pytest -q tests/test_batching.py``
"""

from __future__ import annotations

import random

import pytest
import torch

from lora_llava.config.schema import DataSource
from lora_llava.data.chat import chat_format
from lora_llava.data.encode import Collator, EncodedDataset, Encoder
from lora_llava.data.formats import read_source
from lora_llava.data.sampler import ModalityLengthGroupedSampler, grouped_batches


def lengths_and_modality(n: int = 203, seed: int = 0) -> tuple[list[int], list[bool]]:
    rng = random.Random(seed)
    return [rng.randint(10, 400) for _ in range(n)], [rng.random() < 0.7 for _ in range(n)]


def padding(batches: list[list[int]], lengths: list[int]) -> float:
    cells = sum(len(b) * max(lengths[i] for i in b) for b in batches)
    return 1 - sum(lengths[i] for b in batches for i in b) / cells


# ---------------------------------------------------------------------------------------------- sampler


def test_every_index_exactly_once_and_one_modality_per_batch():
    lengths, has_image = lengths_and_modality()
    batches = grouped_batches(lengths, has_image, batch_size=4, seed=1, group_batches=8)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(len(lengths)))
    assert all(len(b) == 4 for b in batches[:-1]) and 1 <= len(batches[-1]) <= 4
    mixed = [k for k, b in enumerate(batches) if len({has_image[i] for i in b}) > 1]
    assert mixed in ([], [len(batches) - 2], [len(batches) - 1])  # only the merged leftovers, at the end
    assert all(len({has_image[i] for i in b}) == 1 for b in batches[:-2])


def test_sampler_is_seeded_and_reshuffles_per_epoch():
    lengths, has_image = lengths_and_modality()
    a = ModalityLengthGroupedSampler(lengths, has_image, batch_size=4, seed=5)
    b = ModalityLengthGroupedSampler(lengths, has_image, batch_size=4, seed=5)
    assert len(a) == len(lengths) and list(a) == list(b)
    first = list(a)
    a.set_epoch(1)
    assert list(a) != first and sorted(a) == sorted(first)
    assert list(ModalityLengthGroupedSampler(lengths, has_image, batch_size=4, seed=6)) != first


def test_grouping_cuts_padding_and_sorts_each_group():
    lengths, has_image = lengths_and_modality(n=512)
    grouped = grouped_batches(lengths, has_image, batch_size=8, seed=0)
    order = list(range(len(lengths)))
    random.Random(0).shuffle(order)
    plain = [order[i : i + 8] for i in range(0, len(order), 8)]
    assert padding(grouped, lengths) < 0.1 < 0.4 < padding(plain, lengths)
    # within one group of 16 batches, lengths fall from batch to batch (the group was sorted, longest first)
    one = [i for i, m in enumerate(has_image) if m]
    rng = random.Random(0)
    rng.shuffle(one)
    group = sorted(one[: 8 * 16], key=lambda i: -lengths[i])
    assert group[:8] in grouped and group[8:16] in grouped


def test_mismatched_inputs_are_rejected():
    with pytest.raises(ValueError, match="3 lengths but 2 modality flags"):
        grouped_batches([1, 2, 3], [True, False], batch_size=2, seed=0)


# --------------------------------------------------------------------------------------- trainer wiring


@pytest.fixture
def mixed_data(tmp_path, shapes):
    """The shapes training data plus 24 text-only samples of varied length."""
    import json

    recs = json.loads((shapes / "train.json").read_text())
    words = "one two three four five six seven eight nine ten".split()
    for i in range(24):
        q = " ".join(words[: 1 + i % 10])
        recs.append({"id": f"text-{i}", "conversations": [{"from": "human", "value": f"Count: {q}"},
                                                          {"from": "gpt", "value": "Done."}]})  # fmt: skip
    (tmp_path / "mixed.json").write_text(json.dumps(recs))
    return tmp_path / "mixed.json"


def _trainer(recipe, report, encoder, processor, tmp_path):
    from transformers import TrainingArguments

    from lora_llava.training.trainer import LlavaTrainer

    args = TrainingArguments(
        output_dir=str(tmp_path / "t"), per_device_train_batch_size=4, use_cpu=True, report_to=[], seed=11,
        remove_unused_columns=False,
    )  # fmt: skip
    grouped = recipe.train.group_by_length
    return LlavaTrainer(
        spec=None,
        recipe=recipe,
        lengths=[report.length_of(s) for s in report.train] if grouped else None,
        has_image=[bool(s.images) for s in report.train] if grouped else None,
        model=torch.nn.Linear(1, 1),
        args=args,
        train_dataset=EncodedDataset(report.train, encoder),
        data_collator=Collator(processor.tokenizer.pad_token_id),
    )


def test_trainer_batches_by_length_and_modality(make_recipe, mixed_data, shapes, tmp_path, tiny_path):
    from lora_llava.training.prepare import prepare_run

    def epoch(group: bool) -> tuple[list[dict], float]:
        data = {"train": [{"path": str(mixed_data), "image_folder": str(shapes / "images")}]}
        # without the system prompt, whose ~70 tokens in every sample would dilute the padding share
        recipe = make_recipe(data=data, train={"group_by_length": group}, chat={"system_prompt": ""})
        p = prepare_run(recipe, log=lambda *_: None)
        processor, encoder, report = p.processor, p.encoder, p.report
        trainer = _trainer(recipe, report, encoder, processor, tmp_path)
        loader = trainer.get_train_dataloader()
        batches = list(loader)
        mask = torch.cat([b["attention_mask"].flatten() for b in batches])
        return batches, 1 - mask.float().mean().item(), type(loader.batch_sampler.sampler).__name__, encoder

    grouped, pad_grouped, name, encoder = epoch(True)
    assert name == "ModalityLengthGroupedSampler"
    assert sum(len(b["input_ids"]) for b in grouped) == 120
    # 96 image + 24 text-only samples, both multiples of 4: every batch is all-image or all-text
    image_rows = [(b["input_ids"] == encoder.image_token_id).any(dim=1).tolist() for b in grouped]
    assert all(len(set(rows)) == 1 for rows in image_rows)
    assert sum(rows[0] for rows in image_rows) == 96 // 4
    assert all(b["pixel_values"].shape[0] == 4 for b, rows in zip(grouped, image_rows) if rows[0])
    plain, pad_plain, name, _ = epoch(False)
    assert name in ("RandomSampler", "SeedableRandomSampler")
    assert any(
        len(set(rows)) > 1 for rows in [(b["input_ids"] == encoder.image_token_id).any(dim=1).tolist() for b in plain]
    )
    assert pad_grouped < 0.05 < 0.15 < pad_plain


def test_trained_run_logs_low_padding(trained_run):
    import json

    rows = [json.loads(ln) for ln in (trained_run / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["padding_fraction"] < 0.05  # grouped (the default); random batches pad ~20% of shapes


# ------------------------------------------------------------------------------------- encoding, exactly


@pytest.fixture
def samples(shapes):
    good, bad = read_source(DataSource(path=str(shapes / "train.json"), image_folder=str(shapes / "images")))
    assert not bad
    return good[:12]


def expanded_tokens(encoder: Encoder, sample) -> tuple[list[int], list[int]]:
    """The plain path: expand every placeholder into all its image tokens, then tokenize."""
    from lora_llava.data.chat import tokenize_with_labels

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
def test_repeated_image_token_equals_expanding_before_tokenizing(kind, tiny_processor, samples):
    from transformers import LlavaProcessor

    processor = tiny_processor
    if kind != "tiny":
        processor = LlavaProcessor(
            image_processor=tiny_processor.image_processor, tokenizer=_tokenizer(kind), patch_size=8,
            vision_feature_select_strategy="default",
        )  # fmt: skip
    enc = Encoder(processor, chat_format("vicuna_v1", stop="</s>"))
    for s in samples:
        ids, labels = enc.tokens(s, enc.image_sizes(s))
        assert (ids, labels) == expanded_tokens(enc, s), s.id
        assert ids.count(enc.image_token_id) == sum(enc.image_token_counts(enc.image_sizes(s))) > 0


def test_placeholders_and_image_tokens_must_match_the_images(tiny_processor, samples):
    from transformers import LlavaProcessor

    s = samples[0]
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


def test_batched_encoding_and_collation_equal_one_by_one(tiny_processor, samples):
    enc = Encoder(tiny_processor, chat_format("vicuna_v1", stop=tiny_processor.tokenizer.eos_token))
    ds = EncodedDataset(samples, enc)
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
