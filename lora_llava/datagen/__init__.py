"""Instruction data for a new domain: captions and boxes -> a generator LLM -> LLaVA-Instruct JSON.

Usage::

    from lora_llava.datagen import generate_data, load_datagen_config
    result = generate_data(load_datagen_config("coco.yaml"), limit=20)
    result.output          # data/generated.json, ready for a recipe's data.train

Modules, in the order data flows: ``config`` (the strict schema; ``keys`` lists its keys for
``--help``), ``annotations`` (COCO / CSV / LLaVA readers), ``context`` (the symbolic context),
``prompts`` (system prompts and in-context examples), ``generators`` (local transformers LM,
OpenAI-compatible HTTP), ``parse`` (accept or reject a generation), ``journal`` (resumable,
crash-safe output), ``report`` (the quality report), ``run``. The names below are imported on first
use, so reading the schema (``lora-llava data generate --help``) loads none of the rest.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

__all__ = ["DatagenConfig", "GenerateResult", "generate_data", "load_datagen_config"]

_EXPORTS = {
    "DatagenConfig": "lora_llava.datagen.config",
    "load_datagen_config": "lora_llava.datagen.config",
    "GenerateResult": "lora_llava.datagen.run",
    "generate_data": "lora_llava.datagen.run",
}

if TYPE_CHECKING:
    from lora_llava.datagen.config import DatagenConfig, load_datagen_config
    from lora_llava.datagen.run import GenerateResult, generate_data


def __getattr__(name: str) -> object:
    if name in _EXPORTS:
        from importlib import import_module

        value = getattr(import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'lora_llava.datagen' has no attribute {name!r}")
