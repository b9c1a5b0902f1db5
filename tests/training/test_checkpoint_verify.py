"""Resuming never half-succeeds: a checkpoint whose saved tensors do not all reach their modules is refused."""

from __future__ import annotations

import pytest
from safetensors.torch import load_file, save_file

from lora_llava.errors import UserError
from lora_llava.layout import write_manifest
from lora_llava.workflows import train

QUIET = {"log": lambda *_: None}
Q_A = "base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_A.weight"


def _damaged(make_recipe, tmp_path, damage):
    """A run stopped after checkpoint-2, whose checkpoint ``damage`` changes (its manifest re-written to match)."""
    out = tmp_path / "run"
    train(make_recipe(output_dir=str(out), train={"max_steps": 2, "save_steps": 2}), **QUIET)
    ckpt = out / "checkpoints" / "checkpoint-2"
    damage(ckpt)
    write_manifest(ckpt)  # the files are whole: only their content does not fit
    return make_recipe(output_dir=str(out), train={"max_steps": 3, "save_steps": 2, "resume": True}), ckpt


def test_resume_refuses_a_checkpoint_with_a_renamed_lora_key(make_recipe, tmp_path):
    def rename(ckpt):
        path = ckpt / "adapter_model.safetensors"
        state = load_file(path)
        state[Q_A.replace("layers.0.", "layers.00.")] = state.pop(Q_A)
        save_file(state, path, metadata={"format": "pt"})

    recipe, ckpt = _damaged(make_recipe, tmp_path, rename)
    with pytest.raises(UserError) as e:
        train(recipe, **QUIET)
    text = str(e.value)
    assert str(ckpt / "adapter_model.safetensors") in text
    assert f"1 missing (left untrained): {Q_A}" in text
    assert "1 unexpected (found no module): " + Q_A.replace("layers.0.", "layers.00.") in text
    assert "saved with transformers " in text and "\nhint: " in text


def test_resume_refuses_a_checkpoint_without_its_projector(make_recipe, tmp_path):
    recipe, ckpt = _damaged(make_recipe, tmp_path, lambda c: (c / "projector.safetensors").unlink())
    with pytest.raises(UserError, match="projector.safetensors missing") as e:
        train(recipe, **QUIET)
    assert str(ckpt) in str(e.value)
