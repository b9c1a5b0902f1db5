"""Assembling a LLaVA from a vision encoder and a causal LM: a standard checkpoint holding the parts' own weights."""

from __future__ import annotations

import json

import pytest
import torch

from lora_llava.artifacts import resolve_backbone
from lora_llava.config.schema import AssembleConfig
from lora_llava.data.chat import format_for
from lora_llava.errors import UserError


def test_assembled_is_a_standard_llava_with_the_parts_weights(assembled):
    from transformers import AutoModelForCausalLM, AutoProcessor, CLIPVisionModel, LlavaForConditionalGeneration

    from lora_llava.backbones.tiny import ensure_tiny

    path = assembled["mlp"]
    model, info = LlavaForConditionalGeneration.from_pretrained(path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    lm = AutoModelForCausalLM.from_pretrained(ensure_tiny("tiny-qwen2"))
    clip = CLIPVisionModel.from_pretrained(ensure_tiny("tiny-clip"))
    for name, p in lm.model.named_parameters():
        if name != "embed_tokens.weight":
            assert torch.equal(p, model.model.language_model.get_parameter(name)), name
    for name, p in clip.named_parameters():
        assert torch.equal(p, model.model.vision_tower.get_parameter(name)), name
    processor = AutoProcessor.from_pretrained(path)
    tok = processor.tokenizer
    n_old = lm.get_input_embeddings().weight.shape[0]
    assert len(tok) == n_old + 1 and tok.convert_tokens_to_ids("<image>") == n_old
    assert model.config.image_token_id == n_old
    emb = model.get_input_embeddings().weight
    assert emb.shape[0] == len(tok) == model.lm_head.weight.shape[0] == model.config.text_config.vocab_size
    assert torch.equal(emb[:n_old], lm.get_input_embeddings().weight)
    meta = json.loads((path / "lora_llava.json").read_text())
    assert meta["chat_format"] == "chatml" and meta["added_tokens"] == ["<image>"]
    assert resolve_backbone(str(path)).chat_format == "chatml"
    # the processor's saved chat template renders what training renders
    msgs = [{"role": "user", "content": "<image>\nWhat color?"}, {"role": "assistant", "content": "Red"}]
    text, _ = format_for("chatml", tok).render([("user", "<image>\nWhat color?"), ("assistant", "Red")])
    assert processor.apply_chat_template(msgs, tokenize=False) == text


def test_assembled_linear_projector_is_one_linear_map(assembled):
    from transformers import LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(assembled["linear"])
    proj = model.model.multi_modal_projector
    assert model.config.projector_hidden_act == "linear"
    lin2 = proj.linear_2
    assert torch.equal(lin2.weight, torch.eye(lin2.out_features)) and not lin2.bias.any()
    x = torch.randn(3, proj.linear_1.in_features)
    assert torch.allclose(proj(x), proj.linear_1(x), atol=1e-6)


def test_assemble_reuses_same_config_and_refuses_a_different_one(assembled):
    from lora_llava.backbones.assemble import assemble

    before = (assembled["mlp"] / "model.safetensors").stat().st_mtime_ns
    assert (
        assemble(AssembleConfig(vision_encoder="tiny-clip", language_model="tiny-qwen2"), assembled["mlp"])
        == assembled["mlp"]
    )
    assert (assembled["mlp"] / "model.safetensors").stat().st_mtime_ns == before
    with pytest.raises(UserError, match="holds a different assembled model"):
        assemble(AssembleConfig(vision_encoder="tiny-clip", language_model="tiny-qwen2", seed=5), assembled["mlp"])


def test_assemble_rejects_a_non_vision_encoder():
    from lora_llava.backbones.assemble import assemble

    with pytest.raises(UserError, match="is a 'qwen2' model"):
        assemble(AssembleConfig(vision_encoder="tiny-qwen2", language_model="tiny-qwen2"), "/nonexistent/x")
