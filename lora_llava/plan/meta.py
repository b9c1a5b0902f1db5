"""The meta-device model and one training step of it: no weights anywhere, every tensor the step allocates
followed by the live-tensor tracker.

Usage::

    model = meta_model(config, spec, recipe, layers=2)   # 4-bit linears stood in for, adapters attached
    categorize(model, spec, recipe)    # parameter bytes by category: "4-bit weights" (NF4), "LoRA", ...
    one = meta_pass(config, spec, recipe, batch, seq, images, sup, layers=1)  # Pass: peak, logits, grads, ...
    nf4_bytes(4096 * 4096, double_quant=True)   # bytes of one bitsandbytes NF4 weight

The stand-ins: ``Quantized4bit`` keeps its input for the backward and dequantizes its weight to the compute
dtype for each matmul, as bitsandbytes' Linear4bit does; the language model's attention keeps q, k, v, its
output and the log-sum-exp (what the fused SDPA kernels save). A frozen vision tower runs ``VISION_LAYERS``
layers (its weights are counted in full by the estimate).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any

import torch

from lora_llava.compat import storage_ref, use_attention
from lora_llava.config.schema import Recipe
from lora_llava.plan.tracker import LiveTensors

NF4_BLOCK = 64  # bitsandbytes' 4-bit block size
ATTENTION = "lora_llava_plan"  # the stand-in attention's name in transformers' AttentionInterface
VISION_LAYERS = 2  # vision-tower layers a meta pass runs when it is frozen (its weights are counted in full)


def nf4_bytes(weights: int, double_quant: bool) -> int:
    """Bytes of one bitsandbytes NF4 weight: packed values, absmax per 64-weight block (uint8 with a float32
    absmax per 256 blocks and a 256-entry code when double-quantized, else float32), the 16-entry NF4 code."""
    blocks = math.ceil(weights / NF4_BLOCK)
    if double_quant:
        return math.ceil(weights / 2) + blocks + 4 * math.ceil(blocks / 256) + 4 * 256 + 4 + 4 * 16
    return math.ceil(weights / 2) + 4 * blocks + 4 * 16


class Quantized4bit(torch.nn.Linear):
    """Stands in for a bitsandbytes Linear4bit on the meta device: keeps its input for the backward and
    dequantizes its weight to the compute dtype for each matmul (forward and backward)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _Dequant4bitMatmul.apply(x, self.weight)


class _Dequant4bitMatmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        ctx.weight = w
        return x @ torch.empty_like(w).t()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad @ torch.empty_like(ctx.weight), None


class _FusedAttention(torch.autograd.Function):
    """What a fused SDPA kernel keeps for the backward: q, k, v, the output and the log-sum-exp."""

    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(q)
        lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q, k, v, _, _ = ctx.saved_tensors
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


class LoraStandIn(torch.nn.Module):
    """Stands in for PEFT's LoRA ``Linear`` on the meta device, with its tensors in its order: the base layer's
    output, the input cast to the adapter's float32, dropout (when ``lora.dropout`` > 0), A, B, the scaling,
    the sum, the sum cast back to the base layer's dtype. Its parameters are named as PEFT's (``lora_A``,
    ``lora_B``), so ``categorize`` counts them as LoRA."""

    def __init__(self, base: torch.nn.Linear, r: int, alpha: float, dropout: float) -> None:
        super().__init__()
        self.base_layer = base
        self.lora_dropout: torch.nn.Module = torch.nn.Dropout(dropout) if dropout > 0 else torch.nn.Identity()
        self.lora_A = torch.nn.Linear(base.in_features, r, bias=False, device="meta", dtype=torch.float32)
        self.lora_B = torch.nn.Linear(r, base.out_features, bias=False, device="meta", dtype=torch.float32)
        self.scaling = alpha / r

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        dtype = result.dtype
        if x.dtype != self.lora_A.weight.dtype:
            x = x.to(self.lora_A.weight.dtype)
        result = result + self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling
        return result.to(dtype)


