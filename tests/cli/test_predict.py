"""lora-llava predict: a folder or a data file into JSON lines, bad images as error lines, killed and resumed
with every sample written exactly once, scored like eval."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time

from helpers import run_cli


def _lines(path):
    return [json.loads(ln) for ln in path.read_text().splitlines()]


def test_a_killed_prediction_resumes_with_each_sample_once(trained_run, shapes, tmp_path):
    folder = tmp_path / "photos"
    shutil.copytree(shapes / "images", folder)
    (folder / "sub").mkdir()
    (folder / "sub" / "broken.png").write_bytes(b"not a png")
    total = len(list(folder.rglob("*.png")))
    out = tmp_path / "preds.jsonl"
    args = [sys.executable, "-m", "lora_llava.cli.main", "predict", str(trained_run), "--images", str(folder),
            "--prompt", "What color is the shape?", "--out", str(out), "--batch-size", "4", "--max-new-tokens", "3"]  # fmt: skip
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    end = time.time() + 120
    while time.time() < end and (not out.exists() or out.read_text().count("\n") < 20):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = out.read_text().count("\n")
    assert 20 <= partial < total
    with open(out, "a") as f:
        f.write('{"id": "cut-off mid-wri')  # what a kill during a write can leave
    run = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "already there (skipped)" in run.stdout
    rows = _lines(out)
    ids = [r["id"] for r in rows]
    assert len(ids) == len(set(ids)) == total  # every image exactly once, the cut line gone
    bad = [r for r in rows if "error" in r]
    assert [r["id"] for r in bad] == ["sub/broken.png"] and bad[0]["error"].startswith("not a readable image")
    assert all(r["prediction"] for r in rows if "error" not in r)


def test_predict_with_references_scores_like_eval(trained_run, shapes, tmp_path, capsys):
    out = tmp_path / "p.jsonl"
    code, stdout, err = run_cli(
        capsys, "predict", trained_run, "--data", shapes / "eval.json", "--image-folder", shapes / "images",
        "--out", out, "--reference", "--max-new-tokens", "4",
    )  # fmt: skip
    assert code == 0, err
    rows = {r["id"]: r for r in _lines(out)}
    code, stdout2, _ = run_cli(
        capsys, "eval", trained_run, "--data", shapes / "eval.json", "--image-folder", shapes / "images", "--json",
        "--max-new-tokens", "4",
    )  # fmt: skip
    evaluated = {r["id"]: r for r in json.loads(stdout2)["predictions"]}
    assert rows.keys() == evaluated.keys()
    for k, r in rows.items():
        assert (r["prediction"], r["correct"], r["reference"]) == (
            evaluated[k]["prediction"], evaluated[k]["correct"], evaluated[k]["reference"]
        )  # fmt: skip
    accuracy = sum(r["correct"] for r in rows.values()) / len(rows)
    assert f"accuracy {accuracy:.3f}" in stdout


def test_predict_mistakes_are_one_error_line(trained_run, tmp_path, capsys):
    from helpers import assert_user_error

    assert_user_error(*run_cli(capsys, "predict", trained_run, "--out", tmp_path / "o.jsonl"), "either --data")
    assert_user_error(
        *run_cli(capsys, "predict", trained_run, "--images", tmp_path, "--out", tmp_path / "o.jsonl"), "--prompt"
    )
    assert_user_error(
        *run_cli(capsys, "predict", trained_run, "--images", tmp_path, "--prompt", "Q", "--out", tmp_path / "o.jsonl"),
        "no images in",
    )


def test_eval_and_predict_take_their_eval_policy_from_the_library():
    """What a model is evaluated on, and how, is workflows.eval_plan's: the verbs parse and print."""
    import ast
    import inspect

    import lora_llava.cli.evaluate as evaluate
    import lora_llava.cli.predict as predict

    for module in (evaluate, predict):
        tree = ast.parse(inspect.getsource(module))
        imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        assert "lora_llava.workflows" in imported, module.__name__
        assert not imported & {"lora_llava.cli.evaluate", "lora_llava.config", "lora_llava.data.formats.reader"}
