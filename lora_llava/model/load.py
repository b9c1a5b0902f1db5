"""Loading backbones for training, inference and merging; attaching and restoring adapters.

Usage::

    model, processor = load_base(spec, recipe.quantization)                 # 4-bit LM, 16-bit rest
    model = attach_adapters(model, spec, recipe)                             # LoRA on the LM, projector trainable
    model, processor, meta = load_adapter_model("runs/quickstart/adapter")   # a trained adapter, as trained

The quantization skip list and the LoRA targets come from the backbone spec's module roles, so the
vision tower, projector and LM head are never 4-bit and LoRA never lands in the vision tower.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch

from lora_llava.backbones.registry import BackboneSpec, resolve_backbone
from lora_llava.config.schema import QuantizationConfig, Recipe
from lora_llava.errors import UserError

ADAPTER_META = "lora_llava.json"
PROJECTOR_FILE = "projector.safetensors"
VISION_FILE = "vision_tower.safetensors"
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def bnb_config(spec: BackboneSpec, q: QuantizationConfig):
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=q.quant_type,
        bnb_4bit_use_double_quant=q.double_quant,
        bnb_4bit_compute_dtype=DTYPES[q.compute_dtype],
        llm_int8_skip_modules=spec.quantization_skip_modules(),
    )


def _quiet_transformers():
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


def load_processor(path: str):
    from transformers import AutoProcessor

    try:
        return AutoProcessor.from_pretrained(path)
    except OSError as e:
        raise UserError(f"cannot load the processor of {path!r}: {e}", hint=_offline_hint(path)) from None


def deployable_processor(processor, fmt, pad_to_square: bool):
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


def _offline_hint(path: str) -> str:
    if Path(path).exists():
        return "the directory is incomplete; re-save it with save_pretrained"
    return "Hub backbones need network access or a local copy (HF_HOME cache, or a directory path as backbone)"


def cap_tiles(pinpoints: list, tile: int, max_tiles: int | None) -> list:
    """AnyRes grid resolutions with at most ``max_tiles`` tiles of ``tile`` pixels."""
    if not max_tiles:
        return pinpoints
    kept = [p for p in pinpoints if (p[0] // tile) * (p[1] // tile) <= max_tiles]
    if not kept:
        raise UserError(
            f"images.max_tiles={max_tiles} leaves no AnyRes grid (smallest has "
            f"{min((p[0] // tile) * (p[1] // tile) for p in pinpoints)} tiles)"
        )
    return kept


def apply_max_tiles(model, processor, max_tiles: int | None) -> None:
    """Cap LLaVA-NeXT's AnyRes grids on the model config and the processor together (they must agree)."""
    ip = getattr(processor, "image_processor", None)
    if not max_tiles or ip is None or not getattr(ip, "image_grid_pinpoints", None):
        return
    tile = ip.crop_size["height"] if isinstance(ip.crop_size, dict) else ip.crop_size.height
    kept = cap_tiles(ip.image_grid_pinpoints, tile, max_tiles)
    ip.image_grid_pinpoints = kept
    if model is not None:
        model.config.image_grid_pinpoints = kept


def load_base(
    spec: BackboneSpec,
    q: QuantizationConfig,
    quantized: bool | None = None,
    dtype: torch.dtype | None = None,
    max_tiles: int | None = None,
):
    """Load the backbone; 4-bit LM when ``quantized`` (default: ``q.load_in_4bit``)."""
    _quiet_transformers()
    path = spec.local_path()
    if spec.builtin and not torch.cuda.is_available():
        # the built-ins' 64-wide matmuls gain nothing from threads, and spinning OpenMP threads
        # slow them down many times over when the CPUs are shared
        torch.set_num_threads(1)
    quantized = q.load_in_4bit if quantized is None else quantized
    dtype = dtype or DTYPES[q.compute_dtype]
    kwargs: dict = {"dtype": dtype}
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


