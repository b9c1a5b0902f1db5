"""What a run writes opens as trained: system prompt, chat template, image padding under stock transformers."""

from __future__ import annotations

import json

import torch
from PIL import Image

from lora_llava.backbones.registry import resolve_backbone
from lora_llava.data.chat import (
    VICUNA_SYSTEM,
    format_for,
)


def test_trained_adapter_renders_and_records_the_system_prompt(trained_run):
    from transformers import AutoProcessor

    adapter = trained_run / "adapter"
    meta = json.loads((adapter / "lora_llava.json").read_text())
    assert (meta["chat_format"], meta["system_prompt"]) == ("vicuna_v1", VICUNA_SYSTEM)
    stock = AutoProcessor.from_pretrained(adapter)
    text = stock.apply_chat_template([{"role": "user", "content": "Hi?"}], tokenize=False, add_generation_prompt=True)
    assert text == VICUNA_SYSTEM + " USER: Hi? ASSISTANT:"


def test_system_prompt_switch_reaches_training_eval_and_the_template(make_recipe, tmp_path):
    from transformers import AutoProcessor

    from lora_llava.infer import load_model
    from lora_llava.training.prepare import prepare_run
    from lora_llava.workflows import train

    recipe = make_recipe(chat={"system_prompt": ""}, train={"max_steps": 1})
    train(recipe, log=lambda *_: None)
    adapter = tmp_path / "run" / "adapter"
    assert json.loads((adapter / "lora_llava.json").read_text())["system_prompt"] == ""
    stock = AutoProcessor.from_pretrained(adapter)
    assert stock.apply_chat_template([{"role": "user", "content": "Hi?"}], tokenize=False) == "USER: Hi? "
    sample = prepare_run(recipe, log=lambda *_: None).report.train[0]
    loaded = load_model(str(tmp_path / "run"))
    ids, _ = loaded.encoder.tokens(sample, [(64, 64)])
    assert loaded.processor.tokenizer.decode(ids, skip_special_tokens=True).startswith("USER: ")


def test_stock_autoprocessor_pads_like_training(make_recipe, shapes, tmp_path):
    """LLaVA-1.5's pad handling survives into the adapter and the merged model: stock transformers'
    AutoProcessor pads with the same color, and the pixel values equal those trained on."""
    from transformers import AutoProcessor

    from lora_llava.data.encode import Encoder
    from lora_llava.data.formats import Sample
    from lora_llava.merging import merge
    from lora_llava.model.loading import load_processor
    from lora_llava.workflows import train

    recipe = make_recipe(images={"pad_to_square": True}, train={"max_steps": 1})
    train(recipe, log=lambda *_: None)
    merge(str(tmp_path / "run"), str(tmp_path / "merged"), log=lambda *_: None)
    wide = tmp_path / "wide.png"
    Image.new("RGB", (97, 40), (10, 200, 30)).save(wide)
    base = load_processor(resolve_backbone("tiny").local_path())
    trained = Encoder(base, format_for("vicuna_v1", base.tokenizer), pad_to_square=True)
    expected = trained.encode(Sample("mem", 0, "w", [("user", "<image>\nQ"), ("assistant", "A")], [wide]))
    img = trained.load(wide)
    assert img.getpixel((48, 1)) == (122, 116, 104)  # int(255 * CLIP mean), as upstream's expand2square
    for folder in (tmp_path / "run" / "adapter", tmp_path / "merged"):
        stock = AutoProcessor.from_pretrained(folder)
        assert stock.image_processor.do_pad
        got = stock.image_processor(images=[Image.open(wide)], return_tensors="pt")["pixel_values"]
        assert torch.equal(got, expected["pixel_values"])
    unpadded = base.image_processor(images=[Image.open(wide)], return_tensors="pt")["pixel_values"]
    assert not torch.equal(unpadded, expected["pixel_values"])
