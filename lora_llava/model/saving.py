"""Writing an adapter: the trained parts, the processor as trained, the recipe and the metadata, whole or absent.

Usage::

    write_adapter(run.adapter, model, processor, spec, recipe, fmt, {"steps": 40})   # atomically
    write_adapter_files(checkpoint_dir, model, processor, spec, recipe, fmt, extra)   # into an existing folder
    deployable_processor(processor, fmt, pad_to_square)     # what stock AutoProcessor loads as trained

The layout is ``lora_llava.artifacts``'.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lora_llava.annotations import Model, Processor
from lora_llava.backbones.registry import BackboneSpec
from lora_llava.config.load import recipe_to_dict, save_recipe
from lora_llava.config.schema import Recipe
from lora_llava.data.chat import ChatFormat
from lora_llava.fsutil import atomic_dir
from lora_llava.layout import RECIPE_FILE, AdapterMeta, write_manifest, write_meta
from lora_llava.model.trained_parts import save_trained_parts


def deployable_processor(processor: Processor, fmt: ChatFormat, pad_to_square: bool) -> Processor:
    """A copy of ``processor`` that stock transformers uses exactly as training did.

    Its chat template renders ``fmt`` (system prompt included), and with ``pad_to_square`` its image
    processor is transformers' ``LlavaImageProcessor`` with ``do_pad`` (LLaVA-1.5's pad handling, same
    mean color), so ``AutoProcessor`` on a saved adapter or merged model pads like training did.
    """
    import copy

    out = copy.deepcopy(processor)
    out.chat_template = fmt.jinja
    if pad_to_square:
        from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

        settings = {k: v for k, v in out.image_processor.to_dict().items() if k != "image_processor_type"}
        settings["do_pad"] = True
        out.image_processor = LlavaImageProcessorPil(**settings)
    return out


def write_adapter(
    target: Path,
    model: Model,
    processor: Processor,
    spec: BackboneSpec,
    recipe: Recipe,
    fmt: ChatFormat,
    extra: dict[str, Any],
) -> Path:
    """The adapter, written whole or not at all: trained parts, processor as trained, recipe, AdapterMeta."""
    with atomic_dir(target, replace=True) as tmp:
        write_adapter_files(tmp, model, processor, spec, recipe, fmt, extra)
        # every file's size and SHA-256, checked when it is opened as a model; its recipe.yaml stays editable
        # (the merge and eval settings a later command reads), what it trained with is in lora_llava.json
        write_manifest(tmp, leave_out=(RECIPE_FILE,))
    return target


def write_adapter_files(
    folder: Path,
    model: Model,
    processor: Processor,
    spec: BackboneSpec,
    recipe: Recipe,
    fmt: ChatFormat,
    extra: dict[str, Any],
    between: Any = None,
) -> None:
    """An adapter's files into an existing ``folder`` (a checkpoint's, or write_adapter's temporary one).
    ``between`` is called after the weights and before the rest (the slow_save fault of the tests)."""
    save_trained_parts(model, spec, recipe, folder)
    if between is not None:
        between()
    deployable_processor(processor, fmt, recipe.images.pad_to_square).save_pretrained(folder)
    save_recipe(recipe, folder / RECIPE_FILE)
    meta = AdapterMeta(
        backbone=spec.name,
        source=spec.source,
        family=spec.family,
        chat_format=fmt.name,
        stage=recipe.stage,
        system_prompt=fmt.system,
        backbone_chat_format=spec.chat_format,
        quantization=recipe_to_dict(recipe)["quantization"],
        projector_trained=recipe.projector.policy == "full",
        pad_to_square=recipe.images.pad_to_square,
        sealed=True,  # every writer of adapter files (write_adapter, checkpoints) writes a manifest of them
        **extra,
    )
    write_meta(folder, meta)
