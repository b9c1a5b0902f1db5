"""What a user's MODEL/RUN argument means: a run directory, an adapter, a checkpoint, a merged/aligned/assembled
model, any LLaVA checkpoint directory, a registered backbone or a Hub id.

Usage::

    art = open_artifact("exp1")            # a run dir, adapter, checkpoint, merged/aligned/assembled model, or backbone
    art.kind, art.path, art.meta           # "run", Path("exp1"), AdapterMeta(backbone="tiny", ...)
    lin = art.lineage()                    # Lineage: base, training numbers, eval before/after, merge verification
    spec = resolve_backbone("tiny")        # the BackboneSpec a recipe's backbone names (a name, a Hub id, a folder)

A path that exists is always a path: ``exp1`` is the directory ``exp1`` when it exists, and only a
name that is not a directory is looked up among the registered backbones (then as a Hub id). The
on-disk layouts are ``lora_llava.layout``'s.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from lora_llava.backbones.registry import BackboneSpec, looks_like_hub_id
from lora_llava.errors import UserError
from lora_llava.fsutil import cache_root
from lora_llava.layout import (
    MANIFEST_FILE,
    MERGE_REPORT_FILE,
    META_FILE,
    MODEL_CONFIG_FILE,
    RECIPE_FILE,
    TRAINER_STATE_FILE,
    AdapterMeta,
    MergedMeta,
    Meta,
    RunDir,
    checkpoint_problem,
    drift_warning,
    is_checkpoint_dir,
    manifest_problem,
    read_meta,
)

# ------------------------------------------------------------------------------------ what a user typed


@dataclass
class Artifact:
    """A resolved MODEL/RUN argument.

    ``kind``: ``run`` (a run directory with a finished adapter), ``adapter``, ``checkpoint``, ``merged``,
    ``aligned``, ``assembled``, ``checkpoint_dir`` (a transformers checkpoint lora_llava did not write)
    or ``backbone`` (a registered name or a Hub id; ``path`` is None).
    """

    kind: str
    ref: str
    path: Path | None = None
    meta: Meta | None = None

    @property
    def adapter_dir(self) -> Path | None:
        """Where the trained parts of a run or adapter live."""
        if self.kind == "run":
            return RunDir(self.path).adapter  # type: ignore[arg-type]
        return self.path if self.kind == "adapter" else None

    @property
    def run_dir(self) -> Path | None:
        if self.kind == "run":
            return self.path
        if self.kind == "adapter" and self.path is not None and (self.path.parent / RECIPE_FILE).is_file():
            return self.path.parent
        if self.kind in ("adapter", "checkpoint") and self.path is not None and is_checkpoint_dir(self.path):
            return self.path.parent.parent
        return None

    @property
    def description(self) -> str:
        """The kind in words: ``a merged model``."""
        return KIND_WORDS[self.kind]

    @property
    def is_model_dir(self) -> bool:
        """A complete transformers checkpoint: loads with ``from_pretrained`` as it is."""
        return self.kind in ("merged", "aligned", "assembled", "checkpoint_dir")

    def lineage(self) -> Lineage:
        """What this model is and how it was made, from what lora_llava recorded (see ``Lineage``)."""
        return _read_lineage(self)


KIND_WORDS = {
    "run": "a run directory",
    "adapter": "an adapter",
    "checkpoint": "a training checkpoint",
    "merged": "a merged model",
    "aligned": "an aligned (stage-1) model",
    "assembled": "an assembled model",
    "checkpoint_dir": "a model directory",
    "backbone": "a backbone",
}
WHAT = "a run directory, an adapter/, a checkpoint, a merged model, a registered backbone or a Hub id"


def open_artifact(ref: str | Path) -> Artifact:
    """Resolve what a user typed as MODEL/RUN. Raises UserError naming what was looked for."""
    ref = str(ref)
    path = Path(ref)
    if path.exists():
        if not path.is_dir():
            raise UserError(f"{ref!r} is a file; expected {WHAT}")
        return _open_dir(path, ref)
    from lora_llava.backbones.registry import is_registered

    if is_registered(ref) or looks_like_hub_id(ref):
        return Artifact("backbone", ref)
    if "/" in ref or os.sep in ref or ref.startswith("."):
        raise UserError(f"no directory {ref!r}: it does not exist", hint="pass " + WHAT)
    raise UserError(
        f"{ref!r} is neither a directory here nor a registered backbone",
        hint="pass " + WHAT + " (lora-llava recipes --backbones lists the registered ones)",
    )


_WARNED: set[str] = set()


def _check_whole(folder: Path, meta: Meta, ref: str) -> None:
    """An adapter or merged model whose files do not match its manifest (damaged, edited, swapped) is a
    UserError; one written with a manifest that lost it too. Hashing a model's gigabytes once is enough: the
    files' sizes, modification and change times and inodes when they last verified are kept in lora_llava's
    cache, and while they stand the hashes are not recomputed. Written before manifests: one warning, nothing checked."""
    if not (folder / MANIFEST_FILE).is_file():
        if meta.sealed:
            raise UserError(
                f"{meta.KIND} {ref!r} is incomplete or altered: its {MANIFEST_FILE} is gone",
                hint="train or merge it again (or restore the folder from a copy)",
            )
        if str(folder.resolve()) not in _WARNED:
            _WARNED.add(str(folder.resolve()))
            print(f"warning: {ref} was written before lora_llava kept manifests: its files are not checked",
                  file=sys.stderr)  # fmt: skip
        return
    stamp = _stat_stamp(folder)
    record = cache_root() / "verified" / (hashlib.sha256(str(folder.resolve()).encode()).hexdigest()[:24] + ".json")
    try:
        if json.loads(record.read_text()) == stamp:
            return
    except (OSError, ValueError):
        pass
    problem = manifest_problem(folder, hashes=True)
    if problem is not None:
        raise UserError(
            f"{meta.KIND} {ref!r} is damaged or altered: {problem}",
            hint="train or merge it again (or restore the folder from a copy)",
        )
    try:
        record.parent.mkdir(parents=True, exist_ok=True)
        record.write_text(json.dumps(stamp))
    except OSError:
        pass  # the check ran; not remembering it only costs time


def _stat_stamp(folder: Path) -> dict[str, list[int]]:
    """Every file's size, modification and change times and inode: what changes when a file is written or
    replaced (the change time also when its modification time is set back)."""
    out = {}
    for p in sorted(folder.iterdir()):
        if p.is_file():
            st = p.stat()
            out[p.name] = [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]
    return out


def _open_dir(path: Path, ref: str) -> Artifact:
    meta = read_meta(path)
    warning = drift_warning(meta, ref)
    if warning and str(path.resolve()) not in _WARNED:  # once per artifact and process
        _WARNED.add(str(path.resolve()))
        print(warning, file=sys.stderr)
    if meta is not None:
        if is_checkpoint_dir(path) and isinstance(meta, AdapterMeta):
            problem = checkpoint_problem(path, as_model=True)
            if problem is not None:
                raise UserError(f"checkpoint {ref!r} is damaged: {problem}", hint="use another checkpoint of the run")
        elif isinstance(meta, (AdapterMeta, MergedMeta)):
            _check_whole(path, meta, ref)
        return Artifact(meta.KIND, ref, path, meta)
    run = RunDir(path)
    adapter_meta = read_meta(run.adapter)
    if isinstance(adapter_meta, AdapterMeta):
        _check_whole(run.adapter, adapter_meta, f"{ref}/{run.adapter.name}")
        return Artifact("run", ref, path, adapter_meta)
    if is_checkpoint_dir(path):  # written before checkpoints held adapters: it only resumes
        return Artifact("checkpoint", ref, path)
    if (path / MODEL_CONFIG_FILE).is_file():
        return Artifact("checkpoint_dir", ref, path)
    if run.recipe.is_file():
        latest = run.latest_checkpoint()
        if latest is not None:
            size = run.world_size()
            where = "" if size <= 1 else f" (as many processes as trained it: {size}; over several machines, as before)"
            raise UserError(
                f"run directory {ref!r} has no adapter yet: training did not finish (latest checkpoint: {latest.name})",
                hint=f"finish it with: {run.resume_command(ref)}{where}; or use the checkpoint as it is: "
                f"{Path(ref) / run.checkpoints.name / latest.name}",
            )
        raise UserError(
            f"run directory {ref!r} has no adapter: training did not finish, and it has no complete checkpoint",
            hint=f"train it again: lora-llava train {Path(ref) / run.recipe.name} output_dir={ref} --overwrite",
        )
    raise UserError(
        f"{ref!r} is not {WHAT}: no {META_FILE}, adapter/, {TRAINER_STATE_FILE} or {MODEL_CONFIG_FILE} in it",
    )


def backbone_dir(art: Artifact) -> Path:
    """The model directory a local artifact offers as a training backbone."""
    if art.is_model_dir:
        return art.path  # type: ignore[return-value]
    if art.kind == "run" and isinstance(art.meta, AdapterMeta) and art.meta.stage == "align":
        aligned = RunDir(art.path).aligned  # type: ignore[arg-type]
        if (aligned / MODEL_CONFIG_FILE).is_file():
            return aligned
        raise UserError(
            f"backbone {art.ref!r} is a stage-1 run directory without model/ (the aligned model it writes last)",
            hint="finish stage 1 first (lora-llava train <align recipe>)",
        )
    if art.kind in ("run", "adapter"):
        raise UserError(
            f"backbone {art.ref!r} is a stage-2 run (an adapter), not a model",
            hint="merge it first (lora-llava merge RUN OUT) and train on the merged directory",
        )
    raise UserError(
        f"backbone {art.ref!r} is {art.description}, not a model", hint="point at a LLaVA checkpoint directory"
    )


def resolve_backbone(name: str) -> BackboneSpec:
    """The backbone ``name`` names: a registered name or Hub id, a local directory (a LLaVA checkpoint, a
    merged or assembled model, a finished stage-1 run), or an unregistered Hub id of a LLaVA checkpoint.
    A directory that exists is always a directory (``open_artifact``), read by the registry as a model
    directory (``backbone_dir``: a stage-1 run offers its aligned model)."""
    from lora_llava.backbones.registry import backbone_spec

    art = open_artifact(name) if Path(name).exists() else None
    folder = backbone_dir(art) if art is not None and art.path is not None else None
    return backbone_spec(name, folder, exists=art is not None)


def adapter_meta_of(art: Artifact) -> AdapterMeta:
    """The adapter metadata of a run or adapter; a UserError for anything else."""
    if art.kind in ("run", "adapter") and isinstance(art.meta, AdapterMeta):
        return art.meta
    if art.kind in ("merged", "aligned"):
        raise UserError(f"{art.ref} is already merged; this needs a run or adapter directory")
    raise UserError(
        f"{art.ref!r} is {art.description}, not a run or adapter directory",
        hint="pass the output_dir of a finished `lora-llava train`",
    )


# ------------------------------------------------------------------------------------------------ lineage


@dataclass(frozen=True)
class MergeCheck:
    """How a merged model verified against the adapter it was merged from (its merge report)."""

    folder: Path  # the merged model
    dtype: str  # its weights' dtype
    base: str  # what LoRA was folded into: dequantized (the NF4 base as trained) | original
    samples: int  # verification samples (0: none were found, nothing was compared)
    answers_equal: int  # greedy answers of the merged model equal to the adapter's
    answers_total: int
    max_abs_logit_diff: float | None  # next-token logits, merged against adapter
    mean_max_abs_logit_diff: float | None
    run_dtype: str  # the dtype the merged model ran in for the check (as stored)
    quantized_answers_equal: int | None  # the merged model re-quantized to 4-bit NF4, against the adapter
    accuracy: dict[str, float]  # exact match on the verification samples (merged, quantized)
    no_op: bool  # the adapter changed nothing
    passed: bool | None  # against merge.min_agreement (None: no threshold)
    verified: bool | None  # the merged model's lora_llava.json: False when it fell below merge.min_agreement

    @property
    def agreement(self) -> float | None:
        """The share of the merged model's answers equal to the adapter's (None: nothing compared)."""
        return self.answers_equal / self.answers_total if self.answers_total else None


@dataclass(frozen=True)
class Lineage:
    """What a model is and how it was made: what its metadata, run directory and merge report recorded.

    One reader for everything that shows it (the demo's lineage panel, a pushed model's card). None where
    nothing recorded it.
    """

    kind: str  # as Artifact.kind
    ref: str
    folder: Path | None  # the model's own files (a run's adapter/); None for a backbone
    run_dir: Path | None  # the run it came from (a merged model inside its run directory included)
    # what it was trained from
    backbone: str | None  # the base as lora_llava names it
    source: str | None  # where the base came from (a Hub id, builtin:..., a folder)
    family: str | None  # llava | llava_next ...
    chat_format: str | None
    system_prompt: str | None
    pad_to_square: bool
    stage: str | None  # instruct | align (of the adapter)
    recipe: Path | None  # the recipe it was trained with (the model's own copy, else the run's)
    # training (the adapter's metadata)
    steps: int | None
    train_loss: float | None  # mean training loss at the end
    train_samples: int | None
    seconds: float | None  # training wall time
    hardware: str | None  # where it trained (GPU name, or CPU)
    # eval before and after (the quickstart's summary)
    accuracy: dict[str, float] | None  # {"base": ..., "adapter": ..., "merged": ...}; None: not measured
    eval_samples: int | None
    data_report: str | None  # the training data's check report, as printed
    merge: MergeCheck | None  # this merged model's verification, or (a run, an adapter) its run's merged model's

    @property
    def accuracy_before(self) -> float | None:
        """The base model's eval accuracy, before training."""
        return (self.accuracy or {}).get("base")

    @property
    def accuracy_after(self) -> float | None:
        """The trained adapter's eval accuracy."""
        return (self.accuracy or {}).get("adapter")


