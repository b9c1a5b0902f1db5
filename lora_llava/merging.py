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
from typing import Any

import torch

from lora_llava.annotations import Log, Model
from lora_llava.artifacts import adapter_meta_of, open_artifact, resolve_backbone
from lora_llava.backbones.registry import BackboneSpec
from lora_llava.compat import finish_dequantize
from lora_llava.config.load import load_recipe
from lora_llava.config.schema import Recipe
from lora_llava.data.chat import default_system, format_for
from lora_llava.data.formats import Sample
from lora_llava.errors import UserError
from lora_llava.fsutil import atomic_dir
from lora_llava.layout import (
    MERGE_REPORT_FILE,
    RECIPE_FILE,
    AdapterMeta,
    AlignedMeta,
    MergedMeta,
    hold_lock,
    lock_beside,
    release_lock,
    write_manifest,
    write_meta,
)
from lora_llava.model.loading import load_base, load_processor, torch_dtype
from lora_llava.model.trainability import get_module
from lora_llava.model.trained_parts import has_lora, load_peft_adapter, require_trained_files, restore_trained_parts


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
    quantized_answers_equal: int | None = None  # the merged model re-quantized to 4-bit NF4, against the adapter
    quantized_answers: list[str] = field(default_factory=list)
    accuracy: dict[str, float] = field(default_factory=dict)  # exact match on the verification samples
    no_op: bool = False  # the adapter changes nothing (LoRA deltas zero, parts as in the base)
    passed: bool | None = None  # against merge.min_agreement (None: no threshold set)


@dataclass
class MergeReport:
    out_dir: Path
    dtype: str
    base: str
    parity: Parity = dataclasses.field(default_factory=lambda: Parity())

    def to_json(self) -> dict:
        return {**dataclasses.asdict(self), "out_dir": str(self.out_dir)}


def fold(
    adapter_dir: Path, meta: AdapterMeta, recipe: Recipe, base_mode: str | None = None, dtype: str | None = None
) -> tuple[Model, BackboneSpec, str, bool]:
    """Return the merged (unsaved) model in ``dtype``, its backbone spec, the base used, and whether the adapter
    changed anything at all; ``recipe`` is the one saved beside the adapter.

    Layer by layer: each LoRA layer's base weight is dequantized (or upcast) to float32, its LoRA
    delta added in float32, and the sum cast to ``dtype`` before the next layer is touched, so the
    peak memory is about one model in ``dtype`` plus the 4-bit base, never a float32 copy of the model.
    """
    require_trained_files(adapter_dir, recipe, meta)
    spec = resolve_backbone(meta.backbone)
    base_mode = base_mode or recipe.merge.base
    target = torch_dtype(dtype or recipe.merge.dtype)
    q = recipe.quantization
    quantized = q.load_in_4bit and base_mode == "dequantized"  # exactly the weights trained on
    # 4-bit: as trained (its dequantization constants in the compute dtype); original: as stored
    load_dtype = torch_dtype(q.compute_dtype) if quantized else "auto"
    model, _ = load_base(spec, q, quantized=quantized, dtype=load_dtype, max_tiles=recipe.images.max_tiles)
    changed = restore_trained_parts(model, spec, adapter_dir)
    if has_lora(adapter_dir):
        model = load_peft_adapter(model, adapter_dir, meta.versions)
        changed = changed or any(p.abs().max() > 0 for n, p in model.named_parameters() if "lora_B" in n)
        model = _fold_lora_layers(model, target)
    if getattr(model, "is_quantized", False):
        model = finish_dequantize(model, target)  # the 4-bit layers LoRA did not touch
    model = model.to(target)
    leftovers = [n for n, _ in model.named_modules() if "lora_" in n or "modules_to_save" in n]
    if leftovers:
        raise UserError(f"merge left adapter modules behind: {leftovers[:3]}")
    return model.eval(), spec, base_mode, changed


