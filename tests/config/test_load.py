"""Recipes: strict schema, every problem at once, overrides, cross-key rules, round trips."""

from __future__ import annotations

import copy
import dataclasses
import textwrap
from pathlib import Path

import pytest
import yaml

from lora_llava.config import (
    DataSource,
    QuantizationConfig,
    Recipe,
    TrainConfig,
    describe_keys,
    load_recipe,
    recipe_to_dict,
    save_recipe,
)
from lora_llava.errors import UserError


def test_stage_rules_are_checked_at_load(make_recipe):
    with pytest.raises(UserError) as e:
        make_recipe(stage="align", language_model={"policy": "lora"}, projector={"policy": "frozen"})
    assert "language_model.policy: stage align trains only the projector" in str(e.value)
    assert "projector.policy: stage align trains the projector; it must be full" in str(e.value)
    with pytest.raises(UserError, match="assemble: required when backbone is `assemble`"):
        make_recipe(backbone="assemble")


def test_plain_is_refused_for_instruction_tuning(make_recipe):
    from lora_llava.errors import UserError

    with pytest.raises(UserError, match="chat.format: plain is LLaVA-1.5's stage-1"):
        make_recipe(chat={"format": "plain"})


MINIMAL = {"backbone": "llava-tiny", "output_dir": "runs/x", "data": {"train": [{"path": "train.json"}]}}


