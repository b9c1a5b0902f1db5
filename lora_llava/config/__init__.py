"""Recipes: the schema dataclasses and loading, validating and saving them.

Usage::

    from lora_llava.config import load_recipe, save_recipe
    recipe = load_recipe("recipes/quickstart.yaml", ["train.max_steps=20"])
    save_recipe(recipe, "runs/x/recipe.yaml")
"""

from lora_llava.config.load import describe_keys, load_recipe, recipe_to_dict, save_recipe
from lora_llava.config.schema import (
    DataConfig,
    DataSource,
    EvalConfig,
    LoraConfig,
    MergeConfig,
    ProjectorConfig,
    QuantizationConfig,
    Recipe,
    TrainConfig,
    VisionTowerConfig,
)

__all__ = [
    "DataConfig",
    "DataSource",
    "EvalConfig",
    "LoraConfig",
    "MergeConfig",
    "ProjectorConfig",
    "QuantizationConfig",
    "Recipe",
    "TrainConfig",
    "VisionTowerConfig",
    "describe_keys",
    "load_recipe",
    "recipe_to_dict",
    "save_recipe",
]
