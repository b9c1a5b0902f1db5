"""Assemble a new LLaVA from any vision encoder and any causal LM.

Usage::

    path = assemble(AssembleConfig(vision_encoder="openai/clip-vit-large-patch14-336",
                                   language_model="Qwen/Qwen2-1.5B-Instruct"), "runs/new/assembled")
    LlavaForConditionalGeneration.from_pretrained(path)      # a standard transformers LLaVA checkpoint

What happens:
- the vision encoder (CLIP or SigLIP vision model, or the vision half of a full CLIP/SigLIP checkpoint)
  and the causal LM (Llama, Mistral, Qwen2, Phi, ... any ``AutoModelForCausalLM``) are loaded with
  their own weights; nothing of theirs is re-initialized;
- the projector is new: ``mlp2x_gelu`` (LLaVA-1.5) or ``linear`` (LLaVA v1: one linear map; stored
  as transformers' two-layer projector with an identity activation and ``linear_2`` initialized to
  the identity, so it loads everywhere a LLaVA loads);
- ``<image>`` is added to the tokenizer as a special token if missing (and a pad token if the LM has
  none); the embeddings are resized with mean initialization, the LM head follows, and tied
  embeddings stay tied;
- the chat format is the recipe's, or inferred from the LM tokenizer's chat template, and is saved
  as the processor's chat template.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from lora_llava.annotations import Log
from lora_llava.config.schema import AssembleConfig
from lora_llava.errors import UserError
from lora_llava.fsutil import atomic_dir
from lora_llava.layout import AssembledMeta, read_meta, write_meta


def _builtin_parts() -> tuple[str, ...]:
    from lora_llava.backbones.tiny import BUILTINS

    return tuple(n for n, b in BUILTINS.items() if b.kind == "part")


PARTS = _builtin_parts()


def _part_path(name: str) -> str:
    if name in PARTS:
        from lora_llava.backbones.tiny import ensure_tiny

        return str(ensure_tiny(name))
    return name


def _load_vision(name: str, dtype: torch.dtype) -> tuple[Any, str, int]:
    from transformers import AutoConfig, CLIPVisionModel, SiglipVisionModel

    path = _part_path(name)
    try:
        cfg = AutoConfig.from_pretrained(path)
    except OSError as e:
        raise UserError(f"assemble.vision_encoder {name!r} cannot be loaded: {e}") from None
    kind = cfg.model_type
    if kind in ("clip", "clip_vision_model"):
        cls, extra = CLIPVisionModel, 1
    elif kind in ("siglip", "siglip_vision_model"):
        cls, extra = SiglipVisionModel, 0
    else:
        raise UserError(
            f"assemble.vision_encoder {name!r} is a {kind!r} model", hint="use a CLIP or SigLIP vision model"
        )
    model = cls.from_pretrained(path, dtype=dtype)
    return model, path, extra


def _load_lm(name: str, dtype: torch.dtype) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = _part_path(name)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise UserError(f"assemble.language_model {name!r} cannot be loaded as a causal LM: {e}") from None
    return model, tokenizer


def assemble(cfg: AssembleConfig, out_dir: str | Path, dtype: torch.dtype = torch.float32, log: Log = print) -> Path:
    """Build the LLaVA described by ``cfg`` into ``out_dir`` (reused if already built from the same cfg)."""
    from transformers import AutoImageProcessor, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    from lora_llava.backbones.registry import infer_chat_format
    from lora_llava.data.chat import format_for

    out = Path(out_dir)
    existing = read_meta(out) if out.is_dir() else None
    if isinstance(existing, AssembledMeta) and existing.assembled == asdict(cfg):
        return out
    if out.exists() and any(out.iterdir()):
        raise UserError(f"{out} holds a different assembled model", hint="delete it or choose another output_dir")

    vision, vision_path, extra_tokens = _load_vision(cfg.vision_encoder, dtype)
    lm, tokenizer = _load_lm(cfg.language_model, dtype)
    fmt_name = cfg.chat_format or infer_chat_format(tokenizer.chat_template)

    added = []
    if "<image>" not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]}, replace_extra_special_tokens=False)
        added.append("<image>")
    if tokenizer.pad_token is None:
        tokenizer.add_special_tokens({"pad_token": "<pad>"})
        added.append("<pad>")
    image_token_id = tokenizer.convert_tokens_to_ids("<image>")

    text_config = lm.config
    config = LlavaConfig(
        vision_config=vision.config,
        text_config=text_config,
        image_token_id=image_token_id,
        projector_hidden_act="gelu" if cfg.projector == "mlp2x_gelu" else "linear",
        vision_feature_layer=cfg.vision_feature_layer,
        vision_feature_select_strategy=cfg.vision_feature_select,
        tie_word_embeddings=bool(getattr(text_config, "tie_word_embeddings", False)),
    )
    torch.manual_seed(cfg.seed)
    model = LlavaForConditionalGeneration(config).to(dtype)
    model.model.vision_tower.load_state_dict(vision.state_dict())
    missing, unexpected = model.model.language_model.load_state_dict(lm.get_decoder().state_dict(), strict=False)
    if missing or unexpected:
        raise UserError(f"language model weights do not fit: missing {missing[:3]}, unexpected {unexpected[:3]}")
    model.lm_head.load_state_dict(lm.get_output_embeddings().state_dict())
    if cfg.projector == "linear":
        with torch.no_grad():
            lin2 = model.model.multi_modal_projector.linear_2
            lin2.weight.copy_(torch.eye(lin2.out_features, lin2.in_features, dtype=lin2.weight.dtype))
            lin2.bias.zero_()
    if len(tokenizer) != model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=True)
    model.config.text_config.vocab_size = model.get_input_embeddings().weight.shape[0]
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id

    image_processor = AutoImageProcessor.from_pretrained(vision_path)
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=vision.config.patch_size,
        vision_feature_select_strategy=cfg.vision_feature_select,
        num_additional_image_tokens=extra_tokens,
        chat_template=format_for(fmt_name, tokenizer).jinja,
    )
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        write_meta(tmp, AssembledMeta(assembled=asdict(cfg), chat_format=fmt_name, added_tokens=added))
    log(
        f"assembled {cfg.vision_encoder} + {cfg.language_model} ({cfg.projector}, chat format {fmt_name}, "
        f"added tokens {added or 'none'}) into {out}"
    )
    return out
