"""The real-size backbones, without their weights: the exact LLaVA-1.5-7B and LLaVA-NeXT-34B shapes are
built on the meta device, quantized the way from_pretrained does it, and LoRA'd the way training does
it; the counts are what those models have. Image-token budgets use the real processors' settings."""

from __future__ import annotations

import pytest
import torch

from lora_llava.backbones.registry import resolve_backbone
from lora_llava.config.schema import QuantizationConfig
from lora_llava.model.loading import bnb_config

CLIP_L_336 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                  image_size=336, patch_size=14, projection_dim=768)  # fmt: skip
VICUNA_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=32, vocab_size=32064)  # fmt: skip
YI_34B = dict(hidden_size=7168, intermediate_size=20480, num_hidden_layers=60, num_attention_heads=56,
              num_key_value_heads=8, vocab_size=64064)  # fmt: skip


def _meta_model(name: str):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaNextConfig
    from transformers import LlavaForConditionalGeneration as L15
    from transformers import LlavaNextForConditionalGeneration as Next

    text = LlamaConfig(**(VICUNA_7B if name == "llava-1.5-7b" else YI_34B))
    kw = dict(vision_config=CLIPVisionConfig(**CLIP_L_336), text_config=text, projector_hidden_act="gelu",
              vision_feature_layer=-2, vision_feature_select_strategy="default", image_token_id=32000)  # fmt: skip
    with torch.device("meta"):
        if name == "llava-1.5-7b":
            return L15(LlavaConfig(**kw))
        return Next(LlavaNextConfig(**kw, image_grid_pinpoints=[[336, 672], [672, 336], [672, 672], [1008, 336],
                                                                [336, 1008]]))  # fmt: skip


@pytest.mark.parametrize(
    "name, layers, hidden, inter, kv",
    [("llava-1.5-7b", 32, 4096, 11008, 4096), ("llava-v1.6-34b", 60, 7168, 20480, 1024)],
)
def test_real_size_quantization_and_lora_placement(name, layers, hidden, inter, kv):
    from peft import LoraConfig, get_peft_model
    from transformers.integrations.bitsandbytes import replace_with_bnb_linear

    spec = resolve_backbone(name)
    model = _meta_model(name)
    replace_with_bnb_linear(model, spec.quantization_skip_modules(), bnb_config(spec, QuantizationConfig()))
    four_bit = [n for n, m in model.named_modules() if type(m).__name__ == "Linear4bit"]
    assert len(four_bit) == 7 * layers
    assert all(n.startswith("model.language_model.layers.") for n in four_bit)
    for role in ("vision_tower", "projector", "lm_head"):
        mod = model.get_submodule(spec.roles()[role])
        assert not any(type(m).__name__ == "Linear4bit" for m in mod.modules()), role

    r = 128
    peft = get_peft_model(model, LoraConfig(r=r, lora_alpha=256, target_modules=spec.lora_target_regex(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])))  # fmt: skip
    wrapped = {n.rsplit(".lora_A", 1)[0] for n, _ in peft.named_modules() if n.endswith("lora_A")}
    assert len(wrapped) == 7 * layers
    assert not any("vision_tower" in n for n in wrapped)  # CLIP's own q/k/v_proj are left alone
    per_layer = r * ((hidden + hidden) * 2 + (hidden + kv) * 2 + (hidden + inter) * 3)
    lora = sum(p.numel() for n, p in peft.named_parameters() if "lora_" in n)
    assert lora == layers * per_layer
    proj = model.get_submodule(spec.projector)
    assert sum(p.numel() for p in proj.parameters()) == 1024 * hidden + hidden + hidden * hidden + hidden
    if name == "llava-1.5-7b":
        assert lora == 319_815_680  # the trainable LoRA parameters of LLaVA-1.5-7B at r=128


def _processor(family: str, max_tiles: int | None = None):
    from transformers import LlavaNextProcessor, LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    from lora_llava.backbones.tiny import build_tokenizer
    from lora_llava.model.anyres import apply_max_tiles

    tok = build_tokenizer()
    size = {"shortest_edge": 336}
    crop = {"height": 336, "width": 336}
    if family == "llava":
        return LlavaProcessor(CLIPImageProcessorPil(size=size, crop_size=crop), tok, patch_size=14,
                              vision_feature_select_strategy="default", num_additional_image_tokens=1)  # fmt: skip
    pins = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
    proc = LlavaNextProcessor(LlavaNextImageProcessorPil(size=size, crop_size=crop, image_grid_pinpoints=pins), tok,
                              patch_size=14, vision_feature_select_strategy="default",
                              num_additional_image_tokens=1)  # fmt: skip
    apply_max_tiles(None, proc, max_tiles)
    return proc


def test_real_size_image_token_budgets():
    from lora_llava.data.chat import format_for
    from lora_llava.data.encode import Encoder

    l15 = Encoder(_processor("llava"), format_for("vicuna_v1", _processor("llava").tokenizer))
    assert l15.image_token_counts([(500, 375), (336, 336)]) == [576, 576]
    nxt = _processor("llava_next")
    enc = Encoder(nxt, format_for("vicuna_v1", nxt.tokenizer))
    # overview 24x24 + CLS dropped = 576, plus the unpadded grid and one newline per grid row
    assert enc.image_token_counts([(672, 672)]) == [576 + 48 * 48 + 48]
    assert enc.image_token_counts([(1008, 336)]) == [576 + 24 * 72 + 24]
    capped = _processor("llava_next", max_tiles=2)
    assert capped.image_processor.image_grid_pinpoints == [[336, 672], [672, 336]]
    enc2 = Encoder(capped, format_for("vicuna_v1", capped.tokenizer))
    assert enc2.image_token_counts([(672, 672)])[0] < enc.image_token_counts([(672, 672)])[0]
