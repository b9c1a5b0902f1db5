"""Checkpoints are whole or absent, hold only the trained parts, and resuming gives the same result."""

from __future__ import annotations

import shutil

import pytest
import torch
from helpers import adapter_tensors

from lora_llava.layout import RunDir, write_manifest
from lora_llava.workflows import train

QUIET = {"log": lambda *_: None}


def test_checkpoints_are_whole_and_resume_reproduces_the_run(make_recipe, tmp_path):
    full = make_recipe(output_dir=str(tmp_path / "a"), train={"max_steps": 4, "save_steps": 2})
    train(full, **QUIET)
    ckpts = tmp_path / "a" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["checkpoint-2", "checkpoint-4"]  # no staging left
    files = {p.name for p in (ckpts / "checkpoint-2").iterdir()}
    assert {
        "adapter_model.safetensors",
        "adapter_config.json",
        "projector.safetensors",
        "optimizer.pt",
        "scheduler.pt",
        "trainer_state.json",
    } <= files
    assert not {"model.safetensors", "vision_tower.safetensors"} & files  # frozen base weights are not copied
    assert RunDir(tmp_path / "a").latest_checkpoint() == ckpts / "checkpoint-4"

    # an interrupted run: checkpoint-2 survived, a later save died half-way (no trainer_state.json)
    run_b = tmp_path / "b"
    (run_b / "checkpoints").mkdir(parents=True)
    shutil.copytree(ckpts / "checkpoint-2", run_b / "checkpoints" / "checkpoint-2")
    (run_b / "checkpoints" / "checkpoint-3").mkdir()
    (run_b / "checkpoints" / "checkpoint-3" / "adapter_model.safetensors").write_bytes(b"partial")
    assert RunDir(run_b).latest_checkpoint() == run_b / "checkpoints" / "checkpoint-2"

    resumed = make_recipe(output_dir=str(run_b), train={"max_steps": 4, "save_steps": 2, "resume": True})
    result = train(resumed, **QUIET)
    assert result.steps == 4
    a, b = adapter_tensors(tmp_path / "a" / "adapter"), adapter_tensors(run_b / "adapter")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k
    # and the resumed run really continued: its weights differ from checkpoint-2's
    c2 = adapter_tensors(ckpts / "checkpoint-2")
    assert any(not torch.equal(c2[k], b[k]) for k in c2)


def test_resume_without_a_checkpoint_is_a_user_error(make_recipe, tmp_path):
    import pytest

    from lora_llava.errors import UserError

    recipe = make_recipe(output_dir=str(tmp_path / "c"), train={"max_steps": 2, "resume": True})
    with pytest.raises(UserError, match="no complete checkpoint"):
        train(recipe, **QUIET)


def test_no_checkpoint_folder_without_save_steps(make_recipe, tmp_path):
    train(make_recipe(output_dir=str(tmp_path / "d"), train={"max_steps": 1}), **QUIET)
    assert not (tmp_path / "d" / "checkpoints").exists()


def test_resume_refuses_a_changed_recipe_or_a_finished_run_before_loading_a_model(make_recipe, tmp_path, monkeypatch):
    import json

    import pytest

    import lora_llava.training.trainable as trainable_mod
    from lora_llava.errors import UserError

    out = str(tmp_path / "e")
    train(make_recipe(output_dir=out, train={"max_steps": 2, "save_steps": 1}), **QUIET)
    rows = [json.loads(ln) for ln in (tmp_path / "e" / "metrics.jsonl").read_text().splitlines()]

    def no_model(*a, **k):
        raise AssertionError("the model was loaded before the resume check")

    monkeypatch.setattr(trainable_mod, "load_base", no_model)
    changed = make_recipe(output_dir=out, lora={"r": 4}, train={"max_steps": 4, "save_steps": 1, "resume": True})
    kept = {p.name: p.read_bytes() for p in (tmp_path / "e").iterdir() if p.is_file()}
    with pytest.raises(UserError) as e:
        train(changed, **QUIET)
    assert "lora.r: 8 in checkpoint-2, now 4" in str(e.value) and "train.max_steps" not in str(e.value)
    # refused: the run's recipe.yaml (which its resume command reads), data report and metrics are as they were
    assert {p.name: p.read_bytes() for p in (tmp_path / "e").iterdir() if p.is_file()} == kept
    assert "recipe.yaml" in kept and "data_report.txt" in kept
    done = make_recipe(output_dir=out, train={"max_steps": 2, "save_steps": 1, "resume": True})
    with pytest.raises(UserError, match="checkpoint-2 already reached train.max_steps=2; nothing to resume"):
        train(done, **QUIET)
    monkeypatch.undo()

    # a longer run resumes; metrics.jsonl keeps the rows up to the checkpoint and continues
    train(make_recipe(output_dir=out, train={"max_steps": 3, "save_steps": 1, "resume": True}), **QUIET)
    after = [json.loads(ln) for ln in (tmp_path / "e" / "metrics.jsonl").read_text().splitlines()]
    assert [r for r in after if r["step"] <= 2 and "loss" in r] == [r for r in rows if "loss" in r]
    assert max(r["step"] for r in after) == 3


