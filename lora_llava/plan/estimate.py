"""The estimate: categories of bytes from two meta passes extrapolated to the model's depth, the optimizer
state, the CUDA overheads, the plan with its verdict against a card, and the micro-batch that fits.

Usage::

    plan = plan_memory(recipe, gpu_memory="24GB")   # MemoryPlan
    plan.table(); plan.total; plan.tensors; plan.fits; plan.suggestion   # Suggestion(micro_batch, grad_accum)
    preload_warning(recipe)        # train on CUDA: one line when the plan exceeds the card, else None
    format_bytes(3 * 1024**3)      # "3.00 GiB"
    parse_size("24GB")             # bytes (GB read as GiB)
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from lora_llava.annotations import Log
from lora_llava.config.schema import Recipe
from lora_llava.errors import UserError
from lora_llava.plan.configs import backbone_config
from lora_llava.plan.lengths import sequence_plan
from lora_llava.plan.meta import VISION_LAYERS, Pass, meta_pass

GiB = 1024**3
CUDA_OVERHEAD = GiB // 2  # CUDA context and kernels: outside the caching allocator
# cuBLAS' workspaces, allocated through the caching allocator: PyTorch's default on Hopper, ":4096:2:16:8"
# (2 x 4 MiB + 8 x 16 MiB), measured as the allocated bytes a step leaves beyond its tensors (bench/README.md)
CUBLAS_WORKSPACE = 136 * 1024**2
ALLOCATOR_SLACK = 0.10  # caching-allocator fragmentation, as a share of the tensors' peak
STATED_ERROR = 0.20  # |estimate - measured| / measured on the tiny backbones (CPU), see tests/test_plan.py
SLACK = "CUDA allocator slack (10%)"  # the two categories added on CUDA, not tensors of the step
CONTEXT = "CUDA context"
WORKSPACE = "cuBLAS workspace"  # added on CUDA: allocated memory, so part of the tensors' peak
OVERHEADS = (SLACK, CONTEXT)


@dataclass
class Suggestion:
    """The largest micro-batch that fits, with the grad_accum that keeps the recipe's global batch."""

    micro_batch: int
    grad_accum: int
    total: int  # planned bytes at that micro-batch
    fits: bool  # False: not even micro-batch 1 fits


@dataclass
class MemoryPlan:
    """Planned peak memory of one training step, by category (bytes)."""

    backbone: str
    config_source: str  # where the backbone's config came from
    device: str  # "cuda" or "cpu": what the overheads assume
    compute_dtype: str
    micro_batch: int
    grad_accum: int
    seq_len: int
    seq_source: str  # how seq_len was found
    images_per_sample: int
    gradient_checkpointing: bool
    categories: dict[str, int]  # name -> bytes; their sum is ``total``
    peak_at: str  # "backward" or "optimizer step"
    gpu_memory: int | None = None
    suggestion: Suggestion | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(self.categories.values())

    @property
    def tensors(self) -> int:
        """The tensors' peak (the total without the CUDA overheads): what a measured allocator peak compares to."""
        return sum(v for k, v in self.categories.items() if k not in OVERHEADS)

    @property
    def fits(self) -> bool | None:
        return None if self.gpu_memory is None else self.total <= self.gpu_memory

    def table(self) -> str:
        lines = [
            f"memory plan: {self.backbone} ({self.config_source}), {self.compute_dtype}, micro-batch "
            f"{self.micro_batch} x {self.seq_len} tokens ({self.seq_source}), {self.images_per_sample} image(s)/sample, "
            f"gradient checkpointing {'on' if self.gradient_checkpointing else 'off'}",
            f"  {'category':<34} {'memory':>10}",
        ]
        for name, size in self.categories.items():
            if not size:  # nothing of it alive at the peak (gradients before the backward reaches them, say)
                continue
            lines.append(f"  {name:<34} {format_bytes(size):>10}")
        lines.append(f"  {'total (peak at the ' + self.peak_at + ')':<34} {format_bytes(self.total):>10}")
        lines.extend(f"note: {n}" for n in self.notes)
        if self.gpu_memory is not None:
            verdict = "fits" if self.fits else "does NOT fit"
            lines.append(f"{verdict} in {format_bytes(self.gpu_memory)}")
            s = self.suggestion
            if s is not None and s.fits:
                glob = self.micro_batch * self.grad_accum
                lines.append(
                    f"suggested: train.batch_size={s.micro_batch} train.grad_accum={s.grad_accum} "
                    f"(global batch {s.micro_batch * s.grad_accum}, recipe's {glob}; planned {format_bytes(s.total)})"
                )
            elif s is not None:
                lines.append(
                    f"even train.batch_size=1 needs {format_bytes(s.total)}: {_other_levers(self.gradient_checkpointing)}"
                )
        return "\n".join(lines)


