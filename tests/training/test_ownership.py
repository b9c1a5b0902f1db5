"""A run writes only where it may: never into a folder of the user's, never over what it did not write, never
through a link, and one run at a time per directory."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from helpers import LockHolder

from lora_llava.errors import UserError
from lora_llava.workflows import train

QUIET = {"log": lambda *_: None}


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_folder_that_is_not_a_run_is_refused_and_left_as_it_was(make_recipe, tmp_path):
    project = tmp_path / "project"  # output_dir: . in a project: the user's own recipe and notes
    project.mkdir()
    (project / "recipe.yaml").write_text("# my recipe, with my comments\nbackbone: tiny\n")
    (project / "rejected.jsonl").write_text('{"mine": true}\n')
    (project / "eval").mkdir()
    (project / "eval" / "gold.jsonl").write_text("{}\n")
    before = _snapshot(project)
    for overwrite in (False, True):
        with pytest.raises(UserError, match="is not a lora_llava run directory and holds eval/, recipe.yaml, rejected"):
            train(make_recipe(output_dir=str(project)), overwrite=overwrite, **QUIET)
    assert _snapshot(project) == before and {p.name for p in project.iterdir()} == {
        "recipe.yaml",
        "rejected.jsonl",
        "eval",
    }


def test_a_run_replaces_only_what_it_wrote(make_recipe, tmp_path, trained_run):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    (run / "notes.txt").write_text("mine")  # a file of the user's beside the outputs: left alone
    (run / "model").mkdir()  # a folder at an output name that lora_llava did not write
    (run / "model" / "weights.bin").write_bytes(b"precious")
    with pytest.raises(UserError, match="holds model/, which lora_llava did not write"):
        train(make_recipe(output_dir=str(run), train={"max_steps": 1}), overwrite=True, **QUIET)
    assert (run / "model" / "weights.bin").read_bytes() == b"precious" and (run / "adapter").is_dir()
    shutil.rmtree(run / "model")
    train(make_recipe(output_dir=str(run), train={"max_steps": 1}), overwrite=True, **QUIET)
    assert (run / "notes.txt").read_text() == "mine" and (run / "adapter" / "lora_llava.json").is_file()


def test_a_link_at_an_output_name_is_refused(make_recipe, tmp_path, trained_run):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep.txt").write_text("keep")
    (run / "eval").symlink_to(elsewhere)
    with pytest.raises(UserError, match=r"holds eval -> .*elsewhere: lora_llava writes its outputs as plain files"):
        train(make_recipe(output_dir=str(run), train={"max_steps": 1}), overwrite=True, **QUIET)
    assert (elsewhere / "keep.txt").read_text() == "keep"


def test_the_recipes_own_data_inside_output_dir_is_no_obstacle(make_recipe, shapes, tmp_path):
    import shutil

    out = tmp_path / "out"
    shutil.copytree(shapes, out / "data")  # the quickstart's layout: runs/quickstart/data
    data = {
        "train": [{"path": str(out / "data" / "train.json"), "image_folder": str(out / "data" / "images")}],
        "max_length": 256,
    }
    train(make_recipe(output_dir=str(out), data=data, train={"max_steps": 1}), **QUIET)
    assert (out / "adapter").is_dir() and (out / "data" / "train.json").is_file()


def test_a_second_run_into_a_held_directory_names_the_holder(make_recipe, tmp_path):
    out = tmp_path / "busy"
    out.mkdir()
    with LockHolder(out / ".lora_llava.lock") as holder:
        with pytest.raises(
            UserError, match=rf"output_dir '.*busy' is in use by another lora_llava process \(pid {holder.pid}\)"
        ):
            train(make_recipe(output_dir=str(out), train={"max_steps": 1}), **QUIET)
    time.sleep(0.1)
    train(make_recipe(output_dir=str(out), train={"max_steps": 1}), **QUIET)  # free again once it is gone
    assert (out / "adapter").is_dir()


def test_a_failed_runs_bad_sample_list_does_not_outlive_it(make_recipe, tmp_path):
    out = tmp_path / "run"
    recipe = make_recipe(output_dir=str(out), train={"max_steps": 1})
    from lora_llava.layout import RunDir

    run = RunDir(out)
    run.start(inputs=[])  # a run that then failed: its run.json and its list of bad samples stay behind
    run.release()
    run.bad_samples.write_text('{"reason": "stale"}\n')
    train(recipe, **QUIET)
    assert not run.bad_samples.exists()


def test_a_run_in_progress_is_named_before_what_it_has_written(make_recipe, tmp_path, trained_run):
    import shutil

    out = tmp_path / "busy"
    shutil.copytree(trained_run, out)  # outputs on disk, as a run in progress has some
    with LockHolder(out / ".lora_llava.lock") as holder:
        with pytest.raises(UserError, match=rf"is in use by another lora_llava process \(pid {holder.pid}\)"):
            train(make_recipe(output_dir=str(out), train={"max_steps": 1}), **QUIET)  # no --overwrite, no resume


def test_a_file_of_yours_inside_a_runs_eval_folder_is_named(make_recipe, tmp_path, trained_run):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    (run / "eval").mkdir(exist_ok=True)
    (run / "eval" / "my_analysis.txt").write_text("mine")
    with pytest.raises(UserError, match=r"holds eval/my_analysis.txt, which lora_llava did not write"):
        train(make_recipe(output_dir=str(run), train={"max_steps": 1}), overwrite=True, **QUIET)
    assert (run / "eval" / "my_analysis.txt").read_text() == "mine"
