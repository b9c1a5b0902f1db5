"""The backbone registry: one table, name -> everything lora_llava needs to know about a backbone.

Usage::

    spec = resolve_backbone("llava-hf/llava-1.5-7b-hf")
    spec.model_class()                  # LlavaForConditionalGeneration
    spec.quantization_skip_modules()    # never 4-bit: vision tower, projector, LM head
    spec.lora_target_regex(["q_proj"])  # anchored to the language model's path

A name that is not registered may still be a local directory holding a LLaVA or LLaVA-NeXT
checkpoint (a merged model, an assembled model, a stage-1 run directory): its roles are then the
standard transformers ones for its model type and its chat format is read from ``lora_llava.json``
or inferred from its chat template (``describe_inferred`` says which).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from lora_llava.errors import UserError


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


_FAMILIES = {"llava": "LlavaForConditionalGeneration", "llava_next": "LlavaNextForConditionalGeneration"}
_MODEL_TYPES = {"llava": "llava", "llava_next": "llava_next"}


def _hub(name, source, family, fmt, description):
    return BackboneSpec(
        name=name, source=source, family=family, chat_format=fmt, description=description, recipe=f"{name}/qlora"
    )


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
            name="tiny-sp",
            source="builtin:tiny-sp",
            family="llava",
            chat_format="vicuna_v1",
            description="tiny with a Llama-style sentencepiece tokenizer (lone \u2581 before digits, byte fallback)",
            recipe="tiny-sp/qlora",
        ),
        BackboneSpec(
            name="tiny-next",
            source="builtin:tiny-next",
            family="llava_next",
            chat_format="vicuna_v1",
            description="LLaVA-NeXT-shaped, random init, built offline (AnyRes over 32px tiles, image newline)",
            recipe="tiny-next/qlora",
        ),
        _hub(
            "llava-1.5-7b",
            "llava-hf/llava-1.5-7b-hf",
            "llava",
            "vicuna_v1",
            "LLaVA-1.5 7B: CLIP ViT-L/14-336 + MLP + Vicuna-7B",
        ),
        _hub(
            "llava-1.5-13b",
            "llava-hf/llava-1.5-13b-hf",
            "llava",
            "vicuna_v1",
            "LLaVA-1.5 13B: CLIP ViT-L/14-336 + MLP + Vicuna-13B",
        ),
        _hub(
            "llava-v1.6-mistral-7b",
            "llava-hf/llava-v1.6-mistral-7b-hf",
            "llava_next",
            "mistral_instruct",
            "LLaVA-NeXT: AnyRes CLIP-336 + MLP + Mistral-7B-Instruct",
        ),
        _hub(
            "llava-v1.6-vicuna-7b",
            "llava-hf/llava-v1.6-vicuna-7b-hf",
            "llava_next",
            "vicuna_v1",
            "LLaVA-NeXT: AnyRes CLIP-336 + MLP + Vicuna-7B",
        ),
        _hub(
            "llava-v1.6-vicuna-13b",
            "llava-hf/llava-v1.6-vicuna-13b-hf",
            "llava_next",
            "vicuna_v1",
            "LLaVA-NeXT: AnyRes CLIP-336 + MLP + Vicuna-13B",
        ),
        _hub(
            "llava-v1.6-34b",
            "llava-hf/llava-v1.6-34b-hf",
            "llava_next",
            "chatml_direct",
            "LLaVA-NeXT: AnyRes CLIP-336 + MLP + Nous-Hermes-2-Yi-34B",
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
        return _local_spec(path)
    if re.fullmatch(r"[\w.-]+/[\w.-]+", name) and not name.startswith(("runs/", "./", "../")):
        return _hub_spec(name)
    if "/" in name or os.sep in name:
        raise UserError(
            f"backbone directory {name!r} does not exist",
            hint="if it is a stage-1 run directory, train its align recipe first (lora-llava train .../align)",
        )
    import difflib

    close = difflib.get_close_matches(name, [*_REGISTRY, *(s.source for s in _REGISTRY.values())], n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise UserError(
        f"unknown backbone {name!r}: not a registered name, registered Hub id or local directory",
        hint=hint + "list them with: lora-llava recipes --backbones",
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


def _local_spec(path: Path) -> BackboneSpec:
    """A spec for a local LLaVA / LLaVA-NeXT checkpoint, or for a stage-1 run directory (its model/)."""
    if not (path / "config.json").is_file() and (path / "model" / "config.json").is_file():
        path = path / "model"
    if not (path / "config.json").is_file():
        if (path / "adapter" / "lora_llava.json").is_file() or (path / "recipe.yaml").is_file():
            raise UserError(
                f"backbone {str(path)!r} is a run directory without model/ (the aligned model a finished "
                "stage-1 run writes)",
                hint="finish stage 1 first (lora-llava train <align recipe>); a stage-2 run cannot be a backbone",
            )
        raise UserError(
            f"backbone {str(path)!r}: directory has no config.json",
            hint="point at a saved LLaVA checkpoint, a merged model or a stage-1 run directory",
        )

    def read(filename: str) -> str | None:
        f = path / filename
        return f.read_text() if f.is_file() else None

    return _spec_from_files(str(path), read, "local")


def _hub_spec(repo_id: str) -> BackboneSpec:
    """A spec for an unregistered Hub id, from its config and chat template (Hub cache or network)."""
    from huggingface_hub import hf_hub_download

    def read(filename: str) -> str | None:
        try:
            return Path(hf_hub_download(repo_id, filename)).read_text()
        except Exception:  # missing file, offline, gated, unknown repo: all mean "not available"
            return None

    if read("config.json") is None:
        raise UserError(
            f"unknown backbone {repo_id!r}: not registered, and its config.json could not be read from the Hub "
            "(offline, private or misspelt?)",
            hint="list registered backbones with: lora-llava recipes --backbones; or give a local directory",
        )
    return _spec_from_files(repo_id, read, "Hub")


def _spec_from_files(source: str, read, where: str) -> BackboneSpec:
    model_type = json.loads(read("config.json")).get("model_type")
    family = next((f for f, t in _MODEL_TYPES.items() if t == model_type), None)
    if family is None:
        raise UserError(
            f"backbone {source!r}: model_type {model_type!r} is not a LLaVA model",
            hint=f"supported: {', '.join(sorted(_MODEL_TYPES.values()))}; to build one from a vision encoder and "
            "a causal LM use backbone: assemble",
        )
    meta = read("lora_llava.json")
    if meta and json.loads(meta).get("chat_format"):
        fmt, how = json.loads(meta)["chat_format"], "lora_llava.json"
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
