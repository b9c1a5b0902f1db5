"""What trains: LoRA on the language model (and the vision tower when asked), the projector fully.

Usage::

    model = attach_adapters(model, spec, recipe)      # freeze all, then apply the recipe's part policies
    get_module(model, spec.projector)                 # a part by its path, through a PEFT wrapper too
    connector_state(model, spec)                      # projector weights (+ LLaVA-NeXT's image newline)

LoRA targets are one regex anchored under the language model's path (and the vision tower's, for
``vision_tower.policy: lora``), so LoRA never lands in a part the recipe keeps frozen.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import torch

from lora_llava.annotations import Model
from lora_llava.backbones.registry import BackboneSpec
from lora_llava.config.schema import Recipe
from lora_llava.errors import UserError


def base_model(model: Model) -> torch.nn.Module:
    """The transformers model inside a PEFT wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def get_module(model: Model, dotted: str) -> torch.nn.Module:
    """``model.get_submodule`` that also sees through PEFT: the base model's module, or for a part PEFT
    carries as ``modules_to_save`` (a loaded adapter's projector) the copy that runs."""
    module = base_model(model).get_submodule(dotted)
    copies = getattr(module, "modules_to_save", None)
    active = getattr(module, "active_adapters", None)
    if isinstance(copies, torch.nn.ModuleDict) and active and active[0] in copies:
        return copies[active[0]]
    return module


def image_newline(model: Model, spec: BackboneSpec) -> torch.nn.Parameter | None:
    """LLaVA-NeXT's learned row separator (trained and saved with the projector), or None."""
    if not spec.image_newline:
        return None
    owner, _, name = spec.image_newline.rpartition(".")
    return getattr(base_model(model).get_submodule(owner), name)


def connector_state(model: Model, spec: BackboneSpec) -> dict[str, torch.Tensor]:
    """The projector's weights, plus LLaVA-NeXT's image newline (key ``image_newline``)."""
    state = {k: v.detach().cpu().contiguous() for k, v in get_module(model, spec.projector).state_dict().items()}
    nl = image_newline(model, spec)
    if nl is not None:
        state["image_newline"] = nl.detach().cpu().contiguous()
    return state


def _cast_input_hook(module: torch.nn.Module, args: tuple) -> tuple:
    w = next(module.parameters())
    return tuple(a.to(w.dtype) if torch.is_tensor(a) and a.is_floating_point() else a for a in args)


_CASTING: weakref.WeakSet = weakref.WeakSet()  # projectors whose inputs follow their own dtype


def prepare_projector(model: Model, spec: BackboneSpec, trainable: bool) -> None:
    """Projector (and image newline) in float32 when trained, frozen otherwise; inputs follow its dtype."""
    proj = get_module(model, spec.projector)
    if trainable:
        proj.float()
    for p in proj.parameters():
        p.requires_grad_(trainable)
    nl = image_newline(model, spec)
    if nl is not None:
        if trainable:
            nl.data = nl.data.float()
        nl.requires_grad_(trainable)
    if proj not in _CASTING:
        proj.register_forward_pre_hook(_cast_input_hook)
        _CASTING.add(proj)


def lora_targets(spec: BackboneSpec, recipe: Recipe) -> str | None:
    """One regex for every LoRA target: the LM's layers (policy lora) and the vision tower's (policy lora)."""
    parts = []
    if recipe.lm_policy == "lora":
        parts.append(spec.lora_target_regex(recipe.lora.target_modules))
    if recipe.vision_tower.policy == "lora":
        parts.append(spec.vision_lora_regex(recipe.vision_tower.target_modules))
    if not parts:
        return None
    return parts[0] if len(parts) == 1 else "|".join(f"(?:{p})" for p in parts)


def attach_adapters(
    model: Model, spec: BackboneSpec, recipe: Recipe, lora: Callable[[Model, str, Recipe], Model] | None = None
) -> Model:
    """Apply the recipe's part policies: freeze everything, then LoRA where asked, full training where asked.

    ``lora(model, targets, recipe)`` attaches the LoRA layers (``targets``: one regex of module paths); PEFT's
    by default. The planner passes its meta-device stand-ins (``lora_llava.plan.meta``), so both follow this
    one policy.
    """
    for p in model.parameters():
        p.requires_grad_(False)
    if recipe.train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    targets = lora_targets(spec, recipe)
    if targets is not None:
        model = (lora or peft_lora)(model, targets, recipe)
    if recipe.vision_tower.policy == "full":
        vt = get_module(model, spec.vision_tower)
        vt.float()
        for p in vt.parameters():
            p.requires_grad_(True)
    prepare_projector(model, spec, recipe.projector.policy == "full")
    return model


def peft_lora(model: Model, targets: str, recipe: Recipe) -> Model:
    """PEFT LoRA layers on every module whose path matches ``targets``, their weights in float32."""
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(
        r=recipe.lora.r,
        lora_alpha=recipe.lora.alpha,
        lora_dropout=recipe.lora.dropout,
        target_modules=targets,
        bias="none",
    )
    try:
        model = get_peft_model(model, cfg)
    except ValueError as e:
        raise no_lora_target(recipe, str(e)) from None
    for name, p in model.named_parameters():
        if "lora_" in name:
            p.data = p.data.float()
    return model


def no_lora_target(recipe: Recipe, why: str) -> UserError:
    return UserError(
        f"LoRA targets (lora.target_modules {recipe.lora.target_modules}, vision_tower.target_modules "
        f"{recipe.vision_tower.target_modules}) match no linear layer: {why}",
        hint="use layer names of that part, e.g. q_proj, v_proj",
    )
