"""The training loss with logits only where there are labels.

Usage::

    loss = supervised_loss(model, batch)                          # mean over the supervised tokens
    loss = supervised_loss(model, batch, num_items_in_batch=n)    # summed / n (gradient accumulation)

A LLaVA batch is mostly image tokens and prompts, none of them labelled (576 image tokens per
LLaVA-1.5 image, up to ~2,900 for LLaVA-NeXT), yet the model's own forward computes float32 logits over
the whole vocabulary at every position. Here the language model runs to its last hidden states, the
positions whose next token is labelled are gathered, and the LM head and cross-entropy run on those
alone, in chunks of ``CHUNK`` positions, each recomputed in the backward pass (so at most one chunk's
logits are alive). The loss is the one ``LlavaForConditionalGeneration(labels=...)`` computes: the same
shift, float32 logits, summed cross-entropy divided by ``num_items_in_batch`` when the Trainer gives it,
else the mean (``tests/training/test_loss.py`` compares both, and their gradients).
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.checkpoint import checkpoint

from lora_llava.annotations import Model

CHUNK = 4096  # supervised positions per LM-head call
IGNORE = -100
MODEL_INPUTS = ("input_ids", "attention_mask", "pixel_values", "image_sizes", "position_ids")


def language_model_parts(model: Model) -> tuple[Any, Any]:
    """(the LLaVA body that returns hidden states, the LM head) of a LLaVA or LLaVA-NeXT model, PEFT-wrapped or
    not: ``model.model`` and ``model.lm_head`` of the ``*ForConditionalGeneration`` inside."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    body, head = getattr(inner, "model", None), getattr(inner, "lm_head", None)
    if body is None or head is None:
        raise TypeError(f"{type(inner).__name__} has no .model and .lm_head: not a LLaVA model")
    return body, head


def chunk_loss(head: Any, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy of one chunk: ``head(hidden)`` as float32 logits against ``targets``."""
    logits = head(hidden).float()
    return torch.nn.functional.cross_entropy(logits, targets, reduction="sum")


def chunked_cross_entropy(head: Any, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy of ``head(hidden)`` (float32 logits) against ``targets``, ``CHUNK`` rows at a time;
    with more than one chunk each is recomputed in the backward pass, so one chunk's logits are alive at most."""
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[0], CHUNK):
        h, t = hidden[start : start + CHUNK], targets[start : start + CHUNK]
        if torch.is_grad_enabled() and hidden.shape[0] > CHUNK:
            total = total + checkpoint(chunk_loss, head, h, t, use_reentrant=False)
        else:
            total = total + chunk_loss(head, h, t)
    return total


def supervised_loss(model: Model, inputs: dict, num_items_in_batch: Any = None) -> torch.Tensor:
    """The causal-LM loss of ``inputs`` (a collated batch with ``labels``), logits computed only at the
    positions whose next token is labelled; see the module docstring. A model wrapped for several processes
    (DistributedDataParallel) computes it inside the wrapper's forward, which is where DDP learns which
    parameters the loss used and readies their gradients for averaging."""
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        inner = model.module
        own = inner.__dict__.get("forward")
        inner.forward = lambda: _supervised_loss(inner, inputs, num_items_in_batch)
        try:
            loss: torch.Tensor = model()
        finally:
            if own is None:
                del inner.forward
            else:
                inner.forward = own
        return loss
    return _supervised_loss(model, inputs, num_items_in_batch)


def _supervised_loss(model: Model, inputs: dict, num_items_in_batch: Any = None) -> torch.Tensor:
    body, head = language_model_parts(model)
    labels = inputs["labels"]
    # no KV cache: training needs none, and with one transformers would not build packed-sequence masks
    hidden = body(**{k: v for k, v in inputs.items() if k in MODEL_INPUTS}, use_cache=False)[0]
    shifted = labels[:, 1:]
    where = shifted != IGNORE
    picked = hidden[:, :-1][where]  # [supervised positions, hidden size]
    targets = shifted[where].to(picked.device)
    if picked.shape[0] == 0:  # nothing supervised: a zero loss that still reaches the graph
        return 0.0 * hidden.sum(dtype=torch.float32)
    total = chunked_cross_entropy(head, picked, targets)
    if num_items_in_batch is not None:
        return total / torch.as_tensor(num_items_in_batch, device=total.device, dtype=total.dtype)
    return total / picked.shape[0]
