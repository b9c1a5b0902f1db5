"""Fold a trained adapter into deployable 16-bit weights, then verify the result against the adapter.

Usage::

    report = merge("runs/quickstart", "runs/quickstart/merged")
    report["parity"]   # {"max_abs_logit_diff", "answers_equal", ...}

The fold never happens inside 4-bit weights. For a QLoRA run (``merge.base: dequantized``, the
default) the language model is loaded exactly as it was trained, its NF4 weights are dequantized
to float32, and the LoRA deltas and the trained projector are folded in float32 before the cast to
``merge.dtype``: the merged model is the trained model. ``merge.base: original`` folds into the
original 16-bit weights instead (the gap to the adapter is then the quantization error, and the
report shows it). The output is a plain transformers checkpoint: ``<ModelClass>.from_pretrained``
loads it with no missing or unexpected weights, which the verification checks.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from lora_llava.backbones.registry import resolve_backbone
from lora_llava.config.load import load_recipe
from lora_llava.data.chat import default_system, format_for
from lora_llava.data.encode import Encoder
from lora_llava.errors import UserError
from lora_llava.fsutil import atomic_dir
from lora_llava.model.load import (
    ADAPTER_META,
    DTYPES,
    check_lora_loaded,
    has_lora,
    load_base,
    load_processor,
    read_meta,
    restore_trained_parts,
)


def _dequantize_linear4bit(model) -> int:
    """Replace every bitsandbytes Linear4bit by a float32 nn.Linear holding its dequantized weight."""
    import bitsandbytes.functional as F

    count = 0
    for name, module in list(model.named_modules()):
        if type(module).__name__ != "Linear4bit":
            continue
        w = F.dequantize_4bit(module.weight.data, module.weight.quant_state).float()
        new = torch.nn.Linear(
            module.in_features, module.out_features, bias=module.bias is not None, device=w.device, dtype=torch.float32
        )
        new.weight.data.copy_(w)
        if module.bias is not None:
            new.bias.data.copy_(module.bias.data.float())
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
        count += 1
    for attr in ("hf_quantizer", "quantization_method"):
        if hasattr(model, attr):
            setattr(model, attr, None)
    model.is_quantized = model.is_loaded_in_4bit = False
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(model.config, attr):
            delattr(model.config, attr)
    return count


def fold(adapter_dir: Path, base_mode: str | None = None):
    """Return the merged (unsaved, float32) model, the processor and the run's metadata."""
    from peft import PeftModel

    meta = read_meta(adapter_dir)
    if meta.get("merged"):
        raise UserError(f"{adapter_dir} is already merged")
    recipe = load_recipe(adapter_dir / "recipe.yaml")
    spec = resolve_backbone(meta["backbone"])
    base_mode = base_mode or recipe.merge.base
    q = recipe.quantization
    tiles = recipe.images.max_tiles
    if q.load_in_4bit and base_mode == "dequantized":
        model, _ = load_base(spec, q, quantized=True, max_tiles=tiles)  # exactly the weights trained on
        n = _dequantize_linear4bit(model)
        if not n:
            raise UserError("expected 4-bit layers to dequantize, found none")
    else:
        model, _ = load_base(spec, q, quantized=False, dtype=torch.float32, max_tiles=tiles)
    model = model.float()
    restore_trained_parts(model, spec, adapter_dir)
    if has_lora(adapter_dir):
        model = PeftModel.from_pretrained(model, adapter_dir)
        check_lora_loaded(model, adapter_dir)
        merged = model.merge_and_unload()
    else:
        merged = model
    leftovers = [n for n, _ in merged.named_modules() if "lora_" in n]
    if leftovers:
        raise UserError(f"merge left LoRA modules behind: {leftovers[:3]}")
    return merged.eval(), load_processor(str(adapter_dir)), meta, recipe, spec, base_mode


