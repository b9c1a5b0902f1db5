"""Where the planned backbone's config comes from, without weights: its directory or the Hugging Face cache,
else, offline, the registry's row of a registered Hub backbone (``BackboneSpec.offline_config``).

Usage::

    config, spec, source = backbone_config(recipe)  # transformers config, BackboneSpec, ConfigSource
    source.origin                 # ConfigOrigin.LOCAL | OFFLINE | ASSEMBLED | STAGE1_PENDING
    source.origin.has_processor   # whether the backbone's processor is here to read the data's lengths
    str(source)                   # "built-in config (offline)", "config from ...": what the plan prints

An assembled recipe's parts come the same way: the built-in tiny parts, a directory or the cache, else
``BUILTIN_PART_CONFIGS`` below (the Hub parts a shipped recipe assembles from). Parts are not backbones,
so the registry has no rows for them; their offline configs stay here, CLIP's taken from the registry.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

from lora_llava.backbones.registry import CLIP_VIT_L_336, BackboneSpec, registered_backbones
from lora_llava.config.schema import Recipe
from lora_llava.errors import UserError


class ConfigOrigin(enum.Enum):
    """Where a planned config came from, which says whether the backbone's processor is here too."""

    LOCAL = "local"  # a directory, the Hugging Face cache, or a built-in tiny backbone
    OFFLINE = "offline"  # the registry's offline config of a registered Hub backbone
    ASSEMBLED = "assembled"  # built from an assemble recipe's parts (not assembled yet)
    STAGE1_PENDING = "stage1_pending"  # a stage-2 recipe whose stage-1 run does not exist yet

    @property
    def has_processor(self) -> bool:
        return self is ConfigOrigin.LOCAL


@dataclass(frozen=True)
class ConfigSource:
    """Where the config came from: ``origin`` to decide on, ``description`` to print."""

    origin: ConfigOrigin
    description: str

    def __str__(self) -> str:
        return self.description


# The Hub parts a shipped recipe assembles from (the values of their config.json on the Hub); used only when
# neither a directory nor the Hugging Face cache has the config.
_QWEN2_1_5B = {"model_type": "qwen2", "hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28,
               "num_attention_heads": 12, "num_key_value_heads": 2, "vocab_size": 151936,
               "tie_word_embeddings": True}  # fmt: skip
BUILTIN_PART_CONFIGS: dict[str, dict[str, Any]] = {
    "openai/clip-vit-large-patch14-336": CLIP_VIT_L_336,
    "Qwen/Qwen2-1.5B-Instruct": _QWEN2_1_5B,
}
# The registry's offline configs by Hub id, in the shape bench/gpu_check.py reads (a view, not a second table)
BUILTIN_CONFIGS: dict[str, dict[str, Any]] = {
    s.source: {"family": s.family, "text": c.text_values(), "vision": c.vision_values()}
    for s in registered_backbones()
    if (c := s.offline_config) is not None
}
_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]


def backbone_config(recipe: Recipe) -> tuple[Any, BackboneSpec, ConfigSource]:
    """(transformers config, BackboneSpec, where the config came from) of the recipe's backbone, without weights."""
    from lora_llava.artifacts import resolve_backbone

    if recipe.backbone == "assemble":
        assert recipe.assemble is not None  # the schema requires it with backbone: assemble
        a = recipe.assemble
        vision, v_src = _part_config(a.vision_encoder, "assemble.vision_encoder")
        text, t_src = _part_config(a.language_model, "assemble.language_model")
        vision = getattr(vision, "vision_config", vision)  # the vision half of a full CLIP/SigLIP config
        config = llava_config("llava", text, vision, a.vision_feature_layer, a.vision_feature_select)
        spec = BackboneSpec("assemble", "assemble", "llava", "chatml", "assembled")
        where = f"assembled from {a.vision_encoder} ({v_src}) + {a.language_model} ({t_src})"
        return config, spec, ConfigSource(ConfigOrigin.ASSEMBLED, where)
    try:
        spec = resolve_backbone(recipe.backbone)
    except UserError:
        stage1 = _stage1_recipe_for(recipe.backbone)
        if stage1 is None:
            raise
        config, spec, inner = backbone_config(stage1)
        where = f"the stage-1 run {recipe.backbone} does not exist yet; its recipe's model: {inner}"
        return config, spec, ConfigSource(ConfigOrigin.STAGE1_PENDING, where)
    config = _config_from(spec.local_path())
    if config is not None:
        where = "config from " + ("the built-in backbone" if spec.builtin else spec.local_path())
        return config, spec, ConfigSource(ConfigOrigin.LOCAL, where)
    known = spec.offline_config
    if known is None:
        raise UserError(
            f"cannot plan {spec.name!r}: its config.json is neither in a local directory nor in the Hugging Face "
            "cache, and lora_llava has no built-in config for it",
            hint="download its config (hf download REPO config.json) or give a local directory as backbone",
        )
    text, vision = config_of(known.text_values()), config_of(known.vision_values())
    config = llava_config(spec.family, text, vision, -2, "default")
    return config, spec, ConfigSource(ConfigOrigin.OFFLINE, "built-in config (offline)")


def _config_from(path: str) -> Any:
    from transformers import AutoConfig

    from lora_llava.model.loading import hub_kwargs

    try:
        return AutoConfig.from_pretrained(path, **hub_kwargs(path))
    except (OSError, ValueError):
        return None


def config_of(values: dict[str, Any]) -> Any:
    """A transformers config from a config.json's values (``model_type`` picks the class)."""
    from transformers import AutoConfig

    kw = dict(values)
    return AutoConfig.for_model(kw.pop("model_type"), **kw)


def _part_config(name: str, key: str) -> tuple[Any, str]:
    from lora_llava.backbones.assemble import PARTS

    if name in PARTS:
        from lora_llava.backbones.tiny import ensure_tiny

        config = _config_from(str(ensure_tiny(name)))
        if config is not None:
            return config, "built-in part"
    else:
        config = _config_from(name)
        if config is not None:
            return config, "its config"
        if name in BUILTIN_PART_CONFIGS:
            return config_of(BUILTIN_PART_CONFIGS[name]), "built-in config (offline)"
    raise UserError(
        f"cannot plan: {key} {name!r} has no config in a local directory or the Hugging Face cache, and lora_llava "
        "has no built-in config for it",
        hint="download its config (hf download REPO config.json) or give a local directory",
    )


def llava_config(family: str, text: Any, vision: Any, feature_layer: int, select: str) -> Any:
    """A LLaVA (``family`` "llava") or LLaVA-NeXT config around a text and a vision config."""
    from transformers import LlavaConfig, LlavaNextConfig

    kw = dict(
        vision_config=vision,
        text_config=text,
        image_token_id=0,
        projector_hidden_act="gelu",
        vision_feature_layer=feature_layer,
        vision_feature_select_strategy=select,
        tie_word_embeddings=bool(getattr(text, "tie_word_embeddings", False)),
    )
    if family == "llava_next":
        return LlavaNextConfig(**kw, image_grid_pinpoints=_PINPOINTS)
    return LlavaConfig(**kw)


def _stage1_recipe_for(backbone: str) -> Recipe | None:
    """The shipped stage-1 (align) recipe whose output_dir is ``backbone`` (a stage-2 recipe's backbone)."""
    from pathlib import Path

    from lora_llava.config.load import load_recipe
    from lora_llava.recipes import list_recipes, recipe_path

    for name, _ in list_recipes():
        r = load_recipe(recipe_path(name))
        if r.stage == "align" and Path(r.output_dir) == Path(backbone):
            return r
    return None
