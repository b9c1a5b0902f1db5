"""Optimizer parameter groups: each part at its own learning rate.

Usage::

    groups = optimizer_groups(model, spec, recipe)
    GuardedAdamW(groups, lr=recipe.train.learning_rate)     # AdamW that can skip a step the trainer marks bad

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


class GuardedAdamW(torch.optim.AdamW):
    """AdamW that leaves weights and optimizer state untouched on a step the trainer marked bad (``skip``:
    a NaN/inf loss or gradient norm); the flag is cleared by that step."""

    skip = False

    def step(self, closure: Any = None) -> Any:
        if self.skip:
            self.skip = False
            return None
        return super().step(closure)
