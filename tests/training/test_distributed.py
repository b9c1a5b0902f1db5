"""Several processes on one run (torchrun, the gloo backend on these CPUs): two processes of micro-batch b train
as one process of micro-batch 2b does, on data that mixes image and text-only samples, with nothing hanging;
every sample once per epoch; one set of outputs; SIGTERM to one process stops both with one checkpoint, and
resuming it ends where an uninterrupted run ends."""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers import Child, adapter_tensors

from lora_llava.config.load import save_recipe
from lora_llava.errors import EXIT_STOPPED
from lora_llava.layout import RunDir, checkpoint_problem

LIMIT = 300  # seconds a two-process run may take here before the test calls it a hang


def _mixed(shapes: Path, folder: Path, samples: int | None = None) -> Path:
    """The shapes images plus 23 text-only samples with answers of other shapes (several words, a lone
    number, a leading space); 119 in all, so the last step of the epoch is short (or the first ``samples``)."""
    recs = json.loads((shapes / "train.json").read_text())
    answers = [" 7", "Blue, mostly.", "no", "It has three corners and one colour.", "42"]
    for i in range(23):
        turns = [{"from": "human", "value": f"Say item {i} of the list, then stop." + " Please." * (i % 4)},
                 {"from": "gpt", "value": answers[i % len(answers)]}]  # fmt: skip
        recs.insert(i * 4, {"id": f"text-{i}", "conversations": turns})
    path = folder / "mixed.json"
    path.write_text(json.dumps(recs[:samples]))
    return path


def _recipe_file(make_recipe, shapes: Path, out: Path, batch: int, samples: int | None = None, **train) -> Path:
    data = {"train": [{"path": str(_mixed(shapes, out.parent, samples)), "image_folder": str(shapes / "images")}]}
    keys = {"max_steps": None, "epochs": 1, "batch_size": batch, "logging_steps": 1, **train}
    recipe = make_recipe(output_dir=str(out), data=data, train=keys)
    path = out.parent / f"{out.name}.yaml"
    save_recipe(recipe, path)
    return path


class Launch(Child):
    """``lora-llava train`` under torchrun (``processes`` of them), accelerate launch, or alone."""

    def __init__(
        self, recipe_file: Path, processes: int, *extra: str, faults: str = "", accelerate: bool = False
    ) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
        if faults:
            env["LORA_LLAVA_FAULTS"] = faults
        cli = ["-m", "lora_llava", "train", str(recipe_file), *extra]
        head = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
        if accelerate:  # the shipped config, as docs/several-gpus.md shows it, on these CPUs
            config = str(Path(__file__).resolve().parents[2] / "recipes" / "accelerate" / "ddp.yaml")
            head = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", config,
                    "--num_processes", str(processes)]  # fmt: skip
        super().__init__([*head, *cli] if processes > 1 else [sys.executable, *cli], env, limit=LIMIT)


def _rows(run: Path) -> list[dict]:
    return [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines() if ln.strip()]


def test_two_processes_train_as_one_process_with_twice_the_batch(make_recipe, shapes, tmp_path, tiny_path):
    two, one = tmp_path / "two", tmp_path / "one"
    job = Launch(_recipe_file(make_recipe, shapes, two, batch=2), 2)
    assert job.finish() == 0, job.output
    ref = Launch(_recipe_file(make_recipe, shapes, one, batch=4), 1)
    assert ref.finish() == 0, ref.output

    # 119 samples, 4 per optimizer step either way: 30 steps, the last one short (3 samples)
    a, b = _rows(two), _rows(one)
    losses_two = [r["loss"] for r in a if "learning_rate" in r]
    losses_one = [r["loss"] for r in b if "learning_rate" in r]
    assert len(losses_two) == len(losses_one) == 30
    assert losses_two == pytest.approx(losses_one, rel=1e-5, abs=1e-6)
    # every sample counted once: the supervised tokens of the epoch are the same (masked repeats carry none)
    assert a[-1]["step"] == b[-1]["step"] == 30
    ta, tb = adapter_tensors(two / "adapter"), adapter_tensors(one / "adapter")
    assert ta.keys() == tb.keys()
    for k in ta:
        assert torch.allclose(ta[k], tb[k], atol=2e-5), (k, (ta[k] - tb[k]).abs().max())

    # one set of outputs, written once: the run directory of a one-process run, one metrics row per step
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())
    assert [r["step"] for r in a if "learning_rate" in r] == list(range(1, 31))
    assert job.output.count("trained 30 steps") == 1
    assert json.loads((two / "run.json").read_text())["world_size"] == 2
    assert "batch: 2 per process x 1 accumulation x 2 processes = 4 samples per optimizer step" in job.output
    # DDP's C++ reducer notes that find_unused_parameters is on (on purpose) once per process: kept quiet
    assert "find_unused_parameters" not in job.output, job.output


