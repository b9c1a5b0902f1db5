"""The floors of lora_llava hold (setup.cfg's import contracts), cover every module, and no modules import each
other in a circle."""

from __future__ import annotations

import configparser
import subprocess
import sys
from pathlib import Path

import grimp

ROOT = Path(__file__).resolve().parents[1]


def _floors() -> list[list[str]]:
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    rows = config["importlinter:contract:floors"]["layers"].strip().splitlines()
    return [[name.strip() for name in row.replace(":", "|").split("|")] for row in rows]


def test_each_floor_imports_only_the_floors_below_it():
    script = Path(sys.executable).parent / "lint-imports"  # import-linter, a test dependency
    proc = subprocess.run(
        [str(script), "--config", str(ROOT / "setup.cfg"), "--no-cache"], capture_output=True, text=True, cwd=ROOT,
        timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "Contracts: 1 kept, 0 broken." in proc.stdout


def test_every_module_stands_on_a_floor():
    named = {name for row in _floors() for name in row}
    package = ROOT / "lora_llava"
    children = {f"lora_llava.{p.stem}" for p in package.glob("*.py") if p.stem != "__init__"}
    children |= {f"lora_llava.{p.name}" for p in package.iterdir() if (p / "__init__.py").is_file()}
    assert children - named == set(), "add these modules to a floor in setup.cfg"
    assert named - children == set(), "these floors name modules that do not exist"


def test_no_modules_import_each_other_in_a_circle():
    graph = grimp.build_graph("lora_llava", exclude_type_checking_imports=True)
    modules = sorted(graph.modules)
    edges = {m: graph.find_modules_directly_imported_by(m) for m in modules}
    state: dict[str, int] = {}  # 1 on the path, 2 done
    circles: list[list[str]] = []

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for n in sorted(edges[m]):
            if state.get(n) == 1:
                circles.append(path[path.index(n) :] + [n] if n in path else [m, n])
            elif n not in state:
                visit(n, [*path, n])
        state[m] = 2

    for m in modules:
        if m not in state:
            visit(m, [m])
    # a package's __init__ that re-exports its own submodules is not a circle of two rooms
    real = [
        c for c in circles if not any(a == b.rsplit(".", 1)[0] or b == a.rsplit(".", 1)[0] for a, b in zip(c, c[1:]))
    ]
    assert real == [], real


def _layout_file_names() -> set[str]:
    import re

    text = (ROOT / "lora_llava" / "layout.py").read_text()
    names = set(re.findall(r'^[A-Z_]+_FILE = "([^"]+)"', text, re.M))
    names |= {n for n in re.findall(r'self\.path / "([^"]+)"', text) if "." in n}  # files of a run directory
    return names


# a dataset's own file names that happen to equal a layout name (the synthetic task writes train.json/eval.json)
NOT_LAYOUT = {("lora_llava/data/synthetic.py", "eval.json")}


def test_no_module_but_the_layout_spells_a_layout_file_name():
    import ast

    names = _layout_file_names()
    assert {"lora_llava.json", "recipe.yaml", "adapter_model.safetensors", "metrics.jsonl", "manifest.json"} <= names
    spelled = []
    for path in sorted((ROOT / "lora_llava").rglob("*.py")):
        rel = str(path.relative_to(ROOT))
        if rel == "lora_llava/layout.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and node.value in names and (rel, node.value) not in NOT_LAYOUT:
                spelled.append(f"{rel}:{node.lineno}: {node.value!r}")
    assert spelled == [], "use the names of lora_llava.layout instead:\n" + "\n".join(spelled)
