"""The backbone registry: registered backbones, unregistered Hub ids and local directories, and paths that are not models."""

from __future__ import annotations

import json

import pytest

from lora_llava.artifacts import resolve_backbone
from lora_llava.backbones.registry import registered_backbones
from lora_llava.errors import UserError


def test_every_registered_backbone_has_a_known_family_and_chat_format():
    from lora_llava.data.chat import _FORMATS

    for spec in registered_backbones():
        assert spec.family in ("llava", "llava_next")
        assert spec.chat_format in _FORMATS
    assert resolve_backbone("llava-hf/llava-v1.6-mistral-7b-hf").chat_format == "mistral_instruct"
    assert resolve_backbone("llava-hf/llava-v1.6-34b-hf").chat_format == "chatml_direct"
    assert resolve_backbone("llava-v1.6-vicuna-13b").model_class().__name__ == "LlavaNextForConditionalGeneration"


def test_every_registered_hub_backbone_carries_its_offline_config_and_specs_stay_hashable():
    """One row per backbone: a registered Hub backbone's row holds the config the planner builds offline."""
    for spec in registered_backbones():
        assert hash(spec) == hash(resolve_backbone(spec.name))  # frozen and hashable, offline config included
        if spec.builtin:
            assert spec.offline_config is None  # built once from lora_llava's own config
            continue
        config = spec.offline_config
        assert config is not None, spec.name
        assert config.text_values()["model_type"] in ("llama", "mistral")
        assert config.vision_values()["model_type"] == "clip_vision_model"
    seven = resolve_backbone("llava-1.5-7b").offline_config
    assert seven is not None and seven.text_values()["num_hidden_layers"] == 32
    assert "offline_config" not in repr(resolve_backbone("llava-1.5-7b"))


def test_unregistered_hub_id_is_read_from_its_config(monkeypatch, tmp_path):
    import huggingface_hub

    repo = {
        "config.json": json.dumps({"model_type": "llava_next"}),
        "chat_template.jinja": "{{ '[INST] ' }}{{ ' [/INST]' }}",
    }

    def fake_download(repo_id, filename, **kw):
        assert repo_id == "someone/my-llava-next"
        if filename not in repo:
            raise FileNotFoundError(filename)
        (tmp_path / filename).write_text(repo[filename])
        return str(tmp_path / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    spec = resolve_backbone("someone/my-llava-next")
    assert (spec.family, spec.chat_format, spec.source) == ("llava_next", "mistral_instruct", "someone/my-llava-next")
    assert "chat format mistral_instruct (from its chat template)" in spec.inferred
    repo["config.json"] = json.dumps({"model_type": "qwen2"})
    with pytest.raises(UserError, match="model_type 'qwen2' is not a LLaVA model"):
        resolve_backbone("someone/my-llava-next")
    del repo["config.json"]
    with pytest.raises(UserError, match="its config.json could not be read from the (Hub|local cache)"):
        resolve_backbone("someone/my-llava-next")


def test_backbone_paths_that_are_not_models_say_why(tmp_path):
    with pytest.raises(UserError, match="backbone directory 'runs/never-trained' does not exist") as e:
        resolve_backbone("runs/never-trained")
    assert "train its align recipe first" in str(e.value)
    import dataclasses

    from lora_llava.layout import AdapterMeta, write_meta

    (tmp_path / "run" / "adapter").mkdir(parents=True)
    meta = AdapterMeta(backbone="tiny", source="builtin:tiny", family="llava", chat_format="plain", stage="align")
    write_meta(tmp_path / "run" / "adapter", meta)
    with pytest.raises(UserError, match="is a stage-1 run directory without model/"):
        resolve_backbone(str(tmp_path / "run"))
    write_meta(tmp_path / "run" / "adapter", dataclasses.replace(meta, stage="instruct"))
    with pytest.raises(UserError, match="is a stage-2 run \\(an adapter\\), not a model"):
        resolve_backbone(str(tmp_path / "run"))
    (tmp_path / "run" / "adapter" / "lora_llava.json").write_text("{}")
    with pytest.raises(UserError, match="lora_llava.json: unknown format None"):
        resolve_backbone(str(tmp_path / "run"))