def _read_json(path: Path) -> dict:
    data = json.loads(path.read_text())
    return data if isinstance(data, dict) else {}


def _read_lineage(art: Artifact) -> Lineage:
    meta = art.meta
    folder = art.adapter_dir or art.path
    run_path = art.run_dir
    if run_path is None and art.kind in ("merged", "aligned") and art.path is not None:
        if RunDir(art.path.parent).adapter.is_dir():  # <run>/merged: the run it was merged from
            run_path = art.path.parent
    run = RunDir(run_path) if run_path is not None else None
    adapter = meta if isinstance(meta, AdapterMeta) else None
    if adapter is None and run is not None and run.adapter.is_dir():
        found = read_meta(run.adapter)
        adapter = found if isinstance(found, AdapterMeta) else None
    recipe = None
    if folder is not None and (folder / RECIPE_FILE).is_file():
        recipe = folder / RECIPE_FILE
    elif run is not None and run.recipe.is_file():
        recipe = run.recipe
    elif isinstance(meta, MergedMeta) and meta.merged_from and (Path(meta.merged_from) / RECIPE_FILE).is_file():
        recipe = Path(meta.merged_from) / RECIPE_FILE  # merged elsewhere: the adapter it was merged from
    accuracy, eval_samples, data_report = None, None, None
    if run is not None and run.summary.is_file():
        summary = _read_json(run.summary)
        accuracy = dict(summary.get("accuracy") or {})
        eval_samples = summary.get("eval_samples")
    if run is not None and run.data_report.is_file():
        data_report = run.data_report.read_text().strip()
    report = folder / MERGE_REPORT_FILE if folder is not None else None
    if (report is None or not report.is_file()) and run is not None:
        report = run.merged / MERGE_REPORT_FILE  # a run's or adapter's lineage: how its merge verified
    return Lineage(
        kind=art.kind,
        ref=art.ref,
        folder=folder,
        run_dir=run_path,
        backbone=getattr(meta, "backbone", None),
        source=getattr(meta, "source", None),
        family=getattr(meta, "family", None),
        chat_format=getattr(meta, "chat_format", None),
        system_prompt=getattr(meta, "system_prompt", None),
        pad_to_square=bool(getattr(meta, "pad_to_square", False)),
        stage=adapter.stage if adapter is not None else None,
        recipe=recipe,
        steps=adapter.steps if adapter is not None else None,
        train_loss=adapter.train_loss if adapter is not None else None,
        train_samples=adapter.train_samples if adapter is not None else None,
        seconds=adapter.seconds if adapter is not None else None,
        hardware=(adapter.hardware or None) if adapter is not None else None,
        accuracy=accuracy,
        eval_samples=eval_samples,
        data_report=data_report,
        merge=_merge_check(report) if report is not None and report.is_file() else None,
    )


def _merge_check(report: Path) -> MergeCheck | None:
    """The verification a merge report records (None when it records none)."""
    data = _read_json(report)
    p = data.get("parity") or {}
    if not p:
        return None
    merged = read_meta(report.parent)
    return MergeCheck(
        folder=report.parent,
        dtype=data.get("dtype", ""),
        base=data.get("base", ""),
        samples=p.get("samples", 0),
        answers_equal=p.get("answers_equal", 0),
        answers_total=p.get("answers_total", 0),
        max_abs_logit_diff=p.get("max_abs_logit_diff"),
        mean_max_abs_logit_diff=p.get("mean_max_abs_logit_diff"),
        run_dtype=p.get("dtype", ""),
        quantized_answers_equal=p.get("quantized_answers_equal"),
        accuracy=dict(p.get("accuracy") or {}),
        no_op=bool(p.get("no_op", False)),
        passed=p.get("passed"),
        verified=merged.verified if isinstance(merged, MergedMeta) else None,
    )
