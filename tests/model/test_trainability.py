"""What trains: LoRA only under the language model (tiny and real-size shapes), the projector fully, per-part policies."""

from __future__ import annotations

import pytest
import torch
from helpers import LM, PEFT_PREFIX, PROJECTOR, VISION, base_of, is_4bit

from lora_llava.artifacts import resolve_backbone
from lora_llava.config.schema import QuantizationConfig
from lora_llava.model.loading import bnb_config, load_base
from lora_llava.model.parts import check_policy
from lora_llava.model.trainability import attach_adapters


@pytest.mark.parametrize("name", ["tiny", "tiny-next", "assembled"])
def test_quantization_and_lora_placement_per_backbone(name, make_recipe, assembled):
    backbone = str(assembled["mlp"]) if name == "assembled" else name
    recipe = make_recipe(backbone=backbone)
    spec = resolve_backbone(backbone)
    model, _ = load_base(spec, recipe.quantization)
    model = attach_adapters(model, spec, recipe)
    rows = {r.role: r for r in check_policy(model, spec, recipe)}
    base = model.get_base_model()
    for role in ("vision_tower", "projector", "lm_head"):
        mods = [type(m).__name__ for m in base.get_submodule(spec.roles()[role]).modules()]
        assert "Linear4bit" not in mods and rows[role].linear_4bit == 0
    assert rows["language_model"].linear_4bit == 14 and rows["language_model"].lora_layers == 14
    lora_owners = {n.split(".lora_A")[0] for n, _ in base.named_modules() if n.endswith("lora_A")}
    assert all(n.startswith("model.language_model.layers.") for n in lora_owners)
    if name == "tiny-next":
        nl = base.model.image_newline
        assert nl.dtype == torch.float32 and nl.requires_grad and rows["image_newline"].trainable == nl.numel()
    else:
        assert "image_newline" not in rows


def test_vision_tower_policies(make_recipe):
    spec = resolve_backbone("tiny")
    for policy in ("lora", "full"):
        recipe = make_recipe(vision_tower={"policy": policy, "learning_rate": 1e-4})
        model, _ = load_base(spec, recipe.quantization)
        model = attach_adapters(model, spec, recipe)
        rows = {r.role: r for r in check_policy(model, spec, recipe)}
        vt = rows["vision_tower"]
        if policy == "lora":
            assert vt.lora_layers == 12 and 0 < vt.trainable < vt.params  # q,k,v,out,fc1,fc2 x 2 layers
        else:
            assert vt.lora_layers == 0 and vt.trainable == vt.params
        assert rows["language_model"].lora_layers == 14 and rows["lm_head"].trainable == 0
        from lora_llava.training.optim import optimizer_groups

        lrs = sorted(g["lr"] for g in optimizer_groups(model, spec, recipe))
        assert lrs == sorted([1e-4, recipe.train.learning_rate, recipe.projector.learning_rate or 3e-3])


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


def _lora_wrapped(model) -> set[str]:
    """Names (relative to the unwrapped model) of the modules that hold a LoRA A matrix."""
    names = set()
    for n, _ in model.named_modules():
        if n.endswith(".lora_A"):
            n = n[: -len(".lora_A")]
            names.add(n[len(PEFT_PREFIX) :] if n.startswith(PEFT_PREFIX) else n)
    return names


def test_lora_only_in_language_model(qlora):
    assert len(EXPECTED_LORA) == 14
    assert _lora_wrapped(qlora) == EXPECTED_LORA
    base = base_of(qlora)
    # the vision tower has q/k/v projections of its own; none of them is wrapped
    vision = base.get_submodule(VISION)
    vision_qkv = [n for n, m in vision.named_modules() if n.rsplit(".", 1)[-1] in ("q_proj", "k_proj", "v_proj")]
    assert len(vision_qkv) == 6
    for n in vision_qkv:
        assert type(vision.get_submodule(n)) is torch.nn.Linear, n
    for path in (VISION, PROJECTOR, "lm_head"):
        assert not [n for n, _ in base.get_submodule(path).named_modules() if "lora_" in n], path


