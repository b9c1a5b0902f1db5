"""Type names shared across the package, for signatures that say what they take.

Usage::

    from lora_llava.annotations import Log, Model, Processor, Tokenizer

    def train(recipe: Recipe, log: Log = print) -> TrainResult: ...

``Model``, ``Processor`` and ``Tokenizer`` are transformers / PEFT objects, whose own annotations are
too dynamic to check against (they are read as ``Any``); the names document what is expected.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

Log = Callable[[str], object]  # where progress lines go (print, or a function collecting them)
Model = Any  # a transformers LLaVA model, possibly wrapped by PEFT
Processor = Any  # a transformers LLaVA processor (tokenizer + image processor + chat template)
Tokenizer = Any  # a transformers fast tokenizer
