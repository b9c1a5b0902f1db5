"""The part table and the policy check."""

from __future__ import annotations

import pytest
from helpers import LM, PROJECTOR, VISION, base_of

from lora_llava.errors import UserError
from lora_llava.model.loading import load_base
from lora_llava.model.parts import check_policy, part_table
from lora_llava.model.trainability import get_module


def test_part_table_counts(qlora, spec, recipe):
    rows = {r.role: r for r in part_table(qlora, spec)}
    assert [r.role for r in check_policy(qlora, spec, recipe)] == list(rows)
    base = base_of(qlora)
    proj_count = sum(p.numel() for p in base.get_submodule(PROJECTOR).parameters())
    lora_count = sum(p.numel() for n, p in qlora.named_parameters() if "lora_" in n)
    assert rows["projector"].params == rows["projector"].trainable == proj_count
    assert rows["language_model"].trainable == lora_count
    # r=8, hidden 64, intermediate 128, kv heads 2 x head dim 16 = 32:
    # per layer q,o: 8*(64+64); k,v: 8*(64+32); gate,up: 8*(64+128); down: 8*(128+64)
    assert lora_count == 2 * 8 * (2 * 128 + 2 * 96 + 3 * 192)
    assert rows["vision_tower"].trainable == rows["lm_head"].trainable == 0
    assert rows["language_model"].linear_4bit == 14
    assert rows["language_model"].lora_layers == 14
    for role in ("vision_tower", "projector", "lm_head"):
        assert rows[role].linear_4bit == 0 and rows[role].lora_layers == 0, role
        assert rows[role].dtypes == "float32", role
    assert "nf4/4-bit" in rows["language_model"].dtypes

    # the LM's logical parameter count sees through the 4-bit packing
    plain, _ = load_base(spec, recipe.quantization, quantized=False)
    lm_plain = sum(p.numel() for p in plain.get_submodule(LM).parameters())
    assert rows["language_model"].params == lm_plain + lora_count


def test_check_policy_trainable_vision_tower(qlora, spec, recipe):
    p = next(get_module(qlora, VISION).parameters())
    p.requires_grad_(True)
    with pytest.raises(UserError, match="vision tower has trainable parameters") as e:
        check_policy(qlora, spec, recipe)
    assert str(e.value).startswith("part policy violated:")
    assert "projector" not in str(e.value)  # only the real problem is listed


def test_check_policy_frozen_projector_under_full_policy(qlora, spec, recipe):
    assert recipe.projector.policy == "full"
    for p in get_module(qlora, PROJECTOR).parameters():
        p.requires_grad_(False)
    with pytest.raises(UserError, match="projector.policy is full but not every projector parameter is trainable"):
        check_policy(qlora, spec, recipe)


def test_check_policy_frozen_policy_with_trainable_projector(qlora, spec, make_recipe):
    frozen = make_recipe(projector={"policy": "frozen"})
    with pytest.raises(UserError, match="projector.policy is frozen but the projector has trainable parameters"):
        check_policy(qlora, spec, frozen)


def test_check_policy_trainable_lm_head(qlora, spec, recipe):
    get_module(qlora, "lm_head").weight.requires_grad_(True)
    with pytest.raises(UserError, match="lm_head has trainable parameters"):
        check_policy(qlora, spec, recipe)
