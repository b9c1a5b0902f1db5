"""The counting processor of check and plan: the same tokenizer and the same image-token counts as the full
processor, over image sizes, grids and settings unlike the built-ins'; anything else falls back."""

from __future__ import annotations

import json
import random
import shutil

import pytest

from lora_llava.backbones.tiny import ensure_tiny
from lora_llava.model.anyres import apply_max_tiles
from lora_llava.model.counting import CountingProcessor, counting_processor
from lora_llava.model.loading import load_processor

# LLaVA-1.6's own grid pinpoints (336 px tiles) and LLaVA-OneVision-like wider ones
PINPOINTS_16 = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
PINPOINTS_WIDE = [[384, 384], [384, 768], [768, 384], [768, 768], [384, 1152], [1152, 384], [1152, 1152]]

TEXTS = [
    "USER: <image>\nWhat color is the shape? ASSISTANT: Red.</s>",
    " leading space, two  spaces, tab\tand newline\n",
    "números 123 4567 ünïcödé — emoji 🙂 <s> </s> <pad>",
    "",
]


def _sizes(n: int = 150, seed: int = 0) -> list[tuple[int, int]]:
    rng = random.Random(seed)
    sizes = [(1, 1), (1, 4000), (4000, 1), (336, 336), (337, 335), (32, 96), (96, 32), (672, 672), (1008, 336)]
    sizes += [(rng.randint(1, 2500), rng.randint(1, 2500)) for _ in range(n)]
    return sizes  # (height, width)


def _counts(processor, sizes):
    from lora_llava.compat import image_token_counts

    return image_token_counts(processor, sizes)


def _same_tokenizer(a, b) -> None:
    assert type(a) is type(b)
    assert a.get_vocab() == b.get_vocab()
    assert a.all_special_tokens == b.all_special_tokens
    assert a.chat_template == b.chat_template
    for text in TEXTS:
        assert a(text)["input_ids"] == b(text)["input_ids"], text


@pytest.mark.parametrize("name", ["tiny", "tiny-sp", "tiny-next"])
def test_counting_processor_of_a_builtin_equals_the_full_one(_offline_cache, name):
    path = ensure_tiny(name)
    light, full = counting_processor(path), load_processor(path)
    assert isinstance(light, CountingProcessor)
    _same_tokenizer(light.tokenizer, full.tokenizer)
    assert light.image_token == full.image_token
    assert list(light.image_processor.image_mean) == list(full.image_processor.image_mean)
    sizes = _sizes()
    assert _counts(light, sizes) == _counts(full, sizes)
    if name == "tiny-next":  # a tile cap trims both the same way
        apply_max_tiles(None, light, 2)
        apply_max_tiles(None, full, 2)
        assert _counts(light, sizes) == _counts(full, sizes)


def _resaved(tmp_path, name, **changes):
    """A built-in's processor directory with other image settings (sizes, grids, feature strategy)."""
    src = ensure_tiny(name)
    folder = tmp_path / name
    folder.mkdir()
    for f in src.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, folder / f.name)
    config = json.loads((folder / "processor_config.json").read_text())
    images = changes.pop("image_processor", {})
    config["image_processor"].update(images)
    config.update(changes)
    (folder / "processor_config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize(
    "name, changes",
    [
        ("tiny-next", {"patch_size": 14, "image_processor": {"size": {"shortest_edge": 336},
         "crop_size": {"height": 336, "width": 336}, "image_grid_pinpoints": PINPOINTS_16}}),
        ("tiny-next", {"patch_size": 14, "vision_feature_select_strategy": "full", "num_additional_image_tokens": 0,
         "image_processor": {"size": {"height": 384, "width": 384}, "image_grid_pinpoints": PINPOINTS_WIDE}}),
        ("tiny", {"patch_size": 14, "image_processor": {"crop_size": {"height": 336, "width": 336},
         "size": {"shortest_edge": 336}}}),
        ("tiny", {"patch_size": 16, "vision_feature_select_strategy": "full", "num_additional_image_tokens": 0,
         "image_processor": {"crop_size": {"height": 224, "width": 448}}}),
    ],
)  # fmt: skip
def test_counts_equal_the_full_processor_at_real_settings(_offline_cache, tmp_path, name, changes):
    folder = _resaved(tmp_path, name, **changes)
    light, full = counting_processor(folder), load_processor(folder)
    assert light is not None
    sizes = _sizes(300, seed=1)
    assert _counts(light, sizes) == _counts(full, sizes)


def test_what_it_does_not_read_falls_back(_offline_cache, tmp_path):
    assert counting_processor("llava-hf/llava-1.5-7b-hf") is None  # a Hub id
    assert counting_processor(tmp_path) is None  # no processor_config.json
    other = _resaved(tmp_path, "tiny", processor_class="PaliGemmaProcessor")
    assert counting_processor(other) is None
    (tmp_path / "t2").mkdir()
    no_crop = _resaved(tmp_path / "t2", "tiny")
    config = json.loads((no_crop / "processor_config.json").read_text())
    del config["image_processor"]["crop_size"]  # left to the class default: not read here
    (no_crop / "processor_config.json").write_text(json.dumps(config))
    assert counting_processor(no_crop) is None
    (tmp_path / "t3").mkdir()
    named = _resaved(tmp_path / "t3", "tiny")
    tok = json.loads((named / "tokenizer_config.json").read_text())
    tok["tokenizer_class"] = "LlamaTokenizer"  # AutoTokenizer's own rules decide that one
    (named / "tokenizer_config.json").write_text(json.dumps(tok))
    assert counting_processor(named) is None


def test_a_counting_processor_makes_no_pixels(_offline_cache):
    light = counting_processor(ensure_tiny("tiny"))
    with pytest.raises(TypeError, match="load_processor"):
        light.image_processor(images=[], return_tensors="pt")
