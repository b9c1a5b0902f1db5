"""Helpers shared by the verbs: recipe arguments and printing."""

from __future__ import annotations

import argparse
import shlex
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

from lora_llava.config import Recipe, load_recipe
from lora_llava.recipes import recipe_path

if TYPE_CHECKING:
    from lora_llava.errors import TrainingStopped


def add_recipe_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", metavar="RECIPE", help="a recipe YAML file or a built-in recipe name (lora-llava recipes)")
    p.add_argument(
        "overrides",
        metavar="key=value",
        nargs="*",
        help="override recipe keys, dotted, with list indices: train.max_steps=20 data.train.0.path=x.json",
    )


def recipe_from_args(args: argparse.Namespace) -> Recipe:
    recipe = load_recipe(recipe_path(args.recipe), args.overrides)
    ensure_synthetic_data(recipe)
    cpu_threads_for(recipe.backbone)
    return recipe


# the run a verb is training, so an interrupt can say where it stopped and how to continue
TRAINING: dict[str, str] = {}


def training(recipe: Recipe, command: str) -> None:
    """Record the run being trained (``command``: how it was started, to print the resume command)."""
    TRAINING.update(run_dir=recipe.output_dir, command=command)


def interrupted_message() -> str:
    """What an interrupt stopped, with the latest checkpoint and the command that resumes it."""
    from lora_llava.layout import RunDir

    if not TRAINING:
        return "interrupted"
    run = RunDir(TRAINING["run_dir"])
    latest = run.latest_checkpoint()
    if latest is None:
        return (
            f"interrupted: no checkpoint of {run.path} was written (train.save_steps makes a run resumable); "
            "nothing was saved"
        )
    return (
        f"interrupted: the latest checkpoint is {latest}\n"
        f"resume with: {TRAINING['command']} {shlex.quote(f'output_dir={run.path}')} train.resume=true"
    )


def stopped_message(e: TrainingStopped) -> str:
    """A run stopped by SIGTERM/SIGINT after saving a checkpoint: where, and the command that resumes it."""
    lines = [f"{e}"]
    command = TRAINING.get("command") or "lora-llava train RECIPE"
    if e.checkpoint is not None:
        lines.append(f"resume with: {command} {shlex.quote(f'output_dir={e.run_dir}')} train.resume=true")
    return "\n".join(lines)


def cpu_threads_for(backbone: str | None) -> None:
    """One torch thread on a CPU for the built-in tiny backbones: their 64-wide matmuls gain nothing from
    threads, and spinning OpenMP threads slow them down many times over when the CPUs are shared.
    A process-wide setting, so it is made here, by the command, never by the library; made once torch is
    imported, so a command that never needs torch (``check``) does not import it for this."""
    from lora_llava.backbones.registry import registered_backbones
    from lora_llava.thirdparty import when_imported

    if backbone in {s.name for s in registered_backbones() if s.builtin}:
        when_imported("torch", _one_thread_on_cpu)


def _one_thread_on_cpu(torch: ModuleType) -> None:
    if not torch.cuda.is_available():
        torch.set_num_threads(1)


SYNTHETIC_FOLDER = Path("runs/quickstart/data")


def ensure_synthetic_data(recipe: Recipe) -> None:
    """Write the offline shapes dataset when the recipe reads from its folder and a file is missing there."""
    from lora_llava.data.synthetic import write_shapes_dataset

    wanted = [Path(s.path) for s in [*recipe.data.train, *recipe.data.eval]]
    if any(p.parent == SYNTHETIC_FOLDER and not p.exists() for p in wanted):
        write_shapes_dataset(SYNTHETIC_FOLDER)
        print(f"wrote the synthetic shapes dataset to {SYNTHETIC_FOLDER}")


def list_show_or_copy(
    action: str,
    name: str | None,
    dest: str | None,
    listing: Callable[[], list[tuple[str, str]]],
    path_of: Callable[[str], Path],
    default_dest: str,
    what: str,
    noun: str,
) -> int:
    """``list`` the built-in YAML files (name, description), ``show`` one, or ``copy`` one to ``dest``
    (default ``default_dest``; an existing file is never replaced). ``what``: the command ("recipes",
    "data configs"), ``noun``: what one is called ("recipe", "config")."""
    from lora_llava.errors import UserError

    if action == "list":
        entries = listing()
        width = max((len(n) for n, _ in entries), default=0) + 2
        for entry, desc in entries:
            print(f"{entry:<{width}}{desc}")
        return 0
    if not name:
        raise UserError(f"{what} {action} needs a {noun} name", hint=f"lora-llava {what} lists them")
    src = path_of(name)
    if action == "show":
        print(src.read_text(), end="")
        return 0
    from lora_llava.recipes import copy_new

    target = Path(dest or default_dest)
    copy_new(src, target)  # never over a file, never through a link
    print(f"copied {name} to {target}")
    return 0


def synthetic_eval_warning(recipe: Recipe) -> str | None:
    """One line when the eval data is the built-in synthetic shapes set while the training data is not:
    the quickstart (and a run's eval during training) would score the wrong task. A warning, not a refusal: training
    on shapes written elsewhere (lora-llava data generate) and scoring on the built-in set is a fair run."""
    synthetic = SYNTHETIC_FOLDER.resolve()

    def is_synthetic(path: str) -> bool:
        return Path(path).resolve().parent == synthetic

    if any(is_synthetic(s.path) for s in recipe.data.train):
        return None
    shapes = [f"data.eval.{i} ({s.path})" for i, s in enumerate(recipe.data.eval) if is_synthetic(s.path)]
    if not shapes:
        return None
    train = ", ".join(f"data.train.{i} ({s.path})" for i, s in enumerate(recipe.data.train))
    return (
        f"warning: the training data is yours ({train}) but the eval data is still the synthetic shapes set "
        f"({', '.join(shapes)}): the accuracies would score shapes, not your task; override data.eval too "
        "(data.eval.0.path=FILE data.eval.0.image_folder=DIR), or carve eval from your training data "
        "(data.eval=[] data.eval_split=0.1)"
    )
