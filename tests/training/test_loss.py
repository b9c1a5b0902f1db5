"""Logits only at supervised positions give the loss (and the gradients) of the model's own forward, on
every backbone shape: byte-level and sentencepiece tokenizers, LLaVA-NeXT's AnyRes, 4-bit and 16-bit LMs,
padded batches mixing image and text-only samples, one and several exchanges."""

from __future__ import annotations

import pytest
import torch
from helpers import adapted_model

from lora_llava.data.batching import Collator, EncodedDataset
from lora_llava.training import loss as loss_mod
from lora_llava.training.loss import supervised_loss
from lora_llava.training.prepare import prepare_run


def _model_and_batch(make_recipe, tmp_path, backbone: str, four_bit: bool, with_text_only: bool):
    overrides = []
    if with_text_only:  # a second source: text-only, two exchanges, the last answer a lone space then digits
        import json

        text = tmp_path / "text.json"
        text.write_text(json.dumps([
            {"id": "t1", "conversations": [{"from": "human", "value": "Say hi"}, {"from": "gpt", "value": "Hi there"},
                                           {"from": "human", "value": "And 42?"}, {"from": "gpt", "value": "42"}]},
        ]))  # fmt: skip
        overrides = [f"data.train.1.path={text}"]
    recipe = make_recipe(backbone=backbone, quantization={"load_in_4bit": four_bit}, overrides=overrides)
    prepared = prepare_run(recipe, None, log=lambda *_: None, enforce=False)
    samples = prepared.report.train
    picked = samples[:3] + [s for s in samples if not s.images][:1]
    items = EncodedDataset(picked, prepared.encoder)
    batch = Collator(prepared.processor.tokenizer.pad_token_id)([items[i] for i in range(len(picked))])
    model = adapted_model(prepared, recipe, lora_b_std=0.02)  # LoRA B moved off zero: the adapters take part
    model.train()
    return model, batch


def _grads(model) -> dict[str, torch.Tensor]:
    out = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    return out


@pytest.mark.parametrize(
    "backbone,four_bit,text_only",
    [("tiny", True, True), ("tiny-sp", True, False), ("tiny-next", True, False), ("tiny", False, False)],
)
def test_supervised_loss_equals_the_models_own_loss_and_gradients(make_recipe, tmp_path, backbone, four_bit, text_only):
    model, batch = _model_and_batch(make_recipe, tmp_path, backbone, four_bit, text_only)
    labels = batch["labels"]
    assert (labels != -100).float().mean() < 0.5  # most positions are image tokens, prompts and padding
    for n_items in (None, int((labels[:, 1:] != -100).sum()) + 5):  # mean, and summed / n (grad accumulation)
        extra = {} if n_items is None else {"num_items_in_batch": torch.tensor(n_items)}
        full = model(**batch, **extra).loss
        full.backward()
        g_full = _grads(model)
        ours = supervised_loss(model, batch, None if n_items is None else torch.tensor(n_items))
        ours.backward()
        g_ours = _grads(model)
        assert abs(ours.item() - full.item()) < 1e-5, (ours.item(), full.item())
        assert g_full.keys() == g_ours.keys() and len(g_full) > 0
        for k in g_full:
            assert torch.allclose(g_full[k], g_ours[k], atol=1e-6, rtol=1e-4), k


def test_chunks_give_the_same_loss_and_gradients(make_recipe, tmp_path, monkeypatch):
    model, batch = _model_and_batch(make_recipe, tmp_path, "tiny", True, False)
    whole = supervised_loss(model, batch)
    whole.backward()
    g_whole = _grads(model)
    monkeypatch.setattr(loss_mod, "CHUNK", 3)  # many chunks, each recomputed in the backward pass
    chunked = supervised_loss(model, batch)
    chunked.backward()
    g_chunked = _grads(model)
    assert abs(whole.item() - chunked.item()) < 1e-6
    for k in g_whole:
        assert torch.allclose(g_whole[k], g_chunked[k], atol=1e-7, rtol=1e-5), k
