"""A YAML mapping that gives a key twice is one clear error wherever lora_llava reads YAML, never a silent
drop of the first value; merge keys (``<<: *base``) may still be overridden."""

from __future__ import annotations

import re
import shutil
import textwrap
from pathlib import Path

import pytest
import yaml

from lora_llava.config import load_recipe
from lora_llava.errors import UserError

RECIPE = """\
backbone: llava-tiny
output_dir: runs/x
data:
  train:
    - path: train.json
train:
  max_steps: 20
  learning_rate: 1.0e-4
"""


def write(tmp_path: Path, text: str, name: str = "recipe.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def error_of(call, *args) -> str:
    with pytest.raises(UserError) as info:
        call(*args)
    return str(info.value)


def test_a_valid_recipe_still_loads(tmp_path):
    recipe = load_recipe(write(tmp_path, RECIPE))
    assert recipe.train.max_steps == 20 and recipe.train.learning_rate == pytest.approx(1e-4)


def test_a_second_top_level_section_names_the_file_the_key_and_both_lines(tmp_path):
    path = write(tmp_path, RECIPE + "eval:\n  batch_size: 4\ntrain:\n  epochs: 2\n", name="my.yaml")
    text = error_of(load_recipe, path)
    assert text == f"recipe {path}: key 'train' appears twice (lines 6 and 11); keep one"


def test_a_key_repeated_inside_a_section_is_caught(tmp_path):
    path = write(tmp_path, RECIPE + "  learning_rate: 3.0e-4\n")
    text = error_of(load_recipe, path)
    assert text == f"recipe {path}: key 'learning_rate' appears twice (lines 8 and 9); keep one"


def test_a_repeat_in_a_list_item_or_a_flow_mapping_is_caught(tmp_path):
    path = write(tmp_path, RECIPE.replace("    - path: train.json\n", "    - path: a.json\n      path: b.json\n"))
    assert "key 'path' appears twice (lines 5 and 6)" in error_of(load_recipe, path)
    path = write(tmp_path, RECIPE + "lora: {r: 8, alpha: 16, r: 4}\n")
    assert "key 'r' appears twice (line 9, columns 8 and 25)" in error_of(load_recipe, path)


def test_the_same_key_in_different_mappings_is_fine(tmp_path):
    text = RECIPE.replace("    - path: train.json\n", "    - path: a.json\n    - path: b.json\n")
    recipe = load_recipe(write(tmp_path, text + "eval:\n  max_samples: 8\n"))
    assert [s.path for s in recipe.data.train] == ["a.json", "b.json"]


def test_keys_that_yaml_reads_as_equal_are_a_repeat():
    from lora_llava.config.yamlsafe import DuplicateKeyError, strict_load

    with pytest.raises(DuplicateKeyError) as info:
        strict_load("yes: 1\ntrue: 2\n")
    assert str(info.value) == "keys 'yes' and 'true' are the same key (lines 1 and 2); keep one"
    assert strict_load("'1': a\n1: b\n") == {"1": "a", 1: "b"}  # a string and a number are two keys


def test_a_merge_key_may_be_overridden_by_explicit_keys(tmp_path):
    from lora_llava.config.yamlsafe import DuplicateKeyError, strict_load

    text = """\
    backbone: llava-tiny
    output_dir: runs/x
    data:
      train:
        - &source {path: train.json, image_folder: images, fraction: 0.5}
      eval:
        - <<: *source
          path: eval.json
    """
    recipe = load_recipe(write(tmp_path, text))
    assert recipe.data.train[0].path == "train.json"
    source = recipe.data.eval[0]  # explicit keys override merged ones
    assert (source.path, source.image_folder, source.fraction) == ("eval.json", "images", 0.5)
    # merged from a mapping that itself merges and overrides (also one nested deeper than its user, which
    # PyYAML flattens before checking it), and from a list of mappings
    nested = (
        "a: &a {lr: 1}\ndefs:\n  b: &b {<<: *a, lr: 2, steps: 2}\nc:\n  <<: [*b, *a]\n  lr: 3\nd: {<<: *b, steps: 4}\n"
    )
    inner = {"lr": 2, "steps": 2}
    assert strict_load(nested) == {
        "a": {"lr": 1},
        "defs": {"b": inner},
        "c": {"lr": 3, "steps": 2},
        "d": {"lr": 2, "steps": 4},
    }
    assert strict_load(nested) == yaml.safe_load(nested)
    # a key repeated beside a merge is still a repeat, and so are two merge keys
    with pytest.raises(DuplicateKeyError, match=r"^key 'x' appears twice \(lines 4 and 5\); keep one$"):
        strict_load("a: &a {x: 1}\nb:\n  <<: *a\n  x: 2\n  x: 3\n")
    with pytest.raises(DuplicateKeyError, match=r"^merge key '<<' appears twice \(lines 4 and 5\); merge a list"):
        strict_load("a: &a {x: 1}\nb: &b {y: 1}\nc:\n  <<: *a\n  <<: *b\n")


def test_the_strict_loader_stays_safe():
    from lora_llava.config.yamlsafe import StrictLoader, strict_load

    with pytest.raises(yaml.YAMLError, match="could not determine a constructor"):
        strict_load("!!python/object/apply:os.system ['true']\n")
    assert issubclass(StrictLoader, yaml.SafeLoader)


def test_an_override_value_repeating_a_key_is_refused(tmp_path):
    text = error_of(load_recipe, write(tmp_path, RECIPE), ["train={max_steps: 5, max_steps: 6}"])
    assert text.startswith(
        "override 'train={max_steps: 5, max_steps: 6}': in the value, "
        "key 'max_steps' appears twice (line 1, columns 2 and 16); keep one"
    )


def test_a_datagen_config_repeating_a_key_is_refused(tmp_path):
    from lora_llava.datagen.config import load_datagen_config

    config = textwrap.dedent(
        """\
    annotations: {path: a.json, image_folder: images}
    output: out.json
    generator:
      model: tiny-qwen2
      concurrency: 2
    kinds: [conversation]
    """
    )
    ok = load_datagen_config(str(write(tmp_path, config, name="ok.yaml")))
    assert ok.generator is not None and ok.generator.concurrency == 2
    path = write(tmp_path, config + "generator:\n  model: other\n", name="gen.yaml")
    text = error_of(load_datagen_config, str(path))
    assert text == f"datagen config {path}: key 'generator' appears twice (lines 3 and 7); keep one"
    path = write(tmp_path, config.replace("  concurrency: 2\n", "  concurrency: 2\n  concurrency: 3\n"))
    text = error_of(load_datagen_config, str(path))
    assert text == f"datagen config {path}: key 'concurrency' appears twice (lines 5 and 6); keep one"


def test_source_columns_repeating_a_key_are_refused():
    from lora_llava.workflows import data_source

    text = error_of(data_source, "x.json", None, "auto", None, "{image: a, image: b}")
    assert text == "--columns '{image: a, image: b}': key 'image' appears twice (line 1, columns 2 and 12); keep one"


def test_push_refuses_a_run_recipe_repeating_a_key(trained_run, tmp_path):
    from lora_llava.publish import plan_push

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    recipe = run / "adapter" / "recipe.yaml"  # the adapter's own copy is the one pushed
    lines = recipe.read_text(encoding="utf-8").splitlines()
    first = next(i for i, ln in enumerate(lines) if ln.startswith("train:")) + 1
    recipe.write_text("\n".join([*lines, "train:", "  max_steps: 1", ""]), encoding="utf-8")
    text = error_of(plan_push, str(run), "someone/x")
    assert f"key 'train' appears twice (lines {first} and {len(lines) + 1}); keep one" in text
    assert str(recipe) in text


def test_an_alias_bomb_a_self_reference_and_deep_nesting_are_one_error_each(tmp_path):
    import time

    from lora_llava.config import load_recipe

    levels = ['a: &a ["x", "x", "x", "x", "x", "x", "x", "x", "x"]']
    for i in range(1, 9):  # 9 ** 9 values once expanded
        prev, name = chr(96 + i), chr(97 + i)
        levels.append(f"{name}: &{name} [{', '.join(['*' + prev] * 9)}]")
    cases = {
        "bomb.yaml": ("\n".join(levels) + "\n", "expand it past 100000 values"),
        "loop.yaml": ("backbone: tiny\ntrain: &t {extra: [*t]}\n", "refers to the value that holds it"),
        "deep.yaml": ("backbone: " + "[" * 4000 + "]" * 4000 + "\n", "nested deeper than it can be read"),
    }
    for name, (text, expected) in cases.items():
        path = tmp_path / name
        path.write_text(text)
        t0 = time.time()
        with pytest.raises(UserError, match=expected) as e:
            load_recipe(path)
        assert str(e.value).startswith(f"recipe {path}: YAML") and time.time() - t0 < 5


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.learning_rate=.inf", "train.learning_rate: must be a finite number, got inf"),
        ("train.max_grad_norm=-.inf", "train.max_grad_norm: must be a finite number, got -inf"),
        ("train.seed=-1", "train.seed: must be >= 0, got -1"),
        ("train.seed=4294967296", "train.seed: must be <= 4294967295, got 4294967296"),
        ("data.train.0.repeats=1000000000", "data.train.0.repeats: must be <= 1000, got 1000000000"),
        ("data.max_length=1000000000", "data.max_length: must be <= 262144, got 1000000000"),
        ("train.epochs=1e12", "train.epochs: must be <= 1000000000.0, got 1000000000000.0"),
        ("train.logging_steps=99999999999", "train.logging_steps: must be <= 2147483647, got 99999999999"),
    ],
)
def test_every_number_of_a_recipe_is_finite_and_bounded(override, message):
    from lora_llava.config import load_recipe
    from lora_llava.recipes import recipe_path

    with pytest.raises(UserError, match=re.escape(message)):
        load_recipe(recipe_path("quickstart"), [override])


