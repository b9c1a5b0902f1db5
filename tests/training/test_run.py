"""Training a recipe: the run directory, adapter metadata, metrics, a reloaded adapter equals the trained model, determinism, wandb."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from helpers import PROJECTOR, quiet
from safetensors.torch import load_file

ADAPTER_FILES = {
    "README.md",  # PEFT's model card
    "adapter_config.json",
    "adapter_model.safetensors",
    "chat_template.jinja",
    "lora_llava.json",
    "manifest.json",
    "processor_config.json",
    "projector.safetensors",
    "recipe.yaml",
    "tokenizer.json",
    "tokenizer_config.json",
}


def test_run_dir_layout(trained_run: Path):
    # without train.save_steps no checkpoints/ folder is left behind
    assert {p.name for p in trained_run.iterdir()} == {
        "adapter",
        "curves.png",
        "data_report.txt",
        "metrics.jsonl",
        "recipe.yaml",
        "run.json",
    }
    assert not [p.name for p in trained_run.parent.rglob(".*")]  # no .adapter-* leftovers, no lock left behind
    assert {p.name for p in (trained_run / "adapter").iterdir()} == ADAPTER_FILES
    assert all((trained_run / "adapter" / f).is_file() for f in ADAPTER_FILES)


def test_adapter_meta(trained_run: Path):
    meta = json.loads((trained_run / "adapter" / "lora_llava.json").read_text())
    assert meta["format"] == "lora_llava-adapter/1"
    assert meta["backbone"] == "tiny"
    assert meta["source"] == "builtin:tiny"
    assert meta["chat_format"] == "vicuna_v1"
    assert meta["projector_trained"] is True
    assert meta["steps"] == 40
    assert meta["train_samples"] == 96
    assert meta["quantization"] == {
        "load_in_4bit": True,
        "quant_type": "nf4",
        "double_quant": True,
        "compute_dtype": "float32",
    }
    assert math.isfinite(meta["train_loss"])
    cfg = json.loads((trained_run / "adapter" / "adapter_config.json").read_text())
    assert cfg["r"] == 8 and cfg["lora_alpha"] == 16
    assert cfg["target_modules"].startswith("model\\.language_model\\.")


def test_metrics_jsonl(trained_run: Path):
    rows = [json.loads(line) for line in (trained_run / "metrics.jsonl").read_text().splitlines()]
    loss_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in loss_rows] == [1, 10, 20, 30, 40]  # logging_first_step + logging_steps=10
    assert all(math.isfinite(r["loss"]) for r in loss_rows)
    assert loss_rows[-1]["loss"] < loss_rows[0]["loss"]
    assert all(0.0 <= r["padding_fraction"] < 1.0 for r in loss_rows)
    # throughput: real tokens per second, of which the supervised (answer) tokens are a small share here
    assert all(0 < r["supervised_tokens_per_s"] < r["tokens_per_s"] / 4 for r in loss_rows)
    assert all(r["skipped_steps"] == 0 for r in loss_rows)
    meta = json.loads((trained_run / "adapter" / "lora_llava.json").read_text())
    assert rows[-1]["train_loss"] == meta["train_loss"]


def test_adapter_round_trip_restores_trained_weights(trained_run: Path, eval_samples, tiny_path):
    from lora_llava.infer import batch_inputs, load_model
    from lora_llava.model.trainability import get_module

    adapter = trained_run / "adapter"
    first = load_model(str(trained_run))
    second = load_model(str(adapter))
    assert first.kind == second.kind == "adapter"
    inputs, _ = batch_inputs(first, eval_samples[:4])
    with torch.no_grad():
        a = first.model(**inputs).logits
        b = second.model(**inputs).logits
    assert torch.isfinite(a).all()
    assert torch.equal(a, b)

    model = first.model
    assert sum(type(m).__name__ == "Linear4bit" and not hasattr(m, "base_layer") for m in model.modules()) == 14

    saved_proj = load_file(adapter / "projector.safetensors")
    live_proj = get_module(model, PROJECTOR).state_dict()
    assert set(saved_proj) == set(live_proj) == {"linear_1.weight", "linear_1.bias", "linear_2.weight", "linear_2.bias"}
    base = load_file(tiny_path / "model.safetensors")
    for k, v in saved_proj.items():
        assert torch.equal(live_proj[k], v), k
        assert not torch.equal(v, base[f"multi_modal_projector.{k}"]), f"projector {k} was not trained"

    saved_lora = load_file(adapter / "adapter_model.safetensors")
    # the projector rides along as PEFT modules_to_save, so plain PEFT restores it too
    carried = {k: v for k, v in saved_lora.items() if "lora_" not in k}
    assert carried.keys() == {f"base_model.model.{PROJECTOR}.{k}" for k in saved_proj}
    assert all(torch.equal(v, saved_proj[k.rsplit(PROJECTOR + ".", 1)[1]]) for k, v in carried.items())
    saved_lora = {k: v for k, v in saved_lora.items() if "lora_" in k}
    live = dict(model.named_parameters())
    assert len(saved_lora) == 28
    assert sum("lora_" in n for n in live) == 28
    for k, v in saved_lora.items():
        name = k.replace(".lora_A.weight", ".lora_A.default.weight").replace(".lora_B.weight", ".lora_B.default.weight")
        assert torch.equal(live[name], v), k
        if ".lora_B." in k:
            assert v.abs().max() > 0, f"{k} is still zero: not trained"


def test_two_identical_trainings_match(make_recipe, tmp_path):
    from lora_llava.workflows import train

    results = []
    for name in ("a", "b"):
        recipe = make_recipe(output_dir=str(tmp_path / name), train={"max_steps": 3})
        results.append(train(recipe, log=quiet))
    ra, rb = results
    assert ra.steps == rb.steps == 3
    assert math.isfinite(ra.train_loss)
    assert ra.train_loss == rb.train_loss  # bit-exact on CPU
    sa = load_file(ra.adapter_dir / "adapter_model.safetensors")
    sb = load_file(rb.adapter_dir / "adapter_model.safetensors")
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_wandb_offline_needs_no_account(make_recipe, tmp_path, monkeypatch):
    from lora_llava.workflows import train

    wandb_dir = tmp_path / "wandb"
    wandb_dir.mkdir()
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_DIR", raising=False)  # default: the run directory, not the current one
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(wandb_dir / "config"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(wandb_dir / "cache"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_PROJECT", raising=False)  # train() sets it; restored afterwards
    monkeypatch.setenv("WANDB_DIR", "")  # registered with monkeypatch, so train()'s setdefault is undone
    monkeypatch.delenv("WANDB_DIR")

    recipe = make_recipe(train={"max_steps": 1, "report_to": "wandb", "wandb_project": "lora-llava-test"})
    try:
        result = train(recipe, log=quiet)
    finally:
        import wandb

        if wandb.run is not None:
            wandb.finish()
    assert result.steps == 1 and math.isfinite(result.train_loss)
    runs = list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and not (tmp_path / "wandb" / "wandb").exists()
    assert len(list(runs[0].glob("run-*.wandb"))) == 1
    assert (result.adapter_dir / "adapter_model.safetensors").is_file()
