"""Memory planner: the peak memory of one training step of a recipe, before any weight is loaded.

Usage::

    plan = plan_memory(load_recipe("llava-1.5-7b/qlora.yaml"), gpu_memory="24GB")
    print(plan.table())             # the breakdown by category, the total, and the suggested batch
    plan.total, plan.fits, plan.suggestion   # bytes; None without gpu_memory; Suggestion(micro_batch, grad_accum)
    warning = preload_warning(recipe)        # train on CUDA: one line when the plan exceeds the card, else None

How it estimates (no weights anywhere: everything runs on PyTorch's ``meta`` device):

- weights: the backbone's config (its directory, the Hugging Face cache, or, offline, the built-in
  configs of the registered Hub backbones below) is built on the meta device and counted: every linear
  layer of the language model in NF4 when ``quantization.load_in_4bit`` (half a byte per weight, plus
  the absmax constants: 1 byte per 64 weights with ``double_quant``, else 4), the rest in the compute
  dtype; LoRA and the projector in float32, as training keeps them (``attach_adapters`` is applied to
  the meta model, so what trains is exactly what the recipe trains);
- optimizer state: AdamW's two float32 moments per trainable parameter (``train.optimizer: adamw``), or
  bitsandbytes' 8-bit moments (``adamw_8bit``, ``paged_adamw_8bit``);
- logits: with ``train.supervised_logits`` (the default) only at supervised positions, planned as if every
  text position were supervised (an upper bound), at most ``training.loss.CHUNK`` positions at a time;
- activations, logits and gradients: one forward and backward of the meta model at the recipe's micro
  batch and the longest sample after image expansion (exact lengths from the data when it can be read,
  else ``data.max_length``), with every tensor the step allocates followed through a dispatch mode
  (so saved activations, the LoRA dropout copies, the float32 logits and log-softmax, gradient
  checkpointing's recomputation and the gradients are all counted, each freed when PyTorch frees it).
  4-bit layers are stood in for by layers that keep their input for the backward and dequantize their
  weight to the compute dtype for each matmul, as bitsandbytes does; attention keeps q, k, v, its output
  and the log-sum-exp (what the fused SDPA kernels save). A deep model is run with one and two decoder
  layers and extrapolated (the layers are identical, so memory grows linearly with their number);
- on CUDA, a fixed 0.5 GiB for the CUDA context and kernels, and 10% of the tensors' peak for the caching
  allocator's fragmentation (``CUDA_OVERHEAD``, ``ALLOCATOR_SLACK``).

The estimate is of tensor memory; measured against the tensors a CPU training step really allocates on
the tiny backbones it is within ``STATED_ERROR`` (tests/test_plan.py measures it).
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from lora_llava.annotations import Log
from lora_llava.config.schema import Recipe
from lora_llava.errors import UserError

GiB = 1024**3
CUDA_OVERHEAD = GiB // 2  # CUDA context, cuBLAS workspaces, kernels
ALLOCATOR_SLACK = 0.10  # caching-allocator fragmentation, as a share of the tensors' peak
STATED_ERROR = 0.20  # |estimate - measured| / measured on the tiny backbones (CPU), see tests/test_plan.py
NF4_BLOCK = 64  # bitsandbytes' 4-bit block size
_DT_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}

# Offline configs of the registered Hub backbones and of the Hub parts a shipped recipe assembles from
# (the values of their config.json on the Hub); used only when neither a directory nor the Hugging Face
# cache has the config.
_CLIP_L_336 = {"model_type": "clip_vision_model", "hidden_size": 1024, "intermediate_size": 4096,
               "num_hidden_layers": 24, "num_attention_heads": 16, "image_size": 336, "patch_size": 14,
               "projection_dim": 768}  # fmt: skip
_VICUNA_7B = {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
              "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32064,
              "max_position_embeddings": 4096, "rms_norm_eps": 1e-5}  # fmt: skip
_VICUNA_13B = {"model_type": "llama", "hidden_size": 5120, "intermediate_size": 13824, "num_hidden_layers": 40,
               "num_attention_heads": 40, "num_key_value_heads": 40, "vocab_size": 32064,
               "max_position_embeddings": 4096, "rms_norm_eps": 1e-5}  # fmt: skip
_MISTRAL_7B = {"model_type": "mistral", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
               "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 32064}  # fmt: skip
_YI_34B = {"model_type": "llama", "hidden_size": 7168, "intermediate_size": 20480, "num_hidden_layers": 60,
           "num_attention_heads": 56, "num_key_value_heads": 8, "vocab_size": 64064}  # fmt: skip
_QWEN2_1_5B = {"model_type": "qwen2", "hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28,
               "num_attention_heads": 12, "num_key_value_heads": 2, "vocab_size": 151936,
               "tie_word_embeddings": True}  # fmt: skip
_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
BUILTIN_CONFIGS: dict[str, dict[str, Any]] = {
    "llava-hf/llava-1.5-7b-hf": {"family": "llava", "text": _VICUNA_7B, "vision": _CLIP_L_336},
    "llava-hf/llava-1.5-13b-hf": {"family": "llava", "text": _VICUNA_13B, "vision": _CLIP_L_336},
    "llava-hf/llava-v1.6-mistral-7b-hf": {"family": "llava_next", "text": _MISTRAL_7B, "vision": _CLIP_L_336},
    "llava-hf/llava-v1.6-vicuna-7b-hf": {"family": "llava_next", "text": _VICUNA_7B, "vision": _CLIP_L_336},
    "llava-hf/llava-v1.6-vicuna-13b-hf": {"family": "llava_next", "text": _VICUNA_13B, "vision": _CLIP_L_336},
    "llava-hf/llava-v1.6-34b-hf": {"family": "llava_next", "text": _YI_34B, "vision": _CLIP_L_336},
}
BUILTIN_PART_CONFIGS: dict[str, dict[str, Any]] = {
    "openai/clip-vit-large-patch14-336": _CLIP_L_336,
    "Qwen/Qwen2-1.5B-Instruct": _QWEN2_1_5B,
}


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
        return sum(v for k, v in self.categories.items() if not k.startswith("CUDA"))

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
                    f"even train.batch_size=1 needs {format_bytes(s.total)}: lower data.max_length, turn on "
                    "train.gradient_checkpointing, lower lora.r, or use a bigger card"
                )
        return "\n".join(lines)


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


# ----------------------------------------------------------------------------------------- the config


def backbone_config(recipe: Recipe) -> tuple[Any, Any, str]:
    """(transformers config, BackboneSpec, where the config came from) of the recipe's backbone, without weights."""
    from lora_llava.artifacts import resolve_backbone
    from lora_llava.backbones.registry import BackboneSpec

    if recipe.backbone == "assemble":
        assert recipe.assemble is not None  # the schema requires it with backbone: assemble
        a = recipe.assemble
        vision, v_src = _part_config(a.vision_encoder, "assemble.vision_encoder")
        text, t_src = _part_config(a.language_model, "assemble.language_model")
        vision = getattr(vision, "vision_config", vision)  # the vision half of a full CLIP/SigLIP config
        config = _llava_config("llava", text, vision, a.vision_feature_layer, a.vision_feature_select)
        spec = BackboneSpec("assemble", "assemble", "llava", "chatml", "assembled")
        return config, spec, f"assembled from {a.vision_encoder} ({v_src}) + {a.language_model} ({t_src})"
    try:
        spec = resolve_backbone(recipe.backbone)
    except UserError:
        stage1 = _stage1_recipe_for(recipe.backbone)
        if stage1 is None:
            raise
        config, spec, where = backbone_config(stage1)
        return config, spec, f"the stage-1 run {recipe.backbone} does not exist yet; its recipe's model: {where}"
    config = _config_from(spec.local_path())
    if config is not None:
        return config, spec, "config from " + ("the built-in backbone" if spec.builtin else spec.local_path())
    known = BUILTIN_CONFIGS.get(spec.source)
    if known is None:
        raise UserError(
            f"cannot plan {spec.name!r}: its config.json is neither in a local directory nor in the Hugging Face "
            "cache, and lora_llava has no built-in config for it",
            hint="download its config (hf download REPO config.json) or give a local directory as backbone",
        )
    text, vision = _config_of(known["text"]), _config_of(known["vision"])
    return _llava_config(known["family"], text, vision, -2, "default"), spec, "built-in config (offline)"


