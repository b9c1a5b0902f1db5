"""Modality-length grouped batches: seeded, each index once per epoch, one modality per batch, wired into the Trainer."""

from __future__ import annotations

import random

import pytest
import torch

from lora_llava.data.batching import Collator, EncodedDataset
from lora_llava.data.sampler import ModalityLengthGroupedSampler, grouped_batches


def lengths_and_modality(n: int = 203, seed: int = 0) -> tuple[list[int], list[bool]]:
    rng = random.Random(seed)
    return [rng.randint(10, 400) for _ in range(n)], [rng.random() < 0.7 for _ in range(n)]


def padding(batches: list[list[int]], lengths: list[int]) -> float:
    cells = sum(len(b) * max(lengths[i] for i in b) for b in batches)
    return 1 - sum(lengths[i] for b in batches for i in b) / cells


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


@pytest.mark.parametrize(
    "n, batch, world, grouped", [(119, 2, 2, True), (120, 4, 2, False), (7, 3, 4, True), (1, 1, 3, False)]
)
def test_every_sample_once_per_epoch_on_several_processes(n, batch, world, grouped):
    """The epoch's order cut as accelerate cuts it for each process (its BatchSamplerShard): every sample once,
    the masked repeats only in the last step, every process a full batch at every step, and (grouped) each
    step's samples one modality across all processes but for the last."""
    import random

    from accelerate.data_loader import BatchSamplerShard
    from torch.utils.data import BatchSampler

    from lora_llava.data.sampler import DistributedEpochSampler

    rng = random.Random(n)
    lengths = [rng.randint(5, 300) for _ in range(n)]
    has_image = [i % 3 != 0 for i in range(n)]
    sampler = DistributedEpochSampler(n, batch, world, seed=3, lengths=lengths if grouped else None,
                                      has_image=has_image if grouped else None)  # fmt: skip
    per_rank = [list(BatchSamplerShard(BatchSampler(sampler, batch, False), world, r)) for r in range(world)]
    steps = len(per_rank[0])
    assert all(len(b) == steps for b in per_rank) and all(len(x) == batch for b in per_rank for x in b)
    seen = [i for b in per_rank for x in b for i in x]
    assert sorted(i for i in seen if i < n) == list(range(n))  # each real sample exactly once
    repeats = [i for i in seen if i >= n]
    assert len(repeats) == -n % (batch * world)
    assert all(i not in x for b in per_rank for x in b[:-1] for i in repeats)  # only in the last step
    if grouped:
        for step in range(steps - 1):
            kinds = {has_image[i] for b in per_rank for i in b[step]}
            assert len(kinds) == 1, step
    # the fill-ups repeat the last step's own samples: that step has the modalities one process would see
    last = {i for b in per_rank for i in b[-1] if i < n}
    assert all(i - n in last for i in repeats)
    sampler.set_epoch(1)
    if n > 100:  # another epoch, another order (a handful of samples may sort the same)
        assert list(sampler) != list(DistributedEpochSampler(n, batch, world, 3, lengths if grouped else None,
                                                             has_image if grouped else None))  # fmt: skip
