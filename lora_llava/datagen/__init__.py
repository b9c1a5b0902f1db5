"""Instruction data for a new domain: captions and boxes -> a generator LLM -> LLaVA-Instruct JSON.

Usage::

    from lora_llava.datagen import generate_data, load_datagen_config
    result = generate_data(load_datagen_config("coco.yaml"), limit=20)
    result.output          # data/generated.json, ready for a recipe's data.train

Modules, in the order data flows: ``config`` (the strict schema), ``annotations`` (COCO / CSV / LLaVA
readers), ``context`` (the symbolic context), ``prompts`` (system prompts and in-context examples),
``generators`` (local transformers LM, OpenAI-compatible HTTP), ``parse`` (accept or reject a
generation), ``journal`` (resumable, crash-safe output), ``report`` (the quality report), ``run``.
"""

from lora_llava.datagen.config import DatagenConfig, load_datagen_config
from lora_llava.datagen.run import GenerateResult, generate_data

__all__ = ["DatagenConfig", "GenerateResult", "generate_data", "load_datagen_config"]
