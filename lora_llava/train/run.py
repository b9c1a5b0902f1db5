"""Train one recipe: data check -> model -> part policy -> trainer -> self-describing adapter.

Usage::

    recipe = load_recipe("recipes/quickstart.yaml", ["train.max_steps=20"])
    result = train(recipe)          # {"adapter_dir", "train_loss", "steps", "seconds", ...}

The run directory (``recipe.output_dir``) receives ``recipe.yaml`` (resolved), ``metrics.jsonl``,
``rejected.jsonl`` (bad samples, when skipped) and ``adapter/``: LoRA weights, projector weights,
processor with chat template, the resolved recipe and ``lora_llava.json`` naming the base backbone.
The adapter directory is written to a temporary sibling and renamed into place: whole or absent.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import torch

from lora_llava.backbones.registry import resolve_backbone
from lora_llava.config.load import chat_format_name, recipe_to_dict, save_recipe
from lora_llava.config.schema import Recipe
from lora_llava.data.chat import ChatFormat, format_for
from lora_llava.data.check import prepare_data
from lora_llava.data.encode import Collator, EncodedDataset, Encoder
from lora_llava.errors import UserError
from lora_llava.fsutil import atomic_dir
from lora_llava.model.load import (
    ADAPTER_META,
    _newline,
    apply_max_tiles,
    attach_adapters,
    deployable_processor,
    get_module,
    load_base,
    load_processor,
    save_trained_parts,
)
from lora_llava.model.parts import check_policy, format_part_table
from lora_llava.train.checkpoint import resume_point

__all__ = ["train", "prepare_run"]


def backbone_for(recipe: Recipe, log=print):
    """The recipe's backbone spec; ``backbone: assemble`` builds (or reuses) ``<output_dir>/assembled``."""
    if recipe.backbone == "assemble":
        from lora_llava.backbones.assemble import assemble
        from lora_llava.model.load import DTYPES

        dtype = DTYPES[recipe.quantization.compute_dtype]
        path = assemble(recipe.assemble, Path(recipe.output_dir) / "assembled", dtype=dtype, log=log)
        return resolve_backbone(str(path.resolve()))
    spec = resolve_backbone(recipe.backbone)
    if spec.inferred:
        log(f"backbone {spec.name}: {spec.inferred}")
    return spec


def prepare_run(recipe: Recipe, run_dir: Path | None = None, log=print, enforce: bool = True):
    """Everything ``check`` does: backbone, processor, encoder and the data report (no model weights).

    ``enforce=False`` returns the report without applying data.on_bad_sample (see ``enforce_policy``).
    """
    spec = backbone_for(recipe, log)
    if recipe.images.pad_to_square and spec.family != "llava":
        raise UserError(
            f"images.pad_to_square is LLaVA-1.5's image handling; backbone {spec.name} is {spec.family} "
            "(AnyRes tiles keep the aspect ratio), and stock transformers would not pad it at serving time",
            hint="remove images.pad_to_square (images.max_tiles bounds the image tokens instead)",
        )
    processor = load_processor(spec.local_path())
    grids = list(getattr(processor.image_processor, "image_grid_pinpoints", None) or [])
    apply_max_tiles(None, processor, recipe.images.max_tiles)
    fmt = format_for(chat_format_name(recipe, spec.chat_format), processor.tokenizer, recipe.chat.system_prompt)
    encoder = Encoder(processor, fmt, recipe.data.max_length, pad_to_square=recipe.images.pad_to_square)
    report = prepare_data(recipe, encoder, run_dir, enforce=enforce)
    if recipe.images.max_tiles and grids and len(processor.image_processor.image_grid_pinpoints) == len(grids):
        report.warnings.append(
            f"images.max_tiles={recipe.images.max_tiles} caps nothing: every AnyRes grid of {spec.name} has at most "
            f"{recipe.images.max_tiles} tiles"
        )
    return spec, processor, encoder, report


def describe_format(fmt: ChatFormat) -> str:
    """One line: the chat format and the system prompt a run renders."""
    system = f"system prompt {fmt.system!r}" if fmt.system else "no system prompt"
    return f"chat format {fmt.name}, {system}"


def _step_of(checkpoint: Path) -> int:
    return json.loads((checkpoint / "trainer_state.json").read_text())["global_step"]