def test_a_finished_run_is_not_overwritten_and_checkpoints_belong_to_their_run(make_recipe, tmp_path, capsys):
    import json

    import pytest

    from lora_llava.errors import UserError
    from lora_llava.layout import RunDir

    out = tmp_path / "r"
    first = make_recipe(output_dir=str(out), train={"max_steps": 2, "save_steps": 1})
    train(first, **QUIET)
    (out / "summary.json").write_text("{}")  # as quickstart leaves it
    (out / "data.txt").write_text("user data")
    stamp = (out / "adapter" / "adapter_model.safetensors").read_bytes()
    with pytest.raises(UserError) as e:
        train(first, **QUIET)
    assert "holds an earlier run (adapter/, checkpoints/, summary.json, metrics.jsonl)" in str(e.value)
    assert "--overwrite" in str(e.value) and "train.resume=true" in str(e.value)
    assert (out / "adapter" / "adapter_model.safetensors").read_bytes() == stamp  # untouched
    old_id = RunDir(out).run_id()
    assert json.loads((out / "checkpoints" / "checkpoint-1" / "run.json").read_text())["run_id"] == old_id

    # --overwrite replaces the run's outputs (nothing else) and gives it a new id
    second = make_recipe(output_dir=str(out), train={"max_steps": 1, "save_steps": 1})
    train(second, overwrite=True, **QUIET)
    assert not (out / "summary.json").exists() and (out / "data.txt").read_text() == "user data"
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-1"]
    assert RunDir(out).run_id() != old_id
    # a checkpoint of another run is never resumed
    other = out / "checkpoints" / "checkpoint-1" / "run.json"
    other.write_text(json.dumps({"run_id": old_id, "loss_sum": 1.0}))
    write_manifest(other.parent)  # a whole checkpoint, just another run's
    resume = make_recipe(output_dir=str(out), train={"max_steps": 3, "save_steps": 1, "resume": True})
    with pytest.raises(UserError, match="checkpoint-1 belongs to another run"):
        train(resume, **QUIET)


