"""Several processes on one run (torchrun, the gloo backend on these CPUs): two processes of micro-batch b train
as one process of micro-batch 2b does, on data that mixes image and text-only samples, with nothing hanging;
every sample once per epoch; one set of outputs; SIGTERM to one process stops both with one checkpoint, and
resuming it ends where an uninterrupted run ends."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lora_llava.config.load import save_recipe
from lora_llava.errors import EXIT_STOPPED
from lora_llava.layout import RunDir, checkpoint_problem

LIMIT = 300  # seconds a two-process run may take here before the test calls it a hang


def _mixed(shapes: Path, folder: Path) -> Path:
    """The shapes images plus 23 text-only samples with answers of other shapes (several words, a lone
    number, a leading space); 119 in all, so the last step of the epoch is short."""
    recs = json.loads((shapes / "train.json").read_text())
    answers = [" 7", "Blue, mostly.", "no", "It has three corners and one colour.", "42"]
    for i in range(23):
        turns = [{"from": "human", "value": f"Say item {i} of the list, then stop." + " Please." * (i % 4)},
                 {"from": "gpt", "value": answers[i % len(answers)]}]  # fmt: skip
        recs.insert(i * 4, {"id": f"text-{i}", "conversations": turns})
    path = folder / "mixed.json"
    path.write_text(json.dumps(recs))
    return path


def _recipe_file(make_recipe, shapes: Path, out: Path, batch: int, **train) -> Path:
    data = {"train": [{"path": str(_mixed(shapes, out.parent)), "image_folder": str(shapes / "images")}]}
    keys = {"max_steps": None, "epochs": 1, "batch_size": batch, "logging_steps": 1, **train}
    recipe = make_recipe(output_dir=str(out), data=data, train=keys)
    path = out.parent / f"{out.name}.yaml"
    save_recipe(recipe, path)
    return path


class Launch:
    """``lora-llava train`` under torchrun (``processes`` of them) or alone, output read as it comes."""

    def __init__(self, recipe_file: Path, processes: int, *extra: str, faults: str = "") -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
        if faults:
            env["LORA_LLAVA_FAULTS"] = faults
        cli = ["-m", "lora_llava", "train", str(recipe_file), *extra]
        head = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
        cmd = [*head, *cli] if processes > 1 else [sys.executable, *cli]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)

    def workers(self) -> list[int]:
        """The pids of the training processes torchrun started (rank order)."""
        out = subprocess.run(["pgrep", "-P", str(self.proc.pid)], capture_output=True, text=True).stdout
        return sorted(int(p) for p in out.split())

    def wait_for(self, text: str, timeout: float = LIMIT) -> None:
        end = time.time() + timeout
        while not any(text in ln for ln in self.lines):
            assert self.proc.poll() is None, f"exited {self.proc.returncode} before {text!r}:\n{self.output}"
            assert time.time() < end, f"no {text!r} after {timeout}s:\n{self.output}"
            time.sleep(0.05)

    def finish(self, timeout: float = LIMIT) -> int:
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            pytest.fail(f"no end after {timeout}s (a hang):\n{self.output}")
        self._reader.join(timeout=10)
        return code

    @property
    def output(self) -> str:
        return "".join(self.lines)


def _rows(run: Path) -> list[dict]:
    return [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines() if ln.strip()]


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = load_file(folder / "adapter_model.safetensors")
    out.update({f"projector/{k}": v for k, v in load_file(folder / "projector.safetensors").items()})
    return out


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
    ta, tb = _tensors(two / "adapter"), _tensors(one / "adapter")
    assert ta.keys() == tb.keys()
    for k in ta:
        assert torch.allclose(ta[k], tb[k], atol=2e-5), (k, (ta[k] - tb[k]).abs().max())

    # one set of outputs, written once: the run directory of a one-process run, one metrics row per step
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())
    assert [r["step"] for r in a if "learning_rate" in r] == list(range(1, 31))
    assert job.output.count("trained 30 steps") == 1
    assert json.loads((two / "run.json").read_text())["world_size"] == 2
    assert "batch: 2 per process x 1 accumulation x 2 processes = 4 samples per optimizer step" in job.output


def test_sigterm_to_one_process_stops_both_with_one_checkpoint_and_resuming_ends_as_uninterrupted(
    make_recipe, shapes, tmp_path, tiny_path
):
    keys = {"max_steps": 10, "epochs": 1, "save_steps": 100}
    ref = tmp_path / "ref"
    job = Launch(_recipe_file(make_recipe, shapes, ref, batch=2, **keys), 2)
    assert job.finish() == 0, job.output

    out = tmp_path / "stopped"
    recipe_file = _recipe_file(make_recipe, shapes, out, batch=2, **keys)
    job = Launch(recipe_file, 2, faults="slow_step@3")  # steps 3+ are slow: the signal lands inside one
    job.wait_for("step 3/10")
    os.kill(job.workers()[-1], signal.SIGTERM)  # the second process only, as a preempted machine's
    assert job.finish() != 0
    assert job.output.count(f"exitcode  : {EXIT_STOPPED}") == 2, job.output  # both processes stopped, as documented
    ckpts = RunDir(out).checkpoint_dirs()
    assert len(ckpts) == 1 and checkpoint_problem(ckpts[0], hashes=True) is None, job.output
    assert not (out / "adapter").exists()
    assert f"resume with: torchrun --nproc_per_node 2 -m lora_llava train {recipe_file}" in job.output

    # another number of processes is refused, with one line; the same number resumes to the same weights
    alone = Launch(recipe_file, 1, "train.resume=true")
    assert alone.finish() == 2
    assert "was trained by 2 process(es), this run has 1" in alone.output and "Traceback" not in alone.output
    again = Launch(recipe_file, 2, "train.resume=true")
    assert again.finish() == 0, again.output
    ta, tb = _tensors(ref / "adapter"), _tensors(out / "adapter")
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
