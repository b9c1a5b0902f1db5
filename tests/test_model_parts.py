"""Which part of the LLaVA model is 4-bit, which carries LoRA, which trains, and that one real
optimizer step moves exactly the trainable parts.

Usage: ``python -m pytest -q tests/test_model_parts.py``
"""

from __future__ import annotations

import bitsandbytes as bnb
import pytest
import torch

from lora_llava.backbones.registry import resolve_backbone
from lora_llava.errors import UserError
from lora_llava.model.loading import load_base
from lora_llava.model.parts import check_policy, part_table
from lora_llava.model.trainability import attach_adapters, get_module

LM = "model.language_model"
VISION = "model.vision_tower"
PROJECTOR = "model.multi_modal_projector"
LM_LINEARS = [
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
]
# tiny: 2 LLaMA layers x 7 projections; LoRA wraps exactly these (PEFT prefixes base_model.model.)
EXPECTED_LORA = {f"{LM}.layers.{i}.{name}" for i in range(2) for name in LM_LINEARS}
PEFT_PREFIX = "base_model.model."


@pytest.fixture(scope="module")
def spec(tiny_path):
    return resolve_backbone("tiny")


@pytest.fixture
def recipe(make_recipe):
    return make_recipe()


def _base(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _linears(module: torch.nn.Module) -> dict[str, torch.nn.Module]:
    return {n: m for n, m in module.named_modules() if isinstance(m, torch.nn.Linear)}


def _is_4bit(m: torch.nn.Module) -> bool:
    return isinstance(m, bnb.nn.Linear4bit)


def _lora_wrapped(model) -> set[str]:
    """Names (relative to the unwrapped model) of the modules that hold a LoRA A matrix."""
    names = set()
    for n, _ in model.named_modules():
        if n.endswith(".lora_A"):
            n = n[: -len(".lora_A")]
            names.add(n[len(PEFT_PREFIX) :] if n.startswith(PEFT_PREFIX) else n)
    return names


# -- quantization --------------------------------------------------------------------------------


def test_4bit_load_quantizes_exactly_the_language_model(spec, recipe):
    plain, _ = load_base(spec, recipe.quantization, quantized=False)
    lm_linear_names = set(_linears(plain.get_submodule(LM)))
    assert len(lm_linear_names) == 14
    assert not any(_is_4bit(m) for m in plain.modules())
    del plain

    model, _ = load_base(spec, recipe.quantization)
    assert recipe.quantization.load_in_4bit
    lm_linears = _linears(model.get_submodule(LM))
    assert set(lm_linears) == lm_linear_names
    assert all(_is_4bit(m) for m in lm_linears.values()), {n: type(m).__name__ for n, m in lm_linears.items()}
    four_bit = [n for n, m in model.named_modules() if _is_4bit(m)]
    assert len(four_bit) == 14
    assert all(n.startswith(LM + ".") for n in four_bit)

    expected_16bit = {VISION: 12, PROJECTOR: 2, "lm_head": 1}  # CLIP 2 layers x 6, MLP 2, head
    for path, n_linear in expected_16bit.items():
        part = model.get_submodule(path)
        assert not any(_is_4bit(m) for m in part.modules()), path
        linears = _linears(part) if path != "lm_head" else {"": part}
        assert len(linears) == n_linear, path
        for name, m in linears.items():
            assert type(m) is torch.nn.Linear, (path, name, type(m))
            assert m.weight.dtype == torch.float32, (path, name, m.weight.dtype)
            assert type(m.weight).__name__ != "Params4bit"


def test_bare_vision_tower_skip_list_quantizes_the_projector(spec, recipe):
    """The trap our skip list avoids: ``llm_int8_skip_modules=["vision_tower"]`` lets the projector go 4-bit."""
    from transformers import BitsAndBytesConfig

    cfg = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32, llm_int8_skip_modules=["vision_tower"]
    )
    trap = spec.model_class().from_pretrained(spec.local_path(), quantization_config=cfg, dtype=torch.float32)
    proj_4bit = [n for n, m in trap.get_submodule(PROJECTOR).named_modules() if _is_4bit(m)]
    assert sorted(proj_4bit) == ["linear_1", "linear_2"]
    with pytest.raises(UserError, match=r"projector \(model\.multi_modal_projector\) has 2 4-bit layers"):
        check_policy(trap, spec, recipe)
    del trap

    assert spec.quantization_skip_modules() == [VISION, PROJECTOR, "lm_head"]
    ours, _ = load_base(spec, recipe.quantization)
    assert not any(_is_4bit(m) for m in ours.get_submodule(PROJECTOR).modules())
    assert sum(_is_4bit(m) for m in ours.modules()) == 14


# -- adapters ------------------------------------------------------------------------------------


@pytest.fixture
def qlora(spec, recipe):
    model, _ = load_base(spec, recipe.quantization)
    return attach_adapters(model, spec, recipe)