def test_every_numeric_key_has_bounds_that_its_default_meets():
    import dataclasses
    import typing

    from lora_llava.config import schema

    def walk(cls):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            args = [a for a in typing.get_args(hints[f.name]) if a is not type(None)] or [hints[f.name]]
            inner = typing.get_args(args[0])[0] if typing.get_origin(args[0]) is list else args[0]
            if isinstance(inner, type) and dataclasses.is_dataclass(inner):
                yield from walk(inner)
            elif any(a in (int, float) for a in args):
                yield f

    numeric = list(walk(schema.Recipe))
    assert len(numeric) > 30
    for f in numeric:
        if isinstance(f.default, (int, float)) and not isinstance(f.default, bool):
            assert f.metadata.get("min", -float("inf")) <= f.default <= f.metadata.get("max", schema.INT_MAX), f.name


def test_an_override_given_twice_and_nan_are_refused():
    from lora_llava.config import load_recipe
    from lora_llava.recipes import recipe_path

    with pytest.raises(
        UserError, match=r"override train.max_steps given twice \(train.max_steps=5, then train.max_steps=10\)"
    ):
        load_recipe(recipe_path("quickstart"), ["train.max_steps=5", "train.max_steps=10"])
    with pytest.raises(UserError, match=re.escape("train.learning_rate: must be a finite number, got nan")):
        load_recipe(recipe_path("quickstart"), ["train.learning_rate=.nan"])