def test_sigterm_to_one_process_stops_both_with_one_checkpoint_and_resuming_ends_as_uninterrupted(
    make_recipe, shapes, tmp_path, tiny_path
):
    # 22 samples, 4 per step: 6 steps an epoch (the last one short); the stop lands in the second epoch, so
    # resuming must also find that epoch's order (accelerate's skipping loader does not pass the epoch on)
    keys = {"max_steps": 10, "epochs": 1, "save_steps": 100}
    ref = tmp_path / "ref"
    job = Launch(_recipe_file(make_recipe, shapes, ref, batch=2, samples=22, **keys), 2)
    assert job.finish() == 0, job.output

    out = tmp_path / "stopped"
    recipe_file = _recipe_file(make_recipe, shapes, out, batch=2, samples=22, **keys)
    job = Launch(recipe_file, 2, faults="slow_step@8")  # steps 8+ are slow: the signal lands inside one
    job.wait_for("step 8/10")
    os.kill(job.workers()[-1], signal.SIGTERM)  # the second process only, as a preempted machine's
    assert job.finish() != 0
    assert job.output.count(f"exitcode  : {EXIT_STOPPED}") == 2, job.output  # both processes stopped, as documented
    ckpts = RunDir(out).checkpoint_dirs()
    assert len(ckpts) == 1 and checkpoint_problem(ckpts[0], hashes=True) is None, job.output
    assert not (out / "adapter").exists()
    assert f"resume with: torchrun --nproc_per_node 2 -m lora_llava train {recipe_file}" in job.output
    # the signal reached the second process; the first one says so, once, and the second stays quiet
    assert job.output.count("another process was stopped (SIGTERM)") == 1, job.output
    assert "SIGTERM: finishing this step" not in job.output, job.output

    # another number of processes is refused, with one line; the same number resumes to the same weights
    alone = Launch(recipe_file, 1, "train.resume=true")
    assert alone.finish() == 2
    assert "was trained by 2 process(es), this run has 1" in alone.output and "Traceback" not in alone.output
    again = Launch(recipe_file, 2, "train.resume=true")
    assert again.finish() == 0, again.output
    la = {r["step"]: r["loss"] for r in _rows(ref) if "learning_rate" in r}
    lb = {r["step"]: r["loss"] for r in _rows(out) if "learning_rate" in r}
    assert sorted(la) == sorted(lb) == list(range(1, 11))
    assert [lb[s] for s in range(1, 11)] == pytest.approx([la[s] for s in range(1, 11)], rel=1e-5)
    ta, tb = adapter_tensors(ref / "adapter"), adapter_tensors(out / "adapter")
    for k in ta:
        assert torch.allclose(ta[k], tb[k], atol=1e-6), k


@pytest.mark.parametrize("global_batch, batch, processes, accum", [(128, 4, 8, 4), (128, 4, 1, 32), (6, 3, 2, 1)])
def test_a_global_batch_decides_the_accumulation_for_the_number_of_processes(
    make_recipe, global_batch, batch, processes, accum
):
    t = make_recipe(train={"global_batch_size": global_batch, "batch_size": batch, "grad_accum": 7}).train
    assert t.accumulation(processes) == accum
    assert t.batch_line(processes).endswith(f"= {global_batch} samples per optimizer step")
    assert make_recipe(train={"grad_accum": 7}).train.accumulation(processes) == 7  # unset: the recipe's grad_accum


def test_a_global_batch_that_does_not_divide_is_refused_with_the_numbers_that_would(make_recipe):
    from lora_llava.errors import UserError

    recipe = make_recipe(train={"global_batch_size": 12, "batch_size": 4})
    with pytest.raises(UserError) as e:
        recipe.train.accumulation(2)
    assert "train.global_batch_size=12 is not a multiple of train.batch_size=4 x 2 process(es) = 8" in str(e.value)
    assert "or run with 1, 3 process(es)" in str(e.value)
    assert "hint: choose a multiple of 8 (e.g. train.global_batch_size=16)" in str(e.value)


def test_a_global_batch_no_process_count_can_make_is_a_recipe_error(make_recipe):
    from lora_llava.errors import UserError

    with pytest.raises(UserError, match=r"train.global_batch_size: 10 is not a multiple of train.batch_size \(4\)"):
        make_recipe(train={"global_batch_size": 10, "batch_size": 4})