def merge(
    run_or_adapter: str,
    out_dir: str,
    dtype: str | None = None,
    base_mode: str | None = None,
    verify_samples=None,
    replace: bool = False,
    log=print,
) -> dict:
    """Merge; ``replace`` swaps out an existing ``out_dir`` once the new one is complete."""
    from lora_llava.infer import adapter_dir_of

    adapter_dir = adapter_dir_of(run_or_adapter)
    if adapter_dir is None:
        if (Path(run_or_adapter) / ADAPTER_META).is_file():
            raise UserError(f"{run_or_adapter} is already a merged model; merge takes a run or adapter directory")
        raise UserError(
            f"{run_or_adapter!r} is not a run or adapter directory (no adapter/{ADAPTER_META})",
            hint="pass the output_dir of a finished `lora-llava train`",
        )
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"output directory {out_dir!r} is a file", hint="choose a new directory")
    if not replace and out.exists() and any(out.iterdir()):
        raise UserError(
            f"output directory {out_dir!r} exists and is not empty", hint="choose a new directory or delete it"
        )
    t0 = time.time()
    merged, processor, meta, recipe, spec, base_mode = fold(adapter_dir, base_mode)
    dtype_name = dtype or recipe.merge.dtype
    merged = merged.to(DTYPES[dtype_name])
    merged.config.use_cache = True
    formats = {"chat_format": meta["chat_format"], "system_prompt": meta.get("system_prompt", "")}
    if meta.get("stage") == "align":
        # the aligned model is stage 2's backbone: it speaks the backbone's chat format (stage 1 may have
        # trained in plain) and pads only if stage 2's recipe says so
        name = meta.get("backbone_chat_format", meta["chat_format"])
        formats = {"chat_format": name, "system_prompt": default_system(name), "align_format": meta["chat_format"]}
        processor = load_processor(spec.local_path())
        processor.chat_template = format_for(name, processor.tokenizer).jinja
    with atomic_dir(out, replace=replace) as tmp:
        merged.save_pretrained(tmp, safe_serialization=True)
        processor.save_pretrained(tmp)
        info = {
            "format": "lora_llava-merged/1",
            "merged": True,
            "merged_from": str(adapter_dir),
            "backbone": meta["backbone"],
            "source": meta["source"],
            "family": meta["family"],
            **formats,
            "dtype": dtype_name,
            "base": base_mode,
            "pad_to_square": recipe.images.pad_to_square,
        }
        (tmp / ADAPTER_META).write_text(json.dumps(info, indent=2))
    del merged
    log(f"merged {adapter_dir} into {out} ({dtype_name}, base: {base_mode}) in {time.time() - t0:.1f}s")
    parity = verify(adapter_dir, out, spec, recipe, verify_samples)
    report = {"out_dir": str(out), "dtype": dtype_name, "base": base_mode, "parity": parity}
    (out / "merge_report.json").write_text(json.dumps(report, indent=2))
    note = ""
    if base_mode == "original" and recipe.quantization.load_in_4bit:
        note = " (expected gap: the adapter runs on the NF4 base, the merged model on the original weights)"
    log(format_parity(parity) + note)
    return report


def _verify_samples(recipe, n: int):
    from lora_llava.data.formats import read_source

    for src in [*recipe.data.eval, *recipe.data.train]:
        try:
            samples, _ = read_source(src)
        except UserError:
            continue
        if samples:
            return samples[:n]
    return []


@torch.no_grad()
def verify(adapter_dir: Path, out: Path, spec, recipe, samples=None) -> dict:
    """Load the merged dir with plain transformers and compare it with the adapter model."""
    from lora_llava.infer import batch_inputs, generate, load_model

    cls = spec.model_class()
    plain, info = cls.from_pretrained(out, output_loading_info=True)
    problems = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if problems:
        raise UserError(f"merged checkpoint {out} does not load cleanly: {problems}")
    del plain
    samples = samples if samples is not None else _verify_samples(recipe, recipe.merge.verify_samples)
    if not samples:
        return {"samples": 0, "note": "no data found to compare on"}
    adapter = load_model(str(adapter_dir))
    merged = load_model(str(out), dtype=torch.float32 if not torch.cuda.is_available() else None)
    # both prompted as the adapter was trained (a stage-1 output records stage 2's chat format instead)
    merged.encoder = Encoder(merged.processor, adapter.encoder.fmt, pad_to_square=adapter.encoder.pad_to_square)
    diffs = []
    for s in samples:
        inputs, _ = batch_inputs(adapter, [s])
        a = adapter.model(**inputs).logits[0, -1].float()
        b = (
            merged.model(**{k: v.to(next(merged.model.parameters()).device) for k, v in inputs.items()})
            .logits[0, -1]
            .float()
        )
        diffs.append((a - b.to(a.device)).abs().max().item())
    ans_a = generate(adapter, samples, recipe.eval.max_new_tokens)
    ans_m = generate(merged, samples, recipe.eval.max_new_tokens)
    same = sum(x == y for x, y in zip(ans_a, ans_m))
    return {
        "samples": len(samples),
        "max_abs_logit_diff": max(diffs),
        "mean_max_abs_logit_diff": sum(diffs) / len(diffs),
        "answers_equal": same,
        "answers_total": len(samples),
        "adapter_answers": ans_a,
        "merged_answers": ans_m,
    }


def format_parity(p: dict) -> str:
    if not p.get("samples"):
        return "parity: not checked (no samples)"
    return (
        f"parity on {p['samples']} samples: merged == adapter answers {p['answers_equal']}/{p['answers_total']}, "
        f"next-token logits max |diff| {p['max_abs_logit_diff']:.2e} (mean {p['mean_max_abs_logit_diff']:.2e})"
    )
