"""Preparing a run before any weights load: refused combinations, stage-1 samples, tile caps."""

from __future__ import annotations

import pytest
from helpers import align_data


def test_pad_to_square_is_refused_for_anyres_backbones(make_recipe):
    from lora_llava.errors import UserError
    from lora_llava.training.prepare import prepare_run

    with pytest.raises(UserError, match="images.pad_to_square is LLaVA-1.5's image handling; backbone tiny-next"):
        prepare_run(make_recipe(backbone="tiny-next", images={"pad_to_square": True}), log=lambda *_: None)


def test_stage1_plain_reports_samples_it_cannot_render(make_recipe, shapes, tmp_path):
    from lora_llava.errors import UserError
    from lora_llava.training.prepare import prepare_run

    extra = [
        {"id": "text-only", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."}]},
        {"id": "two-turns", "image": "train_0000.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "A shape."},
            {"from": "human", "value": "Color?"}, {"from": "gpt", "value": "Red."}]},
    ]  # fmt: skip
    recipe = make_recipe(stage="align", data=align_data(tmp_path, shapes, extra))
    with pytest.raises(UserError) as e:
        prepare_run(recipe, log=lambda *_: None)
    msg = str(e.value)
    assert msg.startswith("2 bad sample(s) of 14:")
    assert "(id text-only): chat format plain (stage-1 alignment) needs an image in every sample" in msg
    assert "(id two-turns): chat format plain (stage-1 alignment) takes one image and one caption per sample" in msg


def test_stage1_chat_style_gives_bare_captions_a_brief_instruction(make_recipe, shapes, tmp_path):
    from lora_llava.data.prompts import BRIEF_DESCRIPTION_PROMPTS
    from lora_llava.training.prepare import prepare_run

    bare = [{"id": f"bare-{i}", "image": "train_0001.png", "conversations": [
        {"from": "human", "value": "<image>"}, {"from": "gpt", "value": "A red circle."}]} for i in range(6)]  # fmt: skip
    data = align_data(tmp_path, shapes, bare)
    recipe = make_recipe(stage="align", data=data, chat={"format": "vicuna_v1"})
    report = prepare_run(recipe, log=lambda *_: None).report
    prompts = {s.id: s.messages[0][1] for s in report.train if s.id.startswith("bare-")}
    assert all(
        p.startswith("<image>\n") and p[len("<image>\n") :] in BRIEF_DESCRIPTION_PROMPTS for p in prompts.values()
    )
    assert len(set(prompts.values())) > 1  # drawn per sample ...
    again = {s.id: s.messages[0][1] for s in prepare_run(recipe, log=lambda *_: None).report.train if s.id in prompts}
    assert again == prompts  # ... and the same on every run
    written = {s.id: s.messages[0][1] for s in report.train if not s.id.startswith("bare-")}
    assert all("<image>\n" in p and p.split("\n", 1)[1] for p in written.values())  # instructions kept as written


def test_a_tile_cap_that_caps_nothing_is_reported(make_recipe):
    from lora_llava.training.prepare import prepare_run

    report = prepare_run(make_recipe(backbone="tiny-next", images={"max_tiles": 4}), log=lambda *_: None).report
    assert "images.max_tiles=4 caps nothing: every AnyRes grid of tiny-next has at most 4 tiles" in report.summary()
    report = prepare_run(make_recipe(backbone="tiny-next", images={"max_tiles": 3}), log=lambda *_: None).report
    assert "caps nothing" not in report.summary()


def test_a_misspelt_lora_target_is_reported_before_any_weights_load(make_recipe, monkeypatch):
    import lora_llava.model.loading as loading
    from lora_llava.errors import UserError
    from lora_llava.training.prepare import prepare_run

    monkeypatch.setattr(loading, "load_base", lambda *a, **k: pytest.fail("weights were loaded"))
    recipe = make_recipe(lora={"target_modules": ["q_proj", "v_prj"]})
    with pytest.raises(UserError) as e:
        prepare_run(recipe, log=lambda *_: None)
    assert str(e.value).startswith(
        "lora.target_modules: 'v_prj' match(es) no linear layer of the language model (its linear layers: down_proj, "
        "gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj)"
    )
    recipe = make_recipe(vision_tower={"policy": "lora", "target_modules": ["q_proj", "fc3"]})
    with pytest.raises(
        UserError, match="vision_tower.target_modules: 'fc3' match\\(es\\) no linear layer of the vision"
    ):
        prepare_run(recipe, log=lambda *_: None)


def test_epochs_zero_is_a_recipe_error(make_recipe):
    from lora_llava.errors import UserError

    with pytest.raises(UserError, match="train.epochs: 0 would train nothing"):
        make_recipe(train={"epochs": 0, "max_steps": None})


def test_leakage_is_warned(make_recipe, shapes, tmp_path):
    import json

    from lora_llava.training.prepare import prepare_run

    train_src = {"path": str(shapes / "train.json"), "image_folder": str(shapes / "images")}
    recs = json.loads((shapes / "train.json").read_text())
    (tmp_path / "eval.json").write_text(json.dumps(recs[:3] + json.loads((shapes / "eval.json").read_text())[:2]))
    (tmp_path / "more.json").write_text(json.dumps(recs[:2]))
    data = {
        "train": [train_src, train_src, {"path": str(tmp_path / "more.json"), "image_folder": str(shapes / "images")}],
        "eval": [{"path": str(tmp_path / "eval.json"), "image_folder": str(shapes / "images")}],
    }
    warnings = prepare_run(make_recipe(data=data), log=lambda *_: None).report.warnings
    assert f"data.train.1 and data.train.0 are the same file ({shapes / 'train.json'}): its samples count twice" in (
        " ".join(warnings)
    )
    assert any(w.startswith("3 eval sample(s) also appear in the training data") for w in warnings)
    assert any(w.startswith("96 id(s) appear in several training sources") for w in warnings)
    data["eval"] = [train_src]
    warnings = prepare_run(make_recipe(data=data), log=lambda *_: None).report.warnings
    assert any(w.startswith("data.eval.0 is the same file as data.train.0") for w in warnings)
