"""The backbone registry: one table, name -> everything lora_llava needs to know about a backbone.

Usage::

    spec = resolve_backbone("llava-hf/llava-1.5-7b-hf")
    spec.model_class()                  # LlavaForConditionalGeneration
    spec.quantization_skip_modules()    # never 4-bit: vision tower, projector, LM head
    spec.lora_target_regex(["q_proj"])  # anchored to the language model's path

A name that is not registered may still be a local directory holding a LLaVA checkpoint; its roles
are then the standard transformers ones for its model type.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from lora_llava.errors import UserError


@dataclass(frozen=True)
class BackboneSpec:
    name: str
    source: str  # Hub id, local directory, or "builtin:<name>"
    family: str  # "llava"
    chat_format: str
    description: str
    image_token: str = "<image>"
    vision_tower: str = "model.vision_tower"
    projector: str = "model.multi_modal_projector"
    language_model: str = "model.language_model"
    lm_head: str = "lm_head"
    recipe: str | None = None  # built-in recipe that uses it

    @property
    def builtin(self) -> bool:
        return self.source.startswith("builtin:")

    def model_class(self):
        import transformers

        return getattr(transformers, _FAMILIES[self.family])

    def roles(self) -> dict[str, str]:
        return {
            "vision_tower": self.vision_tower,
            "projector": self.projector,
            "language_model": self.language_model,
            "lm_head": self.lm_head,
        }

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


_FAMILIES = {"llava": "LlavaForConditionalGeneration"}
_MODEL_TYPES = {"llava": "llava"}

_REGISTRY: dict[str, BackboneSpec] = {
    s.name: s
    for s in [
        BackboneSpec(
            name="tiny",
            source="builtin:tiny",
            family="llava",
            chat_format="vicuna_v1",
            description="LLaVA-1.5-shaped, random init, built offline (CLIP 32px + MLP + LLaMA 64-d); for CPU runs and tests",
            recipe="quickstart",
        ),
        BackboneSpec(
            name="llava-1.5-7b",
            source="llava-hf/llava-1.5-7b-hf",
            family="llava",
            chat_format="vicuna_v1",
            description="LLaVA-1.5 7B: CLIP ViT-L/14-336 + MLP + Vicuna-7B",
            recipe="llava-1.5-7b/qlora",
        ),
        BackboneSpec(
            name="llava-1.5-13b",
            source="llava-hf/llava-1.5-13b-hf",
            family="llava",
            chat_format="vicuna_v1",
            description="LLaVA-1.5 13B: CLIP ViT-L/14-336 + MLP + Vicuna-13B",
            recipe="llava-1.5-13b/qlora",
        ),
    ]
}


def registered_backbones() -> list[BackboneSpec]:
    return list(_REGISTRY.values())


def resolve_backbone(name: str) -> BackboneSpec:
    """Find ``name`` as a registry name, a registered Hub id, or a local LLaVA checkpoint directory."""
    if name in _REGISTRY:
        return _REGISTRY[name]
    for spec in _REGISTRY.values():
        if spec.source == name:
            return spec
    path = Path(name)
    if path.is_dir():
        cfg = path / "config.json"
        if not cfg.is_file():
            raise UserError(
                f"backbone {name!r}: directory has no config.json", hint="point at a saved LLaVA checkpoint"
            )
        model_type = json.loads(cfg.read_text()).get("model_type")
        family = next((f for f, t in _MODEL_TYPES.items() if t == model_type), None)
        if family is None:
            raise UserError(
                f"backbone {name!r}: model_type {model_type!r} is not supported",
                hint=f"supported model types: {', '.join(sorted(_MODEL_TYPES.values()))}",
            )
        return BackboneSpec(
            name=str(path),
            source=str(path),
            family=family,
            chat_format="vicuna_v1",
            description=f"local {model_type} checkpoint",
        )
    import difflib

    close = difflib.get_close_matches(name, [*_REGISTRY, *(s.source for s in _REGISTRY.values())], n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise UserError(
        f"unknown backbone {name!r}: not a registered name, registered Hub id or local directory",
        hint=hint + "list them with: lora-llava recipes --backbones",
    )
