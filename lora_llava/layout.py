"""The one owner of every on-disk layout lora_llava writes or reads: names, metadata, run directories, manifests,
and the locks that keep one writer per output.

Usage::

    run = RunDir("runs/quickstart")        # the paths of a run directory
    write_meta(folder, MergedMeta(...))    # lora_llava.json, one shape per kind, stamped with the versions
    read_meta(folder)                      # -> AdapterMeta | MergedMeta | AlignedMeta | AssembledMeta | None
    write_manifest(checkpoint)             # every file's size and SHA-256; checkpoint_problem(path) checks it
    with run.claimed(overwrite=False) as run_id: ...   # the directory checked, locked for this process, released
    hold_lock(lock_beside(out), "merge target 'x'")    # one writer per output; release_lock(...) frees it

What a user's MODEL/RUN argument means is ``lora_llava.artifacts``.

Layouts::

    <run>/                    a recipe's output_dir
      recipe.yaml             the resolved recipe
      metrics.jsonl           one line per logging step
      rejected.jsonl          samples left out, with reasons
      adapter/                what training changed (an adapter, below)
      checkpoints/checkpoint-N/   an adapter (below) that also resumes: + optimizer/scheduler/RNG/trainer state,
                              eval.json (with train.eval_steps) and manifest.json (every file's size and SHA-256)
      eval/step-N.jsonl       with train.eval_steps: the answers at step N
      curves.png              loss, eval and learning-rate curves (lora-llava plot RUN redraws it)
      third_party.log         warnings and log lines of transformers, bitsandbytes, ... (lora-llava commands)
      model/                  stage 1 only: the aligned LLaVA, stage 2's backbone (an aligned model)
      assembled/              backbone: assemble only: the new LLaVA before training (an assembled model)
      merged/, summary.json, eval_predictions.json    written by quickstart
    adapter/                  lora_llava.json (AdapterMeta), recipe.yaml, processor + chat template,
                              adapter_config.json + adapter_model.safetensors (LoRA, when any),
                              projector.safetensors (projector + LLaVA-NeXT's image newline, when trained),
                              vision_tower.safetensors (when trained fully)
    merged / aligned / assembled model:   a transformers checkpoint (config.json, model*.safetensors,
                              processor) + lora_llava.json (MergedMeta / AlignedMeta / AssembledMeta)
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shlex
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from lora_llava.distributed import broadcast, world
from lora_llava.errors import UserError

META_FILE = "lora_llava.json"
RECIPE_FILE = "recipe.yaml"
PROJECTOR_FILE = "projector.safetensors"
VISION_FILE = "vision_tower.safetensors"
LORA_CONFIG_FILE = "adapter_config.json"
LORA_WEIGHTS_FILE = "adapter_model.safetensors"
CHECKPOINT_PREFIX = "checkpoint-"
TRAINER_STATE_FILE = "trainer_state.json"
RUN_FILE = "run.json"  # the run's id, in the run directory and in each of its checkpoints
MANIFEST_FILE = "manifest.json"  # a checkpoint's files with their sizes and SHA-256, written last
MERGE_REPORT_FILE = "merge_report.json"  # a merged model's verification against its adapter
MODEL_CONFIG_FILE = "config.json"  # a transformers model directory's config
PROCESSOR_CONFIG_FILE = "processor_config.json"  # its processor's settings (image processor included)
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"  # its tokenizer's settings (the tokenizer class)
CHECKPOINT_EVAL_FILE = "eval.json"  # the eval result at a checkpoint's step (with train.eval_steps)


LOCK_FILE = ".lora_llava.lock"  # a run directory's lock (the holder's pid): one run writes into it at a time


# --------------------------------------------------------------------------------------------- metadata


@dataclass
class _Meta:
    FORMAT: ClassVar[str]
    KIND: ClassVar[str]
    # what it was made with (lora_llava.versions.stamp(): packages, device, CUDA, bitsandbytes backend),
    # filled in by write_meta; empty for artifacts written before version stamps
    versions: dict = field(default_factory=dict, kw_only=True)
    # written with a manifest.json of its files (adapters, checkpoints and merged models from this version on):
    # without one it is incomplete or altered; False for artifacts written before manifests
    sealed: bool = field(default=False, kw_only=True)

    def to_json(self) -> dict[str, Any]:
        return {"format": self.FORMAT, **dataclasses.asdict(self)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Any:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


@dataclass
class AdapterMeta(_Meta):
    """What a trained adapter was trained from and how: enough to rebuild the model exactly."""

    FORMAT: ClassVar[str] = "lora_llava-adapter/1"
    KIND: ClassVar[str] = "adapter"
    backbone: str
    source: str
    family: str
    chat_format: str  # the format training rendered (plain for a plain stage 1)
    stage: str = "instruct"
    system_prompt: str = ""  # adapters written before system prompts were rendered trained with none
    backbone_chat_format: str = ""  # the backbone's own format (what stage 2 after a stage 1 trains in)
    quantization: dict = field(default_factory=dict)
    projector_trained: bool = True
    pad_to_square: bool = False
    train_loss: float | None = None
    steps: int | None = None
    train_samples: int | None = None
    seconds: float | None = None  # training wall time
    hardware: str = ""  # where it trained (GPU name, or CPU)

    def __post_init__(self) -> None:
        self.backbone_chat_format = self.backbone_chat_format or self.chat_format


@dataclass
class MergedMeta(_Meta):
    """A deployable checkpoint folded from an adapter."""

    FORMAT: ClassVar[str] = "lora_llava-merged/1"
    KIND: ClassVar[str] = "merged"
    merged_from: str
    backbone: str
    source: str
    family: str
    chat_format: str
    system_prompt: str = ""
    dtype: str = "bfloat16"
    base: str = "dequantized"
    pad_to_square: bool = False
    merged: bool = True  # read by lora_llava versions that knew only this key
    verified: bool | None = None  # False: the parity check fell below merge.min_agreement


@dataclass
class AlignedMeta(MergedMeta):
    """Stage 1's output: the LLaVA with its aligned projector, stage 2's backbone."""

    FORMAT: ClassVar[str] = "lora_llava-aligned/1"
    KIND: ClassVar[str] = "aligned"
    align_format: str = "plain"  # the format stage 1 trained in; chat_format is the LM's, for stage 2


@dataclass
class AssembledMeta(_Meta):
    """A new LLaVA assembled from a vision encoder and a causal LM (projector untrained)."""

    FORMAT: ClassVar[str] = "lora_llava-assembled/1"
    KIND: ClassVar[str] = "assembled"
    assembled: dict
    chat_format: str
    added_tokens: list = field(default_factory=list)


Meta = AdapterMeta | MergedMeta | AlignedMeta | AssembledMeta
_BY_FORMAT: dict[str, type[_Meta]] = {c.FORMAT: c for c in (AdapterMeta, MergedMeta, AlignedMeta, AssembledMeta)}


def write_meta(folder: str | Path, meta: Meta) -> None:
    """``lora_llava.json`` in ``folder``, stamped with the versions it is written with (when not already)."""
    if not meta.versions:
        from lora_llava.versions import stamp

        meta.versions = stamp()
    (Path(folder) / META_FILE).write_text(json.dumps(meta.to_json(), indent=2))


def read_meta(folder: str | Path) -> Meta | None:
    """The metadata lora_llava wrote into ``folder``, or None when there is none."""
    path = Path(folder) / META_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: unreadable ({e})", hint="the directory is damaged; re-create it") from None
    fmt = data.get("format") if isinstance(data, dict) else None
    cls = _BY_FORMAT.get(fmt or "")
    if cls is None:
        raise UserError(
            f"{path}: unknown format {fmt!r} (known: {', '.join(sorted(_BY_FORMAT))})",
            hint="it was written by another version of lora_llava; use that version, or re-create it",
        )
    if cls is MergedMeta and data.get("align_format"):
        cls = AlignedMeta
    try:
        return cls.from_json(data)
    except TypeError as e:
        raise UserError(f"{path}: incomplete {cls.KIND} metadata ({e})") from None


# ----------------------------------------------------------------------------------------- run directory


class RunDir:
    """The paths of a run directory (a recipe's ``output_dir``)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)

    recipe = property(lambda self: self.path / RECIPE_FILE)
    metrics = property(lambda self: self.path / "metrics.jsonl")
    rejected = property(lambda self: self.path / "rejected.jsonl")
    adapter = property(lambda self: self.path / "adapter")
    checkpoints = property(lambda self: self.path / "checkpoints")
    aligned = property(lambda self: self.path / "model")
    assembled = property(lambda self: self.path / "assembled")
    merged = property(lambda self: self.path / "merged")
    summary = property(lambda self: self.path / "summary.json")
    bad_samples = property(lambda self: self.path / "bad_samples.jsonl")  # every bad sample, when too many to print
    data_report = property(lambda self: self.path / "data_report.txt")  # the data check's report, as printed
    pushed = property(lambda self: self.path / "pushed.json")  # repos this run was pushed to
    eval_predictions = property(lambda self: self.path / "eval_predictions.json")
    eval_dir = property(lambda self: self.path / "eval")  # eval/step-N.jsonl: answers during training
    curves = property(lambda self: self.path / "curves.png")
    third_party_log = property(lambda self: self.path / "third_party.log")  # other packages' warnings and logs

    run_file = property(lambda self: self.path / RUN_FILE)

    def finished_outputs(self) -> list[str]:
        """What an earlier run left here that a new run would contradict (names, for messages)."""
        out = [p.name + "/" for p in (self.adapter, self.aligned, self.merged) if p.exists()]
        if self.checkpoints.is_dir() and any(self.checkpoints.iterdir()):
            out.append("checkpoints/")
        out += [p.name for p in (self.summary, self.eval_predictions) if p.exists()]
        if self.metrics.is_file() and self.metrics.stat().st_size:
            out.append(self.metrics.name)
        return out

    def create(self) -> None:
        """Make the directory (and its parents); a path that cannot be one is a UserError."""
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except FileExistsError:
            raise UserError(f"output_dir {str(self.path)!r} is a file", hint="choose a directory name") from None
        except OSError as e:
            raise UserError(
                f"cannot create output_dir {str(self.path)!r}: {e.strerror or e}",
                hint="choose a directory you can write to (output_dir=...)",
            ) from None
        if not os.access(self.path, os.W_OK):
            raise UserError(f"output_dir {str(self.path)!r} is not writable", hint="choose another output_dir")

    def start(self, overwrite: bool = False, resume: bool = False, inputs: Sequence[str | os.PathLike] = ()) -> str:
        """Claim the directory for a run; returns the run's id (the same id when resuming).

        The directory is locked for this process (``release`` or the process's end frees it): a second run into
        it is refused, naming the holder. A directory holding an earlier run's outputs is refused unless
        ``overwrite`` (which deletes those outputs, nothing else) or ``resume``; one that holds anything
        lora_llava did not write is refused outright (``check_free``). Each run gets a new id, recorded in
        ``run.json`` and in each of its checkpoints, so resuming never continues another run's checkpoint.
        """
        self.check_free(overwrite, resume, inputs)  # before anything is written: a foreign folder stays untouched
        self.create()
        hold_lock(self.path / LOCK_FILE, f"output_dir {str(self.path)!r}")
        if resume:
            self.check_free(resume=True, inputs=inputs)
            latest = self.latest_checkpoint()
            adopted = checkpoint_run_id(latest) if latest is not None else None
            return self.run_id() or self._new_id(adopted)
        self.check_free(overwrite, inputs=inputs)
        for p in self._outputs():
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
        return self._new_id()

    def release(self) -> None:
        """Free the directory's lock (``start``) for another process."""
        release_lock(self.path / LOCK_FILE)

    @contextlib.contextmanager
    def claimed(
        self,
        overwrite: bool = False,
        resume: bool = False,
        inputs: Sequence[str | os.PathLike] = (),
        run_id: str | None = None,
    ) -> Iterator[str]:
        """``start`` for the block, the lock released when it ends; yields the run's id. A caller that already
        claimed the directory passes its ``run_id``: then nothing is checked, taken or released here. With
        several processes (torchrun), the first one claims it and the others are told its run id, or that it
        refused (its error says why)."""
        if run_id is not None:
            yield run_id
            return
        w = world()
        claimed: str | None = None
        if w.main:
            try:
                claimed = self.start(overwrite, resume, inputs)
            finally:
                claimed = broadcast(claimed)  # None tells the others that it refused
        else:
            claimed = broadcast(None)
            if claimed is None:
                raise UserError("the first process did not start the run (its error says why)")
        try:
            yield claimed
        finally:
            if w.main:
                self.release()

    def check_free(
        self, overwrite: bool = False, resume: bool = False, inputs: Sequence[str | os.PathLike] = ()
    ) -> None:
        """A UserError, before anything is written, when the directory is not this run's to write in: it holds
        something lora_llava did not write (a directory that is not a run, with anything but the run's own
        ``inputs`` and lora_llava's leftovers; an output name taken by a user's folder; a link at an output
        name), or an earlier run's outputs and neither ``overwrite`` nor ``resume`` is asked. Cheap: a command
        calls it before loading anything."""
        holder = lock_holder(self.path / LOCK_FILE)
        if holder is not None:  # a run is writing into it right now: that, before anything it has written so far
            raise UserError(
                f"output_dir {str(self.path)!r} is in use by another lora_llava process (pid {holder})",
                hint="wait for it to finish, or choose another output_dir",
            )
        links = [p for p in self._names() if p.is_symlink()]
        if links:
            raise UserError(
                f"output_dir {str(self.path)!r} holds {_few([f'{p.name} -> {os.readlink(p)}' for p in links])}: "
                "lora_llava writes its outputs as plain files and folders, never through a link",
                hint="remove the link(s), or choose another output_dir",
            )
        foreign = self._foreign(inputs)
        if foreign:
            what = (
                "holds"
                if self.run_file.is_file() or self.checkpoints.is_dir()
                else "is not a lora_llava run directory and holds"
            )
            raise UserError(
                f"output_dir {str(self.path)!r} {what} {_few(foreign)}, which lora_llava did not write",
                hint="choose a new or empty output_dir (lora_llava replaces only what it wrote itself), or move "
                "those out of it",
            )
        found = [] if overwrite or resume else self.finished_outputs()
        if found:
            raise UserError(
                f"output_dir {str(self.path)!r} holds an earlier run ({', '.join(found)})",
                hint="choose another output_dir, add --overwrite to replace that run, or set train.resume=true to "
                "continue it",
            )

    def _names(self) -> list[Path]:
        """Every path a run writes directly in the directory (its outputs and its lock)."""
        return [
            self.recipe, self.metrics, self.rejected, self.adapter, self.checkpoints, self.aligned, self.merged,
            self.summary, self.bad_samples, self.data_report, self.pushed, self.eval_predictions, self.eval_dir,
            self.curves, self.third_party_log, self.run_file, self.assembled, self.path / LOCK_FILE,
        ]  # fmt: skip

    def _outputs(self) -> list[Path]:
        """What ``start`` clears for a new run: the outputs of an earlier run (its assembled backbone, its record
        of pushes and its run.json stay: the first is reused, the others are rewritten)."""
        keep = {self.assembled, self.pushed, self.run_file, self.path / LOCK_FILE}
        return [p for p in self._names() if p not in keep]

    def _foreign(self, inputs: Sequence[str | os.PathLike]) -> list[str]:
        """What makes the directory not this run's to write in: in a directory that is no run yet, anything but the
        run's ``inputs`` and what lora_llava writes before a run (an assembled backbone, the lock); in a run
        directory, an output name taken by a folder lora_llava did not write (other files of the user's are left
        alone there)."""
        if not self.path.is_dir():
            return []
        held = [Path(p).resolve() for p in inputs]
        # a run's: its run.json, or (that file lost) checkpoints lora_llava wrote
        is_run = self.run_file.is_file() or (
            self.checkpoints.is_dir() and bool(self.checkpoint_dirs()) and _written_by_us(self, self.checkpoints)
        )
        ours = {p.name for p in self._names()}
        out = []
        for entry in sorted(self.path.iterdir()):
            if entry.name.startswith(".") and entry.name[1:].split("-", 1)[0] in ours:
                continue  # a writer's temporary sibling (fsutil.atomic_dir): cleaned up by the next write
            resolved = entry.resolve()
            if any(h == resolved or resolved in h.parents for h in held):
                continue  # the run's own data (the quickstart's synthetic set lives in its output_dir)
            if not is_run:  # not a run: only what a run-less command of lora_llava leaves
                if entry.name not in (self.assembled.name, LOCK_FILE) or not _written_by_us(self, entry):
                    out.append(entry.name + ("/" if entry.is_dir() else ""))
            elif entry.name in ours and entry.is_dir() and not _written_by_us(self, entry):
                out.append(_foreign_inside(self, entry))  # a run's output name taken by a folder not (only) ours
        return out

    def run_id(self) -> str | None:
        return _read_run_id(self.path)

    def world_size(self) -> int:
        """How many processes trained this run (run.json; 1 when it does not say)."""
        try:
            return int(json.loads(self.run_file.read_text()).get("world_size") or 1)
        except (OSError, ValueError, TypeError, AttributeError):
            return 1

    def resume_command(self, ref: str | os.PathLike | None = None) -> str:
        """The command that continues this unfinished run from its latest checkpoint: its own saved recipe and
        as many processes as it was started with (``ref``: how the user named the directory)."""
        where = Path(ref) if ref is not None else self.path
        size = self.world_size()
        launcher = "lora-llava train" if size <= 1 else f"torchrun --nproc_per_node {size} -m lora_llava train"
        return (
            f"{launcher} {shlex.quote(str(where / RECIPE_FILE))} {shlex.quote(f'output_dir={where}')} train.resume=true"
        )

    def _new_id(self, run_id: str | None = None) -> str:
        import time
        import uuid

        from lora_llava.distributed import world
        from lora_llava.versions import stamp

        run_id = run_id or uuid.uuid4().hex[:12]
        started = time.strftime("%Y-%m-%dT%H:%M:%S")
        record = {"run_id": run_id, "started": started, "world_size": world().size, "versions": stamp()}
        self.run_file.write_text(json.dumps(record, indent=1))
        return run_id

    def checkpoint_dirs(self) -> list[Path]:
        """Every ``checkpoint-N`` folder, newest (most steps) first, complete or not."""
        found = [p for p in self.checkpoints.glob(f"{CHECKPOINT_PREFIX}*") if p.is_dir() and _step_or_none(p)]
        return sorted(found, key=checkpoint_step, reverse=True)

    def latest_checkpoint(self, hashes: bool = False, skipped: list[str] | None = None) -> Path | None:
        """The newest checkpoint whose files match its manifest (sizes; with ``hashes`` also SHA-256), or None.

        A damaged newer checkpoint is passed over; ``skipped`` (a list) receives one line per such one.
        """
        for path in self.checkpoint_dirs():
            problem = checkpoint_problem(path, hashes)
            if problem is None:
                return path
            if skipped is not None:
                skipped.append(f"{path.name}: {problem}")
        return None


def _written_by_us(run: RunDir, folder: Path) -> bool:
    """Whether a folder at one of a run's output names is lora_llava's: a model folder carries lora_llava.json,
    eval/ and checkpoints/ hold nothing but what a run writes there (``_stray``)."""
    if folder == run.path / LOCK_FILE:
        return folder.is_file()
    if folder in (run.adapter, run.aligned, run.merged, run.assembled):
        return (folder / META_FILE).is_file()
    if folder in (run.eval_dir, run.checkpoints):
        return not _stray(run, folder)
    return False


def _stray(run: RunDir, folder: Path) -> list[Path]:
    """What lies in a run's eval/ (step-N.jsonl files) or checkpoints/ (checkpoint folders and their staging)
    that a run does not write there."""
    if folder == run.eval_dir:
        ours = lambda p: p.is_file() and p.name.startswith("step-") and p.suffix == ".jsonl"  # noqa: E731
    else:
        ours = lambda p: p.is_dir() and p.name.startswith((CHECKPOINT_PREFIX, ".", "tmp-"))  # noqa: E731
    return [p for p in sorted(folder.iterdir()) if not ours(p)]


def _foreign_inside(run: RunDir, folder: Path) -> str:
    """A folder at one of a run's output names, named by what in it lora_llava did not write when the folder
    itself is one of its own (``eval/my_notes.txt``), else as a whole (``model/``)."""
    stray = _stray(run, folder) if folder in (run.eval_dir, run.checkpoints) else []
    return ", ".join(f"{folder.name}/{p.name}" for p in stray[:3]) or folder.name + "/"


def _few(names: list[str], n: int = 4) -> str:
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


def checkpoint_step(path: Path) -> int:
    return int(path.name[len(CHECKPOINT_PREFIX) :])


def _step_or_none(path: Path) -> int | None:
    tail = path.name[len(CHECKPOINT_PREFIX) :]
    return int(tail) if tail.isdigit() else None


def _sha256(path: Path, sync: bool = False) -> str:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
        if sync:
            os.fsync(f.fileno())
    return digest.hexdigest()


def fsync_dir(path: Path) -> None:
    """Make a rename or a new file in ``path`` durable (where the platform allows it)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_manifest(folder: Path, leave_out: tuple[str, ...] = ()) -> dict[str, Any]:
    """Flush every file of ``folder`` (but ``leave_out``) to disk and record its size and SHA-256 in
    ``manifest.json`` (written last, itself flushed): a checkpoint is complete exactly when its manifest
    verifies."""
    files: dict[str, Any] = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.name != MANIFEST_FILE and p.name not in leave_out:
            files[str(p.relative_to(folder))] = {"size": p.stat().st_size, "sha256": _sha256(p, sync=True)}
    manifest = {"files": files}
    tmp = folder / f".{MANIFEST_FILE}.tmp"
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(folder / MANIFEST_FILE)
    fsync_dir(folder)
    return manifest


# what only resuming reads (the Trainer's optimizer, scheduler, RNG and arguments): a checkpoint opened as a
# model hashes everything else, not these (gigabytes of optimizer state at real sizes)
RESUME_ONLY = ("optimizer.pt", "scheduler.pt", "rng_state*.pth", "training_args.bin", "scaler.pt")


def checkpoint_problem(path: Path, hashes: bool = False, as_model: bool = False) -> str | None:
    """Why ``path`` is not a complete checkpoint (None when it is): its manifest is missing or unreadable,
    or a file it lists is missing, of another size, or (``hashes``) of other content; ``as_model`` hashes the
    files a model is loaded from (all but ``RESUME_ONLY``). A checkpoint written before manifests existed
    (its metadata carries no version stamp) counts as complete when it holds its trainer state."""
    if not (path / MANIFEST_FILE).is_file():
        meta = read_meta(path)
        older = meta is None or not getattr(meta, "versions", None)
        return (
            None if older and (path / TRAINER_STATE_FILE).is_file() else f"incomplete or altered (no {MANIFEST_FILE})"
        )
    return manifest_problem(path, hashes=hashes, as_model=as_model)


def manifest_problem(path: Path, hashes: bool = True, as_model: bool = False) -> str | None:
    """Why the files of ``path`` do not match its ``manifest.json`` (None when they do): unreadable manifest,
    a listed file missing, of another size or (``hashes``; ``as_model``: all but ``RESUME_ONLY``) of other
    content, or a weights or config file the manifest does not list."""
    import fnmatch

    manifest = path / MANIFEST_FILE
    try:
        files = json.loads(manifest.read_text())["files"]
        if not isinstance(files, dict):
            raise TypeError("files is not a mapping")
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"{MANIFEST_FILE} unreadable ({e})"
    for name, entry in files.items():
        p = path / name
        if not p.is_file():
            return f"{name} is missing"
        if p.stat().st_size != entry.get("size"):
            return f"{name} has {p.stat().st_size} bytes, the manifest says {entry.get('size')}"
        resume_only = any(fnmatch.fnmatch(p.name, pattern) for pattern in RESUME_ONLY)
        if (hashes or (as_model and not resume_only)) and _sha256(p) != entry.get("sha256"):
            return f"{name} does not match its SHA-256 in {MANIFEST_FILE} (damaged)"
    extra = [p for p in sorted(path.iterdir()) if (p.is_file() or p.is_symlink()) and p.name not in files
             and p.suffix in (".safetensors", ".json", ".bin", ".pt", ".model", ".txt") and p.name != MANIFEST_FILE]  # fmt: skip
    if extra:
        shown = [f"{p.name} -> {os.readlink(p)} (a link)" if p.is_symlink() else p.name for p in extra[:3]]
        return f"{', '.join(shown)} not in its {MANIFEST_FILE} (added after it was written)"
    return None


def _read_run_id(folder: Path) -> str | None:
    """The run id recorded in ``folder/run.json`` (a run directory or a checkpoint), or None."""
    try:
        return json.loads((folder / RUN_FILE).read_text()).get("run_id")
    except (OSError, ValueError, AttributeError):
        return None


def checkpoint_run_id(checkpoint: Path) -> str | None:
    return _read_run_id(checkpoint)


def is_checkpoint_dir(path: Path) -> bool:
    """``RUN/checkpoints/checkpoint-N``: a training checkpoint (since checkpoints hold adapters, also one)."""
    return path.name.startswith(CHECKPOINT_PREFIX) and (path / TRAINER_STATE_FILE).is_file()


def drift_warning(meta: Meta | None, ref: str | Path) -> str | None:
    """A ``warning:`` line when ``meta`` was written with another major/minor transformers or peft than the
    installed one (weights may be named differently; the loaders check every key), else None."""
    from lora_llava.versions import LOADERS, drift, package_versions

    changes = drift(meta.versions, package_versions(LOADERS)) if meta is not None else []
    if not changes:
        return None
    return (
        f"warning: {ref} was saved with other versions ({', '.join(changes)}); weights are checked key by key as "
        "they load (lora-llava env shows the installed versions)"
    )


# --------------------------------------------------------------------------------------------- locks


_HELD: dict[str, Any] = {}  # lock files this process holds, by resolved path (an open file each)


def hold_lock(lock_file: Path, what: str) -> None:
    """Hold an exclusive lock on ``lock_file`` until ``release_lock`` (or the process ends): a second process asking
    for it gets a UserError naming ``what`` and the holder's pid. Reentrant within one process. A file of someone
    else's at that name (a link, a folder, anything but a pid) is refused and left as it is. Where the platform
    has no ``fcntl`` (Windows), nothing is locked."""
    key = str(lock_file.resolve())
    if key in _HELD:
        return
    if lock_file.is_symlink() or lock_file.is_dir() or (lock_file.is_file() and not _pid_only(lock_file)):
        raise UserError(
            f"{str(lock_file)!r} is not a lock file of lora_llava (the lock of {what}); it is left as it is",
            hint="move that file away, or choose another output",
        )
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        return
    while True:
        f = open(lock_file, "a+")  # noqa: SIM115 - held open until released
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "unknown"
            f.close()
            raise UserError(
                f"{what} is in use by another lora_llava process (pid {holder})",
                hint="wait for it to finish, or choose another output",
            ) from None
        try:  # the file may have been released and removed between our open and our lock: lock the one there now
            same = os.stat(lock_file).st_ino == os.fstat(f.fileno()).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        f.close()
    f.seek(0)
    f.truncate()
    f.write(str(os.getpid()))
    f.flush()
    _HELD[key] = f


def lock_holder(lock_file: Path) -> str | None:
    """The pid another process holds ``lock_file`` with (``hold_lock``), or None when nobody does (asked without
    taking it, and without creating the file)."""
    if str(lock_file.resolve()) in _HELD:
        return None  # this process's own
    try:
        import fcntl

        f = open(lock_file)  # noqa: SIM115
    except (ImportError, OSError):
        return None
    with f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return f.read().strip() or "unknown"
        except OSError:
            return None
        fcntl.flock(f.fileno(), fcntl.LOCK_UN)
    return None


def _pid_only(path: Path) -> bool:
    """A lock file as ``hold_lock`` leaves it: empty, or a process id."""
    held = path.read_bytes()[:64].strip()
    return held == b"" or held.isdigit()


def lock_beside(output: str | Path) -> Path:
    """The lock one writer holds on an output file or folder (a merge target, a predictions file):
    ``preds.jsonl`` -> ``.preds.jsonl.lock`` beside it."""
    path = Path(output)
    return path.with_name(f".{path.name}.lock")


def release_lock(lock_file: Path) -> None:
    """Free the lock and remove its file (a process that opened it meanwhile finds it gone and locks anew)."""
    f = _HELD.pop(str(lock_file.resolve()), None)
    if f is not None:
        with contextlib.suppress(OSError):
            lock_file.unlink()
        f.close()  # closing the file releases the lock
