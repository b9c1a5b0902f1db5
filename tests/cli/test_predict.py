"""lora-llava predict: a folder or a data file into JSON lines, bad images as error lines, killed and resumed
with every sample written exactly once, scored like eval; a file records what wrote it, so a re-run with other
settings is refused (or started again with --overwrite), and a file that is not a predictions file is never
changed."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time

from helpers import LockHolder, run_cli


def _lines(path):
    from lora_llava.predict import read_predictions

    return read_predictions(path)


def _header(path):
    return json.loads(path.read_text().split("\n")[0])["lora_llava_predictions"]


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
    partial = out.read_text().count("\n") - 1  # the header, then answers
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


def _few_images(shapes, tmp_path, n=3):
    folder = tmp_path / "few"
    folder.mkdir()
    for p in sorted((shapes / "images").glob("eval_*.png"))[:n]:
        shutil.copy(p, folder / p.name)
    return folder


def test_a_rerun_with_other_settings_is_refused_naming_what_differs(trained_run, shapes, tmp_path, capsys):
    from helpers import assert_user_error

    folder, out = _few_images(shapes, tmp_path), tmp_path / "preds.jsonl"

    def predict(*extra):
        return run_cli(capsys, "predict", trained_run, "--images", folder, "--out", out, *extra)

    code, stdout, err = predict("--prompt", "What color is the shape?", "--max-new-tokens", "2")
    assert code == 0, err
    header = _header(out)
    assert header["model"] == str((trained_run / "adapter").resolve()) and header["model_run_id"]
    assert header["images"] == str(folder.resolve()) and header["prompt"] == "What color is the shape?"
    assert (header["max_new_tokens"], header["decoding"], header["reference"]) == (2, "greedy", False)
    first = out.read_bytes()
    assert len(_lines(out)) == 3

    # the same settings (the default batch size is no setting of the answers): resumed, nothing to add
    code, stdout, err = predict("--prompt", "What color is the shape?", "--max-new-tokens", "2", "--batch-size", "1")
    assert code == 0, err
    assert "wrote 0 answer(s)" in stdout and "3 already there (skipped)" in stdout and out.read_bytes() == first

    # other settings: one line naming what differs, the file as it was
    assert_user_error(
        *predict("--prompt", "What shape is it?", "--max-new-tokens", "2"),
        f'{out} was written with --prompt "What color is the shape?" (this run: "What shape is it?"); '
        "write to another --out, or pass --overwrite to start it again",
    )
    assert_user_error(
        *predict("--prompt", "What color is the shape?", "--max-new-tokens", "3"),
        "was written with --max-new-tokens 2 (this run: 3);",
    )
    code, stdout, err = run_cli(
        capsys, "predict", "tiny", "--images", folder, "--prompt", "What color is the shape?", "--out", out,
        "--max-new-tokens", "2",
    )  # fmt: skip
    assert_user_error(
        code, stdout, err, f'was written with model "{(trained_run / "adapter").resolve()}" (this run: "tiny")'
    )
    assert out.read_bytes() == first

    # --overwrite starts it again with this run's settings
    code, stdout, err = predict("--prompt", "What shape is it?", "--max-new-tokens", "2", "--overwrite")
    assert code == 0, err
    assert "wrote 3 answer(s)" in stdout and "skipped" not in stdout
    assert _header(out)["prompt"] == "What shape is it?"
    assert [r["prompt"] for r in _lines(out)] == ["What shape is it?"] * 3


def test_predict_never_changes_a_file_that_is_not_a_predictions_file(trained_run, shapes, tmp_path, capsys):
    from helpers import assert_user_error

    folder = _few_images(shapes, tmp_path, n=1)
    picture = tmp_path / "picture.png"
    shutil.copy(next(folder.iterdir()), picture)
    array = tmp_path / "answers.json"
    array.write_text('[\n {"id": "a", "prediction": "Red"}\n]')  # no newline at the end: once cut to "[\n ...}\n"
    training = tmp_path / "train.jsonl"
    training.write_text('{"id": "a", "image": "a.png", "conversations": []}\n')
    for path, why in (
        (picture, "it is not UTF-8 text"),
        (array, "line 1 is not JSON"),
        (training, "line 1 is not an answer"),
    ):
        before = path.read_bytes()
        for extra in ((), ("--overwrite",)):
            code, stdout, err = run_cli(
                capsys, "predict", trained_run, "--images", folder, "--prompt", "Q", "--out", path, *extra
            )
            assert_user_error(
                code, stdout, err,
                f"--out {str(path)!r} is not a lora-llava predictions file ({why}",
                "it is left as it is: write to another --out",
            )  # fmt: skip
            assert len(err.strip().splitlines()) == 1, err
            assert path.read_bytes() == before


def test_a_predictions_file_of_an_earlier_version_is_resumed_with_a_warning(trained_run, shapes, tmp_path, capsys):
    folder, out = _few_images(shapes, tmp_path), tmp_path / "old.jsonl"
    kept = {"id": "eval_0000.png", "prompt": "Q", "prediction": "from before"}
    out.write_text(json.dumps(kept) + "\n" + '{"id": "eval_0001.png", "pro')  # no header; its last line cut off
    code, stdout, err = run_cli(
        capsys, "predict", trained_run, "--images", folder, "--prompt", "Q", "--out", out, "--max-new-tokens", "2"
    )
    assert code == 0, err
    assert (
        f"warning: {out} does not record what wrote it (an earlier lora-llava did): its 1 answer(s) are kept as "
        "this run's; pass --overwrite to start it again"
    ) in err
    assert "wrote 2 answer(s)" in stdout and "1 already there (skipped)" in stdout
    rows = [json.loads(ln) for ln in out.read_text().splitlines()]
    assert rows[0] == kept  # left as it was: no header claims settings its answers were not written with
    assert sorted(r["id"] for r in rows) == ["eval_0000.png", "eval_0001.png", "eval_0002.png"]


def test_what_a_predictions_file_holds_decides_what_a_run_does(tmp_path):
    """open_predictions: start, resume, refuse or start again, from the file alone (no model needed)."""
    import pytest

    from lora_llava.errors import UserError
    from lora_llava.predict import HEADER, open_predictions

    out = tmp_path / "p.jsonl"
    mine = {"model": "/m", "prompt": "A", "max_new_tokens": 2}
    assert open_predictions(out, mine).keep is None  # missing: started
    out.write_text(json.dumps({HEADER: mine}) + "\n")
    assert open_predictions(out, mine).keep == len(out.read_bytes())  # a header alone, same settings: resumed
    assert open_predictions(out, {**mine, "prompt": "B"}).keep is None  # a header alone: nothing to lose, started
    row = {"id": "x", "prompt": "A", "prediction": "answer\u2028with a line separator"}
    with open(out, "a") as f:
        f.write(json.dumps(row, ensure_ascii=False) + "\n" + '{"id": "y", "pre')
    found = open_predictions(out, mine)
    assert found.done == {"x"} and found.keep == len(out.read_bytes()) - len('{"id": "y", "pre')
    with pytest.raises(
        UserError, match=r'with --prompt "A" \(this run: "B"\), with --max-new-tokens 2 \(this run: without\)'
    ):
        open_predictions(out, {"model": "/m", "prompt": "B"})
    assert open_predictions(out, {"model": "/m", "prompt": "B"}, overwrite=True).keep is None
    out.write_text('{"lora_llava_predictions": {"mo')  # killed while the header was written
    assert open_predictions(out, mine).keep is None
    out.write_text("")
    assert open_predictions(out, mine).keep is None
    with pytest.raises(UserError, match="is a folder"):
        open_predictions(tmp_path, mine)


def test_a_second_run_into_a_held_output_is_refused_naming_the_holder(trained_run, shapes, tmp_path, capsys):
    """Two runs into one --out would each answer, and append, every sample: the second is refused, the file
    unchanged; once the holder is gone, a run resumes the file (and releases the lock when it ends)."""
    from pathlib import Path

    import pytest
    from helpers import assert_user_error

    from lora_llava.errors import UserError
    from lora_llava.layout import hold_lock, release_lock
    from lora_llava.layout import lock_beside as lock_path
    from lora_llava.predict import predict

    folder, out = _few_images(shapes, tmp_path), tmp_path / "preds.jsonl"
    argv = ["predict", trained_run, "--images", folder, "--prompt", "What color is the shape?", "--out", out,
            "--max-new-tokens", "2"]  # fmt: skip
    out.write_text("")  # started by the holder: its header not yet written
    lock = lock_path(out)
    assert lock == tmp_path / ".preds.jsonl.lock"
    with LockHolder(lock) as holder:
        code, stdout, err = run_cli(capsys, *argv)
        assert_user_error(
            code, stdout, err, f"--out {str(out)!r} is in use by another lora_llava process (pid {holder.pid})"
        )
        with pytest.raises(UserError, match=rf"in use by another lora_llava process \(pid {holder.pid}\)"):
            predict(None, [], [], out, settings={"model": "m"})  # type: ignore[arg-type]  # the library too
        assert out.read_bytes() == b""
    time.sleep(0.1)
    code, stdout, err = run_cli(capsys, *argv)  # free again once it is gone
    assert code == 0, err
    assert "wrote 3 answer(s)" in stdout and len(_lines(out)) == 3
    hold_lock(Path(lock), "test")  # released when the run ended (a held flock would refuse this open file)
    release_lock(Path(lock))

    lock.write_text("my notes\n")  # a file of the user's at the lock's name: refused, left as it is
    assert_user_error(*run_cli(capsys, *argv), f"{str(lock)!r} is not a lock file of lora_llava")
    assert lock.read_text() == "my notes\n"
