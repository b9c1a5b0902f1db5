"""Fold a trained adapter into deployable 16-bit weights, then verify the result against the adapter.

Usage::

    report = merge("runs/quickstart", "runs/quickstart/merged")
    report.parity.answers_equal, report.parity.max_abs_logit_diff

The fold never happens inside 4-bit weights. For a QLoRA run (``merge.base: dequantized``, the
default) the language model is loaded exactly as it was trained, its NF4 weights are dequantized
to float32 (transformers' ``dequantize``), and the LoRA deltas and the trained projector are folded
in float32 before the cast to ``merge.dtype``: the merged model is the trained model.
``merge.base: original`` folds into the original 16-bit weights instead (the gap to the adapter is
then the quantization error, and the report shows it). The output is a plain transformers
checkpoint: ``<ModelClass>.from_pretrained`` loads it with no missing or unexpected weights, which
the verification checks. With ``aligned=True`` (stage 1's model/) the output is stage 2's backbone:
it speaks the backbone's chat format and records the format stage 1 trained in.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lora_llava.annotations import Log, Model
from lora_llava.artifacts import AdapterMeta, AlignedMeta, MergedMeta, adapter_meta_of, open_artifact, write_meta
from lora_llava.backbones.registry import BackboneSpec, resolve_backbone
from lora_llava.config.load import load_recipe
from lora_llava.config.schema import Recipe
from lora_llava.data.chat import default_system, format_for
from lora_llava.data.encode import Encoder
from lora_llava.data.formats import Sample
from lora_llava.errors import UserError
from lora_llava.fsutil import atomic_dir
from lora_llava.model.loading import load_base, load_processor, torch_dtype
from lora_llava.model.trained_parts import check_lora_loaded, has_lora, restore_trained_parts


@dataclass
class Parity:
    """The merged model against the adapter, on the same inputs."""

    samples: int = 0
    max_abs_logit_diff: float | None = None
    mean_max_abs_logit_diff: float | None = None
    answers_equal: int = 0
    answers_total: int = 0
    adapter_answers: list[str] = field(default_factory=list)
    merged_answers: list[str] = field(default_factory=list)
    note: str = ""
    dtype: str = ""  # the merged model ran in this dtype (as stored)


@dataclass
class MergeReport:
    out_dir: Path
    dtype: str
    base: str
    parity: Parity

    def to_json(self) -> dict:
        return {**dataclasses.asdict(self), "out_dir": str(self.out_dir)}


def fold(adapter_dir: Path, meta: AdapterMeta, base_mode: str | None = None) -> tuple[Model, Recipe, BackboneSpec, str]:
    """Return the merged (unsaved, float32) model, its recipe, backbone spec and the base used."""
    from peft import PeftModel

    recipe = load_recipe(adapter_dir / "recipe.yaml")
    spec = resolve_backbone(meta.backbone)
    base_mode = base_mode or recipe.merge.base
    q = recipe.quantization
    tiles = recipe.images.max_tiles
    if q.load_in_4bit and base_mode == "dequantized":
        model, _ = load_base(spec, q, quantized=True, max_tiles=tiles)  # exactly the weights trained on
        model = model.dequantize(dtype=torch.float32) or model
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
    return merged.eval(), recipe, spec, base_mode


def merge(
    run_or_adapter: str | Path,
    out_dir: str | Path,
    dtype: str | None = None,
    base_mode: str | None = None,
    verify_samples: list[Sample] | None = None,
    replace: bool = False,
    aligned: bool = False,
    log: Log = print,
) -> MergeReport:
    """Merge; ``replace`` swaps out an existing ``out_dir`` once the new one is complete."""
    art = open_artifact(run_or_adapter)
    meta = adapter_meta_of(art)
    adapter_dir = art.adapter_dir
    assert adapter_dir is not None
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"output directory {str(out_dir)!r} is a file", hint="choose a new directory")
    if not replace and out.exists() and any(out.iterdir()):
        raise UserError(
            f"output directory {str(out_dir)!r} exists and is not empty", hint="choose a new directory or delete it"
        )
    t0 = time.time()
    merged, recipe, spec, base_mode = fold(adapter_dir, meta, base_mode)
    dtype_name = dtype or recipe.merge.dtype
    merged = merged.to(torch_dtype(dtype_name))
    merged.config.use_cache = True
    processor = load_processor(adapter_dir)
    info = MergedMeta(
        merged_from=str(adapter_dir),
        backbone=meta.backbone,
        source=meta.source,
        family=meta.family,
        chat_format=meta.chat_format,
        system_prompt=meta.system_prompt,
        dtype=dtype_name,
        base=base_mode,
        pad_to_square=meta.pad_to_square,
    )
    if aligned:
        # stage 2's backbone: it speaks the backbone's chat format (stage 1 may have trained in plain)
        # and pads only if stage 2's recipe says so
        name = meta.backbone_chat_format
        fields = {**dataclasses.asdict(info), "chat_format": name, "system_prompt": default_system(name)}
        info = AlignedMeta(**fields, align_format=meta.chat_format)
        processor = load_processor(spec.local_path())
        processor.chat_template = format_for(name, processor.tokenizer).jinja
    with atomic_dir(out, replace=replace) as tmp:
        merged.save_pretrained(tmp, safe_serialization=True)
        processor.save_pretrained(tmp)
        write_meta(tmp, info)
    del merged
    log(f"merged {adapter_dir} into {out} ({dtype_name}, base: {base_mode}) in {time.time() - t0:.1f}s")
    parity = verify(adapter_dir, out, spec, recipe, verify_samples)
    report = MergeReport(out, dtype_name, base_mode, parity)
    (out / "merge_report.json").write_text(json.dumps(report.to_json(), indent=2))
    note = ""
    if base_mode == "original" and recipe.quantization.load_in_4bit:
        note = " (expected gap: the adapter runs on the NF4 base, the merged model on the original weights)"
    log(format_parity(parity) + note)
    return report


def _verify_samples(recipe: Recipe, n: int) -> list[Sample]:
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
def verify(
    adapter_dir: Path, out: Path, spec: BackboneSpec, recipe: Recipe, samples: list[Sample] | None = None
) -> Parity:
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
        return Parity(note="no data found to compare on")
    adapter = load_model(adapter_dir)
    merged = load_model(out)  # in the stored dtype: what users of the merged checkpoint will run
    # both prompted as the adapter was trained (a stage-1 output records stage 2's chat format instead)
    merged.encoder = Encoder(merged.processor, adapter.encoder.fmt, pad_to_square=adapter.encoder.pad_to_square)
    diffs = []
    device = next(merged.model.parameters()).device
    for s in samples:
        inputs, _ = batch_inputs(adapter, [s])
        a = adapter.model(**inputs).logits[0, -1].float()
        b = merged.model(**{k: v.to(device) for k, v in inputs.items()}).logits[0, -1].float()
        diffs.append((a - b.to(a.device)).abs().max().item())
    ans_a = generate(adapter, samples, recipe.eval.max_new_tokens)
    ans_m = generate(merged, samples, recipe.eval.max_new_tokens)
    return Parity(
        samples=len(samples),
        max_abs_logit_diff=max(diffs),
        mean_max_abs_logit_diff=sum(diffs) / len(diffs),
        answers_equal=sum(x == y for x, y in zip(ans_a, ans_m)),
        answers_total=len(samples),
        adapter_answers=ans_a,
        merged_answers=ans_m,
        dtype=str(next(merged.model.parameters()).dtype).replace("torch.", ""),
    )


def format_parity(p: Parity) -> str:
    if not p.samples:
        return "parity: not checked (no samples)"
    return (
        f"parity on {p.samples} samples (merged model in {p.dtype}, as stored): merged == adapter answers "
        f"{p.answers_equal}/{p.answers_total}, "
        f"next-token logits max |diff| {p.max_abs_logit_diff:.2e} (mean {p.mean_max_abs_logit_diff:.2e})"
    )
