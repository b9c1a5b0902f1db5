"""The lora-llava command: user errors as one error line (exit 2), help for every verb."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import assert_user_error, run_cli, write_recipe

from lora_llava.cli.main import VERBS, main


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


def test_version(capsys):
    import lora_llava

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out == f"lora-llava {lora_llava.__version__}\n"


def test_outputs_that_cannot_be_written_are_one_error_line(capsys, tmp_path, shapes, trained_run):
    recipe = write_recipe(tmp_path / "r.yaml", shapes)
    (tmp_path / "afile").write_text("x")
    code, out, err = run_cli(capsys, "train", recipe, f"output_dir={tmp_path / 'afile'}")
    assert_user_error(code, out, err, f"output_dir '{tmp_path / 'afile'}' is a file")
    code, out, err = run_cli(capsys, "train", recipe, f"output_dir={tmp_path / 'afile' / 'run'}")
    assert_user_error(code, out, err, f"cannot create output_dir '{tmp_path / 'afile' / 'run'}'")
    code, out, err = run_cli(capsys, "merge", trained_run, tmp_path / "afile" / "m")
    assert_user_error(code, out, err, f"cannot write {tmp_path / 'afile' / 'm'}")
    code, out, err = run_cli(capsys, "recipes", "copy", "quickstart", tmp_path / "afile" / "q.yaml")
    assert_user_error(code, out, err, str(tmp_path / "afile"))
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        code, out, err = run_cli(capsys, "train", recipe, f"output_dir={ro / 'run'}")
        if os.geteuid() != 0:  # root writes anywhere
            assert_user_error(code, out, err, f"cannot create output_dir '{ro / 'run'}'")
    finally:
        ro.chmod(0o700)


def test_a_finished_run_is_refused_by_train_and_quickstart(capsys, tmp_path, shapes, trained_run):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    recipe = write_recipe(tmp_path / "r.yaml", shapes)
    code, out, err = run_cli(capsys, "train", recipe, f"output_dir={run}", "train.max_steps=1")
    assert_user_error(code, out, err, "holds an earlier run (adapter/, metrics.jsonl)", "add --overwrite")
    code, out, err = run_cli(capsys, "quickstart", recipe, f"output_dir={run}", "train.max_steps=1")
    assert_user_error(code, out, err, "holds an earlier run (adapter/, metrics.jsonl)")
    code, out, err = run_cli(capsys, "train", recipe, f"output_dir={run}", "train.max_steps=1", "--overwrite")
    assert code == 0, err


def test_an_interrupt_names_the_checkpoint_and_the_resume_command(capsys, tmp_path, shapes, monkeypatch):
    import lora_llava.workflows as workflows

    recipe = write_recipe(tmp_path / "r.yaml", shapes)
    run = tmp_path / "run"
    code, _, err = run_cli(capsys, "train", recipe, "train.max_steps=2", "train.save_steps=1", f"output_dir={run}")
    assert code == 0, err

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(workflows, "train", interrupted)
    code, out, err = run_cli(capsys, "train", recipe, "train.max_steps=4", f"output_dir={run}", "--overwrite")
    assert code == 130
    assert err == (
        f"interrupted: the latest checkpoint is {run / 'checkpoints' / 'checkpoint-2'}\n"
        f"resume with: lora-llava train {recipe} train.max_steps=4 output_dir={run} train.resume=true\n"
    )
    # an override with spaces (a list of sources) is quoted, so the line pastes into a shell as it was given
    sources = f"data.train=[{{path: {shapes / 'train.json'}, image_folder: {shapes / 'images'}}}]"
    code, out, err = run_cli(capsys, "train", recipe, sources, "train.max_steps=4", f"output_dir={run}", "--overwrite")
    assert code == 130
    line = err.splitlines()[1].removeprefix("resume with: ")
    assert shlex.split(line) == [
        "lora-llava", "train", str(recipe), sources, "train.max_steps=4", f"output_dir={run}", "train.resume=true"
    ]  # fmt: skip


def test_options_may_come_between_overrides():
    from lora_llava.cli.main import _options_first, build_parser

    parser = build_parser()
    argv = ["train", "r.yaml", "a=1", "--overwrite", "b=2"]
    assert _options_first(parser, argv) == ["train", "--overwrite", "r.yaml", "a=1", "b=2"]
    args = parser.parse_args(_options_first(parser, argv))
    assert args.overwrite and args.overrides == ["a=1", "b=2"]
    assert _options_first(parser, ["merge", "run", "--overwrite"]) == ["merge", "run", "--overwrite"]
    # an option with a value, in both spellings, anywhere among the overrides
    for argv in (
        ["plan", "r.yaml", "--gpu-memory", "24GB", "a=1", "b=2"],
        ["plan", "r.yaml", "a=1", "--gpu-memory=24GB", "b=2"],
    ):
        args = parser.parse_args(_options_first(parser, argv))
        assert args.gpu_memory == "24GB" and args.overrides == ["a=1", "b=2"] and args.recipe == "r.yaml"
    args = parser.parse_args(
        _options_first(parser, ["plan", "r.yaml", "a=1", "--seq-len", "512", "--gpu-memory", "8GB"])
    )
    assert (args.seq_len, args.gpu_memory, args.overrides) == (512, "8GB", ["a=1"])


@pytest.mark.parametrize(
    ("argv", "lines"),
    [
        (["envv"], ["error: unknown command 'envv'", "hint: did you mean 'env'? lora-llava --help lists the commands"]),
        (
            ["eval", "runs/x", "--bogus"],
            ["error: unrecognized arguments: --bogus", "hint: lora-llava eval --help lists its arguments"],
        ),
        (
            ["merge", "a"],
            [
                "error: the following arguments are required: OUT_DIR",
                "hint: lora-llava merge --help lists the arguments",
            ],
        ),
    ],
)
def test_argument_mistakes_are_one_error_line_and_a_hint(capsys, argv, lines):
    with pytest.raises(SystemExit) as e:
        main(argv)
    out, err = capsys.readouterr()
    assert e.value.code == 2 and out == "" and err.splitlines() == lines


def test_a_closed_pipe_ends_the_output_without_a_traceback():
    import subprocess
    import sys

    proc = subprocess.Popen(
        [sys.executable, "-m", "lora_llava.cli.main", "recipes", "--keys"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    proc.stdout.close()  # the reader is gone before the first line (as `| head` after its lines)
    err = proc.stderr.read().decode()
    proc.wait(timeout=60)
    assert "Traceback" not in err and "BrokenPipe" not in err, err


@pytest.mark.parametrize(
    "error",
    [
        OSError(28, "No space left on device"),  # a write() with no file name
        OSError(28, "No space left on device", "/runs/x/checkpoints/checkpoint-4/optimizer.pt"),
        RuntimeError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: ... })"),
    ],
)
def test_a_full_disk_is_one_error_line_with_what_to_do(monkeypatch, capsys, error):
    import lora_llava.cli.recipes as verb
    from lora_llava.cli.main import main

    def fail(args):
        raise error

    monkeypatch.setattr(verb, "run", fail)
    assert main(["recipes"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no space left on the device") and "train.resume=true" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 2


def test_quickstart_options_may_come_after_the_recipe_and_among_overrides():
    from lora_llava.cli.main import _options_first, build_parser

    parser = build_parser()
    argv = ["quickstart", "tiny-assembled/instruct", "--overwrite", "backbone=x", "output_dir=y"]
    args = parser.parse_args(_options_first(parser, argv))
    assert args.overwrite and args.args == ["tiny-assembled/instruct", "backbone=x", "output_dir=y"]
