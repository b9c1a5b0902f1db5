"""The datagen config: strict keys, every problem at once, keys never in a config, built-in examples."""

from __future__ import annotations

import pytest
from helpers import assert_user_error, run_cli

from lora_llava.datagen.config import list_configs, load_datagen_config
from lora_llava.errors import UserError

BASE = {
    "annotations": {"path": "a.json", "image_folder": "images"},
    "output": "out.json",
    "generator": {"model": "tiny-qwen2"},
}


def test_defaults():
    c = load_datagen_config(BASE)
    assert c.kinds == ["conversation", "detail", "complex_reasoning"]
    assert c.generator is not None and (c.generator.type, c.generator.few_shot, c.generator.concurrency) == (
        "local",
        2,
        4,
    )


def test_every_problem_at_once_with_nearest_names():
    raw = {
        **BASE,
        "kinds": ["conversation", "details"],
        "generator": {"model": "m", "concurency": 8, "temperature": 3},
        "annotations": {"path": "a.json", "image_folder": "i", "max_boxes": -1},
    }
    with pytest.raises(UserError) as e:
        load_datagen_config(raw)
    text = str(e.value)
    assert "4 problems" in text
    assert "generator.concurency: unknown key; did you mean 'concurrency'?" in text
    assert (
        "kinds.1: must be one of conversation, detail, complex_reasoning, brief, got 'details'; did you mean 'detail'?"
        in text
    )
    assert "generator.temperature: must be <= 2.0, got 3.0" in text
    assert "annotations.max_boxes: must be >= 0, got -1" in text


def test_an_api_key_in_the_config_is_refused_and_not_echoed():
    raw = {**BASE, "generator": {"type": "openai", "model": "m", "base_url": "http://x/v1", "api_key": "sk-secret-123"}}
    with pytest.raises(UserError) as e:
        load_datagen_config(raw)
    assert "generator.api_key: an API key is never read from a config" in str(e.value)
    assert "generator.api_key_env" in str(e.value) and "sk-secret-123" not in str(e.value)


@pytest.mark.parametrize(
    "change, expected",
    [
        ({"generator": {"type": "openai", "model": "m"}}, "generator.base_url: required for type openai"),
        ({"generator": {"type": "openai", "model": "m", "base_url": "127.0.0.1:8000"}}, "must start with http://"),
        ({"generator": {"model": "m", "api_key_env": "K"}}, "generator.api_key_env: only used with type openai"),
        ({"generator": None}, "generator: required for kinds ['conversation', 'detail', 'complex_reasoning']"),
        ({"kinds": ["brief", "brief"]}, "kinds: a kind is listed twice"),
        ({"output": "out.jsonl"}, "output: must be a .json file"),
        ({"kinds": []}, "kinds: needs at least 1 item"),
    ],
)
def test_cross_checks(change, expected):
    with pytest.raises(UserError) as e:
        load_datagen_config({**BASE, **change})
    assert expected in str(e.value)


def test_brief_needs_no_generator_and_overrides_apply():
    c = load_datagen_config({**BASE, "generator": None, "kinds": ["brief"]}, ["annotations.max_captions=2"])
    assert c.generator is None and c.annotations.max_captions == 2


def test_builtin_example_configs_load_and_are_listed(capsys, tmp_path, monkeypatch):
    names = [n for n, _ in list_configs()]
    assert names == ["coco", "csv", "llava"]
    formats = set()
    for name in names:
        c = load_datagen_config(name)
        formats.add(c.annotations.path.rsplit(".", 1)[1])
    assert formats == {"json", "csv"}
    code, out, _ = run_cli(capsys, "data", "configs")
    assert code == 0 and all(n in out for n in names)
    monkeypatch.chdir(tmp_path)
    code, out, _ = run_cli(capsys, "data", "configs", "copy", "coco")
    assert code == 0 and (tmp_path / "coco-datagen.yaml").read_text().startswith("# COCO-style")
    assert_user_error(*run_cli(capsys, "data", "configs", "copy", "coco"), "exists; not overwriting it")
    (tmp_path / "link.yaml").symlink_to(tmp_path / "elsewhere.yaml")  # dangling: never written through
    assert_user_error(*run_cli(capsys, "data", "configs", "copy", "coco", "link.yaml"), "is a symbolic link")
    assert not (tmp_path / "elsewhere.yaml").exists()
    assert_user_error(*run_cli(capsys, "data", "generate", "cocoo"), "did you mean 'coco'?")


def test_datagen_configs_are_not_training_recipes():
    from lora_llava.recipes import list_recipes

    assert not any("coco" in n or "datagen" in n for n, _ in list_recipes())