def stand_in_lora(model: Any, targets: str, recipe: Recipe) -> Any:
    """``attach_adapters``' LoRA step on the meta model without PEFT: a ``LoraStandIn`` on every linear layer
    whose path matches ``targets`` (PEFT matches the whole path), and, as PEFT does for a model that is not
    quantized and checkpoints gradients, the input embeddings' output made to require a gradient."""
    import re

    from lora_llava.model.trainability import no_lora_target

    pattern = re.compile(targets)
    matched = [name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and pattern.fullmatch(name)]
    if not matched:
        raise no_lora_target(recipe, f"no module path matches {targets!r}")
    for name in matched:
        owner, _, attr = name.rpartition(".")
        parent = model.get_submodule(owner) if owner else model
        base = getattr(parent, attr)
        setattr(parent, attr, LoraStandIn(base, recipe.lora.r, recipe.lora.alpha, recipe.lora.dropout))
    if getattr(model, "is_gradient_checkpointing", False):
        model.enable_input_require_grads()
    return model


def _attention(
    module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *args: Any, **kwargs: Any
) -> tuple[torch.Tensor, None]:
    out = _FusedAttention.apply(query, key, value)
    return out.transpose(1, 2).contiguous(), None


def meta_model(config: Any, spec: Any, recipe: Recipe, layers: int | None) -> Any:
    """The recipe's training model on the meta device (``layers`` decoder layers, None: all of them)."""
    from transformers import AttentionInterface

    from lora_llava.model.loading import torch_dtype
    from lora_llava.model.trainability import attach_adapters

    config = copy.deepcopy(config)
    text = config.get_text_config()
    if layers is not None:
        text.num_hidden_layers = layers
        if getattr(text, "layer_types", None):
            text.layer_types = text.layer_types[:layers]
        if recipe.vision_tower.policy == "frozen":  # no gradient: only the selected layer's output outlives it
            config.vision_config.num_hidden_layers = VISION_LAYERS
            config.vision_feature_layer = -1
    AttentionInterface.register(ATTENTION, _attention)
    with torch.device("meta"):
        model = spec.model_class()(config)
    model.to(torch_dtype(recipe.quantization.compute_dtype))
    if recipe.quantization.load_in_4bit:
        lm = model.get_submodule(spec.language_model)
        for name, mod in list(lm.named_modules()):
            if type(mod) is torch.nn.Linear:
                owner, _, attr = name.rpartition(".")
                stand_in = Quantized4bit(mod.in_features, mod.out_features, bias=mod.bias is not None, device="meta")
                stand_in.to(mod.weight.dtype)
                setattr(lm.get_submodule(owner) if owner else lm, attr, stand_in)
    model.config.use_cache = False
    model = attach_adapters(model, spec, recipe, lora=stand_in_lora)
    from lora_llava.model.trainability import get_module

    text_model: Any = get_module(model, spec.language_model)
    use_attention(text_model.config, ATTENTION)
    model.train()
    return model


def categorize(model: torch.nn.Module, spec: Any, recipe: Recipe) -> dict[str, int]:
    """Parameter (and buffer) bytes by category, 4-bit layers counted as NF4 with their absmax constants."""
    from lora_llava.model.trainability import get_module, image_newline

    proj = {id(p) for p in get_module(model, spec.projector).parameters()}
    newline = image_newline(model, spec)  # LLaVA-NeXT's row separator: trained and saved with the projector
    if newline is not None:
        proj.add(id(newline))
    out = {"4-bit weights": 0, "16-bit weights (frozen)": 0, "LoRA": 0, "projector": 0, "vision tower (trained)": 0}
    four_bit = {id(m.weight) for m in model.modules() if isinstance(m, Quantized4bit)}
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        if id(p) in four_bit:
            out["4-bit weights"] += nf4_bytes(p.numel(), recipe.quantization.double_quant)
        elif not p.requires_grad:
            out["16-bit weights (frozen)"] += p.numel() * p.element_size()
        elif "lora_" in name:
            out["LoRA"] += p.numel() * p.element_size()
        elif id(p) in proj:
            out["projector"] += p.numel() * p.element_size()
        else:
            out["vision tower (trained)"] += p.numel() * p.element_size()
    out["16-bit weights (frozen)"] += sum(b.numel() * b.element_size() for b in model.buffers())
    return out


