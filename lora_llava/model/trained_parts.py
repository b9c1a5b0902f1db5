"""Saving and restoring what training changed, and rebuilding a trained model from its adapter.

Usage::

    save_trained_parts(model, spec, recipe, folder)     # LoRA (PEFT files), projector, vision tower if full
    restore_trained_parts(model, spec, folder)          # the projector (+ image newline), vision tower
    model, processor, meta = load_adapter_model("runs/quickstart/adapter")   # the trained model, as trained

File names are the artifact layout's (``lora_llava.artifacts``).
"""

from __future__ import annotations

from pathlib import Path

import torch

from lora_llava.annotations import Model, Processor
from lora_llava.artifacts import LORA_CONFIG_FILE, LORA_WEIGHTS_FILE, PROJECTOR_FILE, VISION_FILE, AdapterMeta
from lora_llava.backbones.registry import BackboneSpec, resolve_backbone
from lora_llava.config.schema import Recipe
from lora_llava.errors import UserError
from lora_llava.model.loading import load_base, load_processor
from lora_llava.model.trainability import connector_state, get_module, image_newline, prepare_projector


def has_lora(folder: Path) -> bool:
    return (Path(folder) / LORA_CONFIG_FILE).is_file()


def save_trained_parts(model: Model, spec: BackboneSpec, recipe: Recipe, out: Path) -> None:
    """Write what training changed: LoRA (PEFT files), projector (+ image newline), vision tower if full."""
    from safetensors.torch import save_file

    full_parts: dict[str, dict[str, torch.Tensor]] = {}
    if recipe.projector.policy == "full":
        state = connector_state(model, spec)
        save_file(state, out / PROJECTOR_FILE)
        full_parts[spec.projector] = {k: v for k, v in state.items() if k != "image_newline"}
    if recipe.vision_tower.policy == "full":
        vt = get_module(model, spec.vision_tower)
        state = {k: v.detach().cpu().contiguous() for k, v in vt.state_dict().items()}
        save_file(state, out / VISION_FILE)
        full_parts[spec.vision_tower] = state
    if hasattr(model, "peft_config"):
        model.save_pretrained(out, safe_serialization=True)
        add_modules_to_save(out, full_parts)


def add_modules_to_save(folder: Path, parts: dict[str, dict[str, torch.Tensor]]) -> None:
    """Make the PEFT adapter in ``folder`` carry the fully trained parts (the projector, a fully trained
    vision tower) as ``modules_to_save``, so plain ``PeftModel.from_pretrained`` restores them too.

    Keys and config are what PEFT itself writes for ``LoraConfig(modules_to_save=[...])``. LLaVA-NeXT's
    image newline is a bare parameter PEFT cannot carry; it stays in projector.safetensors.
    """
    import json

    from safetensors.torch import load_file, save_file

    if not parts:
        return
    weights = load_file(folder / LORA_WEIGHTS_FILE)
    for path, state in parts.items():
        weights.update({f"base_model.model.{path}.{k}": v for k, v in state.items()})
    save_file(weights, folder / LORA_WEIGHTS_FILE, metadata={"format": "pt"})
    config = json.loads((folder / LORA_CONFIG_FILE).read_text())
    names = sorted({*(config.get("modules_to_save") or []), *(p.rsplit(".", 1)[-1] for p in parts)})
    config["modules_to_save"] = names
    (folder / LORA_CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True))


def restore_trained_parts(model: Model, spec: BackboneSpec, folder: Path) -> None:
    """Load the trained projector (+ image newline) and, when trained fully, the vision tower."""
    from safetensors.torch import load_file

    path = folder / PROJECTOR_FILE
    if path.is_file():
        state = load_file(path)
        nl_saved = state.pop("image_newline", None)
        nl = image_newline(model, spec)
        if (nl_saved is None) != (nl is None):
            raise UserError(f"{path}: image_newline {'missing' if nl is not None else 'unexpected'} for this backbone")
        missing, unexpected = get_module(model, spec.projector).load_state_dict(state, strict=False)
        if missing or unexpected:
            raise UserError(
                f"{path}: projector weights do not fit the backbone (missing {missing}, unexpected {unexpected})"
            )
        if nl is not None and nl_saved is not None:
            nl.data = nl_saved.to(nl.device, nl.dtype)
        prepare_projector(model, spec, trainable=False)
    vpath = folder / VISION_FILE
    if vpath.is_file():
        vt = get_module(model, spec.vision_tower)
        missing, unexpected = vt.load_state_dict(load_file(vpath), strict=False)
        if missing or unexpected:
            raise UserError(
                f"{vpath}: vision tower weights do not fit (missing {missing[:3]}, unexpected {unexpected[:3]})"
            )


def check_lora_loaded(model: Model, folder: Path) -> None:
    """Every saved LoRA tensor has a live parameter (nothing left freshly initialized)."""
    from safetensors import safe_open

    with safe_open(str(folder / LORA_WEIGHTS_FILE), "pt") as f:
        saved = sum("lora_" in k for k in f.keys())  # the rest are modules_to_save (fully trained parts)
    live = sum(1 for n, _ in model.named_parameters() if "lora_" in n)
    if saved != live:
        raise UserError(f"{folder}: adapter holds {saved} LoRA tensors but the model has {live} LoRA parameters")


def load_adapter_model(
    adapter_dir: Path, meta: AdapterMeta, dtype: torch.dtype | None = None
) -> tuple[Model, Processor, Recipe]:
    """Rebuild a trained model: base as recorded, trained projector, LoRA weights; nothing left fresh."""
    from peft import PeftModel

    from lora_llava.config.load import load_recipe

    recipe = load_recipe(adapter_dir / "recipe.yaml")
    spec = resolve_backbone(meta.backbone)
    model, _ = load_base(spec, recipe.quantization, dtype=dtype, max_tiles=recipe.images.max_tiles)
    restore_trained_parts(model, spec, adapter_dir)
    if has_lora(adapter_dir):
        model = PeftModel.from_pretrained(model, adapter_dir, is_trainable=False)
        check_lora_loaded(model, adapter_dir)
    model.eval()
    return model, load_processor(adapter_dir), recipe