def get_module(model, dotted: str) -> torch.nn.Module:
    """``model.get_submodule`` that also sees through a PEFT wrapper."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.get_submodule(dotted)


def _cast_input_hook(module, args):
    w = next(module.parameters())
    return tuple(a.to(w.dtype) if torch.is_tensor(a) and a.is_floating_point() else a for a in args)


def _newline(model, spec: BackboneSpec) -> torch.nn.Parameter | None:
    if not spec.image_newline:
        return None
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    owner, _, name = spec.image_newline.rpartition(".")
    return getattr(base.get_submodule(owner), name)


def connector_state(model, spec: BackboneSpec) -> dict[str, torch.Tensor]:
    """The projector's weights, plus LLaVA-NeXT's image newline (key ``image_newline``)."""
    state = {k: v.detach().cpu().contiguous() for k, v in get_module(model, spec.projector).state_dict().items()}
    nl = _newline(model, spec)
    if nl is not None:
        state["image_newline"] = nl.detach().cpu().contiguous()
    return state


def prepare_projector(model, spec: BackboneSpec, trainable: bool) -> None:
    """Projector (and image newline) in float32 when trained, frozen otherwise; inputs follow its dtype."""
    proj = get_module(model, spec.projector)
    if trainable:
        proj.float()
    for p in proj.parameters():
        p.requires_grad_(trainable)
    nl = _newline(model, spec)
    if nl is not None:
        if trainable:
            nl.data = nl.data.float()
        nl.requires_grad_(trainable)
    if not getattr(proj, "_lora_llava_hook", False):
        proj.register_forward_pre_hook(_cast_input_hook)
        proj._lora_llava_hook = True


def lora_targets(spec: BackboneSpec, recipe: Recipe) -> str | None:
    """One regex for every LoRA target: the LM's layers (policy lora) and the vision tower's (policy lora)."""
    from lora_llava.config.load import lm_policy

    parts = []
    if lm_policy(recipe) == "lora":
        parts.append(spec.lora_target_regex(recipe.lora.target_modules))
    if recipe.vision_tower.policy == "lora":
        parts.append(spec.vision_lora_regex(recipe.vision_tower.target_modules))
    if not parts:
        return None
    return parts[0] if len(parts) == 1 else "|".join(f"(?:{p})" for p in parts)


def attach_adapters(model, spec: BackboneSpec, recipe: Recipe):
    """Apply the recipe's part policies: freeze everything, then LoRA where asked, full training where asked."""
    from peft import LoraConfig, get_peft_model

    for p in model.parameters():
        p.requires_grad_(False)
    if recipe.train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    targets = lora_targets(spec, recipe)
    if targets is not None:
        cfg = LoraConfig(
            r=recipe.lora.r,
            lora_alpha=recipe.lora.alpha,
            lora_dropout=recipe.lora.dropout,
            target_modules=targets,
            bias="none",
        )
        try:
            model = get_peft_model(model, cfg)
        except ValueError as e:
            raise UserError(
                f"LoRA targets (lora.target_modules {recipe.lora.target_modules}, vision_tower.target_modules "
                f"{recipe.vision_tower.target_modules}) match no linear layer: {e}",
                hint="use layer names of that part, e.g. q_proj, v_proj",
            ) from None
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.data = p.data.float()
    if recipe.vision_tower.policy == "full":
        vt = get_module(model, spec.vision_tower)
        vt.float()
        for p in vt.parameters():
            p.requires_grad_(True)
    prepare_projector(model, spec, recipe.projector.policy == "full")
    return model


def read_meta(adapter_dir: str | os.PathLike) -> dict:
    path = Path(adapter_dir) / ADAPTER_META
    if not path.is_file():
        raise UserError(f"{str(adapter_dir)!r} is not a lora_llava adapter (no {ADAPTER_META})")
    return json.loads(path.read_text())


def has_lora(adapter_dir: Path) -> bool:
    return (Path(adapter_dir) / "adapter_config.json").is_file()


def load_adapter_model(adapter_dir: str | os.PathLike, quantized: bool | None = None, dtype: torch.dtype | None = None):
    """Rebuild a trained model: base as recorded, trained projector, LoRA weights; nothing left fresh."""
    from peft import PeftModel

    from lora_llava.config.load import load_recipe

    adapter_dir = Path(adapter_dir)
    meta = read_meta(adapter_dir)
    recipe = load_recipe(adapter_dir / "recipe.yaml")
    spec = resolve_backbone(meta["backbone"])
    model, _ = load_base(spec, recipe.quantization, quantized=quantized, dtype=dtype, max_tiles=recipe.images.max_tiles)
    restore_trained_parts(model, spec, adapter_dir)
    if has_lora(adapter_dir):
        model = PeftModel.from_pretrained(model, adapter_dir, is_trainable=False)
        check_lora_loaded(model, adapter_dir)
    model.eval()
    return model, load_processor(str(adapter_dir)), meta


def save_trained_parts(model, spec: BackboneSpec, recipe: Recipe, out: Path) -> None:
    """Write what training changed: LoRA (PEFT files), projector (+ image newline), vision tower if full."""
    from safetensors.torch import save_file

    if hasattr(model, "peft_config"):
        model.save_pretrained(out, safe_serialization=True)
    if recipe.projector.policy == "full":
        save_file(connector_state(model, spec), out / PROJECTOR_FILE)
    if recipe.vision_tower.policy == "full":
        vt = get_module(model, spec.vision_tower)
        save_file({k: v.detach().cpu().contiguous() for k, v in vt.state_dict().items()}, out / VISION_FILE)


def restore_trained_parts(model, spec: BackboneSpec, adapter_dir: Path) -> None:
    """Load the trained projector (+ image newline) and, when trained fully, the vision tower."""
    from safetensors.torch import load_file

    path = adapter_dir / PROJECTOR_FILE
    if path.is_file():
        state = load_file(path)
        nl_saved = state.pop("image_newline", None)
        nl = _newline(model, spec)
        if (nl_saved is None) != (nl is None):
            raise UserError(f"{path}: image_newline {'missing' if nl is not None else 'unexpected'} for this backbone")
        missing, unexpected = get_module(model, spec.projector).load_state_dict(state, strict=False)
        if missing or unexpected:
            raise UserError(
                f"{path}: projector weights do not fit the backbone (missing {missing}, unexpected {unexpected})"
            )
        if nl is not None:
            nl.data = nl_saved.to(nl.device, nl.dtype)
        prepare_projector(model, spec, trainable=False)
    vpath = adapter_dir / VISION_FILE
    if vpath.is_file():
        vt = get_module(model, spec.vision_tower)
        missing, unexpected = vt.load_state_dict(load_file(vpath), strict=False)
        if missing or unexpected:
            raise UserError(
                f"{vpath}: vision tower weights do not fit (missing {missing[:3]}, unexpected {unexpected[:3]})"
            )


def check_lora_loaded(model, adapter_dir: Path) -> None:
    from safetensors import safe_open

    with safe_open(str(adapter_dir / "adapter_model.safetensors"), "pt") as f:
        saved = len(list(f.keys()))
    live = sum(1 for n, _ in model.named_parameters() if "lora_" in n)
    if saved != live:
        raise UserError(f"{adapter_dir}: adapter holds {saved} LoRA tensors but the model has {live} LoRA parameters")
