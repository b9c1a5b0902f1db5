"""Stage 1 then stage 2: the aligned model written above training, in the format it records."""

from __future__ import annotations

import json

import torch
from helpers import align_data

from lora_llava.artifacts import resolve_backbone
from lora_llava.data.chat import (
    VICUNA_SYSTEM,
    chat_format,
    format_for,
)


def test_stage1_then_stage2_on_an_assembled_llava(make_recipe, shapes, tmp_path):
    from safetensors.torch import load_file
    from transformers import LlavaForConditionalGeneration

    from lora_llava.workflows import train

    align = make_recipe(
        backbone="assemble",
        assemble={"vision_encoder": "tiny-clip", "language_model": "tiny-qwen2"},
        stage="align",
        output_dir=str(tmp_path / "align"),
        data={"train": [{"path": str(shapes / "align.json"), "image_folder": str(shapes / "images")}], "eval": []},
        train={"max_steps": 3},
    )
    train(align, log=lambda *_: None)
    run = tmp_path / "align"
    assert sorted(p.name for p in (run / "adapter").iterdir()) == sorted(
        [
            "chat_template.jinja",
            "lora_llava.json",
            "manifest.json",
            "processor_config.json",
            "projector.safetensors",
            "recipe.yaml",
            "tokenizer.json",
            "tokenizer_config.json",
        ]
    )  # no LoRA: only the projector trained
    assembled = LlavaForConditionalGeneration.from_pretrained(run / "assembled")
    aligned, info = LlavaForConditionalGeneration.from_pretrained(run / "model", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    trained = load_file(run / "adapter" / "projector.safetensors")
    for k, v in aligned.model.multi_modal_projector.state_dict().items():
        assert torch.allclose(v.float(), trained[k].float(), atol=1e-2), k
        assert not torch.equal(v.float(), assembled.model.multi_modal_projector.state_dict()[k].float()), k
    lm_a = aligned.model.language_model.layers[0].mlp.up_proj.weight
    lm_b = assembled.model.language_model.layers[0].mlp.up_proj.weight
    assert torch.equal(lm_a, lm_b.to(lm_a.dtype))  # the frozen LLM is kept as it was (no NF4 round trip)

    instruct = make_recipe(backbone=str(run), output_dir=str(tmp_path / "instruct"), train={"max_steps": 2})
    result = train(instruct, log=lambda *_: None)
    meta = json.loads((tmp_path / "instruct" / "adapter" / "lora_llava.json").read_text())
    assert meta["backbone"] == str(run / "model") and meta["chat_format"] == "chatml"
    assert result.steps == 2


def test_stage1_with_text_only_batches_and_a_rerun(make_recipe, shapes, tmp_path):
    """Text-only samples reach no trainable weight while only the projector trains (chat-style stage 1; the
    plain format takes image-caption pairs only): no crash; re-running stage 1 (with overwrite) replaces its model/."""
    from lora_llava.workflows import train

    recs = json.loads((shapes / "align.json").read_text())[:16]
    recs += [{"id": f"t{i}", "conversations": [{"from": "human", "value": "Say hi."}, {"from": "gpt", "value": "Hi."}]}
             for i in range(8)]  # fmt: skip
    (tmp_path / "mixed.json").write_text(json.dumps(recs))
    recipe = make_recipe(
        stage="align", output_dir=str(tmp_path / "align"), chat={"format": "vicuna_v1"},
        data={"train": [{"path": str(tmp_path / "mixed.json"), "image_folder": str(shapes / "images")}], "eval": []},
        train={"max_steps": 6, "batch_size": 4},
    )  # fmt: skip
    first = train(recipe, log=lambda *_: None)
    assert first.steps == 6
    stamp = (tmp_path / "align" / "model" / "model.safetensors").stat().st_mtime_ns
    second = train(recipe, log=lambda *_: None, overwrite=True)
    assert second.steps == 6
    assert (tmp_path / "align" / "model" / "model.safetensors").stat().st_mtime_ns != stamp


def test_stage1_plain_renders_image_and_caption_and_records_itself(make_recipe, shapes, tmp_path):
    from lora_llava.training.prepare import prepare_run
    from lora_llava.workflows import train

    recipe = make_recipe(stage="align", data=align_data(tmp_path, shapes), train={"max_steps": 1})
    p = prepare_run(recipe, log=lambda *_: None)
    processor, encoder, report = p.processor, p.encoder, p.report
    assert encoder.fmt.name == "plain"
    sample = report.train[0]
    ids, labels = encoder.tokens(sample, [(64, 64)])
    tok = processor.tokenizer
    caption = sample.messages[-1][1]
    assert tok.decode(ids, skip_special_tokens=False).replace("<image>", "") == f"<s>{caption}\n"
    assert tok.decode([i for i, lab in zip(ids, labels) if lab != -100]) == caption + "\n"
    train(recipe, log=lambda *_: None)
    adapter_meta = json.loads((tmp_path / "run" / "adapter" / "lora_llava.json").read_text())
    model_meta = json.loads((tmp_path / "run" / "model" / "lora_llava.json").read_text())
    assert (adapter_meta["chat_format"], adapter_meta["backbone_chat_format"]) == ("plain", "vicuna_v1")
    assert (model_meta["chat_format"], model_meta["align_format"]) == ("vicuna_v1", "plain")
    assert model_meta["system_prompt"] == VICUNA_SYSTEM
    assert (tmp_path / "run" / "adapter" / "chat_template.jinja").read_text() == chat_format("plain").jinja
    model_template = (tmp_path / "run" / "model" / "chat_template.jinja").read_text()
    assert model_template == format_for("vicuna_v1", tok).jinja
    # stage 2 from the aligned model trains in the backbone's own format
    assert resolve_backbone(str(tmp_path / "run")).chat_format == "vicuna_v1"


# -- the eval plan: what a model is evaluated on, and how ---------------------------------------------------


def test_eval_plan_of_a_run_is_its_own_eval_data_and_settings(trained_run, shapes):
    import pytest

    from lora_llava.errors import UserError
    from lora_llava.workflows import eval_plan

    plan = eval_plan(trained_run)
    assert len(plan.samples) == 16 and plan.where == "the run's eval data" and plan.bad == []
    assert (plan.max_new_tokens, plan.batch_size) == (4, 16)  # the recipe's eval section
    assert plan.settings_from == f"the run's recipe ({trained_run / 'adapter' / 'recipe.yaml'})"
    assert plan.artifact is not None and plan.artifact.kind == "run" and plan.recipe is not None
    plan = eval_plan(trained_run, max_samples=5, batch_size=2)  # arguments win, setting by setting
    assert len(plan.samples) == 5 and (plan.max_new_tokens, plan.batch_size) == (4, 2)

    plan = eval_plan("tiny", shapes / "eval.json", image_folder=shapes / "images", max_samples=3)
    assert len(plan.samples) == 3 and plan.where == str(shapes / "eval.json")
    assert (plan.max_new_tokens, plan.batch_size, plan.settings_from) == (16, 8, "the defaults")
    with pytest.raises(UserError, match="--data is needed: 'tiny' is a backbone, which records no eval data"):
        eval_plan("tiny")

    plan = eval_plan(trained_run, images=shapes / "images", prompt="What color?", bad="keep")
    assert plan.where == str(shapes / "images") and len(plan.samples) == len(list((shapes / "images").iterdir()))
    assert plan.samples[0].messages[-2][1].endswith("What color?")


def test_eval_plan_bad_samples_error_skip_or_keep(shapes, tmp_path):
    import pytest

    from lora_llava.errors import UserError
    from lora_llava.workflows import eval_plan

    records = json.loads((shapes / "eval.json").read_text())[:3] + [
        {"id": "x", "image": "nope.png", "conversations": []}
    ]
    data = tmp_path / "eval.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    with pytest.raises(UserError, match="1 bad sample"):
        eval_plan("tiny", data, image_folder=shapes / "images")
    said: list[str] = []
    plan = eval_plan("tiny", data, image_folder=shapes / "images", bad="skip", warn=said.append)
    assert len(plan.samples) == 3 and [b.id for b in plan.bad] == ["x"]
    assert said[0].startswith("skipping 1 bad sample(s):\n  ") and "'conversations' is empty" in said[0]
    (tmp_path / "empty.json").write_text("[]")
    with pytest.raises(UserError, match="no samples to score in"):
        eval_plan("tiny", tmp_path / "empty.json", bad="skip")
    assert eval_plan("tiny", tmp_path / "empty.json", bad="keep").samples == []  # predict: nothing to write
    # a recipe data entry's options, as mappings or YAML text
    odd = [{"qid": r["id"], "img": r["image"], "conversations": r["conversations"]} for r in records[:3]]
    (tmp_path / "odd.json").write_text(json.dumps(odd))
    for columns in ("{id: qid, image: img}", {"id": "qid", "image": "img"}):
        plan = eval_plan("tiny", tmp_path / "odd.json", image_folder=shapes / "images", columns=columns)
        assert [s.id for s in plan.samples] == [r["id"] for r in records[:3]]
    with pytest.raises(UserError, match="--columns '{id: ': not YAML"):
        eval_plan("tiny", tmp_path / "odd.json", columns="{id: ")


def test_eval_plan_carves_a_runs_eval_split_without_loading_the_model(trained_run, tmp_path):
    """A run whose eval data is carved from its training data (data.eval_split) needs its encoder: given, or
    read from its processor."""
    import shutil

    import yaml

    from lora_llava.infer import adapter_encoder
    from lora_llava.workflows import eval_plan, run_eval_samples

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    raw = yaml.safe_load((run / "adapter" / "recipe.yaml").read_text())
    raw["data"].update(eval=[], eval_split=8)
    (run / "adapter" / "recipe.yaml").write_text(yaml.safe_dump(raw))
    plan = eval_plan(run)
    train_ids = {r["id"] for r in json.loads(open(raw["data"]["train"][0]["path"]).read())}
    assert len(plan.samples) == 8 and {s.id for s in plan.samples} <= train_ids
    assert plan.recipe is not None
    from lora_llava.artifacts import open_artifact

    same = run_eval_samples(plan.recipe, adapter_encoder(open_artifact(run)))
    assert [s.id for s in same] == [s.id for s in plan.samples]


def test_recipe_eval_plan_caps_at_the_recipes_max_samples(make_recipe, shapes):
    from lora_llava.data.formats import read_source
    from lora_llava.workflows import recipe_eval_plan

    recipe = make_recipe(eval={"max_samples": 5, "batch_size": 3, "max_new_tokens": 7})
    samples, _ = read_source(recipe.data.eval[0])
    plan = recipe_eval_plan(recipe, samples)
    assert [s.id for s in plan.samples] == [s.id for s in samples[:5]]
    assert (plan.max_new_tokens, plan.batch_size, plan.where) == (7, 3, "the run's eval data")


def test_a_merged_model_is_scored_with_the_eval_settings_of_its_run(trained_run, tmp_path):
    import dataclasses
    import shutil

    from lora_llava.config.load import load_recipe, save_recipe
    from lora_llava.merging import merge
    from lora_llava.workflows import eval_plan

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    recipe = load_recipe(run / "adapter" / "recipe.yaml")
    save_recipe(dataclasses.replace(recipe, eval=dataclasses.replace(recipe.eval, max_new_tokens=24)),
                run / "adapter" / "recipe.yaml")  # fmt: skip
    elsewhere = tmp_path / "elsewhere" / "merged"  # not inside its run: found through merged_from
    merge(str(run), str(elsewhere), log=lambda *_: None)
    data = str(run.parent / "shapes_eval.json")
    shutil.copy(recipe.data.eval[0].path, data)
    for model in (run, elsewhere):
        plan = eval_plan(model, data, image_folder=recipe.data.eval[0].image_folder)
        assert plan.max_new_tokens == 24 and "recipe.yaml" in plan.settings_from, model
