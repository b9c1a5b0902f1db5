"""Every private transformers internal lora_llava relies on, in one place, each pinned by a test.

Usage::

    counts = image_token_counts(processor, [(336, 336), (672, 336)])   # image tokens per (height, width)
    allow_training_quantized_base(model)     # stage 1 on a 4-bit LM: only 16-bit parts train
    with no_cpu_weight_repacking(model): ...  # eval mode mid-training without bitsandbytes' CPU repacking
    class MyTrainer(CompatTrainer): ...      # lora_llava.compat.trainer: resume-time weight loading, the train
                                             # sampler and the step's gradient norm as public hooks

No public API does these jobs (checked against transformers 5.24). ``tests/test_compat.py`` fails
loudly when an installed transformers changes the behaviour relied on here; nothing else in
lora_llava touches a private transformers attribute.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from lora_llava.annotations import Model, Processor


def image_token_counts(processor: Processor, sizes: list[tuple[int, int]]) -> list[int]:
    """Image tokens the processor expands each image of (height, width) to (AnyRes grids included).

    Public alternative: run the processor on a blank image of each size and count the tokens, which
    costs a full image preprocessing per size; this asks the processor's own arithmetic instead.
    """
    data = processor._get_num_multimodal_tokens(image_sizes=sizes)
    return list(data["num_image_tokens"] if isinstance(data, dict) else data.num_image_tokens)


def allow_training_quantized_base(model: Model) -> None:
    """Let transformers' Trainer train a 4-bit model that has no PEFT adapter (stage 1: projector only).

    The Trainer refuses "purely quantized models" unless adapters are attached; stage 1 trains the
    16-bit projector of a model whose frozen LM is 4-bit, which our own part-policy check verifies
    before this is called. The Trainer reads the flag PEFT's transformers integration sets.
    """
    model._hf_peft_config_loaded = True


def finish_dequantize(model: Model, dtype: Any) -> Model:
    """Dequantize the 4-bit layers still in ``model`` and drop its quantization state.

    transformers' ``model.dequantize()`` fails (UnboundLocalError) when no 4-bit layer is left, as
    after a layer-by-layer merge that replaced them all; its quantizer's public
    ``remove_quantization_config`` then does the clean-up alone.
    """
    if any(type(m).__name__ == "Linear4bit" for m in model.modules()):
        return model.dequantize(dtype=dtype) or model
    model.hf_quantizer.remove_quantization_config(model)
    return model


@contextmanager
def no_cpu_weight_repacking(model: Model) -> Iterator[None]:
    """Keep bitsandbytes from repacking 4-bit weights for CPU inference while a model that is training
    runs in eval mode (eval during training).

    On CPUs with AVX512-BF16, ``Linear4bit.forward`` in eval mode converts its weight, in place and for
    good, to a CPU inference layout whose kernel has no autograd: training on afterwards would backprop
    through it without a gradient (torch warns "an autograd kernel was not registered"). The switch is
    the module's ``support_avx512bf16_for_cpu`` attribute; there is no public one.
    """
    layers = [m for m in model.modules() if getattr(m, "support_avx512bf16_for_cpu", False)]
    for m in layers:
        m.support_avx512bf16_for_cpu = False
    try:
        yield
    finally:
        for m in layers:
            m.support_avx512bf16_for_cpu = True
