"""Every private transformers internal lora_llava relies on, in one place, each pinned by a test.

Usage::

    counts = image_token_counts(processor, [(336, 336), (672, 336)])   # image tokens per (height, width)
    allow_training_quantized_base(model)     # stage 1 on a 4-bit LM: only 16-bit parts train
    with no_cpu_weight_repacking(model): ...  # eval mode mid-training without bitsandbytes' CPU repacking
    class MyTrainer(CompatTrainer): ...      # resume-time weight loading and the train sampler as public hooks

No public API does these jobs (checked against transformers 5.24). ``tests/test_compat.py`` fails
loudly when an installed transformers changes the behaviour relied on here; nothing else in
lora_llava touches a private transformers attribute.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from transformers import Trainer

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


class CompatTrainer(Trainer):
    """A Trainer whose resume-time weight loading and train sampler are the public hooks below.

    - ``load_checkpoint_weights(path, model)``: what a checkpoint holds is lora_llava's trained parts,
      not a transformers model file, so the Trainer's own loader cannot read it;
    - ``train_sampler(dataset)``: the sampler of the training DataLoader (None: the Trainer's default);
    - ``before_optimizer_step(grad_norm)``: called once per optimizer step, after the backward passes
      and clipping and before ``optimizer.step()``, with the step's gradient norm (before clipping) as a
      float. The Trainer computes that norm every step, logging or not, but passes it to no callback.
    """

    def before_optimizer_step(self, grad_norm: float | None) -> None:
        pass

    def load_checkpoint_weights(self, checkpoint: str, model: Model) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def train_sampler(self, dataset: Any) -> Any:
        return None

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Model | None = None) -> None:
        self.load_checkpoint_weights(resume_from_checkpoint, model or self.model)

    def _get_train_sampler(self, train_dataset: Any = None) -> Any:
        sampler = self.train_sampler(train_dataset if train_dataset is not None else self.train_dataset)
        return sampler if sampler is not None else super()._get_train_sampler(train_dataset)

    def _get_grad_norm(self, model: Model, grad_norm: Any = None) -> Any:
        norm = super()._get_grad_norm(model, grad_norm=grad_norm)
        self.before_optimizer_step(None if norm is None else float(norm))
        return norm


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
