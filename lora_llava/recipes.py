"""Built-in recipes: find, list, show and copy the YAML files shipped with lora_llava.

Usage::

    path = recipe_path("quickstart")          # or "llava-1.5-7b/qlora", or any YAML path
    for name, first_line in list_recipes(): ...
"""

from __future__ import annotations

from pathlib import Path

from lora_llava.errors import UserError


def recipes_root() -> Path:
    here = Path(__file__).resolve().parent
    for cand in (here / "_recipes", here.parent / "recipes"):
        if cand.is_dir():
            return cand
    raise UserError("the built-in recipes folder is missing from this installation", hint="reinstall lora_llava")


def list_recipes() -> list[tuple[str, str]]:
    """(name, description) of every built-in recipe; the description is its first comment line."""
    root = recipes_root()
    out = []
    for p in sorted(root.rglob("*.yaml")):
        name = p.relative_to(root).with_suffix("").as_posix()
        first = next((ln[1:].strip() for ln in p.read_text().splitlines() if ln.startswith("#")), "")
        out.append((name, first))
    return out


def recipe_path(ref: str) -> Path:
    """A YAML path as given, or the built-in recipe of that name."""
    p = Path(ref)
    if p.suffix in (".yaml", ".yml") or p.exists():
        if not p.is_file():
            raise UserError(f"recipe file {ref!r} not found", hint="list the built-in recipes with: lora-llava recipes")
        return p
    cand = recipes_root() / f"{ref}.yaml"
    if cand.is_file():
        return cand
    import difflib

    names = [n for n, _ in list_recipes()]
    close = difflib.get_close_matches(ref, names, n=1)
    raise UserError(
        f"no recipe {ref!r}: not a file and not a built-in recipe",
        hint=(f"did you mean {close[0]!r}? " if close else "") + "list them with: lora-llava recipes",
    )
