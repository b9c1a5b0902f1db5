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
