"""The ``lora-llava`` command: user errors as one ``error:`` line (exit 2), check, recipes, help, eval.

Usage: ``python -m pytest -q tests/test_cli.py``
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lora_llava.cli.main import VERBS, main
from lora_llava.data.chat import VICUNA_SYSTEM
from lora_llava.errors import UserError


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_user_error(code: int, out: str, err: str, *expected: str) -> None:
    assert code == 2, (out, err)
    assert err.startswith("error: "), err
    assert sum(ln.startswith("error:") for ln in err.splitlines()) == 1, err
    assert "Traceback" not in err and "Traceback" not in out
    for text in expected:
        assert text in err, (text, err)


def write_recipe(path: Path, shapes: Path, train: Path | None = None, **data) -> Path:
    raw = {
        "backbone": "tiny",
        "output_dir": str(path.parent / "run"),
        "data": {
            "train": [{"path": str(train or shapes / "train.json"), "image_folder": str(shapes / "images")}],
            "eval": [{"path": str(shapes / "eval.json"), "image_folder": str(shapes / "images")}],
            "max_length": 256,
            **data,
        },
        "quantization": {"compute_dtype": "float32"},
    }
    path.write_text(yaml.safe_dump(raw))
    return path


# ---------------------------------------------------------------------------------------- user errors


def test_missing_recipe_file(capsys, tmp_path):
    code, out, err = run_cli(capsys, "check", tmp_path / "nope.yaml")
    assert_user_error(code, out, err, f"error: recipe file '{tmp_path / 'nope.yaml'}' not found")


def test_unknown_recipe_name_suggests(capsys):
    code, out, err = run_cli(capsys, "train", "quickstrat")
    assert_user_error(code, out, err, "error: no recipe 'quickstrat'", "did you mean 'quickstart'?")


def test_recipe_with_unknown_key_suggests(capsys, tmp_path, shapes):
    path = write_recipe(tmp_path / "r.yaml", shapes)
    raw = yaml.safe_load(path.read_text())
    raw["train"] = {"lerning_rate": 1e-3}
    path.write_text(yaml.safe_dump(raw))
    code, out, err = run_cli(capsys, "check", path)
    assert_user_error(code, out, err, "1 problem", "train.lerning_rate: unknown key; did you mean 'learning_rate'?")


def test_bad_override(capsys):
    code, out, err = run_cli(capsys, "check", "quickstart", "train.batch_size=abc")
    assert_user_error(code, out, err, "train.batch_size: expected an integer, got 'abc' (str)")


def test_bad_override_syntax(capsys):
    code, out, err = run_cli(capsys, "train", "quickstart", "train.max_steps")
    # argparse takes a bare word as an override; load_recipe rejects it without '='
    assert_user_error(code, out, err, "override 'train.max_steps': missing '='")


def test_eval_on_missing_model_dir(capsys, tmp_path, shapes):
    code, out, err = run_cli(
        capsys, "eval", tmp_path / "no-such-run", "--data", shapes / "eval.json",
        "--image-folder", shapes / "images",
    )  # fmt: skip
    assert_user_error(code, out, err, f"no directory '{tmp_path / 'no-such-run'}': it does not exist")


def test_eval_with_bad_data_lists_it(capsys, tmp_path, shapes):
    data = json.loads((shapes / "eval.json").read_text())[:2] + [{"id": "x", "image": "nope.png", "conversations": []}]
    (tmp_path / "eval.json").write_text(json.dumps(data))
    code, out, err = run_cli(
        capsys, "eval", "tiny", "--data", tmp_path / "eval.json", "--image-folder", shapes / "images"
    )
    assert_user_error(code, out, err, "1 bad sample(s) in", "sample 2 (id x): 'conversations' is empty")


def test_merge_of_non_run_dir(capsys, tmp_path):
    (tmp_path / "empty").mkdir()
    code, out, err = run_cli(capsys, "merge", tmp_path / "empty", tmp_path / "merged")
    assert_user_error(
        code, out, err, f"'{tmp_path / 'empty'}' is not a run directory, an adapter/, a checkpoint, a merged model"
    )
    assert not (tmp_path / "merged").exists()


def test_check_with_missing_data_file(capsys, tmp_path, shapes, tiny_path):
    path = write_recipe(tmp_path / "r.yaml", shapes, train=tmp_path / "missing.json")
    code, out, err = run_cli(capsys, "check", path)
    assert_user_error(code, out, err, f"data file '{tmp_path / 'missing.json'}' not found", "hint: check data.*.path")


def test_no_verb_prints_help(capsys):
    code, out, _ = run_cli(capsys)
    assert code == 2 and "usage: lora-llava" in out


def test_real_script_prints_no_traceback(tmp_path):
    script = Path(sys.executable).parent / "lora-llava"
    assert script.is_file()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [str(script), "check", "quickstrat"], capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == ""
    assert proc.stderr == (
        "error: no recipe 'quickstrat': not a file and not a built-in recipe\n"
        "hint: did you mean 'quickstart'? list them with: lora-llava recipes\n"
    )


# ----------------------------------------------------------------------------------------------- check


def test_check_ok(capsys, tmp_path, shapes, tiny_path):
    code, out, err = run_cli(capsys, "check", write_recipe(tmp_path / "r.yaml", shapes))
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == f"backbone: tiny (builtin:tiny), chat format vicuna_v1, system prompt {VICUNA_SYSTEM!r}"
    assert lines[1].split() == ["split", "samples", "bad", "tokens", "answer", "tokens", "source"]
    assert lines[2].split()[:3] == ["train", "96", "0"] and lines[2].endswith(str(shapes / "train.json"))
    assert lines[3].split()[:3] == ["eval", "16", "0"] and lines[3].endswith(str(shapes / "eval.json"))
    assert lines[4].startswith("lengths (tokens, after image expansion): min ")
    assert lines[4].endswith("data.max_length 256")
    assert lines[-1] == "ok"
    assert "Traceback" not in err


def _with_bad_sample(tmp_path: Path, shapes: Path) -> Path:
    data = json.loads((shapes / "train.json").read_text())
    data.append({"id": "broken-one", "image": "nope.png", "conversations": data[0]["conversations"]})
    path = tmp_path / "train.json"
    path.write_text(json.dumps(data))
    return path


def test_check_bad_sample_error(capsys, tmp_path, shapes, tiny_path):
    recipe = write_recipe(tmp_path / "r.yaml", shapes, train=_with_bad_sample(tmp_path, shapes), on_bad_sample="error")
    code, out, err = run_cli(capsys, "check", recipe)
    assert_user_error(
        code, out, err, "error: 1 bad sample(s) of 113:",
        f"{tmp_path / 'train.json'} sample 96 (id broken-one): image 'nope.png' not found in",
    )  # fmt: skip
    assert "ok" not in out.splitlines()


def test_check_bad_sample_skip(capsys, tmp_path, shapes, tiny_path):
    recipe = write_recipe(tmp_path / "r.yaml", shapes, train=_with_bad_sample(tmp_path, shapes))
    code, out, err = run_cli(capsys, "check", recipe, "data.on_bad_sample=skip")
    assert code == 0, err
    assert "1 bad sample(s) would be skipped (data.on_bad_sample=skip):" in out
    assert "(id broken-one): image 'nope.png' not found in" in out
    assert out.splitlines()[-1] == "ok"
    assert not (tmp_path / "run").exists()  # check writes nothing


# --------------------------------------------------------------------------------------------- recipes


def test_recipes_list(capsys):
    code, out, _ = run_cli(capsys, "recipes")
    assert code == 0
    names = [ln.split()[0] for ln in out.splitlines()]
    assert {"quickstart", "llava-1.5-7b/qlora", "llava-1.5-13b/qlora"} <= set(names)
    assert (
        next(ln for ln in out.splitlines() if ln.startswith("quickstart "))
        .split(None, 1)[1]
        .startswith("Quickstart: QLoRA on the offline `tiny` backbone")
    )


def test_recipes_show(capsys):
    from lora_llava.recipes import recipe_path

    code, out, _ = run_cli(capsys, "recipes", "show", "quickstart")
    assert code == 0
    assert out == recipe_path("quickstart").read_text()
    assert yaml.safe_load(out)["backbone"] == "tiny"


def test_recipes_copy_refuses_to_overwrite(capsys, tmp_path):
    from lora_llava.recipes import recipe_path

    dest = tmp_path / "sub" / "mine.yaml"
    code, out, _ = run_cli(capsys, "recipes", "copy", "quickstart", dest)
    assert code == 0 and out == f"copied quickstart to {dest}\n"
    assert dest.read_text() == recipe_path("quickstart").read_text()
    dest.write_text("# mine\n")
    code, out, err = run_cli(capsys, "recipes", "copy", "quickstart", dest)
    assert_user_error(code, out, err, "exists; not overwriting it")
    assert dest.read_text() == "# mine\n"


def test_recipes_show_and_copy_need_arguments(capsys):
    assert_user_error(*run_cli(capsys, "recipes", "show"), "recipes show needs a recipe name")
    assert_user_error(*run_cli(capsys, "recipes", "copy", "quickstart"), "recipes copy needs a destination file")
    assert_user_error(*run_cli(capsys, "recipes", "show", "nope"), "no recipe 'nope'")


def test_recipes_backbones(capsys):
    code, out, _ = run_cli(capsys, "recipes", "--backbones")
    assert code == 0
    rows = {ln.split()[0]: ln.split()[1] for ln in out.splitlines()}
    assert rows["tiny"] == "builtin:tiny"
    assert rows["llava-1.5-7b"] == "llava-hf/llava-1.5-7b-hf"


def test_recipes_keys(capsys):
    code, out, _ = run_cli(capsys, "recipes", "--keys")
    assert code == 0
    keys = [ln.split()[0] for ln in out.splitlines()]
    assert "train.learning_rate" in keys and "data.train.N.path" in keys and "lora.r" in keys
    row = next(ln for ln in out.splitlines() if ln.startswith("train.learning_rate "))
    assert row.split()[1:4] == ["float,", ">=", "0.0"]


# ------------------------------------------------------------------------------------------------ help


@pytest.mark.parametrize("verb", list(VERBS))
def test_every_verb_help(capsys, verb):
    with pytest.raises(SystemExit) as e:
        main([verb, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: lora-llava {verb}")
    assert "\nexamples:\n" in out
    assert f"  lora-llava {verb}" in out


def test_top_level_help(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "examples:" in out and all(verb in out for verb in VERBS)


# ---------------------------------------------------------------------------------------------- recipes


def _shipped_recipes() -> list[Path]:
    root = Path(__file__).resolve().parent.parent / "recipes"
    return sorted(root.rglob("*.yaml"))


def test_shipped_recipes_are_the_builtin_ones():
    from lora_llava.recipes import list_recipes, recipes_root

    root = Path(__file__).resolve().parent.parent / "recipes"
    names = [p.relative_to(root).with_suffix("").as_posix() for p in _shipped_recipes()]
    assert len(names) >= 3
    assert sorted(n for n, _ in list_recipes()) == sorted(names)
    assert all((recipes_root() / f"{n}.yaml").read_bytes() == (root / f"{n}.yaml").read_bytes() for n in names)


@pytest.mark.parametrize("path", _shipped_recipes(), ids=lambda p: p.parent.name + "/" + p.stem)
def test_shipped_recipe_loads_and_backbone_resolves(path):
    from lora_llava.backbones.registry import resolve_backbone
    from lora_llava.config import load_recipe

    recipe = load_recipe(path)  # structural validation only: no weights, no network
    assert path.read_text().startswith("# ")  # the first comment line is its description in `recipes`
    if recipe.backbone == "assemble" or recipe.stage == "instruct" and recipe.backbone.startswith("runs/"):
        return  # checked by test_builtin_recipes_check below (assembled / stage-2-from-stage-1)
    spec = resolve_backbone(recipe.backbone)
    assert recipe.backbone in (spec.name, spec.source)
    assert spec.model_class().__name__.endswith("ForConditionalGeneration")


def test_builtin_recipes_check():
    from lora_llava.backbones.registry import registered_backbones
    from lora_llava.recipes import check_builtin_recipes

    how = check_builtin_recipes()
    assert how["tiny-assembled/align"] == "assemble tiny-clip + tiny-qwen2"
    assert how["tiny-assembled/instruct"] == "stage-1 output of tiny-assembled/align"
    assert how["assemble-clip-qwen2/instruct"] == "stage-1 output of assemble-clip-qwen2/align"
    assert {s.recipe for s in registered_backbones()} <= set(how)
    assert how["llava-v1.6-34b/qlora"] == "llava-v1.6-34b"


def test_builtin_recipes_check_reports_a_missing_stage1(monkeypatch, tmp_path):
    import lora_llava.recipes as rec

    root = tmp_path / "recipes"
    (root / "x").mkdir(parents=True)
    (root / "x" / "instruct.yaml").write_text(
        "# x\nbackbone: runs/nowhere\ndata: {train: [{path: a.json}]}\noutput_dir: runs/x\n"
    )
    monkeypatch.setattr(rec, "recipes_root", lambda: root)
    with pytest.raises(UserError) as e:
        rec.check_builtin_recipes()
    assert "x/instruct: backbone directory 'runs/nowhere' does not exist" in str(e.value)
    assert "backbone tiny has no built-in recipe ('quickstart')" in str(e.value)


# ------------------------------------------------------------------------------------------------- eval


def test_eval_json_on_trained_run(capsys, trained_run, shapes):
    code, out, err = run_cli(
        capsys, "eval", trained_run, "--data", shapes / "eval.json", "--image-folder", shapes / "images",
        "--json", "--max-samples", "8", "--max-new-tokens", "3",
    )  # fmt: skip
    assert code == 0, err
    result = json.loads(out)  # the whole of stdout is one JSON object
    assert isinstance(result, dict)
    assert {"accuracy", "n"} <= set(result)
    assert result["n"] == 8
    assert 0.0 <= result["accuracy"] <= 1.0
    assert result["accuracy"] == pytest.approx(result["correct"] / 8)


def test_recipes_validate(capsys):
    code, out, err = run_cli(capsys, "recipes", "--validate")
    assert code == 0, err
    lines = out.splitlines()
    assert len(lines) == len(_shipped_recipes())
    assert "tiny-assembled/instruct" in out and "stage-1 output of tiny-assembled/align" in out
    assert all(" ok " in ln for ln in lines)


def test_eval_argument_and_data_mistakes(capsys, tmp_path, trained_run, shapes):
    with pytest.raises(SystemExit) as e:  # argparse's own usage error
        run_cli(capsys, "eval", trained_run, "--data", shapes / "eval.json", "--batch-size", "0")
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--batch-size: must be at least 1, got 0" in err and "Traceback" not in err
    (tmp_path / "empty.json").write_text("[]")
    code, out, err = run_cli(capsys, "eval", trained_run, "--data", tmp_path / "empty.json")
    assert_user_error(code, out, err, "no samples to score in")
    code, out, err = run_cli(capsys, "eval", trained_run, "--data", shapes / "eval.json")  # no --image-folder
    assert_user_error(code, out, err, "image paths are relative to --image-folder")


def test_merge_into_a_file_is_a_user_error(capsys, tmp_path, trained_run):
    (tmp_path / "f").write_text("x")
    code, out, err = run_cli(capsys, "merge", trained_run, tmp_path / "f")
    assert_user_error(code, out, err, "is a file")