def test_a_global_batch_these_processes_cannot_make_is_refused_before_anything_is_written(
    make_recipe, tmp_path, monkeypatch
):
    """Divisible by the batch (the recipe is fine) but not by batch x 2 processes: train refuses at once."""
    from lora_llava.errors import UserError
    from lora_llava.training import run as run_module

    recipe = make_recipe(output_dir=str(tmp_path / "never"), train={"global_batch_size": 12, "batch_size": 4})
    monkeypatch.setattr(run_module, "start", lambda: SimpleNamespace(size=2, main=True, rank=0))
    with pytest.raises(UserError, match="x 2 process"):
        run_module.train(recipe, log=lambda *_: None)
    assert not (tmp_path / "never").exists()


@pytest.mark.parametrize("var, name", [("ACCELERATE_USE_FSDP", "FSDP"), ("ACCELERATE_USE_DEEPSPEED", "DeepSpeed")])
def test_a_sharded_launch_is_refused_before_anything_is_written(make_recipe, tmp_path, monkeypatch, var, name):
    from lora_llava.errors import UserError
    from lora_llava.training.run import train

    monkeypatch.setenv(var, "true")
    out = tmp_path / "never"
    with pytest.raises(UserError, match=f"accelerate launched this run with {name}"):
        train(make_recipe(output_dir=str(out)), log=lambda *_: None)
    assert not out.exists()


def test_the_shipped_accelerate_config_is_one_accelerate_reads_and_not_a_recipe():
    from accelerate.commands.config.config_args import load_config_from_file

    from lora_llava.errors import UserError
    from lora_llava.recipes import list_recipes, recipe_path, recipes_root

    config = load_config_from_file(str(recipes_root() / "accelerate" / "ddp.yaml"))
    assert str(config.distributed_type) in ("MULTI_GPU", "DistributedType.MULTI_GPU")
    assert not [n for n, _ in list_recipes() if n.startswith("accelerate/")]
    with pytest.raises(UserError, match="'accelerate/ddp' is a config of accelerate launch, not a training recipe"):
        recipe_path("accelerate/ddp")


def test_a_mistake_every_process_makes_is_reported_once(make_recipe, shapes, tmp_path, tiny_path):
    recipe_file = _recipe_file(make_recipe, shapes, tmp_path / "never", batch=2)
    job = Launch(recipe_file, 2, "train.batchsize=4")
    assert job.finish() != 0
    errors = [ln for ln in job.lines if ln.startswith("error")]
    assert errors == ["error: recipe " + str(recipe_file) + ": 1 problem:\n"], job.output
    assert "unknown key; did you mean 'batch_size'? (from the command line: train.batchsize=4)" in job.output
    assert not (tmp_path / "never").exists()


def test_accelerate_launch_with_the_shipped_config_trains_with_two_processes(make_recipe, shapes, tmp_path, tiny_path):
    out = tmp_path / "acc"
    job = Launch(_recipe_file(make_recipe, shapes, out, batch=2, max_steps=2), 2, accelerate=True)
    assert job.finish() == 0, job.output
    assert json.loads((out / "run.json").read_text())["world_size"] == 2
    assert job.output.count("trained 2 steps") == 1 and (out / "adapter").is_dir()
    assert "2 per process x 1 accumulation x 2 processes = 4 samples" in job.output


def test_a_vanished_peer_is_named_by_its_connection_not_by_a_cut_message():
    from lora_llava.training.session import _peer_lost

    gloo = RuntimeError(
        "[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer [10.0.0.2]:4127"
    )
    assert _peer_lost(gloo) == "connection closed by peer"
    assert _peer_lost(RuntimeError("NCCL communicator was aborted on rank 1")) == "NCCL communicator aborted"
    assert _peer_lost(RuntimeError("CUDA out of memory")) is None


@pytest.mark.parametrize(
    "env, expected",
    [
        ({"TORCHELASTIC_RUN_ID": "x"}, "torchrun --nproc_per_node 2 -m lora_llava train"),
        (
            {"TORCHELASTIC_RUN_ID": "x", "ACCELERATE_USE_CPU": "False"},
            "accelerate launch --num_processes 2 -m lora_llava train",
        ),
        (
            {"TORCHELASTIC_RUN_ID": "x", "LOCAL_WORLD_SIZE": "1"},
            "torchrun --nnodes 2 --nproc_per_node 1 -m lora_llava train",
        ),
    ],
)
def test_the_resume_command_names_the_launcher_that_started_the_run(monkeypatch, env, expected):
    from lora_llava.cli.train import _launcher

    for k in ("TORCHELASTIC_RUN_ID", "ACCELERATE_USE_CPU", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert _launcher() == expected
