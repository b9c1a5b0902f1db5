"""Loading a backbone for training, inference and merging: 4-bit language model, 16-bit rest.

Usage::

    model, processor = load_base(spec, recipe.quantization)                        # as a QLoRA run trains it
    model, processor = load_base(spec, q, quantized=False, dtype=torch.float32)   # 16-bit (or 32-bit) everywhere
    processor = load_processor("runs/quickstart/adapter")

The quantization skip list comes from the backbone spec's module roles, so the vision tower,
projector and LM head are never 4-bit.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from lora_llava.annotations import Model, Processor
from lora_llava.backbones.registry import BackboneSpec
from lora_llava.config.schema import QuantizationConfig
from lora_llava.errors import UserError
from lora_llava.model.anyres import apply_max_tiles


def torch_dtype(name: str) -> torch.dtype:
    """``torch.bfloat16`` for ``"bfloat16"``: the recipe's dtype names (config.schema.DTYPE_NAMES) as torch dtypes."""
    return getattr(torch, name)


def bnb_config(spec: BackboneSpec, q: QuantizationConfig) -> Any:
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=q.quant_type,
        bnb_4bit_use_double_quant=q.double_quant,
        bnb_4bit_compute_dtype=torch_dtype(q.compute_dtype),
        llm_int8_skip_modules=spec.quantization_skip_modules(),
    )


def quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


def load_processor(path: str | Path) -> Processor:
    from transformers import AutoProcessor

    try:
        return AutoProcessor.from_pretrained(str(path))
    except OSError as e:
        raise UserError(f"cannot load the processor of {str(path)!r}: {e}", hint=_offline_hint(str(path))) from None


def _offline_hint(path: str) -> str:
    if Path(path).exists():
        return "the directory is incomplete; re-save it with save_pretrained"
    return "Hub backbones need network access or a local copy (HF_HOME cache, or a directory path as backbone)"


def load_base(
    spec: BackboneSpec,
    q: QuantizationConfig,
    quantized: bool | None = None,
    dtype: torch.dtype | None = None,
    max_tiles: int | None = None,
) -> tuple[Model, Processor]:
    """Load the backbone; 4-bit LM when ``quantized`` (default: ``q.load_in_4bit``)."""
    quiet_transformers()
    path = spec.local_path()
    quantized = q.load_in_4bit if quantized is None else quantized
    kwargs: dict = {"dtype": dtype or torch_dtype(q.compute_dtype)}
    if quantized:
        kwargs["quantization_config"] = bnb_config(spec, q)
    if torch.cuda.is_available():
        kwargs["device_map"] = {"": 0}
    try:
        model = spec.model_class().from_pretrained(path, **kwargs)
    except OSError as e:
        raise UserError(f"cannot load backbone {spec.name!r} from {path!r}: {e}", hint=_offline_hint(path)) from None
    model.config.use_cache = False
    processor = load_processor(path)
    apply_max_tiles(model, processor, max_tiles)
    return model, processor