def _config_from(path: str) -> Any:
    from transformers import AutoConfig

    from lora_llava.model.loading import hub_kwargs

    try:
        return AutoConfig.from_pretrained(path, **hub_kwargs(path))
    except (OSError, ValueError):
        return None


def _config_of(values: dict[str, Any]) -> Any:
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
            return _config_of(BUILTIN_PART_CONFIGS[name]), "built-in config (offline)"
    raise UserError(
        f"cannot plan: {key} {name!r} has no config in a local directory or the Hugging Face cache, and lora_llava "
        "has no built-in config for it",
        hint="download its config (hf download REPO config.json) or give a local directory",
    )


def _llava_config(family: str, text: Any, vision: Any, feature_layer: int, select: str) -> Any:
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


# -------------------------------------------------------------------------------------- the lengths


def sequence_plan(recipe: Recipe, config_source: str, log: Log | None = None) -> tuple[int, int, str, float | None]:
    """(longest sample in tokens, most images in a sample, how it was found, the supervised tokens per
    sample of the micro-batch of longest samples, on average): the data's exact lengths after image expansion when it can be read
    here, else data.max_length with one image (supervised tokens then unknown: None)."""
    why = ""
    if recipe.backbone == "assemble" or "offline" in config_source or "does not exist" in config_source:
        why = "the backbone's processor is not available here"
    else:
        from lora_llava.training.prepare import prepare_run

        try:
            prepared = prepare_run(recipe, None, log=log or (lambda *a: None), enforce=False)
        except UserError as e:
            why = str(e).splitlines()[0]
        else:
            samples = prepared.report.train
            if samples:
                report = prepared.report
                longest = max(report.length_of(s) for s in samples)
                images = max(len(s.images) for s in samples)
                top = sorted(samples, key=report.length_of, reverse=True)[: recipe.train.batch_size]
                sup = sum(_supervised_tokens(prepared.encoder, s) for s in top) / len(top)
                return longest, images, f"the longest of {len(samples)} training samples", sup
            why = "no usable training sample"
    return recipe.data.max_length, 1, f"data.max_length; data not read: {why}", None


