"""Before any weights load: every LoRA target name of a recipe matches a linear layer of its part.

Usage::

    check_lora_targets(spec, recipe)     # UserError naming a misspelt target and the names there are
    linear_layer_names(spec, [spec.language_model])   # {"model.language_model": {"q_proj", ...}}

The names come from the backbone's model built on the meta device from its config (no weights, no memory),
so a misspelt name (``v_prj``) is reported by ``check`` instead of being silently ignored beside one that
matches. Building the model needs torch and transformers' modeling code (seconds to import); the names of a
local backbone are kept in lora_llava's cache, keyed by its config file, model class and transformers
version, so a later ``check`` of the same backbone imports neither.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

from lora_llava.backbones.registry import BackboneSpec
from lora_llava.config.schema import Recipe
from lora_llava.errors import UserError
from lora_llava.fsutil import cache_root
from lora_llava.layout import MODEL_CONFIG_FILE
from lora_llava.versions import package_versions


def check_lora_targets(spec: BackboneSpec, recipe: Recipe) -> None:
    """A UserError naming each LoRA target that matches no linear layer of its part, with the names there are."""
    wanted = []
    if recipe.lm_policy == "lora":
        wanted.append(("lora.target_modules", spec.language_model, recipe.lora.target_modules, "language model"))
    if recipe.vision_tower.policy == "lora":
        wanted.append(
            ("vision_tower.target_modules", spec.vision_tower, recipe.vision_tower.target_modules, "vision tower")
        )
    if not wanted:
        return
    names = linear_layer_names(spec, [part for _, part, _, _ in wanted])
    problems = []
    for key, part, targets, what in wanted:
        have = names[part]
        missing = [n for n in targets if n not in have]
        if missing:
            problems.append(
                f"{key}: {', '.join(repr(n) for n in missing)} match(es) no linear layer of the {what} "
                f"(its linear layers: {', '.join(sorted(have))})"
            )
    if problems:
        raise UserError("\n".join(problems), hint="use the layer names listed")


def linear_layer_names(spec: BackboneSpec, parts: list[str]) -> dict[str, set[str]]:
    """For each of ``parts`` (module paths), the names (last path component) of its linear layers."""
    path = spec.local_path()
    key = _cache_key(spec, Path(path))
    cached = _read(key) if key else None
    if cached is not None and all(p in cached for p in parts):
        return {p: set(cached[p]) for p in parts}
    names = _from_meta_model(spec, path, parts)
    if key:
        _write(key, {**(cached or {}), **{p: sorted(v) for p, v in names.items()}})
    return names


def _from_meta_model(spec: BackboneSpec, path: str, parts: list[str]) -> dict[str, set[str]]:
    import torch
    from transformers import AutoConfig

    from lora_llava.model.loading import hub_kwargs

    config = AutoConfig.from_pretrained(path, **hub_kwargs(path))
    with torch.device("meta"):
        model = spec.model_class()(config)
    return {
        part: {
            n.rsplit(".", 1)[-1] for n, m in model.get_submodule(part).named_modules() if isinstance(m, torch.nn.Linear)
        }
        for part in parts
    }


def _cache_key(spec: BackboneSpec, folder: Path) -> str | None:
    """A digest of what decides the names: the config file's bytes, the model class, transformers' version.
    None for a backbone without a local config file (a Hub id: its names are not kept)."""
    try:
        config = (folder / MODEL_CONFIG_FILE).read_bytes()
    except OSError:
        return None
    h = hashlib.sha256(config)
    h.update(f"\0{spec.family}\0{package_versions(('transformers',)).get('transformers')}".encode())
    return h.hexdigest()[:24]


def _cache_file(key: str) -> Path:
    return cache_root() / "linear-layers" / f"{key}.json"


def _read(key: str) -> dict[str, list[str]] | None:
    try:
        data = json.loads(_cache_file(key).read_text())
    except (OSError, ValueError):
        return None
    ok = isinstance(data, dict) and all(
        isinstance(v, list) and all(isinstance(n, str) for n in v) for v in data.values()
    )
    return data if ok else None


def _write(key: str, data: dict[str, list[str]]) -> None:
    """Whole or absent (a temporary file renamed into place); a cache that cannot be written is skipped."""
    target = _cache_file(key)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{key}-")
        with os.fdopen(fd, "w") as f:
            json.dump(data, f)
        os.replace(tmp, target)
    except OSError:
        pass