def image_features(config: Any, max_tiles: int | None) -> tuple[int, int]:
    """(vision-tower crops per image, patches per crop) the projector sees for one image."""
    v = config.vision_config
    patches = (v.image_size // v.patch_size) ** 2
    if getattr(config, "vision_feature_select_strategy", "default") == "full":
        patches += 1
    crops = 1
    pins = getattr(config, "image_grid_pinpoints", None)
    if pins:
        tiles = [(h // v.image_size) * (w // v.image_size) for h, w in pins]
        allowed = [t for t in tiles if max_tiles is None or t <= max_tiles] or [min(tiles)]
        crops = 1 + max(allowed)
    return crops, patches


@dataclass
class Pass:
    """What one meta pass measured."""

    peak: int  # tensors allocated by the step, at their peak (gradients included)
    logits: int  # of which logits-shaped tensors
    grads: int  # of which gradients
    params: dict[str, int]  # parameter bytes by category (of this meta model)
    trainable: int  # trainable parameters (numel)
    largest_trainable: int  # numel of the largest trainable tensor


def meta_pass(
    config: Any, spec: Any, recipe: Recipe, batch: int, seq: int, images: int, sup: float | None, layers: int | None
) -> Pass:
    """One forward and backward of the recipe's loss on the meta model, every tensor followed."""
    from lora_llava.model.trainability import get_module

    model: Any = meta_model(config, spec, recipe, layers)
    params = categorize(model, spec, recipe)
    trainable = [p for p in model.parameters() if p.requires_grad]
    text = config.get_text_config()
    tracker = LiveTensors(text.vocab_size, held=[*model.parameters(), *model.buffers()])
    crops, patches = image_features(config, recipe.images.max_tiles)
    v = config.vision_config
    meta = torch.device("meta")
    dtype = next(p for p in get_module(model, spec.vision_tower).parameters()).dtype
    with tracker.mode():
        ids = torch.zeros(batch, seq, dtype=torch.long, device=meta)
        labels = torch.zeros(batch, seq, dtype=torch.long, device=meta)
        embeds = model.get_input_embeddings()(ids)
        if images:
            pixels = torch.empty(batch * images * crops, 3, v.image_size, v.image_size, device=meta, dtype=dtype)
            tower: Any = get_module(model, spec.vision_tower)
            layer = model.config.vision_feature_layer
            states = tower(pixels, output_hidden_states=True).hidden_states
            feats = states[layer if isinstance(layer, int) else layer[-1]]
            feats = feats[:, -patches:]
            del states
            img = get_module(model, spec.projector)(feats).reshape(batch, -1, embeds.shape[-1])
            k = min(img.shape[1], seq - 1)
            embeds = torch.cat([img[:, :k].to(embeds.dtype), embeds[:, k:]], dim=1)
        hidden = get_module(model, spec.language_model)(inputs_embeds=embeds).last_hidden_state
        del embeds
        head = get_module(model, spec.lm_head)
        if recipe.train.supervised_logits:
            from lora_llava.training.loss import CHUNK, chunk_loss

            # logits only at supervised positions: as many per sample as the data's longest samples have on
            # average (``sup``), else every text position (an upper bound); training runs them CHUNK at a time,
            # each chunk recomputed in the backward pass, so one chunk's logits are what is alive at once
            k = min(images * patches * crops, seq - 1) if images else 0
            text = seq - 1 - k
            n = min(round(sup * batch), batch * text) if sup is not None else batch * text
            picked = hidden[:, k:-1].reshape(-1, hidden.shape[-1])[:n]
            del hidden
            targets = labels[:, k + 1 :].reshape(-1)[:n]
            loss = chunk_loss(head, picked[:CHUNK], targets[:CHUNK]) / max(picked.shape[0], 1)
            del picked
        else:
            logits = head(hidden)
            del hidden
            loss = _base(model).loss_function(logits=logits, labels=labels, vocab_size=text.vocab_size)
            del logits
        loss.backward()
        del loss
        tracker.saw([])
    grads = {storage_ref(p.grad)[0] for p in trainable if p.grad is not None}
    return Pass(
        peak=tracker.peak,
        logits=tracker.logits_at_peak,
        grads=tracker.bytes_at_peak(grads),
        params=params,
        trainable=sum(p.numel() for p in trainable),
        largest_trainable=max((p.numel() for p in trainable), default=0),
    )


def _base(model: torch.nn.Module) -> Any:
    from lora_llava.model.trainability import base_model

    return base_model(model)
