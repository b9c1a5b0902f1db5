"""The backbone registry: one table, name -> everything lora_llava needs to know about a backbone.

Usage::

    spec = resolve_backbone("llava-hf/llava-1.5-7b-hf")
    spec.model_class()                  # LlavaForConditionalGeneration
    spec.quantization_skip_modules()    # never 4-bit: vision tower, projector, LM head
    spec.lora_target_regex(["q_proj"])  # anchored to the language model's path

A registered Hub backbone's row also carries its config.json values (``spec.offline_config``), so that
``lora-llava plan`` can build it on the meta device with neither the Hub nor its cache; adding a
registered backbone is one row.

A name that is not registered may still be a local directory holding a LLaVA or LLaVA-NeXT
checkpoint (a merged model, an assembled model, a stage-1 run directory): its roles are then the
standard transformers ones for its model type and its chat format is read from ``lora_llava.json``
or inferred from its chat template (``spec.inferred`` says which).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lora_llava.errors import UserError
from lora_llava.layout import META_FILE, MODEL_CONFIG_FILE


@dataclass(frozen=True)
class OfflineConfig:
    """A registered Hub backbone's config.json values (its language model's and its vision tower's), for
    planning when neither a directory nor the Hugging Face cache has the config. Kept as items, not dicts,
    so that a spec stays frozen and hashable; ``text_values()`` and ``vision_values()`` are the dicts."""

    text: tuple[tuple[str, Any], ...]
    vision: tuple[tuple[str, Any], ...]

    @classmethod
    def of(cls, text: Mapping[str, Any], vision: Mapping[str, Any]) -> OfflineConfig:
        return cls(tuple(text.items()), tuple(vision.items()))

    def text_values(self) -> dict[str, Any]:
        return dict(self.text)

    def vision_values(self) -> dict[str, Any]:
        return dict(self.vision)


@dataclass(frozen=True)
class BackboneSpec:
    name: str
    source: str  # Hub id, local directory, or "builtin:<name>"
    family: str  # "llava" | "llava_next"
    chat_format: str
    description: str
    image_token: str = "<image>"
    vision_tower: str = "model.vision_tower"
    projector: str = "model.multi_modal_projector"
    language_model: str = "model.language_model"
    lm_head: str = "lm_head"
    recipe: str | None = None  # built-in recipe that uses it
    inferred: str = ""  # how an unregistered directory's roles and chat format were found
    offline_config: OfflineConfig | None = field(default=None, repr=False)  # registered Hub backbones: the config

    @property
    def builtin(self) -> bool:
        return self.source.startswith("builtin:")

    def model_class(self) -> Any:
        import transformers

        return getattr(transformers, _FAMILIES[self.family])

    def roles(self) -> dict[str, str]:
        return {
            "vision_tower": self.vision_tower,
            "projector": self.projector,
            "language_model": self.language_model,
            "lm_head": self.lm_head,
        }

    @property
    def image_newline(self) -> str | None:
        """LLaVA-NeXT's learned row separator: a parameter, trained and saved with the projector."""
        return "model.image_newline" if self.family == "llava_next" else None

    def vision_lora_regex(self, names: list[str]) -> str:
        """PEFT ``target_modules`` regex matching ``names`` only under the vision tower."""
        alts = "|".join(re.escape(n) for n in names)
        return rf"{re.escape(self.vision_tower)}\..*\.({alts})"

    def quantization_skip_modules(self) -> list[str]:
        """Full module paths bitsandbytes must leave in 16-bit (a bare "vision_tower" would not do)."""
        return [self.vision_tower, self.projector, self.lm_head]

    def lora_target_regex(self, names: list[str]) -> str:
        """PEFT ``target_modules`` regex matching ``names`` only under the language model."""
        alts = "|".join(re.escape(n) for n in names)
        return rf"{re.escape(self.language_model)}\..*\.({alts})"

    def local_path(self) -> str:
        """Where ``from_pretrained`` reads this backbone (built-ins are built on first use)."""
        if self.builtin:
            from lora_llava.backbones.tiny import ensure_tiny

            return str(ensure_tiny(self.source.split(":", 1)[1]))
        return self.source


# family (= the transformers model_type of its checkpoints) -> model class
_FAMILIES = {"llava": "LlavaForConditionalGeneration", "llava_next": "LlavaNextForConditionalGeneration"}