def test_lora_only_in_language_model(qlora):
    assert len(EXPECTED_LORA) == 14
    assert _lora_wrapped(qlora) == EXPECTED_LORA
    base = _base(qlora)
    # the vision tower has q/k/v projections of its own; none of them is wrapped
    vision = base.get_submodule(VISION)
    vision_qkv = [n for n, m in vision.named_modules() if n.rsplit(".", 1)[-1] in ("q_proj", "k_proj", "v_proj")]
    assert len(vision_qkv) == 6
    for n in vision_qkv:
        assert type(vision.get_submodule(n)) is torch.nn.Linear, n
    for path in (VISION, PROJECTOR, "lm_head"):
        assert not [n for n, _ in base.get_submodule(path).named_modules() if "lora_" in n], path


def test_trainable_set_after_attach(qlora):
    base = _base(qlora)
    proj = base.get_submodule(PROJECTOR)
    proj_params = dict(proj.named_parameters())
    assert len(proj_params) == 4  # linear_1/2 weight and bias
    assert all(p.requires_grad and p.dtype == torch.float32 for p in proj_params.values())
    assert not any(p.requires_grad for p in base.get_submodule(VISION).parameters())
    assert not base.get_submodule("lm_head").weight.requires_grad

    trainable = {n for n, p in qlora.named_parameters() if p.requires_grad}
    lora = {n for n, _ in qlora.named_parameters() if "lora_" in n}
    expected_proj = {f"{PEFT_PREFIX}{PROJECTOR}.{n}" for n in proj_params}
    assert len(lora) == 28  # A and B for 14 layers
    assert trainable == lora | expected_proj
    assert all(p.dtype == torch.float32 for n, p in qlora.named_parameters() if n in lora)


def test_part_table_counts(qlora, spec, recipe):
    rows = {r.role: r for r in part_table(qlora, spec)}
    assert [r.role for r in check_policy(qlora, spec, recipe)] == list(rows)
    base = _base(qlora)
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


def test_frozen_projector_policy(spec, make_recipe):
    recipe = make_recipe(projector={"policy": "frozen"})
    model, _ = load_base(spec, recipe.quantization)
    model = attach_adapters(model, spec, recipe)
    rows = {r.role: r for r in check_policy(model, spec, recipe)}
    assert rows["projector"].trainable == 0
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        n for n, _ in model.named_parameters() if "lora_" in n
    }


def test_16bit_lora_mode(spec, make_recipe):
    recipe = make_recipe(quantization={"load_in_4bit": False})
    model, _ = load_base(spec, recipe.quantization)
    assert not any(_is_4bit(m) for m in model.modules())
    model = attach_adapters(model, spec, recipe)
    assert not any(_is_4bit(m) for m in model.modules())
    assert _lora_wrapped(model) == EXPECTED_LORA
    rows = {r.role: r for r in check_policy(model, spec, recipe)}
    assert all(r.linear_4bit == 0 for r in rows.values())
    assert rows["language_model"].lora_layers == 14
    assert rows["projector"].trainable == rows["projector"].params


# -- one optimizer step --------------------------------------------------------------------------


def test_one_optimizer_step_moves_only_projector_and_lora(spec, recipe):
    from lora_llava.data.encode import Collator, EncodedDataset
    from lora_llava.training.optim import optimizer_groups
    from lora_llava.training.prepare import prepare_run

    p = prepare_run(recipe)
    processor, encoder, report = p.processor, p.encoder, p.report
    batch = Collator(processor.tokenizer.pad_token_id)([EncodedDataset(report.train, encoder)[i] for i in range(4)])
    assert "pixel_values" in batch

    torch.manual_seed(0)
    model, _ = load_base(spec, recipe.quantization)
    model = attach_adapters(model, spec, recipe)
    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    params = dict(model.named_parameters())
    four_bit = {n for n, p in params.items() if type(p).__name__ == "Params4bit"}
    assert len(four_bit) == 14
    lora_a = {n for n in params if ".lora_A." in n}
    lora_b = {n for n in params if ".lora_B." in n}
    proj = {n for n in params if f".{PROJECTOR}." in n}
    assert len(lora_a) == len(lora_b) == 14 and len(proj) == 4
    assert all(not before[n].any() for n in lora_b)  # PEFT starts B at zero

    opt = torch.optim.AdamW(optimizer_groups(model, spec, recipe), lr=recipe.train.learning_rate)
    assert sum(len(g["params"]) for g in opt.param_groups) == 32
    loss = model(**batch).loss
    assert torch.isfinite(loss)
    loss.backward()
    opt.step()

    after = dict(model.named_parameters())
    for n in proj | lora_b:
        assert not torch.equal(before[n], after[n]), f"{n} did not move"
    # with B == 0 the gradient reaching A is exactly zero, so AdamW (no weight decay) leaves A in place
    for n in lora_a:
        assert torch.equal(before[n], after[n]), n
    frozen = set(params) - proj - lora_a - lora_b
    assert four_bit < frozen
    assert any(n.startswith(f"{PEFT_PREFIX}{VISION}.") for n in frozen)
    assert f"{PEFT_PREFIX}lm_head.weight" in frozen
    for n in frozen:
        assert after[n].grad is None, n
        assert torch.equal(before[n], after[n]), f"frozen {n} changed"
