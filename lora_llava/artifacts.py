"""What a user's MODEL/RUN argument means: a run directory, an adapter, a checkpoint, a merged/aligned/assembled
model, any LLaVA checkpoint directory, a registered backbone or a Hub id.

Usage::

    art = open_artifact("exp1")            # a run dir, adapter, checkpoint, merged/aligned/assembled model, or backbone
    art.kind, art.path, art.meta           # "run", Path("exp1"), AdapterMeta(backbone="tiny", ...)
    spec = resolve_backbone("tiny")        # the BackboneSpec a recipe's backbone names (a name, a Hub id, a folder)

A path that exists is always a path: ``exp1`` is the directory ``exp1`` when it exists, and only a
name that is not a directory is looked up among the registered backbones (then as a Hub id). The
on-disk layouts are ``lora_llava.layout``'s.
"""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from lora_llava.backbones.registry import BackboneSpec
from lora_llava.errors import UserError
from lora_llava.layout import (
    META_FILE,
    RECIPE_FILE,
    TRAINER_STATE_FILE,
    AdapterMeta,
    Meta,
    RunDir,
    checkpoint_problem,
    drift_warning,
    is_checkpoint_dir,
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


def looks_like_hub_id(ref: str) -> bool:
    """``owner/name`` that is not a relative path a user meant as a directory (``./x``, ``runs/x``)."""
    return bool(re.fullmatch(r"[\w.-]+/[\w.-]+", ref)) and not ref.startswith(("runs/", "./", "../", "."))


_WARNED: set[str] = set()


def _open_dir(path: Path, ref: str) -> Artifact:
    meta = read_meta(path)
    warning = drift_warning(meta, ref)
    if warning and str(path.resolve()) not in _WARNED:  # once per artifact and process
        _WARNED.add(str(path.resolve()))
        print(warning, file=sys.stderr)
    if meta is not None:
        if is_checkpoint_dir(path) and isinstance(meta, AdapterMeta):
            problem = checkpoint_problem(path)
            if problem is not None:
                raise UserError(f"checkpoint {ref!r} is damaged: {problem}", hint="use another checkpoint of the run")
        return Artifact(meta.KIND, ref, path, meta)
    run = RunDir(path)
    adapter_meta = read_meta(run.adapter)
    if isinstance(adapter_meta, AdapterMeta):
        return Artifact("run", ref, path, adapter_meta)
    if is_checkpoint_dir(path):  # written before checkpoints held adapters: it only resumes
        return Artifact("checkpoint", ref, path)
    if (path / "config.json").is_file():
        return Artifact("checkpoint_dir", ref, path)
    if run.recipe.is_file():
        latest = run.latest_checkpoint()
        if latest is not None:
            raise UserError(
                f"run directory {ref!r} has no adapter yet: training did not finish (latest checkpoint: {latest.name})",
                hint="finish it with: lora-llava train <recipe> output_dir=" + ref + " train.resume=true",
            )
        raise UserError(
            f"run directory {ref!r} has no adapter: training did not finish",
            hint="train it to the end (lora-llava train <recipe> output_dir=" + ref + ")",
        )
    raise UserError(
        f"{ref!r} is not {WHAT}: no {META_FILE}, adapter/, {TRAINER_STATE_FILE} or config.json in it",
    )


def backbone_dir(art: Artifact) -> Path:
    """The model directory a local artifact offers as a training backbone."""
    if art.is_model_dir:
        return art.path  # type: ignore[return-value]
    if art.kind == "run" and isinstance(art.meta, AdapterMeta) and art.meta.stage == "align":
        aligned = RunDir(art.path).aligned  # type: ignore[arg-type]
        if (aligned / "config.json").is_file():
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
    A directory that exists is always a directory (``open_artifact``)."""
    from lora_llava.backbones.registry import hub_spec, registered, spec_from_files, unknown_backbone

    if not Path(name).exists():
        spec = registered(name)
        if spec is not None:
            return spec
        if "/" in name or os.sep in name:
            if looks_like_hub_id(name):
                return hub_spec(name)
            raise UserError(
                f"backbone directory {name!r} does not exist",
                hint="if it is a stage-1 run directory, train its align recipe first (lora-llava train .../align)",
            )
        raise unknown_backbone(name)
    art = open_artifact(name)
    if art.path is None:
        return hub_spec(name)
    path = backbone_dir(art)

    def read(filename: str) -> str | None:
        f = path / filename
        return f.read_text() if f.is_file() else None

    return spec_from_files(str(path), read, "local")


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