def _other_levers(checkpointing: bool) -> str:
    """What else lowers the peak when no micro-batch fits (gradient checkpointing only when it is off)."""
    turn_on = "" if checkpointing else "turn on train.gradient_checkpointing, "
    return f"lower data.max_length, {turn_on}lower lora.r, or use a bigger card"


def format_bytes(n: float) -> str:
    for unit, size in (("GiB", GiB), ("MiB", 1024**2), ("KiB", 1024)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def parse_size(text: str) -> int:
    """``"24GB"``, ``"24GiB"``, ``"24"`` (GiB), ``"800MB"`` -> bytes (GB read as GiB, as cards are sold)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(I?B)?\s*", text.upper())
    if not m:
        raise UserError(f"--gpu-memory {text!r} is not a size", hint="write it like 24GB, 80GiB or 800MB")
    value, unit = float(m.group(1)), m.group(2) or "G"
    return int(value * 1024 ** {"K": 1, "M": 2, "G": 3, "T": 4}[unit])


def _estimate(
    config: Any, spec: Any, recipe: Recipe, batch: int, seq: int, images: int, sup: float | None, device: str
) -> tuple[dict[str, int], str]:
    """Categories (bytes) and where the peak is, for one micro-batch size on ``device``."""
    depth = config.get_text_config().num_hidden_layers
    one = _cached_pass(config, spec, recipe, batch, seq, images, sup, 1)
    two = _cached_pass(config, spec, recipe, batch, seq, images, sup, 2) if depth > 1 else one

    def at_depth(a: float, b: float) -> int:  # identical decoder layers: memory is linear in their number
        return int(a + (b - a) * (depth - 1))

    act = at_depth(one.peak - one.logits - one.grads, two.peak - two.logits - two.grads)
    grads = max(0, at_depth(one.grads, two.grads))  # the moment of the peak moves a little with depth
    logits = two.logits
    cats = {k: at_depth(one.params[k], two.params[k]) for k in one.params}
    if recipe.vision_tower.policy == "frozen":
        layers = config.vision_config.num_hidden_layers - VISION_LAYERS
        cats["16-bit weights (frozen)"] += _vision_layer_bytes(config, recipe) * layers
    cats = {k: v for k, v in cats.items() if v}
    trainable = at_depth(one.trainable, two.trainable)
    name = recipe.train.optimizer
    # AdamW: exp_avg, exp_avg_sq in float32; bitsandbytes' 8-bit AdamW: one byte each plus a float32 absmax
    # per 256 values (tensors under 4096 values stay 32-bit: a negligible share of LoRA at real sizes)
    per_param = 8 if name == "adamw" else 2 + 8 / 256
    cats[f"optimizer state ({name})"] = int(per_param * trainable)
    backward = act + logits + grads
    # the optimizer step: every gradient (float32, as the trained parts), plus the update's temporaries: torch's
    # AdamW on CUDA tensors runs foreach (a float32 intermediate for every trained tensor at once: measured
    # 1.24 GiB over 1.27 GiB of trained weights, bench/README.md); elsewhere, and bitsandbytes' 8-bit
    # optimizers, update tensor by tensor (two float32 temporaries of the largest)
    foreach = device == "cuda" and name == "adamw"
    step_grads, temporaries = 4 * trainable, 4 * trainable if foreach else 2 * 4 * two.largest_trainable
    if step_grads + temporaries > backward:
        cats["gradients"] = step_grads
        cats["optimizer step temporaries"] = temporaries
        return cats, "optimizer step"
    cats["gradients (at the peak)"] = grads
    cats["activations"] = act
    cats["logits (supervised positions)" if recipe.train.supervised_logits else "logits (+ float32 log-softmax)"] = (
        logits
    )
    return cats, "backward"


_PASSES: dict[tuple, Pass] = {}


def _cached_pass(
    config: Any, spec: Any, recipe: Recipe, batch: int, seq: int, images: int, sup: float | None, layers: int
) -> Pass:
    key = (id(config), id(recipe), batch, seq, images, sup, layers)
    if key not in _PASSES:
        _PASSES[key] = meta_pass(config, spec, recipe, batch, seq, images, sup, layers)
    return _PASSES[key]


def _vision_layer_bytes(config: Any, recipe: Recipe) -> int:
    """Bytes of one vision-tower encoder layer in the compute dtype."""
    from transformers import AutoModel

    from lora_llava.model.loading import torch_dtype

    v = copy.deepcopy(config.vision_config)
    with torch.device("meta"):
        a = sum(p.numel() for p in AutoModel.from_config(v).parameters())
        v.num_hidden_layers += 1
        b = sum(p.numel() for p in AutoModel.from_config(v).parameters())
    return (b - a) * torch_dtype(recipe.quantization.compute_dtype).itemsize


def _with_overheads(cats: dict[str, int], device: str) -> dict[str, int]:
    if device != "cuda":
        return cats
    cats = {**cats, WORKSPACE: CUBLAS_WORKSPACE}
    tensors = sum(cats.values())
    return {**cats, SLACK: int(tensors * ALLOCATOR_SLACK), CONTEXT: CUDA_OVERHEAD}


def plan_memory(
    recipe: Recipe,
    gpu_memory: int | str | None = None,
    device: str | None = None,
    seq_len: int | None = None,
    log: Log | None = None,
    supervised: float | None = None,
) -> MemoryPlan:
    """The planned peak of one training step of ``recipe``; with ``gpu_memory`` (bytes or "24GB") whether it fits
    and the largest micro-batch that does (grad_accum keeping the recipe's global batch). ``device`` (default:
    cuda when ``gpu_memory`` is given or CUDA is available, else cpu) decides whether CUDA overheads are added;
    ``seq_len`` overrides the longest sample, ``supervised`` the supervised (answer) tokens per sample."""
    limit = parse_size(gpu_memory) if isinstance(gpu_memory, str) else gpu_memory
    device = device or ("cuda" if limit is not None or torch.cuda.is_available() else "cpu")
    config, spec, source = backbone_config(recipe)
    if seq_len is not None:
        seq, images, how, sup = seq_len, 1, "given", supervised
    else:
        seq, images, how, sup = sequence_plan(recipe, source, log)
    t = recipe.train
    cats, peak_at = _estimate(config, spec, recipe, t.batch_size, seq, images, sup, device)
    plan = MemoryPlan(
        backbone=recipe.backbone if recipe.backbone != "assemble" else "assemble",
        config_source=str(source),
        device=device,
        compute_dtype=recipe.quantization.compute_dtype,
        micro_batch=t.batch_size,
        grad_accum=t.grad_accum,
        seq_len=seq,
        seq_source=how,
        images_per_sample=images,
        gradient_checkpointing=t.gradient_checkpointing,
        categories=_with_overheads(cats, device),
        peak_at=peak_at,
        gpu_memory=limit,
    )
    if device == "cuda" and recipe.quantization.compute_dtype == "float32":
        plan.notes.append("compute_dtype float32 on a GPU: bfloat16 halves the frozen weights and activations")
    trained = sum(cats.get(k, 0) for k in ("LoRA", "projector", "vision tower (trained)"))
    plan.notes.append(
        f"several GPUs (DDP: torchrun, accelerate launch): each GPU holds all of this, plus DDP's gradient buckets "
        f"(one more copy of the trained weights' gradients, about {format_bytes(trained)}): about "
        f"{format_bytes(plan.total + trained)} per GPU (an estimate, as the rest)"
    )
    if limit is not None:
        plan.suggestion = _suggest(plan, lambda b: sum(_with_overheads(
            _estimate(config, spec, recipe, b, seq, images, sup, device)[0], device).values()))  # fmt: skip
    return plan


def _suggest(plan: MemoryPlan, total_at: Callable[[int], int]) -> Suggestion:
    """Largest micro-batch dividing the global batch whose plan fits (memory is close to linear in the batch:
    two points, then each candidate checked exactly)."""
    assert plan.gpu_memory is not None
    glob = plan.micro_batch * plan.grad_accum
    one = total_at(1)
    if one > plan.gpu_memory:
        return Suggestion(1, glob, one, False)
    two = total_at(2) if glob >= 2 else one
    per_sample = max(two - one, 1)
    guess = 1 + int((plan.gpu_memory - one) // per_sample)
    for b in sorted((d for d in range(1, glob + 1) if glob % d == 0 and d <= guess), reverse=True):
        total = plan.total if b == plan.micro_batch else total_at(b)
        if total <= plan.gpu_memory:
            return Suggestion(b, glob // b, total, True)
    return Suggestion(1, glob, one, True)


def preload_warning(recipe: Recipe, log: Log | None = None) -> str | None:
    """For ``train`` on CUDA, before weights load: one warning line when the plan exceeds the card's memory,
    else None (also None without CUDA, and when the plan cannot be made: planning never stops training)."""
    if not torch.cuda.is_available():
        return None
    try:
        free, total = torch.cuda.mem_get_info(0)
        plan = plan_memory(recipe, gpu_memory=int(total), device="cuda", log=log)
    except (UserError, RuntimeError, ValueError):
        return None
    if plan.fits:
        return None
    s = plan.suggestion
    fix = (
        f"; try train.batch_size={s.micro_batch} train.grad_accum={s.grad_accum} (same global batch)"
        if s is not None and s.fits
        else "; " + _other_levers(recipe.train.gradient_checkpointing)
    )
    return (
        f"warning: the memory plan of this run ({format_bytes(plan.total)} at batch {plan.micro_batch} x "
        f"{plan.seq_len} tokens) exceeds this GPU's {format_bytes(total)}{fix} (lora-llava plan shows the breakdown)"
    )
