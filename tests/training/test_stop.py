"""A real training process stopped by SIGTERM, Ctrl-C (twice) or SIGKILL in the middle of a save: what is
saved, the exit status, the message, and that resuming ends with the weights of an uninterrupted run."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import torch
from helpers import Child, adapter_tensors

from lora_llava.config.load import save_recipe
from lora_llava.errors import EXIT_STOPPED
from lora_llava.layout import RunDir, checkpoint_problem
from lora_llava.workflows import train

QUIET = {"log": lambda *_: None}
TRAIN = {"max_steps": 8, "logging_steps": 1}


def _assert_same_weights(a: Path, b: Path) -> None:
    ta, tb = adapter_tensors(a), adapter_tensors(b)
    assert ta.keys() == tb.keys()
    for k in ta:
        assert torch.allclose(ta[k], tb[k], atol=1e-6), k


class Training(Child):
    """``lora-llava train`` in a child process, its output read line by line as it comes."""

    def __init__(self, recipe_file: Path, faults: str) -> None:
        env = {**os.environ, "LORA_LLAVA_FAULTS": faults, "PYTHONUNBUFFERED": "1"}
        super().__init__([sys.executable, "-m", "lora_llava.cli.main", "train", str(recipe_file)], env, limit=120)


def _recipe_file(make_recipe, out: Path, **train_keys) -> Path:
    recipe = make_recipe(output_dir=str(out), train={**TRAIN, **train_keys})
    path = out.parent / f"{out.name}.yaml"
    save_recipe(recipe, path)
    return path


def test_sigterm_saves_after_the_step_in_flight_and_resuming_matches_an_uninterrupted_run(
    make_recipe, tmp_path, tiny_path
):
    reference = train(make_recipe(output_dir=str(tmp_path / "ref"), train=TRAIN), **QUIET)

    out = tmp_path / "stopped"
    job = Training(_recipe_file(make_recipe, out), "slow_step@3")  # steps 3+ are slow: the signal lands inside one
    job.wait_for("step 3/8")
    job.proc.send_signal(signal.SIGTERM)
    code = job.finish()
    assert code == EXIT_STOPPED, job.output
    assert "SIGTERM: finishing this step, then saving a checkpoint" in job.output
    assert "Traceback" not in job.output
    # the step in flight (4) finished and was saved; no adapter, since the run is not over
    ckpts = RunDir(out).checkpoint_dirs()
    assert [p.name for p in ckpts] == ["checkpoint-4"], job.output
    assert checkpoint_problem(ckpts[0], hashes=True) is None
    assert "stopped by SIGTERM at step 4 of 8; checkpoint saved:" in job.output
    assert (
        f"resume with: lora-llava train {out.parent / 'stopped.yaml'} output_dir={out} train.resume=true" in job.output
    )
    assert not (out / "adapter").exists()

    resumed = train(make_recipe(output_dir=str(out), train={**TRAIN, "resume": True}), **QUIET)
    assert resumed.steps == 8
    _assert_same_weights(reference.adapter_dir, out / "adapter")
    assert abs(resumed.train_loss - reference.train_loss) < 1e-6


def test_a_second_ctrl_c_aborts_at_once_and_leaves_saved_checkpoints_intact(make_recipe, tmp_path, tiny_path):
    out = tmp_path / "aborted"
    job = Training(_recipe_file(make_recipe, out, save_steps=2), "slow_step@3")
    job.wait_for("step 3/8")
    job.proc.send_signal(signal.SIGINT)
    job.wait_for("SIGINT: finishing this step")
    job.proc.send_signal(signal.SIGINT)
    code = job.finish()
    assert code == 130, job.output
    assert "Traceback" not in job.output
    assert "interrupted" in job.output and "checkpoint-2" in job.output  # names the checkpoint to resume from
    # checkpoint-2 is whole and verifies; the step that was in flight was never published
    assert [p.name for p in RunDir(out).checkpoint_dirs()] == ["checkpoint-2"]
    assert checkpoint_problem(RunDir(out).checkpoints / "checkpoint-2", hashes=True) is None


def test_sigkill_during_a_save_resumes_from_the_last_complete_checkpoint(make_recipe, tmp_path, tiny_path):
    reference = train(make_recipe(output_dir=str(tmp_path / "ref"), train=TRAIN), **QUIET)

    out = tmp_path / "killed"
    job = Training(_recipe_file(make_recipe, out, save_steps=2), "slow_save@4")
    job.wait_for("fault: saving step 4")  # checkpoint-4's weights are written, the rest is not
    job.proc.send_signal(signal.SIGKILL)
    assert job.finish() == -signal.SIGKILL
    run = RunDir(out)
    assert [p.name for p in run.checkpoint_dirs()] == ["checkpoint-2"]  # the torn save never got its name
    assert (run.checkpoints / ".staging" / "checkpoint-4" / "adapter_model.safetensors").is_file()

    lines: list[str] = []
    resumed = train(
        make_recipe(output_dir=str(out), train={**TRAIN, "save_steps": 2, "resume": True}), log=lines.append
    )
    assert f"resuming from {run.checkpoints / 'checkpoint-2'}" in lines
    assert resumed.steps == 8
    _assert_same_weights(reference.adapter_dir, out / "adapter")
    assert not (run.checkpoints / ".staging").exists()
