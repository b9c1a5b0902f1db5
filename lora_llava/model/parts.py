"""The part table: what each part of a LLaVA model holds, and the policy it must obey.

Usage::

    rows = part_table(model, spec)
    print(format_part_table(rows))
    check_policy(model, spec, recipe)     # UserError listing every violation

Parts are the backbone spec's roles (vision tower, projector, language model, LM head). The policy
for a QLoRA run: the vision tower, projector and LM head are never quantized; LoRA layers exist
only inside the language model; the vision tower has no trainable parameter; the projector is
trainable when ``projector.policy`` is ``full``; something is trainable at all.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lora_llava.annotations import Model
from lora_llava.backbones.registry import BackboneSpec
from lora_llava.config.schema import Recipe
from lora_llava.errors import UserError


def _is_4bit(module: torch.nn.Module) -> bool:
    """A module holding 4-bit weights itself. PEFT's LoRA wrapper of a bitsandbytes layer is also
    named ``Linear4bit`` but holds none (its ``base_layer`` does), so it is not counted twice."""
    return any(type(p).__name__ == "Params4bit" for p in module.parameters(recurse=False))


def _numel(p: torch.nn.Parameter) -> int:
    # 4-bit weights are packed two per byte; count the logical parameters
    return p.numel() * 2 if type(p).__name__ == "Params4bit" else p.numel()


@dataclass
class PartRow:
    role: str
    path: str
    params: int
    trainable: int
    dtypes: str
    linear_4bit: int
    lora_layers: int


def part_table(model: Model, spec: BackboneSpec) -> list[PartRow]:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    rows = []
    for role, path in spec.roles().items():
        mod = base.get_submodule(path)
        params = list(mod.parameters())
        kinds = sorted(
            {"nf4/4-bit" if type(p).__name__ == "Params4bit" else str(p.dtype).replace("torch.", "") for p in params}
        )
        rows.append(
            PartRow(
                role=role,
                path=path,
                params=sum(_numel(p) for p in params),
                trainable=sum(p.numel() for p in params if p.requires_grad),
                dtypes=", ".join(kinds),
                linear_4bit=sum(1 for m in mod.modules() if _is_4bit(m) and type(m).__name__ == "Linear4bit"),
                lora_layers=sum(1 for n, _ in mod.named_modules() if n.endswith("lora_A")),
            )
        )
    if spec.image_newline:
        owner, _, name = spec.image_newline.rpartition(".")
        p = getattr(base.get_submodule(owner), name)
        rows.append(
            PartRow(
                "image_newline",
                spec.image_newline,
                p.numel(),
                p.numel() if p.requires_grad else 0,
                str(p.dtype).replace("torch.", ""),
                0,
                0,
            )
        )
    return rows


def _fmt(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def format_part_table(rows: list[PartRow]) -> str:
    head = f"{'part':<15} {'params':>9} {'trainable':>10} {'4-bit lin':>9} {'LoRA':>5}  dtype"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r.role:<15} {_fmt(r.params):>9} {_fmt(r.trainable):>10} {r.linear_4bit:>9} {r.lora_layers:>5}  {r.dtypes}"
        )
    total = sum(r.params for r in rows)
    train = sum(r.trainable for r in rows)
    lines.append(f"{'total':<15} {_fmt(total):>9} {_fmt(train):>10}   ({100 * train / max(total, 1):.2f}% trainable)")
    return "\n".join(lines)


def check_policy(model: Model, spec: BackboneSpec, recipe: Recipe) -> list[PartRow]:
    """Raise UserError listing every way the loaded model breaks the recipe's part policies."""
    rows = {r.role: r for r in part_table(model, spec)}
    vt, proj, lm, head = rows["vision_tower"], rows["projector"], rows["language_model"], rows["lm_head"]
    problems = []
    for r in (vt, proj, head):
        if r.linear_4bit:
            problems.append(f"{r.role} ({r.path}) has {r.linear_4bit} 4-bit layers; it must stay 16-bit")
    for r in (proj, head):
        if r.lora_layers:
            problems.append(f"{r.role} has {r.lora_layers} LoRA layers; LoRA belongs to the language model only")
    vpol = recipe.vision_tower.policy
    if vpol == "frozen" and (vt.trainable or vt.lora_layers):
        problems.append("vision tower has trainable parameters or LoRA layers; vision_tower.policy is frozen")
    if vpol == "lora" and not vt.lora_layers:
        problems.append("vision_tower.policy is lora but the vision tower has no LoRA layer")
    if vpol == "full" and vt.trainable != vt.params:
        problems.append("vision_tower.policy is full but not every vision tower parameter is trainable")
    if recipe.projector.policy == "full" and proj.trainable != proj.params:
        problems.append("projector.policy is full but not every projector parameter is trainable")
    if recipe.projector.policy == "frozen" and proj.trainable:
        problems.append("projector.policy is frozen but the projector has trainable parameters")
    if head.trainable:
        problems.append("lm_head has trainable parameters; it stays frozen")
    if recipe.quantization.load_in_4bit and not lm.linear_4bit:
        problems.append("quantization.load_in_4bit is true but the language model has no 4-bit layer")
    lpol = recipe.lm_policy
    if lpol == "lora" and not lm.lora_layers:
        problems.append("the language model has no LoRA layer (language_model.policy lora)")
    if lpol == "frozen" and (lm.trainable or lm.lora_layers):
        problems.append("the language model has trainable parameters; language_model.policy is frozen")
    if (
        lpol == "lora"
        and lm.trainable
        and lm.trainable
        > sum(p.numel() for n, p in model.named_parameters() if "lora_" in n and spec.language_model in n)
    ):
        problems.append("the language model has trainable parameters outside its LoRA layers")
    if problems:
        raise UserError("part policy violated:\n  " + "\n  ".join(problems))
    return list(rows.values())