def _supervised_tokens(encoder: Any, sample: Any) -> int:
    """How many of ``sample``'s tokens carry loss (image sizes read from the files)."""
    sizes = [encoder.load(p).size for p in sample.images]
    _, labels = encoder.tokens(sample, sizes)
    return sum(1 for x in labels[1:] if x != -100)


def _image_features(config: Any, max_tiles: int | None) -> tuple[int, int]:
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


# --------------------------------------------------------------------------------------- the meta pass


def nf4_bytes(weights: int, double_quant: bool) -> int:
    """Bytes of one bitsandbytes NF4 weight: packed values, absmax per 64-weight block (uint8 with a float32
    absmax per 256 blocks and a 256-entry code when double-quantized, else float32), the 16-entry NF4 code."""
    blocks = math.ceil(weights / NF4_BLOCK)
    if double_quant:
        return math.ceil(weights / 2) + blocks + 4 * math.ceil(blocks / 256) + 4 * 256 + 4 + 4 * 16
    return math.ceil(weights / 2) + 4 * blocks + 4 * 16


class _Quantized4bit(torch.nn.Linear):
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


def _attention(
    module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *args: Any, **kwargs: Any
) -> tuple[torch.Tensor, None]:
    out = _FusedAttention.apply(query, key, value)
    return out.transpose(1, 2).contiguous(), None


