"""lora-llava check: the report, bad samples as errors or skipped."""

from __future__ import annotations

import json
from pathlib import Path

from helpers import assert_user_error, run_cli, write_recipe

from lora_llava.data.chat import VICUNA_SYSTEM


def test_check_with_missing_data_file(capsys, tmp_path, shapes, tiny_path):
    path = write_recipe(tmp_path / "r.yaml", shapes, train=tmp_path / "missing.json")
    code, out, err = run_cli(capsys, "check", path)
    assert_user_error(code, out, err, f"data file '{tmp_path / 'missing.json'}' not found", "hint: check data.*.path")


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