def test_a_resumed_run_reports_the_whole_runs_mean_loss(make_recipe, tmp_path):
    import json

    steps = {"max_steps": 4, "save_steps": 2, "logging_steps": 1}
    full = train(make_recipe(output_dir=str(tmp_path / "full"), train=steps), **QUIET)
    # the same run, killed after its checkpoint at step 2 (with the rows it had logged by then), then resumed
    (tmp_path / "part" / "checkpoints").mkdir(parents=True)
    shutil.copytree(
        tmp_path / "full" / "checkpoints" / "checkpoint-2", tmp_path / "part" / "checkpoints" / "checkpoint-2"
    )
    rows = (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()
    (tmp_path / "part" / "metrics.jsonl").write_text("\n".join(rows[:2] + rows[-1:]) + "\n")  # + a stale summary row
    said: list[str] = []
    resumed = train(make_recipe(output_dir=str(tmp_path / "part"), train={**steps, "resume": True}), log=said.append)
    assert resumed.train_loss == pytest.approx(full.train_loss, abs=1e-6)
    assert resumed.padding_fraction == full.padding_fraction > 0  # the whole run's tokens, not steps 3-4's
    assert any(line.startswith("trained steps 3-4 in ") and "(resumed at step 2); the run's 4 steps:" in line
               for line in said), said  # fmt: skip
    meta = json.loads((tmp_path / "part" / "adapter" / "lora_llava.json").read_text())
    assert meta["train_loss"] == pytest.approx(full.train_loss, abs=1e-6)
    rows = [json.loads(ln) for ln in (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()]
    summaries = [r for r in rows if "train_loss" in r]
    assert len(summaries) == 1 and rows[-1] is summaries[0]  # the first run's summary row is gone
    assert summaries[0]["train_loss"] == pytest.approx(full.train_loss, abs=1e-6)
    assert summaries[0]["padding_fraction"] == pytest.approx(full.padding_fraction, abs=1e-4)


def test_keep_checkpoints_keeps_the_newest_and_the_best(make_recipe, tmp_path):
    import json

    # ten saves, keep 2, no eval: exactly the two newest remain
    plain = make_recipe(output_dir=str(tmp_path / "k"), train={"max_steps": 10, "save_steps": 1, "keep_checkpoints": 2})
    train(plain, **QUIET)
    assert [p.name for p in RunDir(tmp_path / "k").checkpoint_dirs()] == ["checkpoint-10", "checkpoint-9"]

    # with eval every 3 steps, the best by eval accuracy (then eval loss) is kept besides
    evald = make_recipe(
        output_dir=str(tmp_path / "e"),
        train={"max_steps": 10, "save_steps": 1, "keep_checkpoints": 2, "eval_steps": 3},
        eval={"max_samples": 4},
    )
    train(evald, **QUIET)
    rows = [json.loads(x) for x in (tmp_path / "e" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval_accuracy" in r]
    assert [r["step"] for r in evals] == [3, 6, 9, 10]
    best = max(evals, key=lambda r: (r["eval_accuracy"], -r["eval_loss"], -r["step"]))["step"]
    kept = {p.name for p in RunDir(tmp_path / "e").checkpoint_dirs()}
    assert kept == {"checkpoint-10", "checkpoint-9", f"checkpoint-{best}"}
    ev = json.loads((tmp_path / "e" / "checkpoints" / f"checkpoint-{best}" / "eval.json").read_text())
    assert ev["step"] == best and ev["n"] == 4


def test_resume_skips_a_damaged_checkpoint_and_says_so(make_recipe, tmp_path):
    from lora_llava.layout import checkpoint_problem

    recipe = make_recipe(output_dir=str(tmp_path / "d"), train={"max_steps": 4, "save_steps": 2})
    train(recipe, **QUIET)
    ckpts = tmp_path / "d" / "checkpoints"
    (tmp_path / "d" / "adapter").rename(tmp_path / "adapter-kept")  # as if the run had died after step 4
    weights = ckpts / "checkpoint-4" / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # same size, other content: only the hash tells
    weights.write_bytes(bytes(data))
    assert checkpoint_problem(ckpts / "checkpoint-4") is None  # sizes match ...
    assert "does not match its SHA-256" in checkpoint_problem(ckpts / "checkpoint-4", hashes=True)  # ... hashes not

    lines: list[str] = []
    resume = make_recipe(output_dir=str(tmp_path / "d"), train={"max_steps": 4, "save_steps": 2, "resume": True})
    result = train(resume, log=lines.append)
    assert any(
        ln.startswith("warning: skipping checkpoint-4: adapter_model.safetensors does not match") for ln in lines
    )
    assert f"resuming from {ckpts / 'checkpoint-2'}" in lines
    assert result.steps == 4
    a, b = adapter_tensors(tmp_path / "adapter-kept"), adapter_tensors(tmp_path / "d" / "adapter")
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k


def test_every_checkpoint_has_a_manifest_of_its_files(make_recipe, tmp_path):
    import hashlib
    import json

    recipe = make_recipe(output_dir=str(tmp_path / "m"), train={"max_steps": 1, "save_steps": 1})
    train(recipe, **QUIET)
    ckpt = tmp_path / "m" / "checkpoints" / "checkpoint-1"
    files = json.loads((ckpt / "manifest.json").read_text())["files"]
    on_disk = {str(p.relative_to(ckpt)) for p in ckpt.rglob("*") if p.is_file()} - {"manifest.json"}
    assert set(files) == on_disk
    for name, entry in files.items():
        blob = (ckpt / name).read_bytes()
        assert entry == {"size": len(blob), "sha256": hashlib.sha256(blob).hexdigest()}


def test_a_checkpoint_file_that_would_run_code_is_refused_in_one_line(make_recipe, tmp_path):
    import pickle

    from lora_llava.errors import UserError
    from lora_llava.layout import write_manifest

    recipe = make_recipe(output_dir=str(tmp_path / "r"), train={"max_steps": 2, "save_steps": 1})
    train(recipe, **QUIET)
    ckpt = tmp_path / "r" / "checkpoints" / "checkpoint-1"
    shutil.rmtree(tmp_path / "r" / "checkpoints" / "checkpoint-2")
    shutil.rmtree(tmp_path / "r" / "adapter")

    class Evil:
        def __reduce__(self):
            return (print, ("this ran",))

    (ckpt / "rng_state.pth").write_bytes(pickle.dumps({"python": Evil()}))
    (ckpt / "optimizer.pt").write_bytes(pickle.dumps(Evil()))
    write_manifest(ckpt)  # a checkpoint whose manifest agrees: the files themselves must be refused
    resumed = make_recipe(output_dir=str(tmp_path / "r"), train={"max_steps": 2, "save_steps": 1, "resume": True})
    with pytest.raises(UserError, match=r"checkpoint .*checkpoint-1 holds a file that is not plain tensors"):
        train(resumed, **QUIET)


def test_a_resume_whose_checkpoint_rotation_deletes_finishes_with_its_adapter(make_recipe, tmp_path):
    steps = {"max_steps": 4, "save_steps": 1, "keep_checkpoints": 1}
    train(make_recipe(output_dir=str(tmp_path / "full"), train={**steps, "max_steps": 2}), **QUIET)
    (tmp_path / "part" / "checkpoints").mkdir(parents=True)  # stopped after its checkpoint at step 2
    shutil.copytree(
        tmp_path / "full" / "checkpoints" / "checkpoint-2", tmp_path / "part" / "checkpoints" / "checkpoint-2"
    )
    said: list[str] = []
    result = train(make_recipe(output_dir=str(tmp_path / "part"), train={**steps, "resume": True}), log=said.append)
    assert result.steps == 4 and (tmp_path / "part" / "adapter" / "lora_llava.json").is_file()
    assert not (tmp_path / "part" / "checkpoints" / "checkpoint-2").exists()  # rotated away while training
    assert any(line.startswith("trained steps 3-4 in ") for line in said), said
