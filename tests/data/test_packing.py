"""Packing: every sample once, rows within the budget, and each sample's loss in a packed row equal to its
loss alone (no attention across samples), on several backbone shapes and attention implementations."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import adapted_model

from lora_llava.data.batching import Collator, EncodedDataset
from lora_llava.data.packing import PackedDataset, pack_indices
from lora_llava.training.prepare import prepare_run


def test_pack_indices_best_fit_each_sample_once_within_capacity():
    lengths = [70, 10, 40, 60, 30, 100, 25, 5, 55, 45]
    packs = pack_indices(lengths, 100)
    assert sorted(i for p in packs for i in p) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in p) <= 100 for p in packs)
    assert len(packs) == 5  # 440 tokens: the fewest rows of 100 that can hold them
    assert packs == pack_indices(lengths, 100)  # deterministic: a resumed run packs the same
    with pytest.raises(ValueError, match="more than a packed row's 64"):
        pack_indices([10, 65], 64)
    many = pack_indices([(i * 37) % 200 + 20 for i in range(2000)], 1024)
    fill = sum((i * 37) % 200 + 20 for i in range(2000)) / (len(many) * 1024)
    assert fill > 0.99


def _per_token_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """CE at every position whose next token is labelled (0 elsewhere), [rows, width - 1]."""
    shifted = labels[:, 1:]
    ce = torch.nn.functional.cross_entropy(
        logits[:, :-1].float().transpose(1, 2), shifted.clamp(min=0), reduction="none"
    )
    return ce * (shifted != -100)


def _setup(make_recipe, tmp_path, backbone, attn, four_bit):
    text = tmp_path / "text.json"
    text.write_text(json.dumps([
        {"id": f"t{i}", "conversations": [{"from": "human", "value": "Count" + " on" * i},
                                          {"from": "gpt", "value": " ".join(str(k) for k in range(i + 1))}]}
        for i in range(3)
    ]))  # fmt: skip
    recipe = make_recipe(
        backbone=backbone, quantization={"load_in_4bit": four_bit}, overrides=[f"data.train.1.path={text}"]
    )
    prepared = prepare_run(recipe, None, log=lambda *_: None, enforce=False)
    samples = [s for s in prepared.report.train if s.images][:5] + [s for s in prepared.report.train if not s.images]
    model = adapted_model(prepared, recipe, lora_b_std=0.05)
    model.base_model.model.set_attn_implementation(attn)
    model.eval()
    return prepared, samples, model


# bitsandbytes' CPU 4-bit kernel rounds differently for inputs of other shapes (a row vs one sample): ~1e-4
@pytest.mark.parametrize(
    "backbone,attn,four_bit,rtol",
    [
        ("tiny", "sdpa", True, 1e-3),
        ("tiny", "eager", False, 1e-5),
        ("tiny-sp", "sdpa", True, 1e-3),
        ("tiny-next", "sdpa", False, 1e-5),
        ("tiny-next", "sdpa", True, 1e-3),
    ],
)
def test_each_samples_loss_in_a_packed_row_is_its_loss_alone(make_recipe, tmp_path, backbone, attn, four_bit, rtol):
    prepared, samples, model = _setup(make_recipe, tmp_path, backbone, attn, four_bit)
    lengths = [prepared.report.length_of(s) for s in samples]
    capacity = max(lengths) * 3
    packs = pack_indices(lengths, capacity)
    assert len(packs) < len(samples)  # several samples share rows
    pad = prepared.processor.tokenizer.pad_token_id
    batch = Collator(pad)(PackedDataset(samples, prepared.encoder, packs).__getitems__(list(range(len(packs)))))
    assert "attention_mask" not in batch and batch["position_ids"].shape == batch["input_ids"].shape
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "token_mask")}
    with torch.no_grad():
        packed = _per_token_loss(model(**inputs, use_cache=False).logits, batch["labels"])  # as in training
        alone = {}
        single = EncodedDataset(samples, prepared.encoder)
        for i in range(len(samples)):
            one = Collator(pad)([single[i]])
            out = model(**{k: v for k, v in one.items() if k != "labels"}).logits
            alone[i] = _per_token_loss(out, one["labels"]).sum()
        # the same rows with attention across the whole row: losses change (so the check above can fail)
        crossed = _per_token_loss(
            model(**inputs, attention_mask=batch["token_mask"], use_cache=False).logits, batch["labels"]
        )  # fmt: skip
    checked, changed = 0, 0
    for r, members in enumerate(packs):
        start = 0
        for i in members:
            n = lengths[i]
            seg = packed[r, start : start + n - 1].sum()  # the next token of a segment's last position is not its own
            assert torch.allclose(seg, alone[i], atol=1e-5, rtol=rtol), (i, float(seg), float(alone[i]))
            if start > 0:
                changed += not torch.allclose(crossed[r, start : start + n - 1].sum(), alone[i], atol=1e-5, rtol=rtol)
            start += n
            checked += 1
    assert checked == len(samples)
    assert changed > 0


def test_training_with_packing_runs_without_padding(make_recipe):
    from lora_llava.workflows import train

    lines: list[str] = []
    result = train(make_recipe(train={"max_steps": 3, "packing": True, "batch_size": 2}), log=lines.append)
    assert any(ln.startswith("packing: 96 samples into ") for ln in lines), lines
    assert result.padding_fraction < 0.05 and result.steps == 3
