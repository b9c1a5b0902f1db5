"""Memory planner: the peak memory of one training step of a recipe, before any weight is loaded.

Usage::

    plan = plan_memory(load_recipe("llava-1.5-7b/qlora.yaml"), gpu_memory="24GB")
    print(plan.table())             # the breakdown by category, the total, and the suggested batch
    plan.total, plan.fits, plan.suggestion   # bytes; None without gpu_memory; Suggestion(micro_batch, grad_accum)
    warning = preload_warning(recipe)        # train on CUDA: one line when the plan exceeds the card, else None

How it estimates (no weights anywhere: everything runs on PyTorch's ``meta`` device):

- weights: the backbone's config (its directory, the Hugging Face cache, or, offline, the registry's row of a
  registered Hub backbone: ``BackboneSpec.offline_config``) is built on the meta device and counted: every
  linear layer of the language model in NF4 when ``quantization.load_in_4bit`` (half a byte per weight, plus
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
- the optimizer step: every trained weight's float32 gradient plus the update's temporaries (on CUDA, torch's
  foreach AdamW: one float32 intermediate per trained weight; elsewhere two of the largest tensor);
- on CUDA, cuBLAS' workspaces (136 MiB, allocated memory: part of the tensors), a fixed 0.5 GiB for the CUDA
  context and kernels, and 10% of the tensors' peak for the caching allocator's fragmentation
  (``CUBLAS_WORKSPACE``, ``CUDA_OVERHEAD``, ``ALLOCATOR_SLACK``).

The estimate is of tensor memory; measured against the tensors a CPU training step really allocates on
the tiny backbones it is within ``STATED_ERROR`` (tests/test_plan.py measures it); against the CUDA
allocator's peak of a llava-1.5-7b step on an H200 (bench/gpu_check.py) it was within -0.0% .. +13.4%.

The package, each file one step (this file only re-exports them):

- ``configs``: where the backbone's config comes from (``backbone_config``, ``ConfigSource``);
- ``lengths``: the data's longest sample, or ``data.max_length`` (``sequence_plan``);
- ``meta``: the meta-device model with its 4-bit and attention stand-ins, and one training step of it;
- ``tracker``: the live-tensor tracker that step runs under;
- ``estimate``: the categories, the plan, its fit and the suggested micro-batch (``plan_memory``).
"""

from __future__ import annotations

import torch  # noqa: F401  (``plan.torch.cuda``: what the planner asks about the card)

from lora_llava.plan.configs import (
    BUILTIN_CONFIGS,
    BUILTIN_PART_CONFIGS,
    ConfigOrigin,
    ConfigSource,
    backbone_config,
    config_of,
    llava_config,
)
from lora_llava.plan.estimate import (
    ALLOCATOR_SLACK,
    CUBLAS_WORKSPACE,
    CUDA_OVERHEAD,
    STATED_ERROR,
    GiB,
    MemoryPlan,
    Suggestion,
    format_bytes,
    parse_size,
    plan_memory,
    preload_warning,
)
from lora_llava.plan.lengths import sequence_plan
from lora_llava.plan.meta import NF4_BLOCK, nf4_bytes

# the names bench/gpu_check.py imports
_config_of = config_of
_llava_config = llava_config

__all__ = [
    "ALLOCATOR_SLACK",
    "BUILTIN_CONFIGS",
    "BUILTIN_PART_CONFIGS",
    "CUBLAS_WORKSPACE",
    "CUDA_OVERHEAD",
    "NF4_BLOCK",
    "STATED_ERROR",
    "ConfigOrigin",
    "ConfigSource",
    "GiB",
    "MemoryPlan",
    "Suggestion",
    "backbone_config",
    "config_of",
    "format_bytes",
    "llava_config",
    "nf4_bytes",
    "parse_size",
    "plan_memory",
    "preload_warning",
    "sequence_plan",
]
