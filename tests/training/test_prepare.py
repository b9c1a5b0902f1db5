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
