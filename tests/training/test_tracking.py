"""wandb gets the resolved recipe as its run config, secrets redacted: a canary never reaches its files."""

from __future__ import annotations

import json
from pathlib import Path

from lora_llava.training.tracking import REDACTED, redact
from lora_llava.workflows import train

CANARY = "canary-7f3a9c2e51d4"


def test_redact_secret_keys_and_secret_environment_values():
    value = {"hub": {"token": "abc", "api_key": "k"}, "notes": f"uses {CANARY}", "lr": 1e-3, "paths": [CANARY, "x"]}
    assert redact(value, {CANARY}) == {
        "hub": {"token": REDACTED, "api_key": REDACTED},
        "notes": REDACTED,
        "lr": 1e-3,
        "paths": [REDACTED, "x"],
    }


def test_a_secret_in_the_environment_never_reaches_wandbs_files(make_recipe, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("HF_TOKEN", CANARY)
    monkeypatch.setenv("MY_SERVICE_API_KEY", CANARY)
    monkeypatch.delenv("WANDB_DIR", raising=False)
    # and on the command line, which wandb records as the run's metadata unless told not to
    monkeypatch.setattr("sys.argv", ["lora-llava", "train", "my.yaml", f"note={CANARY}"])
    recipe = make_recipe(
        output_dir=str(tmp_path / "w"),
        train={"max_steps": 2, "report_to": "wandb", "eval_steps": 2},
        eval={"max_samples": 3},
    )
    train(recipe, log=lambda *_: None)
    files = [p for p in (tmp_path / "w" / "wandb").rglob("*") if p.is_file()]
    assert files, "wandb wrote nothing offline"
    assert not [p for p in files if CANARY.encode() in p.read_bytes()]
    # the recipe is the run's config (offline, wandb keeps it in the run's .wandb log)
    log = next(p for p in files if p.suffix == ".wandb").read_bytes()
    assert b"learning_rate" in log and b"backbone" in log
    assert b"eval/accuracy" in log and b"eval/loss" in log
    # the eval answers as a table with the images
    (table,) = [p for p in files if p.name.startswith("predictions_2_") and p.name.endswith(".table.json")]
    content = json.loads(table.read_text())
    assert content["columns"] == ["id", "image", "question", "prediction", "reference", "correct"]
    assert [row[0] for row in content["data"]] == ["eval-10", "eval-1", "eval-15"]  # eval.max_samples: 3
    assert all(row[1] == "Image" and row[4] in {"Red", "Green", "Blue", "Yellow"} for row in content["data"])
    assert Path(tmp_path / "w" / "adapter").is_dir()
