"""LoRA target names checked before any weights load, from the meta model once and then from the cache; what
``check`` and ``plan`` import."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from lora_llava.artifacts import resolve_backbone
from lora_llava.model import targets
from lora_llava.model.targets import linear_layer_names

LLAMA = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
CLIP = {"q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"}


def test_names_come_from_the_meta_model_once_then_from_the_cache(_offline_cache, monkeypatch):
    spec = resolve_backbone("tiny-sp")
    parts = [spec.language_model, spec.vision_tower]
    first = linear_layer_names(spec, parts)
    assert first == {spec.language_model: LLAMA, spec.vision_tower: CLIP}

    def no_model(*a, **k):
        raise AssertionError("the meta model was built again")

    monkeypatch.setattr(targets, "_from_meta_model", no_model)
    assert linear_layer_names(spec, parts) == first


def test_a_damaged_or_foreign_cache_entry_is_recomputed(_offline_cache, monkeypatch):
    spec = resolve_backbone("tiny-next")
    key = targets._cache_key(spec, Path(spec.local_path()))
    assert key is not None
    linear_layer_names(spec, [spec.language_model])
    cache = targets._cache_file(key)
    built = []
    real = targets._from_meta_model
    monkeypatch.setattr(targets, "_from_meta_model", lambda *a: built.append(1) or real(*a))
    cache.write_text('{"model.language_model": ["q_pr')  # cut short
    assert linear_layer_names(spec, [spec.language_model]) == {spec.language_model: LLAMA}
    cache.write_text(json.dumps({"model.language_model": 3}))  # not names
    assert linear_layer_names(spec, [spec.language_model]) == {spec.language_model: LLAMA}
    assert len(built) == 2 and json.loads(cache.read_text()) == {spec.language_model: sorted(LLAMA)}


def test_the_key_follows_the_config(_offline_cache, tmp_path):
    spec = resolve_backbone("tiny")
    folder = Path(spec.local_path())
    other = tmp_path / "cfg"
    other.mkdir()
    config = json.loads((folder / "config.json").read_text())
    (other / "config.json").write_bytes((folder / "config.json").read_bytes())
    assert targets._cache_key(spec, other) == targets._cache_key(spec, folder)
    config["text_config"]["intermediate_size"] += 1
    (other / "config.json").write_text(json.dumps(config))
    assert targets._cache_key(spec, other) != targets._cache_key(spec, folder)
    assert targets._cache_key(spec, tmp_path / "missing") is None


def _modules_after(verb: str, recipe: Path, tmp_path: Path) -> set[str]:
    code = (
        "import contextlib, io, json, sys\n"
        "from lora_llava.cli.main import main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        f"    rc = main([{verb!r}, {str(recipe)!r}])\n"
        "print(json.dumps({'rc': rc, 'modules': sorted(sys.modules)}))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["rc"] == 0
    return set(got["modules"])


@pytest.fixture
def recipe_file(make_recipe, tmp_path):
    from lora_llava.config.load import save_recipe

    return save_recipe(make_recipe(), tmp_path / "recipe.yaml")


def test_check_imports_no_torch_peft_bitsandbytes_or_modeling(recipe_file, tmp_path):
    linear_layer_names(resolve_backbone("tiny"), [resolve_backbone("tiny").language_model])  # names cached
    modules = _modules_after("check", recipe_file, tmp_path)
    heavy = {"torch", "peft", "bitsandbytes", "transformers.modeling_utils", "transformers.trainer", "trl"}
    assert heavy & modules == set()


def test_plan_imports_no_peft_bitsandbytes_or_trainer(recipe_file, tmp_path):
    modules = _modules_after("plan", recipe_file, tmp_path)
    assert {"peft", "bitsandbytes", "transformers.trainer", "trl"} & modules == set()
    assert "torch" in modules  # the meta model is real
