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
    """A private copy of the trained run's adapter, to damage, as written before manifests (one written since
    refuses any changed file at once: tests/test_artifacts.py); these tests are of the key-by-key checks."""
    from helpers import unseal

    return unseal(shutil.copytree(trained_run / "adapter", tmp_path / "adapter"))


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


def retensor(path, key, fn):
    """Re-save ``path`` with tensor ``key`` replaced by ``fn(tensor)``."""
    state = load_file(path)
    state[key] = fn(state[key])
    save_file(state, path, metadata={"format": "pt"})


def test_a_tensor_of_another_shape_is_one_error_not_a_traceback(adapter, shapes, capsys):
    retensor(adapter / "adapter_model.safetensors", Q_A, lambda t: torch.zeros(t.shape[0], t.shape[1] + 1))
    data = ["--data", shapes / "eval.json", "--image-folder", shapes / "images"]
    code, out, err = run_cli(capsys, "eval", adapter, *data)
    assert_user_error(code, out, err, "tensor(s) of another shape: ", "q_proj", "\nhint: ")


def test_a_projector_of_another_shape_is_one_error(adapter):
    retensor(adapter / "projector.safetensors", "linear_1.weight", lambda t: torch.zeros(t.shape[0] + 1, t.shape[1]))
    text = refused(adapter)
    assert "projector.safetensors" in text and "tensor(s) of another shape: linear_1.weight" in text


@pytest.mark.parametrize("name", ["adapter_model.safetensors", "projector.safetensors"])
def test_a_truncated_weight_file_is_one_error(adapter, name):
    data = (adapter / name).read_bytes()
    (adapter / name).write_bytes(data[: len(data) // 2])
    text = refused(adapter)
    assert f"{name}: not a readable safetensors file" in text


def test_the_projector_and_its_copy_in_the_adapter_must_agree(adapter):
    """The projector is saved twice (its own file, and as PEFT's modules_to_save): an edit of one copy is refused,
    not silently outvoted by the other."""
    retensor(adapter / "projector.safetensors", "linear_1.weight", lambda t: torch.zeros_like(t))
    text = refused(adapter)
    assert (
        "projector.safetensors: 1 tensor(s) differ from their copy in adapter_model.safetensors: linear_1.weight"
        in text
    )


def test_every_key_renamed_names_the_keys_found_nowhere(adapter):
    rename(
        adapter / "adapter_model.safetensors", lambda k: k.replace("base_model.model.model.", "base_model.model.mdl.")
    )
    text = refused(adapter)
    assert "32 unexpected (found no module): " in text and "1 missing (left untrained)" in text


def test_a_merged_model_loads_strictly(trained_run, tmp_path, capsys):
    from helpers import unseal

    from lora_llava.merging import merge

    merged = tmp_path / "merged"
    merge(trained_run, merged, dtype="float32", log=lambda *_: None)
    unseal(merged)  # the checks of a model without a manifest
    weights = merged / "model.safetensors"
    original = weights.read_bytes()
    state = load_file(weights)
    key = next(k for k in state if k.endswith("layers.0.self_attn.q_proj.weight"))

    state["model.extra.weight"] = torch.zeros(2)
    save_file(state, weights, metadata={"format": "pt"})
    text = refused(merged)
    assert f"model {merged}: every weight of the model loaded; 1 weight(s) of the checkpoint are not used" in text
    assert "model.extra.weight" in text

    state = load_file(weights)
    del state["model.extra.weight"]
    state[key] = torch.zeros(state[key].shape[0], state[key].shape[1] + 2)
    save_file(state, weights, metadata={"format": "pt"})
    assert "weights of another shape" in refused(merged) or "have another shape" in refused(merged)

    weights.write_bytes(original[: len(original) // 3])
    assert "not readable safetensors" in refused(merged)
    weights.write_bytes(original)
    load_model(merged)


def test_a_checkpoint_whose_weights_do_not_match_its_manifest_is_refused(make_recipe, tmp_path, capsys):
    from lora_llava.workflows import train

    train(make_recipe(output_dir=str(tmp_path / "r"), train={"max_steps": 2, "save_steps": 2}), log=lambda *_: None)
    ckpt = tmp_path / "r" / "checkpoints" / "checkpoint-2"
    retensor(ckpt / "adapter_model.safetensors", Q_A, lambda t: torch.zeros_like(t))  # same size, other bytes
    code, out, err = run_cli(capsys, "eval", ckpt)
    assert_user_error(code, out, err, "is damaged: adapter_model.safetensors does not match its SHA-256")
