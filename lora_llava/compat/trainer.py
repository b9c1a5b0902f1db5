"""The transformers Trainer with the private hooks lora_llava needs made public (kept apart from
``lora_llava.compat`` so that importing compat loads no Trainer).

Usage::

    class MyTrainer(CompatTrainer):
        def load_checkpoint_weights(self, checkpoint, model): ...
        def train_sampler(self, dataset): ...
        def before_optimizer_step(self, grad_norm): ...

Pinned by ``tests/test_compat.py`` like the rest of compat.
"""

from __future__ import annotations

from typing import Any

from transformers import Trainer

from lora_llava.annotations import Model


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
