"""Optimizer parameter groups: each part at its own learning rate.

Usage::

    groups = optimizer_groups(model, spec, recipe)
    GuardedAdamW(groups, lr=recipe.train.learning_rate)     # AdamW that can skip a step the trainer marks bad
    make_optimizer(model, spec, recipe)                     # the recipe's train.optimizer, guarded the same way

LoRA of the language model trains at ``train.learning_rate`` with ``train.weight_decay``; the
projector (and LLaVA-NeXT's image newline) at ``projector.learning_rate`` without weight decay (as
LLaVA's mm_projector_lr); the vision tower at ``vision_tower.learning_rate``. Frozen parameters are
in no group; empty groups are left out.
"""

from __future__ import annotations

from typing import Any

import torch

from lora_llava.annotations import Model
from lora_llava.backbones.registry import BackboneSpec
from lora_llava.config.schema import Recipe
from lora_llava.model.trainability import get_module, image_newline

PARTS = ("language_model", "projector", "vision_tower")


def optimizer_groups(model: Model, spec: BackboneSpec, recipe: Recipe) -> list[dict[str, Any]]:
    """One AdamW group per trained part (``name`` says which), trainable parameters only."""
    proj_ids = {id(p) for p in get_module(model, spec.projector).parameters()}
    nl = image_newline(model, spec)
    if nl is not None:
        proj_ids.add(id(nl))
    vision_ids = {id(p) for p in get_module(model, spec.vision_tower).parameters()}
    lr = recipe.train.learning_rate
    buckets: dict[str, list] = {k: [] for k in PARTS}
    for p in model.parameters():
        if p.requires_grad:
            key = "projector" if id(p) in proj_ids else "vision_tower" if id(p) in vision_ids else "language_model"
            buckets[key].append(p)
    rates = {
        "language_model": (lr, recipe.train.weight_decay),
        "projector": (recipe.projector.learning_rate or lr, 0.0),
        "vision_tower": (recipe.vision_tower.learning_rate or lr, recipe.train.weight_decay),
    }
    return [
        {"params": ps, "lr": rates[k][0], "weight_decay": rates[k][1], "name": k} for k, ps in buckets.items() if ps
    ]


class SkippableStep:
    """Mixed into an optimizer: a step the trainer marked bad (``skip``: a NaN/inf loss or gradient norm)
    leaves weights and optimizer state untouched; the flag is cleared by that step."""

    skip = False

    def step(self, closure: Any = None) -> Any:
        if self.skip:
            self.skip = False
            return None
        return super().step(closure)  # type: ignore[misc]


class GuardedAdamW(SkippableStep, torch.optim.AdamW):
    """torch's AdamW (fp32 moments), skippable."""


def make_optimizer(model: Model, spec: BackboneSpec, recipe: Recipe) -> torch.optim.Optimizer:
    """``train.optimizer`` over the recipe's parameter groups: ``adamw`` (torch, fp32 moments), ``adamw_8bit``
    (bitsandbytes, 8-bit block-wise moments: a quarter of the state memory) or ``paged_adamw_8bit`` (the same,
    its state in paged memory that CUDA moves to the CPU under memory pressure instead of failing; on a CPU it
    runs as adamw_8bit). Each skips the steps the NaN/inf guard marks bad."""
    groups = optimizer_groups(model, spec, recipe)
    lr = recipe.train.learning_rate
    name = recipe.train.optimizer
    if name == "adamw":
        return GuardedAdamW(groups, lr=lr)
    import bitsandbytes as bnb

    base = {"adamw_8bit": bnb.optim.AdamW8bit, "paged_adamw_8bit": bnb.optim.PagedAdamW8bit}[name]
    guarded = type(f"Guarded{base.__name__}", (SkippableStep, base), {})
    if name == "paged_adamw_8bit" and not torch.cuda.is_available():
        import warnings

        warnings.filterwarnings("ignore", message="Paged optimizers are not supported on CPU")
    return guarded(groups, lr=lr)
