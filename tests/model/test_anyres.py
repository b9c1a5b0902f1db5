"""LLaVA-NeXT AnyRes: token counts equal what the model consumes, tile caps, tile padding in batches."""

from __future__ import annotations

import pytest
import torch

from lora_llava.artifacts import resolve_backbone
from lora_llava.data.batching import Collator
from lora_llava.data.chat import format_for
from lora_llava.data.encode import Encoder
from lora_llava.errors import UserError
from lora_llava.model.loading import load_processor


def _next(max_tiles=None):
    from transformers import LlavaNextForConditionalGeneration

    spec = resolve_backbone("tiny-next")
    processor = load_processor(spec.local_path())
    model = LlavaNextForConditionalGeneration.from_pretrained(spec.local_path()).eval()
    if max_tiles:
        from lora_llava.model.anyres import apply_max_tiles

        apply_max_tiles(model, processor, max_tiles)
    return model, processor


@pytest.mark.parametrize("max_tiles", [None, 2])
def test_anyres_lengths_equal_what_the_model_consumes(aspect_data, max_tiles):
    model, processor = _next(max_tiles)
    enc = Encoder(processor, format_for("vicuna_v1", processor.tokenizer))
    image_id = processor.image_token_id
    counts = []
    for s in aspect_data:
        item = enc.encode(s)
        n_tokens = int((item["input_ids"] == image_id).sum())
        assert enc.length(s) == len(item["input_ids"])  # header-only length == the encoded sample
        with torch.no_grad():
            feats = model.model.get_image_features(
                pixel_values=item["pixel_values"],
                image_sizes=item["image_sizes"],
                vision_feature_layer=-2,
                vision_feature_select_strategy="default",
            )
        feats = feats.pooler_output if hasattr(feats, "pooler_output") else feats
        consumed = sum(f.shape[0] for f in feats)
        assert n_tokens == consumed, s.id
        counts.append(n_tokens)
        # the full forward accepts it (transformers raises when tokens and features disagree)
        with torch.no_grad():
            out = model(**{k: v.unsqueeze(0) if k in ("input_ids", "labels") else v for k, v in item.items()})
        assert torch.isfinite(out.loss)
    assert len(set(counts)) >= 3  # aspect ratios really change the token count
    if max_tiles:
        full, _ = _next(None)
        enc_full = Encoder(_next(None)[1], format_for("vicuna_v1", processor.tokenizer))
        assert all(enc.length(s) <= enc_full.length(s) for s in aspect_data)
        assert any(enc.length(s) < enc_full.length(s) for s in aspect_data)
        assert all((p[0] // 32) * (p[1] // 32) <= 2 for p in processor.image_processor.image_grid_pinpoints)
        assert model.config.image_grid_pinpoints == processor.image_processor.image_grid_pinpoints


def test_anyres_batch_pads_tiles(aspect_data):
    model, processor = _next()
    enc = Encoder(processor, format_for("vicuna_v1", processor.tokenizer))
    items = [enc.encode(s) for s in aspect_data[:3]]
    tiles = [it["pixel_values"].shape[1] for it in items]
    assert len(set(tiles)) > 1
    batch = Collator(processor.tokenizer.pad_token_id)(items)
    assert batch["pixel_values"].shape[:2] == (3, max(tiles))
    assert batch["image_sizes"].tolist() == [[64, 64], [40, 100], [90, 30]]
    with torch.no_grad():
        assert torch.isfinite(model(**batch).loss)


def test_max_tiles_too_small_is_a_user_error():
    from lora_llava.model.anyres import cap_tiles

    with pytest.raises(UserError, match="images.max_tiles=1 leaves no AnyRes grid"):
        cap_tiles([[32, 64], [64, 64]], 32, 1)