def _fold_lora_layers(peft_model: Model, dtype: torch.dtype) -> Model:
    """Replace every LoRA layer by a plain Linear holding base + delta (computed in float32, stored in
    ``dtype``), and every modules_to_save wrapper by its trained copy; returns the bare model."""
    import bitsandbytes.functional as bnbf
    from peft.tuners.lora import LoraLayer

    model = peft_model.get_base_model()
    replaced: list[str] = []
    for name in [n for n, _ in model.named_modules()]:  # names only: a replaced layer is freed at once
        if any(name.startswith(r + ".") for r in replaced):
            continue  # inside a module already replaced
        module = model.get_submodule(name)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        if isinstance(module, LoraLayer):
            base = module.get_base_layer()
            w = base.weight
            weight = bnbf.dequantize_4bit(w.data, w.quant_state).float() if hasattr(w, "quant_state") else w.float()
            for adapter in module.active_adapters:
                weight += module.get_delta_weight(adapter).float().to(weight.device)
            linear = torch.nn.Linear(
                base.in_features, base.out_features, bias=base.bias is not None, device=weight.device, dtype=dtype
            )
            with torch.no_grad():
                linear.weight.copy_(weight)
                if base.bias is not None:
                    linear.bias.copy_(base.bias.float())
            setattr(parent, child, linear)
            replaced.append(name)
            del weight, module, base, w
        elif hasattr(module, "modules_to_save") and isinstance(module.modules_to_save, torch.nn.ModuleDict):
            setattr(parent, child, get_module(model, name))
            replaced.append(name)
    return model


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
    recipe = load_recipe(adapter_dir / RECIPE_FILE)
    dtype_name = dtype or recipe.merge.dtype
    merged, spec, base_mode, changed = fold(adapter_dir, meta, recipe, base_mode, dtype_name)
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
        sealed=True,  # written with a manifest (_write_verified)
    )
    if aligned:
        # stage 2's backbone: it speaks the backbone's chat format (stage 1 may have trained in plain)
        # and pads only if stage 2's recipe says so
        name = meta.backbone_chat_format
        fields = {**dataclasses.asdict(info), "chat_format": name, "system_prompt": default_system(name)}
        info = AlignedMeta(**fields, align_format=meta.chat_format)
        processor = load_processor(spec.local_path())
        processor.chat_template = format_for(name, processor.tokenizer).jinja
    lock = lock_beside(out)  # one merge into a target at a time
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        hold_lock(lock, f"merge target {str(out)!r}")
    except OSError as e:
        raise UserError(f"cannot write {out}: {e.strerror or e}", hint="choose a directory you can write to") from None
    try:
        folded = [merged]  # handed over: freed once saved, before the verification loads two models
        del merged
        parity, report = _write_verified(
            folded,
            processor,
            info,
            out,
            replace,
            adapter_dir,
            spec,
            recipe,
            verify_samples,
            changed,
            log,
            f"({dtype_name}, base: {base_mode}) in {time.time() - t0:.1f}s",
            MergeReport(out, dtype_name, base_mode),
        )
    finally:
        release_lock(lock)
    floor = recipe.merge.min_agreement
    note = ""
    if base_mode == "original" and recipe.quantization.load_in_4bit:
        note = " (expected gap: the adapter runs on the NF4 base, the merged model on the original weights)"
    log(format_parity(parity) + note)
    if parity.no_op:
        log("warning: the adapter changes nothing (its LoRA deltas are zero and its parts equal the base's): "
            "the merged model is the base model")  # fmt: skip
    if parity.passed is False:
        raise UserError(
            f"merge verification failed: merged == adapter answers {parity.answers_equal}/{parity.answers_total}, "
            f"below merge.min_agreement={floor}; the output is kept at {out}, marked unverified "
            "(lora_llava.json verified: false)",
            hint="look at merge_report.json; merge.dtype float32 or merge.base dequantized close the gap",
        )
    return report


