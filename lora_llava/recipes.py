"""Built-in recipes: find, list, show and copy the YAML files shipped with lora_llava.

Usage::

    path = recipe_path("quickstart")          # or "llava-1.5-7b/qlora", or any YAML path
    for name, first_line in list_recipes(): ...
    copy_new(path, Path("my-run.yaml"))       # a new file: never over an existing one, never through a link
"""

from __future__ import annotations

import os
from pathlib import Path

from lora_llava.errors import UserError


def recipes_root() -> Path:
    here = Path(__file__).resolve().parent
    for cand in (here / "_recipes", here.parent / "recipes"):
        if cand.is_dir():
            return cand
    raise UserError("the built-in recipes folder is missing from this installation", hint="reinstall lora_llava")


DATAGEN_FOLDER = "datagen"  # recipes/datagen/: example configs of lora-llava data generate, not training recipes
ACCELERATE_FOLDER = "accelerate"  # recipes/accelerate/: configs of accelerate launch (several GPUs), not recipes
NOT_RECIPES = (DATAGEN_FOLDER, ACCELERATE_FOLDER)


def first_comment(path: Path) -> str:
    """The first comment line of a YAML file: a built-in file's description."""
    return next((ln[1:].strip() for ln in path.read_text().splitlines() if ln.startswith("#")), "")


def builtin_yaml(ref: str, candidate: Path | None, names: list[str], missing: str, unknown: str, command: str) -> Path:
    """``ref`` as a YAML path when it is one (or exists), else the built-in ``candidate``; otherwise one error:
    ``missing`` for a YAML path that is not a file, ``unknown`` (with the nearest of ``names``) for a name."""
    import difflib

    p = Path(ref)
    if p.suffix in (".yaml", ".yml") or p.exists():
        if not p.is_file():
            raise UserError(missing, hint=f"list the built-in ones with: {command}")
        return p
    if candidate is not None and candidate.is_file():
        return candidate
    close = difflib.get_close_matches(ref, names, n=1)
    raise UserError(unknown, hint=(f"did you mean {close[0]!r}? " if close else "") + f"list them with: {command}")


def list_recipes() -> list[tuple[str, str]]:
    """(name, description) of every built-in training recipe; the description is its first comment line."""
    root = recipes_root()
    return [
        (p.relative_to(root).with_suffix("").as_posix(), first_comment(p))
        for p in sorted(root.rglob("*.yaml"))
        if p.relative_to(root).parts[0] not in NOT_RECIPES
    ]


def recipe_path(ref: str) -> Path:
    """A YAML path as given, or the built-in recipe of that name."""
    if Path(ref).parts and Path(ref).parts[0] == DATAGEN_FOLDER:
        raise UserError(
            f"{ref!r} is an example config of lora-llava data generate, not a training recipe",
            hint=f"lora-llava data generate {Path(ref).name}",
        )
    if Path(ref).parts and Path(ref).parts[0] == ACCELERATE_FOLDER:
        raise UserError(
            f"{ref!r} is a config of accelerate launch, not a training recipe",
            hint=f"accelerate launch --config_file {recipes_root() / ref}.yaml -m lora_llava train RECIPE",
        )
    return builtin_yaml(
        ref,
        recipes_root() / f"{ref}.yaml",
        [n for n, _ in list_recipes()],
        missing=f"recipe file {ref!r} not found",
        unknown=f"no recipe {ref!r}: not a file and not a built-in recipe",
        command="lora-llava recipes",
    )


def copy_new(src: Path, dest: Path) -> None:
    """Write ``src``'s bytes to ``dest`` as a new file (its folders made). A ``dest`` that is a symbolic link,
    dangling or not, is refused in one line naming it, and an existing one is refused: nothing is written
    there, nor where a link points (the file is created with O_EXCL, which fails on any existing name,
    a link included, so a link made after the checks is never followed either)."""
    if dest.is_symlink():
        raise _link_refused(dest)
    if dest.exists():
        raise UserError(f"{str(dest)!r} exists; not overwriting it", hint="give another destination")
    data = src.read_bytes()
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_BINARY", 0)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        why = f"{str(dest.parent)!r} is not a folder" if isinstance(e, FileExistsError) else e.strerror or e
        raise UserError(f"cannot write {str(dest)!r}: {why}", hint="give another destination") from None
    try:
        fd = os.open(dest, flags, 0o666)
    except FileExistsError:  # made since the checks above
        if dest.is_symlink():
            raise _link_refused(dest) from None
        raise UserError(f"{str(dest)!r} exists; not overwriting it", hint="give another destination") from None
    except OSError as e:
        raise UserError(f"cannot write {str(dest)!r}: {e.strerror or e}", hint="give another destination") from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
    except OSError as e:  # a full disk: no half-written recipe left behind
        dest.unlink(missing_ok=True)
        raise UserError(f"cannot write {str(dest)!r}: {e.strerror or e}", hint="give another destination") from None


def _link_refused(dest: Path) -> UserError:
    try:
        target = f" (to {os.readlink(dest)!r})"
    except OSError:
        target = ""
    return UserError(f"{str(dest)!r} is a symbolic link{target}; not writing through it: give another destination")


def check_builtin_recipes() -> dict[str, str]:
    """Validate every built-in recipe without downloading weights; returns {name: how its backbone resolves}.

    A backbone must be a registered name or Hub id, ``assemble`` with known parts (built-in parts or
    Hub ids), or the ``output_dir`` of a built-in stage-1 (align) recipe. Every registered backbone
    must have its recipe. Raises UserError listing every problem.
    """
    from lora_llava.artifacts import resolve_backbone
    from lora_llava.backbones.assemble import PARTS
    from lora_llava.backbones.registry import registered_backbones
    from lora_llava.config import load_recipe

    recipes = {name: load_recipe(recipe_path(name)) for name, _ in list_recipes()}
    stage1 = {r.output_dir: n for n, r in recipes.items() if r.stage == "align"}
    out, problems = {}, []
    for name, r in recipes.items():
        if r.backbone == "assemble" and r.assemble is not None:
            bad = [p for p in (r.assemble.vision_encoder, r.assemble.language_model) if p not in PARTS and "/" not in p]
            if bad:
                problems.append(f"{name}: assemble parts {bad} are neither built-in parts nor Hub ids")
            out[name] = f"assemble {r.assemble.vision_encoder} + {r.assemble.language_model}"
        elif r.backbone in stage1:
            out[name] = f"stage-1 output of {stage1[r.backbone]}"
        else:
            try:
                out[name] = resolve_backbone(r.backbone).name
            except UserError as e:
                problems.append(f"{name}: {e}")
    for spec in registered_backbones():
        if spec.recipe not in recipes:
            problems.append(f"backbone {spec.name} has no built-in recipe ({spec.recipe!r})")
    if problems:
        raise UserError("built-in recipes:\n  " + "\n  ".join(problems))
    return out