def test_trainable_set_after_attach(qlora):
    base = base_of(qlora)
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
    assert not any(is_4bit(m) for m in model.modules())
    model = attach_adapters(model, spec, recipe)
    assert not any(is_4bit(m) for m in model.modules())
    assert _lora_wrapped(model) == EXPECTED_LORA
    rows = {r.role: r for r in check_policy(model, spec, recipe)}
    assert all(r.linear_4bit == 0 for r in rows.values())
    assert rows["language_model"].lora_layers == 14
    assert rows["projector"].trainable == rows["projector"].params


CLIP_L_336 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                  image_size=336, patch_size=14, projection_dim=768)  # fmt: skip


VICUNA_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=32, vocab_size=32064)  # fmt: skip


YI_34B = dict(hidden_size=7168, intermediate_size=20480, num_hidden_layers=60, num_attention_heads=56,
              num_key_value_heads=8, vocab_size=64064)  # fmt: skip


def _meta_model(name: str):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaNextConfig
    from transformers import LlavaForConditionalGeneration as L15
    from transformers import LlavaNextForConditionalGeneration as Next

    text = LlamaConfig(**(VICUNA_7B if name == "llava-1.5-7b" else YI_34B))
    kw = dict(vision_config=CLIPVisionConfig(**CLIP_L_336), text_config=text, projector_hidden_act="gelu",
              vision_feature_layer=-2, vision_feature_select_strategy="default", image_token_id=32000)  # fmt: skip
    with torch.device("meta"):
        if name == "llava-1.5-7b":
            return L15(LlavaConfig(**kw))
        return Next(LlavaNextConfig(**kw, image_grid_pinpoints=[[336, 672], [672, 336], [672, 672], [1008, 336],
                                                                [336, 1008]]))  # fmt: skip


@pytest.mark.parametrize(
    "name, layers, hidden, inter, kv",
    [("llava-1.5-7b", 32, 4096, 11008, 4096), ("llava-v1.6-34b", 60, 7168, 20480, 1024)],
)
def test_real_size_quantization_and_lora_placement(name, layers, hidden, inter, kv):
    from peft import LoraConfig, get_peft_model
    from transformers.integrations.bitsandbytes import replace_with_bnb_linear

    spec = resolve_backbone(name)
    model = _meta_model(name)
    replace_with_bnb_linear(model, spec.quantization_skip_modules(), bnb_config(spec, QuantizationConfig()))
    four_bit = [n for n, m in model.named_modules() if type(m).__name__ == "Linear4bit"]
    assert len(four_bit) == 7 * layers
    assert all(n.startswith("model.language_model.layers.") for n in four_bit)
    for role in ("vision_tower", "projector", "lm_head"):
        mod = model.get_submodule(spec.roles()[role])
        assert not any(type(m).__name__ == "Linear4bit" for m in mod.modules()), role

    r = 128
    peft = get_peft_model(model, LoraConfig(r=r, lora_alpha=256, target_modules=spec.lora_target_regex(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])))  # fmt: skip
    wrapped = {n.rsplit(".lora_A", 1)[0] for n, _ in peft.named_modules() if n.endswith("lora_A")}
    assert len(wrapped) == 7 * layers
    assert not any("vision_tower" in n for n in wrapped)  # CLIP's own q/k/v_proj are left alone
    per_layer = r * ((hidden + hidden) * 2 + (hidden + kv) * 2 + (hidden + inter) * 3)
    lora = sum(p.numel() for n, p in peft.named_parameters() if "lora_" in n)
    assert lora == layers * per_layer
    proj = model.get_submodule(spec.projector)
    assert sum(p.numel() for p in proj.parameters()) == 1024 * hidden + hidden + hidden * hidden + hidden
    if name == "llava-1.5-7b":
        assert lora == 319_815_680  # the trainable LoRA parameters of LLaVA-1.5-7B at r=128
