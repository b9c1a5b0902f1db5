"""Every private torch and transformers internal lora_llava relies on, in one place, each pinned by a test.

Usage::

    counts = image_token_counts(processor, [(336, 336), (672, 336)])   # image tokens per (height, width)
    allow_training_quantized_base(model)     # stage 1 on a 4-bit LM: only 16-bit parts train
    with no_cpu_weight_repacking(model): ...  # eval mode mid-training without bitsandbytes' CPU repacking
    class MyTrainer(CompatTrainer): ...      # lora_llava.compat.trainer: resume-time weight loading, the train
                                             # sampler and the step's gradient norm as public hooks
    use_attention(text_model.config, "my_attention")  # a registered AttentionInterface name, set after the build
    key, ref = storage_ref(tensor)           # one key per storage (all views share it) while ref is held
    freed_storages([key, ...])               # of those keys, the storages PyTorch has freed since
    with watch_ops(lambda outputs: ...): ... # every ATen op's output tensors, the backward's included

No public API does these jobs (checked against transformers 5.24 and torch 2.13). ``tests/test_compat.py``
fails loudly when an installed transformers or torch changes the behaviour relied on here; nothing else in
lora_llava touches a private transformers or torch attribute. Importing this module imports neither (each
function imports what it needs).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
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


def use_attention(config: Any, name: str) -> None:
    """Make the model built from ``config`` (already built: its layers read the config at each forward) call the
    attention function registered under ``name`` with ``transformers.AttentionInterface.register``.

    Public alternative: ``model.set_attn_implementation(name)``, which also validates the name against the
    installed kernels and sets every sub-model; the planner sets its own stand-in on the language model only.
    """
    config._attn_implementation = name


def storage_ref(tensor: Any) -> tuple[int, Any]:
    """(key, weak reference) of the storage under ``tensor``: every view of one storage has the same key, and
    no other storage gets it while the reference is held (meta tensors included).

    ``torch.multiprocessing.reductions.StorageWeakRef`` is undocumented; its ``cdata`` is the key.
    """
    from torch.multiprocessing.reductions import StorageWeakRef

    ref = StorageWeakRef(tensor.untyped_storage())
    return ref.cdata, ref


def freed_storages(keys: Iterable[int]) -> list[int]:
    """Of ``keys`` (from ``storage_ref``, their references still held), those whose storage PyTorch has freed.

    ``torch.UntypedStorage._expired`` is private; there is no public way to ask it of a weak reference's key.
    """
    import torch

    expired = torch.UntypedStorage._expired
    return [k for k in keys if expired(k)]


def watch_ops(seen: Callable[[list[Any]], None]) -> Any:
    """A context manager inside which every ATen op (the backward's too) runs as before and then hands its
    output tensors to ``seen``.

    ``TorchDispatchMode`` (``torch.utils._python_dispatch``) and ``tree_flatten`` (``torch.utils._pytree``)
    live in private modules; no public hook sees each op's outputs below autograd.
    """
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    class Watch(TorchDispatchMode):
        def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
            out = func(*args, **(kwargs or {}))
            seen([t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)])
            return out

    return Watch()
