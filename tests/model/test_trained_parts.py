"""Loading a trained adapter never half-succeeds: every saved tensor finds its module, every trained module
gets its tensor, every trained part's file is there; else a UserError naming file, keys and versions."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from helpers import assert_user_error, run_cli
from PIL import Image
from safetensors.torch import load_file, save_file

from lora_llava.errors import UserError
from lora_llava.infer import load_model

Q_A = "base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_A.weight"
PROJ_W = "base_model.model.model.multi_modal_projector.linear_1.weight"


@pytest.fixture
def adapter(trained_run, tmp_path):
    """A private copy of the trained run's adapter, to damage."""
    return shutil.copytree(trained_run / "adapter", tmp_path / "adapter")


def rename(path, fn):
    """Re-save the safetensors file ``path`` with its keys renamed by ``fn`` (as another version would name them)."""
    state = load_file(path)
    save_file({fn(k): v for k, v in state.items()}, path, metadata={"format": "pt"})


def logits(ref, shapes):
    loaded = load_model(ref)
    rec = json.loads((shapes / "eval.json").read_text())[0]
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What color is it?"}]}]
    prompt = loaded.processor.apply_chat_template(messages, add_generation_prompt=True)
    image = Image.open(shapes / "images" / rec["image"]).convert("RGB")
    inputs = loaded.processor(text=prompt, images=image, return_tensors="pt")
    with torch.no_grad():
        return loaded.model(**inputs).logits


def refused(ref) -> str:
    with pytest.raises(UserError) as e:
        load_model(ref)
    return str(e.value)


def test_an_unchanged_copy_loads_and_answers_as_the_original(adapter, trained_run, shapes, tiny_path):
    ours, original = logits(adapter, shapes), logits(trained_run / "adapter", shapes)
    assert torch.equal(ours, original)
    assert not torch.allclose(ours, logits("tiny", shapes), atol=1e-3)  # and it is not the base


def test_one_renamed_lora_key_is_refused(adapter):
    rename(adapter / "adapter_model.safetensors", lambda k: k.replace("layers.0.", "layers.00.") if k == Q_A else k)
    text = refused(adapter)
    assert str(adapter / "adapter_model.safetensors") in text
    assert f"1 unexpected (found no module): {Q_A.replace('layers.0.', 'layers.00.')}" in text
    assert f"1 missing (left untrained): {Q_A}" in text
    assert "saved with transformers " in text and "(installed: transformers " in text
    assert "\nhint: " in text


def test_lm_keys_in_transformers_4_style_load_as_peft_converts_them(adapter, trained_run, shapes):
    """PEFT renames transformers 4.x LoRA keys for transformers 5: such an adapter is not refused, and answers
    exactly as the original."""
    rename(adapter / "adapter_model.safetensors", lambda k: k.replace("model.language_model.", "language_model.model."))
    assert any(
        k.startswith("base_model.model.language_model.model.") for k in load_file(adapter / "adapter_model.safetensors")
    )
    assert torch.equal(logits(adapter, shapes), logits(trained_run / "adapter", shapes))


def test_all_keys_in_transformers_4_style_are_refused(adapter):
    def old(k: str) -> str:
        k = k.replace("base_model.model.model.language_model.", "base_model.model.language_model.model.")
        return k.replace("base_model.model.model.multi_modal_projector.", "base_model.model.multi_modal_projector.")

    rename(adapter / "adapter_model.safetensors", old)
    text = refused(adapter)
    assert f"1 missing (left untrained): {PROJ_W}" in text
    assert "base_model.model.multi_modal_projector.linear_1.bias" in text and "saved with" in text


def test_all_lm_keys_renamed_are_refused_with_the_keys_named(adapter):
    rename(adapter / "adapter_model.safetensors", lambda k: k.replace("model.language_model.", "model.text_model."))
    text = refused(adapter)
    assert "28 unexpected (found no module): base_model.model.model.text_model.layers.0." in text
    assert "28 missing (left untrained): base_model.model.model.language_model.layers.0." in text
    assert "(28 in all)" in text and "saved with" in text


def test_the_hint_names_the_versions_it_was_saved_with(adapter):
    meta = json.loads((adapter / "lora_llava.json").read_text())
    meta["versions"] = {**meta["versions"], "transformers": "4.46.3", "peft": "0.13.2"}
    (adapter / "lora_llava.json").write_text(json.dumps(meta))
    rename(adapter / "adapter_model.safetensors", lambda k: k.replace("layers.1.", "layers.01."))
    text = refused(adapter)
    assert "saved with transformers 4.46.3, peft 0.13.2 (installed: transformers 5." in text
    assert "pip install transformers==4.46.3 peft==0.13.2" in text


def test_a_missing_projector_file_is_refused(adapter):
    (adapter / "projector.safetensors").unlink()
    text = refused(adapter)
    assert "projector.safetensors missing" in text and str(adapter) in text and "saved with" in text


def test_missing_lora_files_are_refused(adapter):
    """Without adapter_config.json the adapter used to load as the bare base."""
    (adapter / "adapter_config.json").unlink()
    assert "adapter_config.json missing" in refused(adapter)


def test_a_renamed_projector_key_is_refused(adapter):
    rename(adapter / "projector.safetensors", lambda k: k.replace("linear_1.", "linear_one."))
    text = refused(adapter)
    assert str(adapter / "projector.safetensors") in text
    assert "2 unexpected (found no module): linear_one.bias, linear_one.weight" in text
    assert "2 missing (left untrained): linear_1.bias, linear_1.weight" in text and "saved with" in text


def test_a_tensor_whose_value_did_not_load_is_refused(adapter):
    from lora_llava.model.trained_parts import verify_adapter_weights

    model = load_model(adapter).model
    verify_adapter_weights(model, adapter, {})
    with torch.no_grad():
        model.get_parameter(Q_A.replace("lora_A.weight", "lora_A.default.weight")).add_(1.0)
    with pytest.raises(UserError, match=r"1 not loaded \(the model's values differ from the file's\): " + Q_A):
        verify_adapter_weights(model, adapter, {})


def test_eval_of_a_damaged_adapter_is_one_error_line(adapter, shapes, capsys):
    rename(adapter / "adapter_model.safetensors", lambda k: k.replace("layers.0.", "layers.00.") if k == Q_A else k)
    data = ["--data", shapes / "eval.json", "--image-folder", shapes / "images"]
    code, out, err = run_cli(capsys, "eval", adapter, *data)
    assert_user_error(code, out, err, Q_A, "saved with", "\nhint: ")


def test_merge_refuses_a_damaged_adapter_like_loading_does(adapter, tmp_path, capsys):
    rename(adapter / "adapter_model.safetensors", lambda k: k.replace("multi_modal_projector", "mm_projector"))
    code, out, err = run_cli(capsys, "merge", adapter, tmp_path / "merged")
    assert_user_error(code, out, err, "1 missing (left untrained): " + PROJ_W.replace(".weight", ""))
    assert not (tmp_path / "merged").exists()
    (adapter / "projector.safetensors").unlink()
    code, out, err = run_cli(capsys, "merge", adapter, tmp_path / "merged")
    assert_user_error(code, out, err, "projector.safetensors missing")