def _write_verified(
    folded: list[Any],
    processor: Any,
    info: MergedMeta,
    out: Path,
    replace: bool,
    adapter_dir: Path,
    spec: BackboneSpec,
    recipe: Recipe,
    verify_samples: list[Sample] | None,
    changed: bool,
    log: Log,
    how: str,
    report: MergeReport,
) -> tuple[Parity, MergeReport]:
    """Save the merged model to a temporary folder, verify it there against the adapter, write its report, and
    only then rename it into place: a merged/ folder is whole and verified, or absent."""
    floor = recipe.merge.min_agreement
    with atomic_dir(out, replace=replace) as tmp:  # verified before the rename: merged/ never stands unchecked
        merged = folded.pop()
        merged.save_pretrained(tmp, safe_serialization=True, max_shard_size=recipe.merge.max_shard_size)
        del merged
        processor.save_pretrained(tmp)
        write_meta(tmp, info)
        write_manifest(tmp)  # verification opens it as a model, which checks it (rewritten with the report below)
        log(f"merged {adapter_dir} into {out} {how}")
        parity = verify(adapter_dir, tmp, spec, recipe, verify_samples)
        parity.no_op = not changed
        if floor is not None and not parity.samples:
            where = ", ".join(s.path for s in [*recipe.data.eval, *recipe.data.train][:3]) or "none"
            raise UserError(
                f"merge.min_agreement={floor} needs samples to compare the merged model with the adapter, and none "
                f"could be read (the recipe's data: {where}, from {Path.cwd()}); nothing was written to {out}",
                hint="run merge from the folder the run trained in (its data paths are relative to it), or unset "
                "merge.min_agreement to merge without that check",
            )
        if floor is not None:
            parity.passed = parity.answers_equal >= floor * parity.answers_total
            write_meta(tmp, dataclasses.replace(info, verified=parity.passed))
        report.parity = parity
        (tmp / MERGE_REPORT_FILE).write_text(json.dumps(report.to_json(), indent=2))
        write_manifest(tmp)  # last: every file's size and SHA-256, checked when it is opened as a model
    return parity, report


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
    from lora_llava.infer import evaluate, load_model, next_token_gaps

    cls = spec.model_class()
    plain, info = cls.from_pretrained(out, output_loading_info=True)
    problems = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if problems:
        raise UserError(f"merged checkpoint {out} does not load cleanly: {problems}")
    del plain
    samples = samples if samples is not None else _verify_samples(recipe, recipe.merge.verify_samples)
    if not samples:
        return Parity(note="no data found to compare on")
    n = recipe.eval.max_new_tokens
    adapter = load_model(adapter_dir)
    # in the stored dtype (what users of the merged checkpoint will run), prompted as the adapter was trained
    # (a stage-1 output records stage 2's chat format instead)
    merged = load_model(out, like=adapter)
    diffs = next_token_gaps(adapter, merged, samples)
    by_adapter, by_merged = evaluate(adapter, samples, n), evaluate(merged, samples, n)
    ans_a = [p["prediction"] for p in by_adapter.predictions]
    ans_m = [p["prediction"] for p in by_merged.predictions]
    parity = Parity(
        samples=len(samples),
        max_abs_logit_diff=max(diffs),
        mean_max_abs_logit_diff=sum(diffs) / len(diffs),
        answers_equal=sum(x == y for x, y in zip(ans_a, ans_m)),
        answers_total=len(samples),
        adapter_answers=ans_a,
        merged_answers=ans_m,
        dtype=str(next(merged.model.parameters()).dtype).replace("torch.", ""),
        accuracy={"adapter": round(by_adapter.accuracy, 4), "merged": round(by_merged.accuracy, 4)},
    )
    del merged
    if recipe.merge.verify_quantized:
        by_quantized = evaluate(load_model(out, quantize=True, like=adapter), samples, n)
        parity.quantized_answers = [p["prediction"] for p in by_quantized.predictions]
        parity.quantized_answers_equal = sum(x == y for x, y in zip(ans_a, parity.quantized_answers))
        parity.accuracy["quantized"] = round(by_quantized.accuracy, 4)
    return parity


def format_parity(p: Parity) -> str:
    if not p.samples:
        return "parity: not checked (no samples)"
    text = (
        f"parity on {p.samples} samples (merged model in {p.dtype}, as stored): merged == adapter answers "
        f"{p.answers_equal}/{p.answers_total}, "
        f"next-token logits max |diff| {p.max_abs_logit_diff:.2e} (mean {p.mean_max_abs_logit_diff:.2e})"
    )
    if p.quantized_answers_equal is not None:
        text += f"; re-quantized to 4-bit: {p.quantized_answers_equal}/{p.answers_total} equal"
    return text
