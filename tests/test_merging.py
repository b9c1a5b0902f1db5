"""Merging: a plain 16-bit checkpoint, verified against the adapter; refusals."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import quiet
from safetensors.torch import load_file

from lora_llava.errors import UserError


def test_merge_of_a_next_run_loads_with_its_class(make_recipe, tmp_path):
    from transformers import AutoConfig, LlavaNextForConditionalGeneration

    from lora_llava.merging import merge
    from lora_llava.workflows import train

    recipe = make_recipe(
        backbone="tiny-next", output_dir=str(tmp_path / "run"), images={"max_tiles": 2}, train={"max_steps": 2}
    )
    train(recipe, log=lambda *_: None)
    # float32: a 2-step model's near-tied greedy answers would flip with bf16 storage rounding
    report = merge(str(tmp_path / "run"), str(tmp_path / "merged"), dtype="float32", log=lambda *_: None)
    assert AutoConfig.from_pretrained(tmp_path / "merged").architectures == ["LlavaNextForConditionalGeneration"]
    model, info = LlavaNextForConditionalGeneration.from_pretrained(tmp_path / "merged", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert all(max(p) // 32 * (min(p) // 32) <= 2 for p in model.config.image_grid_pinpoints)
    assert report.parity.answers_equal == report.parity.answers_total
    assert report.parity.max_abs_logit_diff < 0.1
    # the trained image newline made it into the merged weights
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "run" / "adapter" / "projector.safetensors")["image_newline"]
    assert torch.allclose(model.model.image_newline.float(), saved.float(), atol=1e-2)


MERGED_FILES = {
    "chat_template.jinja",
    "config.json",
    "generation_config.json",
    "lora_llava.json",
    "manifest.json",  # every file's size and SHA-256, checked when it is opened as a model
    "merge_report.json",
    "model.safetensors",
    "processor_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
}


@pytest.fixture(scope="module")
def merged(trained_run, tmp_path_factory):
    from lora_llava.merging import merge

    out = tmp_path_factory.mktemp("merge") / "merged"
    report = merge(str(trained_run), str(out), log=quiet)
    return out, report


def test_merge_output_is_plain_16bit_checkpoint(merged):
    from transformers import LlavaForConditionalGeneration

    out, report = merged
    assert {p.name for p in out.iterdir()} == MERGED_FILES
    assert [p.name for p in out.parent.iterdir()] == ["merged"]  # no temp dir left beside it, no lock
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
    # measured as users will run it: plain transformers loads the merged checkpoint in its stored dtype
    assert p.dtype == "bfloat16"


def test_merged_model_is_evaluated_in_its_stored_dtype(merged):
    import torch

    from lora_llava.infer import load_model

    out, _ = merged
    assert next(load_model(out).model.parameters()).dtype == torch.bfloat16


def test_merge_refuses_non_empty_output(trained_run, tmp_path):
    from lora_llava.merging import merge

    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(UserError, match="exists and is not empty"):
        merge(str(trained_run), str(out), log=quiet)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_merge_refuses_merged_dir(merged, tmp_path):
    from lora_llava.merging import merge

    out, _ = merged
    with pytest.raises(UserError, match="is already merged; this needs a run or adapter directory"):
        merge(str(out), str(tmp_path / "again"), log=quiet)
    assert not (tmp_path / "again").exists()


def test_merge_into_original_weights_shows_quantization_error(trained_run, merged, tmp_path):
    from lora_llava.merging import merge

    _, dequantized = merged
    original = merge(str(trained_run), str(tmp_path / "orig"), base_mode="original", log=quiet)
    assert original.base == "original"
    assert original.parity.max_abs_logit_diff > dequantized.parity.max_abs_logit_diff


def test_verification_includes_the_model_requantized_to_4bit(merged):
    _, report = merged
    p = report.parity
    assert p.quantized_answers_equal is not None and len(p.quantized_answers) == p.answers_total
    assert set(p.accuracy) == {"adapter", "merged", "quantized"}
    assert p.no_op is False and p.passed is None  # no merge.min_agreement set


def test_a_broken_merge_fails_verification_and_is_kept_marked(trained_run, tmp_path, monkeypatch):
    import dataclasses

    import lora_llava.merging as merging
    from lora_llava.config.load import load_recipe, save_recipe
    from lora_llava.layout import read_meta

    run = tmp_path / "run"
    import shutil

    shutil.copytree(trained_run, run)
    recipe = load_recipe(run / "adapter" / "recipe.yaml")
    strict = dataclasses.replace(recipe, merge=dataclasses.replace(recipe.merge, min_agreement=1.0))
    save_recipe(strict, run / "adapter" / "recipe.yaml")
    real_fold = merging.fold

    def broken_fold(*args, **kwargs):  # a merge that loses the trained projector
        model, *rest = real_fold(*args, **kwargs)
        with torch.no_grad():
            for p in model.model.multi_modal_projector.parameters():
                p.zero_()
        return (model, *rest)

    monkeypatch.setattr(merging, "fold", broken_fold)
    with pytest.raises(UserError, match=r"merge verification failed: merged == adapter answers \d/4, below "):
        merging.merge(str(run), str(tmp_path / "bad"), log=quiet)
    assert read_meta(tmp_path / "bad").verified is False  # kept, and marked
    assert json.loads((tmp_path / "bad" / "merge_report.json").read_text())["parity"]["passed"] is False


def test_a_no_op_adapter_is_flagged(make_recipe, tmp_path):
    from lora_llava.merging import merge
    from lora_llava.workflows import train

    recipe = make_recipe(train={"max_steps": 1, "learning_rate": 0.0}, projector={"learning_rate": 0.0})
    train(recipe, log=quiet)
    lines = []
    report = merge(str(tmp_path / "run"), str(tmp_path / "m"), log=lines.append)
    assert report.parity.no_op is True
    assert any(ln.startswith("warning: the adapter changes nothing") for ln in lines)


def test_large_merges_are_sharded(trained_run, tmp_path):
    import dataclasses
    import shutil

    from transformers import LlavaForConditionalGeneration

    from lora_llava.config.load import load_recipe, save_recipe
    from lora_llava.merging import merge
    from lora_llava.publish import plan_push

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    recipe = load_recipe(run / "adapter" / "recipe.yaml")
    small = dataclasses.replace(
        recipe, merge=dataclasses.replace(recipe.merge, max_shard_size="200KB", verify_quantized=False)
    )
    save_recipe(small, run / "adapter" / "recipe.yaml")
    merge(str(run), str(run / "merged"), log=quiet)
    shards = sorted(p.name for p in (run / "merged").glob("model-*.safetensors"))
    assert len(shards) > 1 and (run / "merged" / "model.safetensors.index.json").is_file()
    _, info = LlavaForConditionalGeneration.from_pretrained(run / "merged", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    pushed = {f.path_in_repo for f in plan_push(str(run), "me/x", merged=True).files}
    assert set(shards) | {"model.safetensors.index.json"} <= pushed


def test_a_merge_is_verified_before_it_stands_and_min_agreement_needs_samples(trained_run, tmp_path, monkeypatch):
    import dataclasses
    import shutil

    import lora_llava.merging as merging
    from lora_llava.config.load import load_recipe, save_recipe

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)

    def killed(*args, **kwargs):  # the process dies while verifying (here: an error in the middle of it)
        raise RuntimeError("killed during verification")

    with monkeypatch.context() as m:
        m.setattr(merging, "verify", killed)
        with pytest.raises(RuntimeError, match="killed during verification"):
            merging.merge(str(run), str(tmp_path / "m1"), log=quiet)
    assert not (tmp_path / "m1").exists()  # no unverified merged model left for push or demo to pick up
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".m1-")]
    recipe = load_recipe(run / "adapter" / "recipe.yaml")
    strict = dataclasses.replace(recipe, merge=dataclasses.replace(recipe.merge, min_agreement=1.0))
    save_recipe(strict, run / "adapter" / "recipe.yaml")
    monkeypatch.chdir(tmp_path)  # the recipe's data paths do not resolve from here
    with pytest.raises(UserError, match=r"merge.min_agreement=1.0 needs samples .* nothing was written to"):
        merging.merge(str(run), str(tmp_path / "m2"), log=quiet, verify_samples=[])
    assert not (tmp_path / "m2").exists()
