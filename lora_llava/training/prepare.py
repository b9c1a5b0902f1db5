"""Setting up a run before any weights load: backbone, processor, chat format, encoder, checked data.

Usage::

    prepared = prepare_run(recipe, run_dir)          # what `check` prints and `train` trains on
    prepared.spec, prepared.encoder.fmt, prepared.report.train
    report_data(prepared, RunDir(run_dir))           # printed, and kept in the run's data_report.txt

Everything here is cheap and can fail: the recipe's backbone resolves (an assembled backbone is
built), its processor loads, every sample is read, rendered and budgeted.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lora_llava.annotations import Log
from lora_llava.artifacts import resolve_backbone
from lora_llava.backbones.registry import BackboneSpec
from lora_llava.config.schema import Recipe
from lora_llava.data.chat import ChatFormat, format_for
from lora_llava.data.check import DataReport, prepare_data
from lora_llava.data.encode import Encoder
from lora_llava.errors import UserError
from lora_llava.layout import RunDir
from lora_llava.model.anyres import apply_max_tiles
from lora_llava.model.counting import counting_processor
from lora_llava.model.loading import load_processor, torch_dtype
from lora_llava.model.targets import check_lora_targets


@dataclass
class PreparedRun:
    """A recipe made concrete: the backbone, its processor, the encoder (chat format included), the data."""

    recipe: Recipe
    spec: BackboneSpec
    processor: Any
    encoder: Encoder
    report: DataReport

    @property
    def fmt(self) -> ChatFormat:
        return self.encoder.fmt


def backbone_for(recipe: Recipe, log: Log = print) -> BackboneSpec:
    """The recipe's backbone spec; ``backbone: assemble`` builds (or reuses) ``<output_dir>/assembled``."""
    if recipe.backbone == "assemble":
        from lora_llava.backbones.assemble import assemble

        assert recipe.assemble is not None  # cross_check requires it with backbone: assemble
        dtype = torch_dtype(recipe.quantization.compute_dtype)
        path = assemble(recipe.assemble, RunDir(recipe.output_dir).assembled, dtype=dtype, log=log)
        return resolve_backbone(str(path.resolve()))
    spec = resolve_backbone(recipe.backbone)
    if spec.inferred:
        log(f"backbone {spec.name}: {spec.inferred}")
    return spec


def prepare_run(
    recipe: Recipe, run_dir: Path | None = None, log: Log = print, enforce: bool = True, pixels: bool = True
) -> PreparedRun:
    """Everything ``check`` does: backbone, processor, encoder and the data report (no model weights).

    ``enforce=False`` returns the report without applying data.on_bad_sample (see ``enforce_policy``).
    ``pixels=False`` (``check``, ``plan``): lengths only, from a counting processor where the backbone's
    processor is one it reads (``model.counting``), which skips transformers' image-processing imports.
    """
    spec = backbone_for(recipe, log)
    if recipe.images.pad_to_square and spec.family != "llava":
        raise UserError(
            f"images.pad_to_square is LLaVA-1.5's image handling; backbone {spec.name} is {spec.family} "
            "(AnyRes tiles keep the aspect ratio), and stock transformers would not pad it at serving time",
            hint="remove images.pad_to_square (images.max_tiles bounds the image tokens instead)",
        )
    path = spec.local_path()
    processor = (None if pixels else counting_processor(path)) or load_processor(path)
    check_lora_targets(spec, recipe)
    grids = list(getattr(processor.image_processor, "image_grid_pinpoints", None) or [])
    apply_max_tiles(None, processor, recipe.images.max_tiles)
    fmt = format_for(recipe.chat_format_for(spec.chat_format), processor.tokenizer, recipe.chat.system_prompt)
    encoder = Encoder(processor, fmt, recipe.data.max_length, pad_to_square=recipe.images.pad_to_square)
    report = prepare_data(recipe, encoder, run_dir, enforce=enforce)
    if recipe.images.max_tiles and grids and len(processor.image_processor.image_grid_pinpoints) == len(grids):
        report.warnings.append(
            f"images.max_tiles={recipe.images.max_tiles} caps nothing: every AnyRes grid of {spec.name} has at most "
            f"{recipe.images.max_tiles} tiles"
        )
    return PreparedRun(recipe, spec, processor, encoder, report)


def describe_format(fmt: ChatFormat) -> str:
    """One line: the chat format and the system prompt a run renders."""
    system = f"system prompt {fmt.system!r}" if fmt.system else "no system prompt"
    return f"chat format {fmt.name}, {system}"


def report_data(prepared: PreparedRun, run: RunDir, log: Log = print) -> None:
    """Say what a run trains on (chat format, the data report, what was left out) and keep it in the run's
    data_report.txt."""
    report = prepared.report
    text = describe_format(prepared.fmt) + "\n" + report.summary()
    log(text)
    run.data_report.write_text(text + "\n")
    if report.bad or report.dropped:
        left_out = len(report.bad) + len(report.dropped)
        log(f"left out {left_out} sample(s) ({len(report.bad)} bad); listed in {run.rejected}")
    if prepared.recipe.train.group_by_length:
        log(f"batches grouped by length, image and text-only apart (seed {prepared.recipe.train.seed})")