class _MetricsLog:
    """metrics.jsonl: started afresh, or (resuming) kept up to the checkpoint's step and continued."""

    def __init__(self, path: Path, keep_until: int | None = None) -> None:
        self.path = path
        kept = []
        if keep_until is not None and path.is_file():
            kept = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= keep_until]
        path.write_text("".join(ln + "\n" for ln in kept))

    def write(self, row: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")


def _callbacks(log: _MetricsLog, collator_stats: dict):
    from transformers import TrainerCallback

    class Metrics(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs:
                row = {"step": state.global_step, **{k: v for k, v in logs.items() if isinstance(v, (int, float))}}
                if collator_stats["tokens"]:
                    row["padding_fraction"] = round(collator_stats["pad"] / collator_stats["tokens"], 4)
                log.write(row)

        def on_step_end(self, args, state, control, **kwargs):
            if state.log_history and not math.isfinite(state.log_history[-1].get("loss", 0.0)):
                control.should_training_stop = True

    return [Metrics()]


class _CountingCollator(Collator):
    def __init__(self, pad_id: int, stats: dict) -> None:
        super().__init__(pad_id)
        self.stats = stats

    def __call__(self, items):
        batch = super().__call__(items)
        self.stats["tokens"] += batch["attention_mask"].numel()
        self.stats["pad"] += int((batch["attention_mask"] == 0).sum())
        return batch


def _optimizer_groups(model, spec, recipe: Recipe):
    """LoRA of the LM at train.learning_rate; projector (+ image newline) and vision tower at their own rates."""
    proj_ids = {id(p) for p in get_module(model, spec.projector).parameters()}
    nl = _newline(model, spec)
    if nl is not None:
        proj_ids.add(id(nl))
    vision_ids = {id(p) for p in get_module(model, spec.vision_tower).parameters()}
    lr = recipe.train.learning_rate
    buckets: dict[str, list] = {"language_model": [], "projector": [], "vision_tower": []}
    for p in model.parameters():
        if p.requires_grad:
            key = "projector" if id(p) in proj_ids else "vision_tower" if id(p) in vision_ids else "language_model"
            buckets[key].append(p)
    rates = {
        "language_model": (lr, recipe.train.weight_decay),
        "projector": (recipe.projector.learning_rate or lr, 0.0),
        "vision_tower": (recipe.vision_tower.learning_rate or lr, recipe.train.weight_decay),
    }
    return [{"params": ps, "lr": rates[k][0], "weight_decay": rates[k][1]} for k, ps in buckets.items() if ps]


def _training_args(recipe: Recipe, run_dir: Path):
    from transformers import TrainingArguments

    t = recipe.train
    cuda = torch.cuda.is_available()
    bf16 = cuda and recipe.quantization.compute_dtype == "bfloat16"
    fp16 = cuda and recipe.quantization.compute_dtype == "float16"
    if t.report_to == "wandb" and t.wandb_project:
        os.environ.setdefault("WANDB_PROJECT", t.wandb_project)
    return TrainingArguments(
        output_dir=str(run_dir / "checkpoints"),  # created only when a checkpoint is saved
        per_device_train_batch_size=t.batch_size,
        gradient_accumulation_steps=t.grad_accum,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler,
        warmup_steps=min(t.warmup_ratio, 0.999),  # transformers reads a value >= 1 as a number of steps
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        num_train_epochs=t.epochs,
        max_steps=t.max_steps or -1,
        logging_steps=t.logging_steps,
        save_strategy="steps" if t.save_steps else "no",
        save_steps=t.save_steps or 500,
        report_to=[] if t.report_to == "none" else [t.report_to],
        seed=t.seed,
        data_seed=t.seed,
        bf16=bf16,
        fp16=fp16,
        use_cpu=not cuda,
        remove_unused_columns=False,
        dataloader_num_workers=t.dataloader_workers,
        gradient_checkpointing=False,  # enabled on the model itself (non-reentrant)
        disable_tqdm=False,
        logging_first_step=True,
    )


def _trainer_class(recipe: Recipe, report):
    """The checkpointing Trainer, or (train.group_by_length) one whose sampler groups by length and modality."""
    from lora_llava.data.sampler import ModalityLengthGroupedSampler
    from lora_llava.train.checkpoint import CheckpointingTrainer as Trainer

    if not recipe.train.group_by_length:
        return Trainer
    lengths = [report.length_of(s) for s in report.train]
    has_image = [bool(s.images) for s in report.train]

    class LengthGroupedTrainer(Trainer):
        def _get_train_sampler(self, train_dataset=None):
            n = len(train_dataset if train_dataset is not None else self.train_dataset)
            if n != len(lengths):
                raise RuntimeError(f"length-grouped sampler built for {len(lengths)} samples, dataset has {n}")
            return ModalityLengthGroupedSampler(lengths, has_image, self._train_batch_size, self.args.seed)

    return LengthGroupedTrainer


def save_adapter(model, processor, spec, recipe: Recipe, run_dir: Path, extra: dict, fmt: ChatFormat) -> Path:
    """Write the adapter artifact atomically to ``run_dir/adapter``; its processor renders and pads as training did."""
    target = run_dir / "adapter"
    with atomic_dir(target, replace=True) as tmp:
        save_trained_parts(model, spec, recipe, tmp)
        deployable_processor(processor, fmt, recipe.images.pad_to_square).save_pretrained(tmp)
        save_recipe(recipe, tmp / "recipe.yaml")
        meta = {
            "format": "lora_llava-adapter/1",
            "backbone": spec.name,
            "stage": recipe.stage,
            "source": spec.source,
            "family": spec.family,
            "chat_format": fmt.name,
            "system_prompt": fmt.system,
            "backbone_chat_format": spec.chat_format,
            "quantization": recipe_to_dict(recipe)["quantization"],
            "projector_trained": recipe.projector.policy == "full",
            "pad_to_square": recipe.images.pad_to_square,
            **extra,
        }
        (tmp / ADAPTER_META).write_text(json.dumps(meta, indent=2))
    return target


def train(recipe: Recipe, log=print, prepared: tuple | None = None) -> dict:
    """Train ``recipe``; ``prepared`` is a ``prepare_run(recipe, run_dir)`` result already at hand."""
    from transformers import set_seed

    run_dir = Path(recipe.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_recipe(recipe, run_dir / "recipe.yaml")
    t0 = time.time()
    spec, processor, encoder, report = prepared or prepare_run(recipe, run_dir, log)
    log(describe_format(encoder.fmt))
    log(report.summary())
    if report.bad or report.dropped:
        left_out = len(report.bad) + len(report.dropped)
        log(f"left out {left_out} sample(s) ({len(report.bad)} bad); listed in {run_dir / 'rejected.jsonl'}")
    if recipe.train.group_by_length:
        log(f"batches grouped by length, image and text-only apart (seed {recipe.train.seed})")

    resume = resume_point(recipe, run_dir) if recipe.train.resume else None
    if recipe.stage == "align" and (run_dir / "model").exists() and not (run_dir / "model").is_dir():
        raise UserError(f"{run_dir / 'model'} is a file; stage 1 writes its aligned model there")

    set_seed(recipe.train.seed)
    model, _ = load_base(spec, recipe.quantization, max_tiles=recipe.images.max_tiles)
    model = attach_adapters(model, spec, recipe)
    rows = check_policy(model, spec, recipe)
    log(format_part_table(rows))

    stats = {"tokens": 0, "pad": 0}
    collator = _CountingCollator(processor.tokenizer.pad_token_id, stats)
    metrics = _MetricsLog(run_dir / "metrics.jsonl", keep_until=_step_of(resume) if resume else None)
    optimizer = torch.optim.AdamW(_optimizer_groups(model, spec, recipe), lr=recipe.train.learning_rate)
    if getattr(model, "is_quantized", False) and not hasattr(model, "peft_config"):
        # stage align on a 4-bit LM: only 16-bit parts train (checked by check_policy above), which
        # transformers' "no training of purely quantized models" guard cannot tell apart
        model._hf_peft_config_loaded = True
    if resume is not None:
        log(f"resuming from {resume}")
    trainer = _trainer_class(recipe, report)(
        spec=spec,
        recipe=recipe,
        model=model,
        args=_training_args(recipe, run_dir),
        train_dataset=EncodedDataset(report.train, encoder),
        data_collator=collator,
        optimizers=(optimizer, None),
        callbacks=_callbacks(metrics, stats),
    )
    out = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    if (run_dir / "checkpoints").is_dir() and not any((run_dir / "checkpoints").iterdir()):
        (run_dir / "checkpoints").rmdir()  # the Trainer makes it up front; keep it only when it holds some
    loss = float(out.training_loss)
    if not math.isfinite(loss) or any(not math.isfinite(r.get("loss", 0.0)) for r in trainer.state.log_history):
        raise UserError(
            "training loss became NaN/inf; no adapter was written",
            hint="lower train.learning_rate, or use compute_dtype bfloat16/float32",
        )
    seconds = time.time() - t0
    extra = {"train_loss": loss, "steps": trainer.state.global_step, "train_samples": len(report.train)}
    adapter = save_adapter(model, processor, spec, recipe, run_dir, extra, encoder.fmt)
    pad = stats["pad"] / max(stats["tokens"], 1)
    if recipe.stage == "align":
        from lora_llava.merge import merge

        # the LM was frozen: keep its original weights, so stage 2 quantizes exactly what stage 1 saw
        merge(str(run_dir), str(run_dir / "model"), base_mode="original", replace=True, log=log)
        log(f"stage 1 done: {run_dir / 'model'} is the aligned LLaVA; start stage 2 with backbone: {run_dir}")
    log(
        f"trained {trainer.state.global_step} steps in {seconds:.0f}s, mean loss {loss:.4f}, "
        f"padding {pad:.1%}; adapter: {adapter}"
    )
    return {
        "adapter_dir": str(adapter),
        "train_loss": loss,
        "steps": trainer.state.global_step,
        "seconds": seconds,
        "padding_fraction": pad,
        "model": model,
        "processor": processor,
        "report": report,
    }
