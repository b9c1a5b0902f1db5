"""lora_llava: QLoRA fine-tuning of LLaVA vision-language models on one GPU.

Usage::

    import lora_llava

    recipe = lora_llava.load_recipe("recipes/quickstart.yaml", ["train.max_steps=50"])
    result = lora_llava.train(recipe)                           # TrainResult: adapter_dir, train_loss, steps, ...
    model = lora_llava.load_model(result.run_dir)               # the trained model, prompted as trained
    score = lora_llava.evaluate(model, samples)                 # EvalResult: accuracy, predictions
    report = lora_llava.merge(result.run_dir, "merged/")        # MergeReport: parity of merged vs adapter

The same jobs are the ``lora-llava`` command's verbs. Importing this package loads nothing heavy
and changes no process-wide setting; the names below are imported on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

__version__ = "0.2.0"

__all__ = [
    "__version__",
    "evaluate",
    "load_model",
    "load_recipe",
    "merge",
    "open_artifact",
    "read_data",
    "train",
]

_EXPORTS = {
    "load_recipe": ("lora_llava.config.load", "load_recipe"),
    "train": ("lora_llava.workflows", "train"),
    "load_model": ("lora_llava.infer", "load_model"),
    "evaluate": ("lora_llava.infer", "evaluate"),
    "merge": ("lora_llava.merging", "merge"),
    "open_artifact": ("lora_llava.artifacts", "open_artifact"),
    "read_data": ("lora_llava.data.formats", "read_source"),
}

if TYPE_CHECKING:
    from lora_llava.artifacts import open_artifact
    from lora_llava.config.load import load_recipe
    from lora_llava.data.formats import read_source as read_data
    from lora_llava.infer import evaluate, load_model
    from lora_llava.merging import merge
    from lora_llava.workflows import train


def __getattr__(name: str) -> object:
    if name in _EXPORTS:
        from importlib import import_module

        module, attr = _EXPORTS[name]
        value = getattr(import_module(module), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'lora_llava' has no attribute {name!r}")