_ATTENTION = "lora_llava_plan"
_VISION_LAYERS = 2  # vision-tower layers a meta pass runs when it is frozen (its weights are counted in full)


class _LiveTensors:
    """Every storage the ops inside allocate, followed until PyTorch frees it: the peak of their sum."""

    def __init__(self, vocab: int) -> None:
        self.vocab = vocab
        self.live: dict[int, tuple[Any, int, bool]] = {}  # storage id -> (weak ref, bytes, is logits)
        self.current = self.peak = self.logits_at_peak = 0
        self.keys_at_peak: list[int] = []
        self._snapshot_at = 0

    def mode(self) -> Any:
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_flatten

        tracker = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
                out = func(*args, **(kwargs or {}))
                tracker.saw([t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)])
                return out

        return Mode()

    def saw(self, tensors: list[torch.Tensor]) -> None:
        from torch.multiprocessing.reductions import StorageWeakRef

        expired = torch.UntypedStorage._expired
        for key in [k for k in self.live if expired(k)]:
            _, size, _ = self.live.pop(key)
            self.current -= size
        for t in tensors:
            ref = StorageWeakRef(t.untyped_storage())
            if ref.cdata in self.live:
                continue
            size = t.untyped_storage().nbytes()
            self.live[ref.cdata] = (ref, size, t.dim() >= 2 and t.shape[-1] == self.vocab)
            self.current += size
        if self.current > self.peak:
            self.peak = self.current
            if self.peak > self._snapshot_at * 1.002:  # enough to split the peak by category
                self._snapshot_at = self.peak
                self.keys_at_peak = list(self.live)
                self.logits_at_peak = sum(s for _, s, lg in self.live.values() if lg)

    def bytes_at_peak(self, keys: set[int]) -> int:
        """Of the peak, the bytes held by storages in ``keys``."""
        found = 0
        for k in self.keys_at_peak:
            if k in keys and k in self.live:
                found += self.live[k][1]
        return found


@dataclass
class _Pass:
    peak: int  # tensors allocated by the step, at their peak (gradients included)
    logits: int  # of which logits-shaped tensors
    grads: int  # of which gradients
    params: dict[str, int]  # parameter bytes by category (of this meta model)
    trainable: int  # trainable parameters (numel)
    largest_trainable: int  # numel of the largest trainable tensor


def _meta_model(config: Any, spec: Any, recipe: Recipe, layers: int | None) -> Any:
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
            config.vision_config.num_hidden_layers = _VISION_LAYERS
            config.vision_feature_layer = -1
    AttentionInterface.register(_ATTENTION, _attention)
    with torch.device("meta"):
        model = spec.model_class()(config)
    model.to(torch_dtype(recipe.quantization.compute_dtype))
    if recipe.quantization.load_in_4bit:
        lm = model.get_submodule(spec.language_model)
        for name, mod in list(lm.named_modules()):
            if type(mod) is torch.nn.Linear:
                owner, _, attr = name.rpartition(".")
                stand_in = _Quantized4bit(mod.in_features, mod.out_features, bias=mod.bias is not None, device="meta")
                stand_in.to(mod.weight.dtype)
                setattr(lm.get_submodule(owner) if owner else lm, attr, stand_in)
    model.config.use_cache = False
    model = attach_adapters(model, spec, recipe)
    from lora_llava.model.trainability import get_module

    text_model: Any = get_module(model, spec.language_model)
    text_model.config._attn_implementation = _ATTENTION
    model.train()
    return model


