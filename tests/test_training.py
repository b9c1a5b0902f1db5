"""Training end to end on tiny: the run directory and adapter artifact, reloading it as trained,
reproducibility, merging into plain 16-bit weights, evaluation and offline wandb.

Usage: ``python -m pytest -q tests/test_training.py``
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lora_llava.errors import UserError

PROJECTOR = "model.multi_modal_projector"
ADAPTER_FILES = {
    "README.md",  # PEFT's model card
    "adapter_config.json",
    "adapter_model.safetensors",
    "chat_template.jinja",
    "lora_llava.json",
    "processor_config.json",
    "projector.safetensors",
    "recipe.yaml",
    "tokenizer.json",
    "tokenizer_config.json",
}
MERGED_FILES = {
    "chat_template.jinja",
    "config.json",
    "generation_config.json",
    "lora_llava.json",
    "merge_report.json",
    "model.safetensors",
    "processor_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
}


def _quiet(*_):
    pass


@pytest.fixture(scope="module")
def eval_samples(shapes):
    from lora_llava.config import DataSource
    from lora_llava.data.formats import read_source

    samples, bad = read_source(DataSource(path=str(shapes / "eval.json"), image_folder=str(shapes / "images")))
    assert not bad and len(samples) == 16
    return samples


# -- the artifact --------------------------------------------------------------------------------


def test_run_dir_layout(trained_run: Path):
    # without train.save_steps no checkpoints/ folder is left behind
    assert {p.name for p in trained_run.iterdir()} == {"adapter", "metrics.jsonl", "recipe.yaml"}
    assert not [p.name for p in trained_run.parent.rglob(".*")]  # no .adapter-* / .adapter-old leftovers
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
    meta = json.loads((trained_run / "adapter" / "lora_llava.json").read_text())
    assert rows[-1]["train_loss"] == meta["train_loss"]


# -- reloading -----------------------------------------------------------------------------------


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
        results.append(train(recipe, log=_quiet))
    ra, rb = results
    assert ra.steps == rb.steps == 3
    assert math.isfinite(ra.train_loss)
    assert ra.train_loss == rb.train_loss  # bit-exact on CPU
    sa = load_file(ra.adapter_dir / "adapter_model.safetensors")
    sb = load_file(rb.adapter_dir / "adapter_model.safetensors")
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


# -- merging -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def merged(trained_run, tmp_path_factory):
    from lora_llava.merging import merge

    out = tmp_path_factory.mktemp("merge") / "merged"
    report = merge(str(trained_run), str(out), log=_quiet)
    return out, report


def test_merge_output_is_plain_16bit_checkpoint(merged):
    from transformers import LlavaForConditionalGeneration

    out, report = merged
    assert {p.name for p in out.iterdir()} == MERGED_FILES
    assert [p.name for p in out.parent.iterdir()] == ["merged"]  # no temp dir left beside it
    assert json.loads((out / "merge_report.json").read_text()) == json.loads(json.dumps(report.to_json()))
    assert report.dtype == "bfloat16" and report.base == "dequantized"

    weights = load_file(out / "model.safetensors")
    assert {v.dtype for v in weights.values()} == {torch.bfloat16}
    assert not [k for k in weights if "lora_" in k or "absmax" in k or "quant" in k]

    model, info = LlavaForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert getattr(model.config, "quantization_config", None) is None
    assert model.dtype == torch.bfloat16
    assert not [n for n, m in model.named_modules() if type(m).__name__ == "Linear4bit" or "lora_" in n]
    meta = json.loads((out / "lora_llava.json").read_text())
    assert meta["merged"] is True and meta["backbone"] == "tiny" and meta["chat_format"] == "vicuna_v1"


def test_merge_parity(merged):
    _, report = merged
    p = report.parity
    assert p.samples == 4
    assert p.answers_equal == p.answers_total == 4
    assert p.adapter_answers == p.merged_answers
    assert 0.0 <= p.max_abs_logit_diff < 0.1


def test_merge_refuses_non_empty_output(trained_run, tmp_path):
    from lora_llava.merging import merge

    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(UserError, match="exists and is not empty"):
        merge(str(trained_run), str(out), log=_quiet)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_merge_refuses_merged_dir(merged, tmp_path):
    from lora_llava.merging import merge

    out, _ = merged
    with pytest.raises(UserError, match="is already merged; this needs a run or adapter directory"):
        merge(str(out), str(tmp_path / "again"), log=_quiet)
    assert not (tmp_path / "again").exists()


def test_merge_into_original_weights_shows_quantization_error(trained_run, merged, tmp_path):
    from lora_llava.merging import merge

    _, dequantized = merged
    original = merge(str(trained_run), str(tmp_path / "orig"), base_mode="original", log=_quiet)
    assert original.base == "original"
    assert original.parity.max_abs_logit_diff > dequantized.parity.max_abs_logit_diff


# -- evaluation ----------------------------------------------------------------------------------


def test_evaluate(trained_run, eval_samples):
    from lora_llava.infer import evaluate, load_model

    result = evaluate(load_model(str(trained_run)), eval_samples, max_new_tokens=4)
    assert result.n == len(eval_samples) == 16
    assert 0.0 <= result.accuracy <= 1.0
    assert result.accuracy == result.correct / 16
    assert result.correct == sum(r["correct"] for r in result.predictions)
    assert [r["id"] for r in result.predictions] == [s.id for s in eval_samples]


def test_normalize():
    from lora_llava.infer import normalize

    assert normalize("Red.") == normalize(" red") == "red"
    assert normalize('"Blue!"') == "blue"
    assert normalize("red") != normalize("green")


# -- wandb ---------------------------------------------------------------------------------------


def test_wandb_offline_needs_no_account(make_recipe, tmp_path, monkeypatch):
    from lora_llava.workflows import train

    wandb_dir = tmp_path / "wandb"
    wandb_dir.mkdir()
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(wandb_dir))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(wandb_dir / "config"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(wandb_dir / "cache"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_PROJECT", raising=False)  # train() sets it; restored afterwards

    recipe = make_recipe(train={"max_steps": 1, "report_to": "wandb", "wandb_project": "lora-llava-test"})
    try:
        result = train(recipe, log=_quiet)
    finally:
        import wandb

        if wandb.run is not None:
            wandb.finish()
    assert result.steps == 1 and math.isfinite(result.train_loss)
    runs = list((wandb_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    assert len(list(runs[0].glob("run-*.wandb"))) == 1
    assert (result.adapter_dir / "adapter_model.safetensors").is_file()
