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

from lora_llava.backbones.registry import BackboneSpec
from lora_llava.config.schema import Recipe
from lora_llava.errors import UserError


def _is_4bit(module: torch.nn.Module) -> bool:
    return type(module).__name__ in ("Linear4bit", "Params4bit") or any(
        type(p).__name__ == "Params4bit" for p in module.parameters(recurse=False)
    )


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


def part_table(model, spec: BackboneSpec) -> list[PartRow]:
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


def check_policy(model, spec: BackboneSpec, recipe: Recipe) -> list[PartRow]:
    rows = {r.role: r for r in part_table(model, spec)}
    problems = []
    for role in ("vision_tower", "projector", "lm_head"):
        if rows[role].linear_4bit:
            problems.append(
                f"{role} ({rows[role].path}) has {rows[role].linear_4bit} 4-bit layers; it must stay 16-bit"
            )
    for role in ("vision_tower", "projector", "lm_head"):
        if rows[role].lora_layers:
            problems.append(f"{role} has {rows[role].lora_layers} LoRA layers; LoRA belongs to the language model only")
    if rows["vision_tower"].trainable:
        problems.append("vision tower has trainable parameters; vision_tower.policy is frozen")
    if recipe.projector.policy == "full" and rows["projector"].trainable != rows["projector"].params:
        problems.append("projector.policy is full but not every projector parameter is trainable")
    if recipe.projector.policy == "frozen" and rows["projector"].trainable:
        problems.append("projector.policy is frozen but the projector has trainable parameters")
    if recipe.quantization.load_in_4bit and not rows["language_model"].linear_4bit:
        problems.append("quantization.load_in_4bit is true but the language model has no 4-bit layer")
    if not rows["language_model"].lora_layers:
        problems.append("the language model has no LoRA layer")
    if problems:
        raise UserError("part policy violated:\n  " + "\n  ".join(problems))
    return list(rows.values())