def _categorize(model: torch.nn.Module, spec: Any, recipe: Recipe) -> dict[str, int]:
    """Parameter (and buffer) bytes by category, 4-bit layers counted as NF4 with their absmax constants."""
    from lora_llava.model.trainability import get_module

    proj = {id(p) for p in get_module(model, spec.projector).parameters()}
    out = {"4-bit weights": 0, "16-bit weights (frozen)": 0, "LoRA": 0, "projector": 0, "vision tower (trained)": 0}
    four_bit = {id(m.weight) for m in model.modules() if isinstance(m, _Quantized4bit)}
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


def _meta_pass(
    config: Any, spec: Any, recipe: Recipe, batch: int, seq: int, images: int, sup: float | None, layers: int | None
) -> _Pass:
    from torch.multiprocessing.reductions import StorageWeakRef

    from lora_llava.model.trainability import get_module

    model: Any = _meta_model(config, spec, recipe, layers)
    params = _categorize(model, spec, recipe)
    trainable = [p for p in model.parameters() if p.requires_grad]
    text = config.get_text_config()
    tracker = _LiveTensors(text.vocab_size)
    crops, patches = _image_features(config, recipe.images.max_tiles)
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
    grads = {StorageWeakRef(p.grad.untyped_storage()).cdata for p in trainable if p.grad is not None}
    return _Pass(
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


# ------------------------------------------------------------------------------------------ the plan


def _estimate(
    config: Any, spec: Any, recipe: Recipe, batch: int, seq: int, images: int, sup: float | None = None
) -> tuple[dict[str, int], str]:
    """Categories (bytes) and where the peak is, for one micro-batch size."""
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
        layers = config.vision_config.num_hidden_layers - _VISION_LAYERS
        cats["16-bit weights (frozen)"] += _vision_layer_bytes(config, recipe) * layers
    cats = {k: v for k, v in cats.items() if v}
    trainable = at_depth(one.trainable, two.trainable)
    name = recipe.train.optimizer
    # AdamW: exp_avg, exp_avg_sq in float32; bitsandbytes' 8-bit AdamW: one byte each plus a float32 absmax
    # per 256 values (tensors under 4096 values stay 32-bit: a negligible share of LoRA at real sizes)
    per_param = 8 if name == "adamw" else 2 + 8 / 256
    cats[f"optimizer state ({name})"] = int(per_param * trainable)
    backward = act + logits + grads
    # the optimizer step: every gradient (float32, as the trained parts), plus the update's temporaries
    step_grads, temporaries = 4 * trainable, 2 * 4 * two.largest_trainable
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


_PASSES: dict[tuple, _Pass] = {}


def _cached_pass(
    config: Any, spec: Any, recipe: Recipe, batch: int, seq: int, images: int, sup: float | None, layers: int
) -> _Pass:
    key = (id(config), id(recipe), batch, seq, images, sup, layers)
    if key not in _PASSES:
        _PASSES[key] = _meta_pass(config, spec, recipe, batch, seq, images, sup, layers)
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
    tensors = sum(cats.values())
    return {**cats, "CUDA allocator slack (10%)": int(tensors * ALLOCATOR_SLACK), "CUDA context": CUDA_OVERHEAD}


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
    cats, peak_at = _estimate(config, spec, recipe, t.batch_size, seq, images, sup)
    plan = MemoryPlan(
        backbone=recipe.backbone if recipe.backbone != "assemble" else "assemble",
        config_source=source,
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
    if limit is not None:
        plan.suggestion = _suggest(plan, lambda b: sum(_with_overheads(
            _estimate(config, spec, recipe, b, seq, images, sup)[0], device).values()))  # fmt: skip
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
        else "; lower data.max_length or lora.r, or turn on train.gradient_checkpointing"
    )
    return (
        f"warning: the memory plan of this run ({format_bytes(plan.total)} at batch {plan.micro_batch} x "
        f"{plan.seq_len} tokens) exceeds this GPU's {format_bytes(total)}{fix} (lora-llava plan shows the breakdown)"
    )