# The config.json values on the Hub of the registered Hub backbones' parts (their ``offline_config``)
CLIP_VIT_L_336 = {"model_type": "clip_vision_model", "hidden_size": 1024, "intermediate_size": 4096,
                  "num_hidden_layers": 24, "num_attention_heads": 16, "image_size": 336, "patch_size": 14,
                  "projection_dim": 768}  # fmt: skip
_VICUNA_7B = {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
              "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32064,
              "max_position_embeddings": 4096, "rms_norm_eps": 1e-5}  # fmt: skip
_VICUNA_13B = {"model_type": "llama", "hidden_size": 5120, "intermediate_size": 13824, "num_hidden_layers": 40,
               "num_attention_heads": 40, "num_key_value_heads": 40, "vocab_size": 32064,
               "max_position_embeddings": 4096, "rms_norm_eps": 1e-5}  # fmt: skip
_MISTRAL_7B = {"model_type": "mistral", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
               "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 32064}  # fmt: skip
_YI_34B = {"model_type": "llama", "hidden_size": 7168, "intermediate_size": 20480, "num_hidden_layers": 60,
           "num_attention_heads": 56, "num_key_value_heads": 8, "vocab_size": 64064}  # fmt: skip


def _hub(
    name: str, source: str, family: str, fmt: str, description: str, text: dict[str, Any], vision: dict[str, Any]
) -> BackboneSpec:
    return BackboneSpec(
        name=name,
        source=source,
        family=family,
        chat_format=fmt,
        description=description,
        recipe=f"{name}/qlora",
        offline_config=OfflineConfig.of(text, vision),
    )


def _builtin_specs() -> list[BackboneSpec]:
    from lora_llava.backbones.tiny import BUILTINS

    return [
        BackboneSpec(
            name=b.name,
            source=f"builtin:{b.name}",
            family=b.family,
            chat_format=b.chat_format,
            description=b.description,
            recipe=b.recipe,
        )
        for b in BUILTINS.values()
        if b.kind == "backbone"
    ]


_REGISTRY: dict[str, BackboneSpec] = {
    s.name: s
    for s in [
        *_builtin_specs(),
        _hub(
            "llava-1.5-7b",
            "llava-hf/llava-1.5-7b-hf",
            "llava",
            "vicuna_v1",
            "LLaVA-1.5 7B: CLIP ViT-L/14-336 + MLP + Vicuna-7B",
            _VICUNA_7B,
            CLIP_VIT_L_336,
        ),
        _hub(
            "llava-1.5-13b",
            "llava-hf/llava-1.5-13b-hf",
            "llava",
            "vicuna_v1",
            "LLaVA-1.5 13B: CLIP ViT-L/14-336 + MLP + Vicuna-13B",
            _VICUNA_13B,
            CLIP_VIT_L_336,
        ),
        _hub(
            "llava-v1.6-mistral-7b",
            "llava-hf/llava-v1.6-mistral-7b-hf",
            "llava_next",
            "mistral_instruct",
            "LLaVA-NeXT: AnyRes CLIP-336 + MLP + Mistral-7B-Instruct",
            _MISTRAL_7B,
            CLIP_VIT_L_336,
        ),
        _hub(
            "llava-v1.6-vicuna-7b",
            "llava-hf/llava-v1.6-vicuna-7b-hf",
            "llava_next",
            "vicuna_v1",
            "LLaVA-NeXT: AnyRes CLIP-336 + MLP + Vicuna-7B",
            _VICUNA_7B,
            CLIP_VIT_L_336,
        ),
        _hub(
            "llava-v1.6-vicuna-13b",
            "llava-hf/llava-v1.6-vicuna-13b-hf",
            "llava_next",
            "vicuna_v1",
            "LLaVA-NeXT: AnyRes CLIP-336 + MLP + Vicuna-13B",
            _VICUNA_13B,
            CLIP_VIT_L_336,
        ),
        _hub(
            "llava-v1.6-34b",
            "llava-hf/llava-v1.6-34b-hf",
            "llava_next",
            "chatml_direct",
            "LLaVA-NeXT: AnyRes CLIP-336 + MLP + Nous-Hermes-2-Yi-34B",
            _YI_34B,
            CLIP_VIT_L_336,
        ),
    ]
}


def model_class_name(family: str) -> str:
    """The transformers class of a family's checkpoints (LlavaForConditionalGeneration, ...)."""
    return _FAMILIES.get(family, _FAMILIES["llava"])


def registered_backbones() -> list[BackboneSpec]:
    return list(_REGISTRY.values())


def is_registered(name: str) -> bool:
    """A registered backbone name or the Hub id of one."""
    return registered(name) is not None


def registered(name: str) -> BackboneSpec | None:
    """The registered backbone called ``name`` (a registered name or the Hub id of one), or None."""
    if name in _REGISTRY:
        return _REGISTRY[name]
    return next((spec for spec in _REGISTRY.values() if spec.source == name), None)


def looks_like_hub_id(ref: str) -> bool:
    """``owner/name`` that is not a relative path a user meant as a directory (``./x``, ``runs/x``)."""
    return bool(re.fullmatch(r"[\w.-]+/[\w.-]+", ref)) and not ref.startswith(("runs/", "./", "../", "."))


def backbone_spec(name: str, folder: Path | None = None, exists: bool = False) -> BackboneSpec:
    """The spec of backbone ``name``: from ``folder`` (the model directory ``name`` opened to), else, for a
    name that is no existing path, the registered backbone or the Hub id it names."""
    if folder is not None:
        return spec_from_files(
            str(folder), lambda f: (folder / f).read_text() if (folder / f).is_file() else None, "local"
        )
    if exists:
        return hub_spec(name)
    spec = registered(name)
    if spec is not None:
        return spec
    if "/" in name or os.sep in name:
        if looks_like_hub_id(name):
            return hub_spec(name)
        raise UserError(
            f"backbone directory {name!r} does not exist",
            hint="if it is a stage-1 run directory, train its align recipe first (lora-llava train .../align)",
        )
    raise unknown_backbone(name)


def unknown_backbone(name: str) -> UserError:
    """The error for a name that is neither registered nor a directory nor a Hub id, with the nearest name."""
    import difflib

    close = difflib.get_close_matches(name, [*_REGISTRY, *(s.source for s in _REGISTRY.values())], n=1)
    return UserError(
        f"unknown backbone {name!r}: not a registered name, registered Hub id or local directory",
        hint=(f"did you mean {close[0]!r}? " if close else "") + "list them with: lora-llava recipes --backbones",
    )


def infer_chat_format(template: str | None) -> str:
    """The chat format a tokenizer's chat template speaks (vicuna_v1 when it has none)."""
    t = template or ""
    if "<|im_start|>" in t:
        return "chatml_direct" if "Answer the questions." in t else "chatml"
    if "<|start_header_id|>" in t:
        return "llama3"
    if "[INST]" in t:
        return "mistral_instruct"
    return "vicuna_v1"


def hub_spec(repo_id: str) -> BackboneSpec:
    """A spec for an unregistered Hub id, from its config and chat template (Hub cache or network)."""
    from huggingface_hub import hf_hub_download

    from lora_llava.hub import hub_reachable, offline_reason

    online = hub_reachable()

    def read(filename: str) -> str | None:
        try:
            return Path(hf_hub_download(repo_id, filename, local_files_only=not online)).read_text()
        except Exception:  # missing file, offline, gated, unknown repo: all mean "not available"
            return None

    if read(MODEL_CONFIG_FILE) is None:
        where = "from the Hub (private or misspelt?)" if online else f"from the local cache ({offline_reason()})"
        raise UserError(
            f"unknown backbone {repo_id!r}: not registered, and its config.json could not be read {where}",
            hint="list registered backbones with: lora-llava recipes --backbones; or give a local directory",
        )
    return spec_from_files(repo_id, read, "Hub")


def spec_from_files(source: str, read: Callable[[str], str | None], where: str) -> BackboneSpec:
    model_type = json.loads(read(MODEL_CONFIG_FILE) or "{}").get("model_type")
    if model_type not in _FAMILIES:
        raise UserError(
            f"backbone {source!r}: model_type {model_type!r} is not a LLaVA model",
            hint=f"supported: {', '.join(sorted(_FAMILIES))}; to build one from a vision encoder and "
            "a causal LM use backbone: assemble",
        )
    family = model_type
    meta = read(META_FILE)
    if meta and json.loads(meta).get("chat_format"):
        fmt, how = json.loads(meta)["chat_format"], META_FILE
    else:
        template = read("chat_template.jinja") or read("chat_template.json")
        fmt, how = infer_chat_format(template), "its chat template"
    return BackboneSpec(
        name=source,
        source=source,
        family=family,
        chat_format=fmt,
        description=f"{where} {model_type} checkpoint",
        inferred=f"{model_type}: roles vision_tower=model.vision_tower, projector=model.multi_modal_projector, "
        f"language_model=model.language_model, lm_head=lm_head; chat format {fmt} (from {how})",
    )
