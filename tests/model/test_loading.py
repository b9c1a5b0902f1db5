"""Loading in 4-bit: exactly the language model's linears are quantized; a bare skip list would quantize the projector."""

from __future__ import annotations

import pytest
import torch
from helpers import LM, PROJECTOR, VISION, is_4bit

from lora_llava.errors import UserError
from lora_llava.model.loading import load_base
from lora_llava.model.parts import check_policy


def _linears(module: torch.nn.Module) -> dict[str, torch.nn.Module]:
    return {n: m for n, m in module.named_modules() if isinstance(m, torch.nn.Linear)}


def test_4bit_load_quantizes_exactly_the_language_model(spec, recipe):
    plain, _ = load_base(spec, recipe.quantization, quantized=False)
    lm_linear_names = set(_linears(plain.get_submodule(LM)))
    assert len(lm_linear_names) == 14
    assert not any(is_4bit(m) for m in plain.modules())
    del plain

    model, _ = load_base(spec, recipe.quantization)
    assert recipe.quantization.load_in_4bit
    lm_linears = _linears(model.get_submodule(LM))
    assert set(lm_linears) == lm_linear_names
    assert all(is_4bit(m) for m in lm_linears.values()), {n: type(m).__name__ for n, m in lm_linears.items()}
    four_bit = [n for n, m in model.named_modules() if is_4bit(m)]
    assert len(four_bit) == 14
    assert all(n.startswith(LM + ".") for n in four_bit)

    expected_16bit = {VISION: 12, PROJECTOR: 2, "lm_head": 1}  # CLIP 2 layers x 6, MLP 2, head
    for path, n_linear in expected_16bit.items():
        part = model.get_submodule(path)
        assert not any(is_4bit(m) for m in part.modules()), path
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
    proj_4bit = [n for n, m in trap.get_submodule(PROJECTOR).named_modules() if is_4bit(m)]
    assert sorted(proj_4bit) == ["linear_1", "linear_2"]
    with pytest.raises(UserError, match=r"projector \(model\.multi_modal_projector\) has 2 4-bit layers"):
        check_policy(trap, spec, recipe)
    del trap

    assert spec.quantization_skip_modules() == [VISION, PROJECTOR, "lm_head"]
    ours, _ = load_base(spec, recipe.quantization)
    assert not any(is_4bit(m) for m in ours.get_submodule(PROJECTOR).modules())
    assert sum(is_4bit(m) for m in ours.modules()) == 14


def test_a_base_checkpoint_missing_weights_is_refused_naming_them(tmp_path, tiny_path, spec, recipe, capsys):
    """Weights renamed between transformers versions load as nothing: the model would start from random
    values where the checkpoint's weights were. That is an error naming the weights; weights the model does
    not use are a warning."""
    import dataclasses
    import shutil

    from safetensors.torch import load_file, save_file

    copy = tmp_path / "tiny"
    shutil.copytree(tiny_path, copy)
    weights = next(copy.glob("*.safetensors"))
    state = load_file(weights)
    key = next(k for k in state if "layers.0.self_attn.q_proj.weight" in k)
    state[key.replace("layers.0.", "layers.00.")] = state.pop(key)
    save_file(state, weights, metadata={"format": "pt"})
    moved = dataclasses.replace(spec, source=str(copy))
    with pytest.raises(UserError) as e:
        load_base(moved, recipe.quantization)
    text = str(e.value)
    assert "1 weight(s) of the model are not in the checkpoint" in text and "layers.0.self_attn.q_proj.weight" in text
    assert "installed: transformers" in text and "hint: " in text

    state = load_file(weights)
    state[key] = state[key.replace("layers.0.", "layers.00.")].clone()  # the weight back, plus one nobody uses
    save_file(state, weights, metadata={"format": "pt"})
    load_base(moved, recipe.quantization)
    err = capsys.readouterr().err
    assert "1 weight(s) of the checkpoint are not used by the model" in err and "layers.00." in err