def write(tmp_path: Path, text: str, name: str = "recipe.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def minimal(**sections) -> dict:
    data = copy.deepcopy(MINIMAL)
    data.update(sections)
    return data


def problems(source, overrides=()) -> list[str]:
    """The problem lines of the UserError that loading ``source`` must raise."""
    with pytest.raises(UserError) as info:
        load_recipe(source, overrides)
    header, *lines = str(info.value).splitlines()
    assert header.startswith("recipe ")
    return [line.strip() for line in lines]


def test_minimal_recipe_fills_defaults(tmp_path):
    path = write(
        tmp_path,
        """
        backbone: llava-tiny
        output_dir: runs/x
        data:
          train:
            - path: train.json
    """,
    )
    recipe = load_recipe(path)
    assert recipe.data.train == [DataSource(path="train.json")]
    assert recipe.data.eval == []
    assert recipe.train == TrainConfig()
    assert recipe.train.learning_rate == 2e-4 and recipe.train.lr_scheduler == "cosine"
    assert recipe.quantization == QuantizationConfig()
    assert recipe.lora.target_modules[0] == "q_proj"
    # sections are instances, and factories give each recipe its own list
    assert all(
        dataclasses.is_dataclass(getattr(recipe, f.name))
        for f in dataclasses.fields(Recipe)
        if f.name not in ("backbone", "output_dir", "stage", "assemble")
    )
    other = load_recipe(MINIMAL)
    other.lora.target_modules.append("x")
    assert "x" not in recipe.lora.target_modules


def test_dict_source_is_not_mutated():
    source = minimal(train={"max_steps": 3})
    before = copy.deepcopy(source)
    load_recipe(source, ["train.max_steps=9", "data.train.0.path=other.json"])
    assert source == before


def test_unknown_key_suggests_at_nested_and_list_paths():
    data = minimal(train={"lerning_rate": 1e-4}, bakbone="x")
    data["data"]["train"][0]["pth"] = "oops.json"
    lines = problems(data)
    assert "train.lerning_rate: unknown key; did you mean 'learning_rate'?" in lines
    assert "data.train.0.pth: unknown key; did you mean 'path'?" in lines
    assert "bakbone: unknown key; did you mean 'backbone'?" in lines


def test_a_problem_from_an_override_names_the_command_line_not_only_the_file():
    from lora_llava.errors import UserError

    data = minimal(train={"lerning_rate": 1e-4})
    with pytest.raises(UserError) as e:
        load_recipe(data, ["train.batchsize=4", "data.train=[{path: 3}]", "train.max_steps=5"])
    lines = str(e.value).splitlines()[1:]
    assert (
        "  train.batchsize: unknown key; did you mean 'batch_size'? (from the command line: train.batchsize=4)" in lines
    )
    assert (
        "  data.train.0.path: expected a string, got 3 (int) (from the command line: data.train=[{path: 3}])" in lines
    )
    # the recipe's own mistake is the recipe's
    assert "  train.lerning_rate: unknown key; did you mean 'learning_rate'?" in lines


def test_unknown_key_without_close_match_lists_valid_keys():
    (line,) = problems(minimal(eval={"zzzzzz": 1}))
    assert line.startswith("eval.zzzzzz: unknown key; valid keys: max_new_tokens, batch_size, max_samples")


def test_bad_type():
    assert problems(minimal(train={"batch_size": "four"})) == [
        "train.batch_size: expected an integer, got 'four' (str)"
    ]


def test_bool_rejected_for_int_and_float():
    lines = problems(minimal(train={"seed": True, "weight_decay": False}))
    assert "train.seed: expected an integer, got True (bool)" in lines
    assert "train.weight_decay: expected a number, got False (bool)" in lines


def test_float_rejected_for_int_and_string_number_rejected_for_int():
    lines = problems(minimal(train={"batch_size": 4.0, "grad_accum": "4"}))
    assert any(line.startswith("train.batch_size: expected an integer") for line in lines)
    assert any(line.startswith("train.grad_accum: expected an integer") for line in lines)


def test_bad_literal_suggests():
    expected = (
        "train.lr_scheduler: must be one of cosine, linear, constant, constant_with_warmup, got 'cosin'; "
        "did you mean 'cosine'?"
    )
    assert problems(minimal(train={"lr_scheduler": "cosin"})) == [expected]


def test_out_of_range():
    lines = problems(minimal(train={"warmup_ratio": 1.5, "batch_size": 0}))
    assert "train.warmup_ratio: must be <= 1.0, got 1.5" in lines
    assert "train.batch_size: must be >= 1, got 0" in lines


def test_required_missing_and_min_items():
    data = minimal(lora={"target_modules": []})
    del data["backbone"]
    data["data"] = {"train": []}
    lines = problems(data)
    assert "backbone: required key missing" in lines
    assert "data.train: needs at least 1 item" in lines
    assert "lora.target_modules: needs at least 1 item" in lines
    lines = problems({"backbone": "b", "output_dir": "o", "data": {}})
    assert lines == ["data.train: required key missing"]


def test_none_only_for_optional():
    assert load_recipe(minimal(train={"max_steps": None})).train.max_steps is None
    assert problems(minimal(train={"batch_size": None})) == ["train.batch_size: expected an integer, got null"]


def test_section_and_list_shape_errors():
    lines = problems(minimal(train=5, lora={"target_modules": "q_proj"}))
    assert "train: expected a mapping of keys, got 5 (int)" in lines
    assert "lora.target_modules: expected a list, got 'q_proj' (str)" in lines
    assert problems(minimal(data={"train": [["x"]]})) == ["data.train.0: expected a mapping of keys, got a list"]


def test_all_problems_reported_at_once(tmp_path):
    path = write(
        tmp_path,
        """
        backbone: llava-tiny
        output_dir: runs/x
        data:
          train:
            - pth: train.json
        train:
          batch_size: four
          lr_scheduler: cosin
          warmup_ratio: 1.5
        lora:
          r: 0
    """,
    )
    with pytest.raises(UserError) as info:
        load_recipe(path)
    message = str(info.value)
    assert message.splitlines()[0] == f"recipe {path}: 6 problems:"
    for where in (
        "data.train.0.pth:",
        "data.train.0.path:",
        "train.batch_size:",
        "train.lr_scheduler:",
        "train.warmup_ratio:",
        "lora.r:",
    ):
        assert where in message


def test_string_floats_accepted(tmp_path):
    path = write(
        tmp_path,
        """
        backbone: llava-tiny
        output_dir: runs/x
        data: {train: [{path: t.json}]}
        train: {learning_rate: 2e-4, epochs: 3}
        projector: {learning_rate: "1e-5"}
    """,
    )
    assert yaml.safe_load(path.read_text())["train"]["learning_rate"] == "2e-4"  # the YAML 1.1 gotcha
    recipe = load_recipe(path)
    assert recipe.train.learning_rate == pytest.approx(2e-4) and isinstance(recipe.train.learning_rate, float)
    assert recipe.train.epochs == 3.0 and isinstance(recipe.train.epochs, float)
    assert recipe.projector.learning_rate == pytest.approx(1e-5)
    assert problems(minimal(train={"learning_rate": "fast"})) == [
        "train.learning_rate: expected a number, got 'fast' (str)"
    ]


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    path = write(tmp_path, "backbone: x\ndata:\n  train: [a, b\noutput_dir: y\n", name="broken.yaml")
    with pytest.raises(UserError, match=r"broken\.yaml: YAML syntax error at line \d+") as info:
        load_recipe(path)
    assert str(path) in str(info.value)


def test_missing_file_and_non_mapping_top_level(tmp_path):
    with pytest.raises(UserError, match="nope.yaml: file not found"):
        load_recipe(tmp_path / "nope.yaml")
    with pytest.raises(UserError, match="list.yaml: top level must be a mapping"):
        load_recipe(write(tmp_path, "- a\n- b\n", name="list.yaml"))
    with pytest.raises(UserError, match="empty.yaml: file is empty"):
        load_recipe(write(tmp_path, "", name="empty.yaml"))


def test_overrides_parse_values(tmp_path):
    path = write(
        tmp_path,
        """
        backbone: llava-tiny
        output_dir: runs/x
        data:
          train:
            - path: train.json
    """,
    )
    recipe = load_recipe(
        path,
        [
            "train.max_steps=20",
            "quantization.load_in_4bit=false",
            "lora.target_modules=[q_proj,v_proj]",
            "train.learning_rate=1e-3",
            "data.train.0.path=other.json",
            "data.train.0.max_samples=7",
        ],
    )
    assert recipe.train.max_steps == 20
    assert recipe.quantization.load_in_4bit is False
    assert recipe.lora.target_modules == ["q_proj", "v_proj"]
    assert recipe.train.learning_rate == pytest.approx(1e-3)
    assert recipe.data.train == [DataSource(path="other.json", max_samples=7)]
    recipe = load_recipe(minimal(train={"max_steps": 5}), ["train.max_steps=null"])
    assert recipe.train.max_steps is None


def test_override_appends_and_creates_sections():
    recipe = load_recipe(MINIMAL, ["data.train.1.path=b.json", "data.eval.0.path=e.json", "eval.batch_size=2"])
    assert [s.path for s in recipe.data.train] == ["train.json", "b.json"]
    assert recipe.data.eval == [DataSource(path="e.json")]
    assert recipe.eval.batch_size == 2


def test_override_values_are_validated():
    data = copy.deepcopy(MINIMAL)
    assert problems(data, ["train.batch_size=four"]) == [
        "train.batch_size: expected an integer, got 'four' (str) (from the command line: train.batch_size=four)"
    ]
    assert problems(data, ["train.max_stepz=3"]) == [
        "train.max_stepz: unknown key; did you mean 'max_steps'? (from the command line: train.max_stepz=3)"
    ]


@pytest.mark.parametrize(
    ("override", "reason"),
    [
        ("train.max_steps", "missing '='"),
        ("=3", "empty key"),
        ("train..max_steps=3", "empty key segment"),
        ("data.train.5.path=x.json", "index 5 out of range for data.train"),
        ("data.train.x=1", "data.train is a list"),
        ("data.0=1", "data is a mapping, not a list"),
        ("backbone.name=x", "backbone is 'llava-tiny' (str)"),
        ("train.seed=[1,", "not valid YAML"),
    ],
)
def test_bad_overrides_name_the_override(override, reason):
    with pytest.raises(UserError) as info:
        load_recipe(MINIMAL, [override])
    assert str(info.value).startswith(f"override {override!r}: ")
    assert reason in str(info.value)


def test_save_and_load_round_trip(tmp_path):
    recipe = load_recipe(
        minimal(
            train={
                "learning_rate": "1e-05",
                "epochs": 2,
                "max_steps": 30,
                "report_to": "wandb",
                "wandb_project": "p",
            },
            data={
                "train": [{"path": "a.json", "image_folder": "imgs"}, {"path": "b.json", "max_samples": 3}],
                "eval": [{"path": "e.json"}],
                "on_bad_sample": "skip",
            },
            lora={"target_modules": ["q_proj"], "dropout": 0},
        )
    )
    saved = save_recipe(recipe, tmp_path / "sub" / "recipe.yaml")
    assert load_recipe(saved) == recipe
    assert load_recipe(recipe_to_dict(recipe)) == recipe
    plain = yaml.safe_load(saved.read_text())
    assert list(plain) == [f.name for f in dataclasses.fields(Recipe)]  # schema order, not sorted
    assert plain["data"]["train"][1] == {
        "path": "b.json",
        "format": "auto",
        "image_folder": None,
        "image_roots": [],
        "split": None,
        "columns": {"id": None, "conversations": None, "image": None, "role": None, "text": None},
        "roles": {"user": [], "assistant": [], "system": []},
        "max_samples": 3,
        "fraction": None,
        "repeats": 1,
        "prompt_style": "plain",
    }


def test_describe_keys_covers_every_leaf():
    rows = {key: (type_text, default, help) for key, type_text, default, help in describe_keys()}
    assert rows["train.learning_rate"][:2] == ("float, >= 0.0", "0.0002")
    assert rows["data.train.N.path"][1] == "required"
    assert rows["data.eval"][1] == "[]"
    assert "cosine" in rows["train.lr_scheduler"][0]
    assert rows["train.max_steps"][:2] == ("int | null, >= 1", "null")
    assert rows["quantization.load_in_4bit"][1] == "true"
    assert all(help for _, _, help in rows.values())
    leaves = {"backbone", "output_dir"}
    for section in ("quantization", "lora", "projector", "vision_tower", "train", "eval", "merge"):
        leaves |= {f"{section}.{f.name}" for f in dataclasses.fields(type(getattr(load_recipe(MINIMAL), section)))}
    assert leaves <= set(rows)
