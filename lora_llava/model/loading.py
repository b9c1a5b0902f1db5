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
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from lora_llava.annotations import Model, Processor
from lora_llava.backbones.registry import BackboneSpec
from lora_llava.config.schema import QuantizationConfig
from lora_llava.distributed import world
from lora_llava.errors import UserError
from lora_llava.layout import META_FILE
from lora_llava.model.anyres import apply_max_tiles

if TYPE_CHECKING:
    import torch


def torch_dtype(name: str) -> torch.dtype:
    """``torch.bfloat16`` for ``"bfloat16"``: the recipe's dtype names (config.schema.DTYPE_NAMES) as torch dtypes."""
    import torch  # here, not at the top: check and plan read this module's processors without torch

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
    """Library use: transformers' warnings and progress bars off. A ``lora-llava`` command has already sent
    them to its log file (``lora_llava.thirdparty``), which this leaves as it is."""
    from lora_llava import thirdparty

    if thirdparty.settled():
        return
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


def load_processor(path: str | Path) -> Processor:
    from transformers import AutoProcessor

    try:
        return AutoProcessor.from_pretrained(str(path), **hub_kwargs(str(path)))
    except OSError as e:
        _raise_unavailable(str(path), "its processor", e)


def hub_kwargs(path: str) -> dict:
    """``local_files_only`` for a Hub id when the Hub cannot be reached: the cache answers at once."""
    from lora_llava.hub import hub_reachable

    return {} if Path(path).exists() or hub_reachable() else {"local_files_only": True}


def _raise_unavailable(path: str, what: str, e: OSError) -> NoReturn:
    from lora_llava.hub import hub_reachable, not_available

    if Path(path).exists():
        raise UserError(
            f"cannot load {what} from {path!r}: {e}",
            hint="the directory is incomplete; re-save it with save_pretrained",
        ) from None
    if not hub_reachable():
        message, hint = not_available(path, what)
        raise UserError(message, hint=hint) from None
    raise UserError(
        f"cannot load {what} of {path!r} from the Hub: {e}", hint="check the name (and access to it)"
    ) from None


_REWRITE = (
    "the checkpoint's weight names do not match this model class or transformers version: use the version it was "
    "saved with (lora-llava env), or re-save it with save_pretrained"
)


def check_loading_info(info: dict, what: str, strict: bool = False) -> None:
    """A base that loaded only in part is an error, never a model with freshly initialized weights: weights of the
    model that the checkpoint lacks (or holds in another shape) are named; weights of the checkpoint that the
    model does not use are an error for a model lora_llava wrote (``strict``), else a warning line."""
    from lora_llava.versions import package_versions

    missing = sorted({*info.get("missing_keys", ()), *(k[0] for k in info.get("mismatched_keys", ()))})
    unexpected = sorted(info.get("unexpected_keys", ()))
    installed = ", ".join(f"{n} {v}" for n, v in package_versions(("transformers",)).items())
    unused = (
        f"; {len(unexpected)} weight(s) of the checkpoint are not used by the model, e.g. {', '.join(unexpected[:4])}"
        if unexpected
        else ""
    )
    if missing or (unexpected and strict):
        lacking = (
            f"{len(missing)} weight(s) of the model are not in the checkpoint (or have another shape), "
            f"e.g. {', '.join(missing[:4])}; they would start from random values"
            if missing
            else "every weight of the model loaded"
        )
        raise UserError(f"{what}: {lacking}{unused} (installed: {installed})", hint=_REWRITE)
    if unexpected:
        print(
            f"warning: {what}: {len(unexpected)} weight(s) of the checkpoint are not used by the model, "
            f"e.g. {', '.join(unexpected[:4])}",
            file=sys.stderr,
        )


def load_base(
    spec: BackboneSpec,
    q: QuantizationConfig,
    quantized: bool | None = None,
    dtype: torch.dtype | str | None = None,
    max_tiles: int | None = None,
) -> tuple[Model, Processor]:
    """Load the backbone; 4-bit LM when ``quantized`` (default: ``q.load_in_4bit``)."""
    quiet_transformers()
    path = spec.local_path()
    quantized = q.load_in_4bit if quantized is None else quantized
    # use_kernels=False: the model's own layers, never kernels fetched from the Hub (transformers >= 5.25's default)
    kwargs: dict = {"dtype": dtype or torch_dtype(q.compute_dtype), "use_kernels": False}
    if quantized:
        kwargs["quantization_config"] = bnb_config(spec, q)
    import torch

    if torch.cuda.is_available():  # the whole model on this process's GPU (several processes: one GPU each)
        kwargs["device_map"] = {"": world().local_rank}
    ours = (Path(path) / META_FILE).is_file()  # a model lora_llava wrote (merged, aligned, assembled)
    what = f"model {path}" if ours else f"backbone {spec.name!r} ({path})"
    from safetensors import SafetensorError

    try:
        model, info = spec.model_class().from_pretrained(path, output_loading_info=True, **kwargs, **hub_kwargs(path))
    except OSError as e:
        _raise_unavailable(path, f"backbone {spec.name!r}", e)
    except SafetensorError as e:
        raise UserError(f"{what}: a weight file is not readable safetensors ({e})", hint=_REWRITE) from None
    except RuntimeError as e:
        if "mismatch" not in str(e) and "shape" not in str(e):
            raise
        first = str(e).strip().splitlines()[0]
        raise UserError(f"{what}: weights of another shape than the model's ({first})", hint=_REWRITE) from None
    check_loading_info(info, what, strict=ours)
    model.config.use_cache = False
    processor = load_processor(path)
    apply_max_tiles(model, processor, max_tiles)
    return model, processor
