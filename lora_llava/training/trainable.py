"""The model a run trains: the backbone loaded as the recipe says, adapters attached, the part policy checked.

Usage::

    model = build_trainable(recipe, prepared, log)   # logs the part table; a policy violation is a UserError
"""

from __future__ import annotations

from lora_llava.annotations import Log, Model
from lora_llava.compat import allow_training_quantized_base
from lora_llava.config.schema import Recipe
from lora_llava.model.loading import load_base
from lora_llava.model.parts import check_policy, format_part_table
from lora_llava.model.trainability import attach_adapters
from lora_llava.training.prepare import PreparedRun


def build_trainable(recipe: Recipe, prepared: PreparedRun, log: Log = print) -> Model:
    """Load the backbone (4-bit LM where the recipe says), attach LoRA and set each part's policy, check it."""
    from transformers import set_seed

    set_seed(recipe.train.seed)
    model, _ = load_base(prepared.spec, recipe.quantization, max_tiles=recipe.images.max_tiles)
    model = attach_adapters(model, prepared.spec, recipe)
    log(format_part_table(check_policy(model, prepared.spec, recipe)))
    for config in (model.config, getattr(model.config, "text_config", None)):
        if config is not None:  # training keeps no KV cache (with one, packed rows would get no block mask)
            config.use_cache = False
    if getattr(model, "is_quantized", False) and not hasattr(model, "peft_config"):
        allow_training_quantized_base(model)  # stage 1 on a 4-bit LM; check_policy verified only 16-bit parts train
    return model
