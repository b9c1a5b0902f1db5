"""lora-llava quickstart end to end: synthetic data, base eval, train, eval, merge, merged eval, summary."""

from __future__ import annotations

import json
from pathlib import Path

from lora_llava.cli.main import main


def test_quickstart_runs_the_whole_pipeline(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code = main(["quickstart", "train.max_steps=40", "eval.max_samples=16", "output_dir=runs/qs"])
    out = capsys.readouterr().out
    assert code == 0
    assert "wrote the synthetic shapes dataset to runs/quickstart/data" in out
    for stage in ("== 1/5 base model (tiny)", "== 2/5 train", "== 3/5 trained adapter", "== 4/5 merge", "== 5/5"):
        assert stage in out
    summary = json.loads(Path("runs/qs/summary.json").read_text())
    assert summary["train_steps"] == 40 and summary["eval_samples"] == 16
    assert summary["merged_equals_adapter"] == "16/16"
    assert summary["accuracy"]["adapter"] == summary["accuracy"]["merged"]
    assert summary["accuracy"]["adapter"] > summary["accuracy"]["base"]
    assert {p.name for p in Path("runs/qs").iterdir()} >= {
        "adapter", "merged", "recipe.yaml", "metrics.jsonl", "summary.json", "eval_predictions.json", "curves.png"
    }  # fmt: skip
    # the recipe evaluates every 50 steps and at the end: here (40 steps) at the end only
    assert [p.name for p in Path("runs/qs/eval").iterdir()] == ["step-40.jsonl"]
    assert len(Path("runs/qs/eval/step-40.jsonl").read_text().splitlines()) == 16
    line = next(ln for ln in out.splitlines() if ln.startswith("accuracy  base"))
    assert line.endswith("(16 eval samples)")


def test_quickstart_warns_when_only_the_training_data_is_yours(shapes, tmp_path, monkeypatch, capsys):
    """data.train overridden, data.eval still the synthetic shapes: one warning line before training, naming
    both and the ways out (which are recipes that load); the pipeline itself is not run here."""
    import lora_llava.pipeline
    from lora_llava.config import load_recipe
    from lora_llava.recipes import recipe_path

    monkeypatch.chdir(tmp_path)
    before_training = []
    monkeypatch.setattr(
        lora_llava.pipeline, "run_pipeline", lambda recipe, **kw: before_training.append(capsys.readouterr().err)
    )
    mine = [f"data.train.0.path={shapes / 'train.json'}", f"data.train.0.image_folder={shapes / 'images'}"]
    assert main(["quickstart", *mine, "output_dir=runs/mine"]) == 0
    warning = [ln for ln in before_training[0].splitlines() if ln.startswith("warning:")]
    assert warning == [
        f"warning: the training data is yours (data.train.0 ({shapes / 'train.json'})) but the eval data is still "
        "the synthetic shapes set (data.eval.0 (runs/quickstart/data/eval.json)): the accuracies would score "
        "shapes, not your task; override data.eval too (data.eval.0.path=FILE data.eval.0.image_folder=DIR), or "
        "carve eval from your training data (data.eval=[] data.eval_split=0.1)"
    ]
    # no warning: the whole quickstart on shapes, both data overridden, or eval carved from the training data
    eval_too = [f"data.eval.0.path={shapes / 'eval.json'}", f"data.eval.0.image_folder={shapes / 'images'}"]
    for overrides in ([], [*mine, *eval_too], [*mine, "data.eval=[]", "data.eval_split=0.1"]):
        load_recipe(recipe_path("quickstart"), overrides)  # the ways out the warning names are valid recipes
        assert main(["quickstart", *overrides, "output_dir=runs/other", "--overwrite"]) == 0
        assert "warning:" not in before_training[-1], overrides
    assert len(before_training) == 4


def test_train_warns_too_when_it_evaluates_your_run_on_the_shapes(shapes, tmp_path, monkeypatch, capsys):
    import lora_llava.workflows

    monkeypatch.chdir(tmp_path)
    said = []
    monkeypatch.setattr(lora_llava.workflows, "train", lambda recipe, **kw: said.append(capsys.readouterr().err))
    mine = [f"data.train.0.path={shapes / 'train.json'}", f"data.train.0.image_folder={shapes / 'images'}"]
    assert main(["train", "quickstart", *mine, "output_dir=runs/mine"]) == 0  # quickstart evaluates while training
    assert any(ln.startswith("warning: the training data is yours") for ln in said[0].splitlines())
    assert main(["train", "quickstart", *mine, "train.eval_steps=null", "output_dir=runs/mine2"]) == 0
    assert "warning:" not in said[1]  # no eval during training: nothing would score the shapes
