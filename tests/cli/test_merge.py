"""lora-llava merge: user mistakes as one error line."""

from __future__ import annotations

import json

from helpers import assert_user_error, run_cli


def test_merge_of_non_run_dir(capsys, tmp_path):
    (tmp_path / "empty").mkdir()
    code, out, err = run_cli(capsys, "merge", tmp_path / "empty", tmp_path / "merged")
    assert_user_error(
        code, out, err, f"'{tmp_path / 'empty'}' is not a run directory, an adapter/, a checkpoint, a merged model"
    )
    assert not (tmp_path / "merged").exists()


def test_merge_into_a_file_is_a_user_error(capsys, tmp_path, trained_run):
    (tmp_path / "f").write_text("x")
    code, out, err = run_cli(capsys, "merge", trained_run, tmp_path / "f")
    assert_user_error(code, out, err, "is a file")


def test_merge_through_the_command(capsys, tmp_path, trained_run):
    from lora_llava.artifacts import open_artifact
    from lora_llava.layout import MergedMeta

    code, out, err = run_cli(capsys, "merge", trained_run, tmp_path / "m", "--dtype", "float32")
    assert code == 0, err
    assert "parity on 4 samples (merged model in float32, as stored): merged == adapter answers 4/4" in out
    art = open_artifact(tmp_path / "m")
    assert art.kind == "merged" and isinstance(art.meta, MergedMeta) and art.meta.dtype == "float32"
    assert json.loads((tmp_path / "m" / "merge_report.json").read_text())["dtype"] == "float32"
