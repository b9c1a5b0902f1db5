"""Reading, validating, overriding and writing recipes.

Usage::

    recipe = load_recipe("recipes/quickstart.yaml", ["train.max_steps=20", "data.train.0.path=x.json"])
    save_recipe(recipe, "runs/x/recipe.yaml")       # load_recipe() of that file gives an equal Recipe
    for key, type_text, default, help in describe_keys(): ...

Every problem in a recipe is collected and reported at once in a single :class:`UserError`.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import math
import os
import types
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from lora_llava.config.schema import FLOAT_MAX, INT_MAX, DataSource, Recipe
from lora_llava.config.yamlsafe import DuplicateKeyError, load_yaml, strict_load
from lora_llava.errors import UserError

_INVALID = object()  # marks a value that failed validation (a problem was recorded)


# ---------------------------------------------------------------------------------------------- loading


def load_recipe(source: str | os.PathLike | dict, overrides: Sequence[str] = ()) -> Recipe:
    """Usage: ``load_recipe("run.yaml", ["train.max_steps=20"])``; a YAML file or a dict -> validated Recipe.

    Overrides are ``dotted.key=value`` with list indices allowed (``data.train.0.path=x.json``);
    the value is parsed as YAML. Raises UserError listing every problem found.
    """
    if isinstance(source, dict):
        name = "<dict>"
        data = copy.deepcopy(source)
    else:
        name = os.fspath(source)
        data = _read_yaml(Path(name))
    given: dict[str, str] = {}
    for override in overrides:
        key = override.split("=", 1)[0].strip()
        if key in given and "=" in override:  # the later would silently win, as a repeated YAML key would
            raise UserError(f"override {key} given twice ({given[key]}, then {override})", hint="give each key once")
        given[key] = override
        apply_override(data, override)
    return convert_checked(Recipe, data, cross_check, f"recipe {name}", given=given)


def convert_checked(
    cls: type,
    data: Any,
    cross: Callable[[Any], list[str]],
    what: str,
    problems: list[str] | None = None,
    given: dict[str, str] | None = None,
) -> Any:
    """``data`` as a ``cls`` (``convert_dataclass``), then ``cross(value)``'s rules across keys; one UserError
    listing every problem (those already in ``problems`` first) under ``what`` ("recipe my.yaml"). ``given``:
    the command line's overrides by key, so a problem with one of them says it came from there."""
    problems = list(problems or [])
    value = convert_dataclass(cls, data, "", problems)
    if not problems:
        problems.extend(cross(value))
    if problems:
        count = f"{len(problems)} problem{'s' if len(problems) != 1 else ''}"
        lines = [f"  {p}{_from_command_line(p, given or {})}" for p in problems]
        raise UserError(f"{what}: {count}:\n" + "\n".join(lines))
    return value


def _from_command_line(problem: str, given: dict[str, str]) -> str:
    """`` (from the command line: KEY=VALUE)`` when the problem's key was overridden there (or lies inside it)."""
    key = problem.split(":", 1)[0].strip()
    for k, override in given.items():
        if key == k or key.startswith(k + "."):
            return f" (from the command line: {override})"
    return ""


def load_source(raw: dict, where: str) -> DataSource:
    """Usage: ``load_source({"path": "x.jsonl", "format": "messages"}, "eval --data")``: one data source,
    validated like a recipe's ``data.*`` entries (every problem at once, named under ``where``)."""
    problems: list[str] = []
    src = convert_dataclass(DataSource, raw, where, problems)
    if problems:
        raise UserError(f"{where}: {len(problems)} problem(s):\n" + "\n".join(f"  {p}" for p in problems))
    return src


def cross_check(recipe: Recipe) -> list[str]:
    """Rules that involve several keys; each problem names the keys."""
    out = []
    t = recipe.train
    if t.global_batch_size is not None and t.global_batch_size % t.batch_size:
        out.append(
            f"train.global_batch_size: {t.global_batch_size} is not a multiple of train.batch_size ({t.batch_size}): "
            "the global batch is train.batch_size x accumulation x processes"
        )
    if recipe.backbone == "assemble" and recipe.assemble is None:
        out.append("assemble: required when backbone is `assemble` (vision_encoder, language_model, ...)")
    if recipe.assemble is not None and recipe.backbone != "assemble":
        out.append(f"assemble: only used with backbone: assemble (backbone is {recipe.backbone!r})")
    if recipe.stage == "align":
        if recipe.language_model.policy == "lora":
            out.append("language_model.policy: stage align trains only the projector; use frozen (or stage: instruct)")
        if recipe.projector.policy != "full":
            out.append("projector.policy: stage align trains the projector; it must be full")
        if recipe.vision_tower.policy != "frozen":
            out.append("vision_tower.policy: stage align keeps the vision tower frozen")
    if recipe.train.max_steps is None and recipe.train.epochs <= 0:
        out.append("train.epochs: 0 would train nothing (and write an untrained adapter); give epochs > 0 or max_steps")
    if recipe.projector.policy == "frozen" and recipe.vision_tower.policy == "frozen" and recipe.lm_policy == "frozen":
        out.append(
            "projector.policy, vision_tower.policy, language_model.policy: every part is frozen; nothing would train"
        )
    if recipe.train.eval_steps and not recipe.data.eval and not recipe.data.eval_split:
        out.append("train.eval_steps: there is no eval data to evaluate on; add data.eval or data.eval_split")
    if recipe.train.keep_checkpoints and not recipe.train.save_steps:
        out.append("train.keep_checkpoints: no checkpoints are written without train.save_steps; set it too")
    if recipe.chat.format == "plain" and recipe.stage != "align":
        out.append(
            "chat.format: plain is LLaVA-1.5's stage-1 (stage: align) format; instruction tuning needs a "
            "conversation format (leave chat.format unset for the backbone's own)"
        )
    return out + _data_problems(recipe)


def _data_problems(recipe: Recipe) -> list[str]:
    """Data keys whose valid range one type and bound cannot say."""
    out = []
    split = recipe.data.eval_split
    if isinstance(split, float) and not 0.0 < split < 1.0:
        out.append(f"data.eval_split: a fraction must be between 0 and 1 (exclusive), got {split}; or give a count")
    if isinstance(split, int) and split < 1:
        out.append(f"data.eval_split: a number of samples must be >= 1, got {split}")
    for name in ("train", "eval"):
        for i, src in enumerate(getattr(recipe.data, name)):
            if src.fraction == 0.0:
                out.append(f"data.{name}.{i}.fraction: 0 would use no sample; remove the source or raise it")
    return out


def _read_yaml(path: Path) -> dict:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"recipe {path}: file not found") from None
    except IsADirectoryError:
        raise UserError(f"recipe {path}: is a directory, expected a YAML file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"recipe {path}: cannot read: {e}") from None
    data = load_yaml(text, f"recipe {path}")  # a syntax error, or a key given twice in one mapping
    if data is None:
        raise UserError(f"recipe {path}: file is empty; expected a mapping of keys such as 'backbone:'")
    if not isinstance(data, dict):
        raise UserError(f"recipe {path}: top level must be a mapping of keys, got {_show(data)}")
    return data


# -------------------------------------------------------------------------------------------- overrides


def apply_override(data: dict, override: str) -> None:
    """Set ``dotted.key=value`` in ``data``, creating missing mappings and appending at index == len."""

    def fail(reason: str) -> typing.NoReturn:
        raise UserError(f"override {override!r}: {reason}", hint="overrides look like train.max_steps=20")

    key, sep, raw = override.partition("=")
    key = key.strip()
    if not sep:
        fail("missing '='")
    if not key:
        fail("empty key")
    parts = key.split(".")
    if any(not p for p in parts):
        fail("empty key segment")
    try:
        value = strict_load(raw)
    except DuplicateKeyError as e:
        fail(f"in the value, {e.describe()}")
    except yaml.YAMLError as e:
        fail(f"value is not valid YAML: {getattr(e, 'problem', None) or e}")

    node: Any = data  # always a dict or a list: missing or null containers are created on the way
    for i, part in enumerate(parts):
        here = ".".join(parts[:i]) or "<top level>"
        last = i == len(parts) - 1
        slot: str | int = part
        if isinstance(node, list):
            if not part.isdigit():
                fail(f"{here} is a list; expected an index, got {part!r}")
            slot = int(part)
            if slot > len(node):
                n = len(node)
                fail(f"index {slot} out of range for {here} ({n} item{'s' if n != 1 else ''}); use {n} to append")
            if slot == len(node):
                node.append(None)
        elif part.isdigit():
            fail(f"{here} is a mapping, not a list; cannot index it with {part}")
        if last:
            node[slot] = value
            return
        child = node[slot] if isinstance(node, list) and isinstance(slot, int) else node.get(slot)
        if child is None:
            child = node[slot] = [] if parts[i + 1].isdigit() else {}
        elif not isinstance(child, (dict, list)):
            fail(f"{'.'.join(parts[: i + 1])} is {_show(child)}, cannot set keys inside it")
        node = child


# ------------------------------------------------------------------------------------------- validation


def _default(f: dataclasses.Field) -> Any:
    """A field's default value, a fresh one for factories."""
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    # A class given as a plain default (schema.option does that for `list` and sections) means "build one".
    return f.default() if isinstance(f.default, type) else f.default


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def convert_dataclass(cls: type, value: Any, path: str, problems: list[str]) -> Any:
    """``value`` (a mapping from YAML) as an instance of the dataclass ``cls``; every problem (unknown key with
    the nearest name, wrong type, bound, missing required key) is appended to ``problems`` with its dotted
    path under ``path``, and the result is then not to be used."""
    if not isinstance(value, dict):
        problems.append(f"{path or '<top level>'}: expected a mapping of keys, got {_show(value)}")
        return _INVALID
    fields = {f.name: f for f in dataclasses.fields(cls)}
    start = len(problems)
    for key in value:
        if key not in fields:
            text = str(key)
            close = difflib.get_close_matches(text, list(fields), n=1)
            tip = f"did you mean {close[0]!r}?" if close else f"valid keys: {', '.join(fields)}"
            problems.append(f"{_join(path, text)}: unknown key; {tip}")
    kwargs: dict[str, Any] = {}
    for name, f in fields.items():
        sub = _join(path, name)
        if name not in value:
            if f.metadata.get("required"):
                problems.append(f"{sub}: required key missing")
            else:
                kwargs[name] = _default(f)
            continue
        kwargs[name] = _convert(_hints(cls)[name], value[name], sub, f.metadata, problems)
    return cls(**kwargs) if len(problems) == start else _INVALID


def _convert(tp: Any, value: Any, path: str, meta: typing.Mapping[str, Any], problems: list[str]) -> Any:
    """Check ``value`` against type ``tp`` (and bounds in ``meta``); return it converted, or _INVALID."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:
            return _convert(options[0], value, path, meta, problems)
        for option in options:  # several non-null types: the first that accepts the value wins
            scratch: list[str] = []
            out = _convert(option, value, path, meta, scratch)
            if not scratch:
                return out
        problems.append(f"{path}: expected {_type_text(tp)}, got {_show(value)}")
        return _INVALID
    if origin is Literal:
        if any(value == a and type(value) is type(a) for a in args):
            return value
        msg = f"{path}: must be one of {', '.join(map(str, args))}, got {_show(value, with_type=False)}"
        close = difflib.get_close_matches(str(value), [str(a) for a in args], n=1) if value is not None else []
        problems.append(msg + (f"; did you mean {close[0]!r}?" if close else ""))
        return _INVALID
    if origin is list:
        if not isinstance(value, list):
            problems.append(f"{path}: expected a list, got {_show(value)}")
            return _INVALID
        start = len(problems)
        items = [_convert(args[0], item, f"{path}.{i}", {}, problems) for i, item in enumerate(value)]
        need = meta.get("min_items")
        if need is not None and len(value) < need:
            problems.append(f"{path}: needs at least {need} item{'s' if need != 1 else ''}")
        return items if len(problems) == start else _INVALID
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return convert_dataclass(tp, value, path, problems)
    out = _convert_scalar(tp, value)
    if out is _INVALID:
        expected = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(tp, tp)
        problems.append(f"{path}: expected {expected}, got {_show(value)}")
        return _INVALID
    if isinstance(out, (int, float)) and not isinstance(out, bool):
        if isinstance(out, float) and not math.isfinite(out):
            problems.append(f"{path}: must be a finite number, got {out}")
            return _INVALID
        cap = meta.get("max", INT_MAX if isinstance(out, int) else FLOAT_MAX)  # every number is bounded
        if "min" in meta and out < meta["min"]:
            problems.append(f"{path}: must be >= {meta['min']}, got {out}")
            return _INVALID
        if out > cap:
            problems.append(f"{path}: must be <= {cap}, got {out}")
            return _INVALID
    return out


def _convert_scalar(tp: type, value: Any) -> Any:
    if tp is bool:
        return value if isinstance(value, bool) else _INVALID
    if tp is int:
        return value if isinstance(value, int) and not isinstance(value, bool) else _INVALID
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out = float(value)
        elif isinstance(value, str):  # YAML 1.1 reads `2e-4` (no dot) as a string
            try:
                out = float(value.strip())
            except ValueError:
                return _INVALID
        else:
            return _INVALID
        return out  # NaN and infinities are refused by _convert: "must be a finite number"
    if tp is str:
        if isinstance(value, os.PathLike):
            return os.fspath(value)
        return value if isinstance(value, str) else _INVALID
    raise TypeError(f"recipe schema uses unsupported type {tp!r}")


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _show(value: Any, with_type: bool = True) -> str:
    if value is None:
        return "null"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{text} ({type(value).__name__})" if with_type else text


# ---------------------------------------------------------------------------------------------- writing


def recipe_to_dict(recipe: Recipe) -> dict[str, Any]:
    """Usage: ``recipe_to_dict(recipe)``; a plain nested dict (lists and scalars only) of the recipe."""
    return dataclasses.asdict(recipe)


def save_recipe(recipe: Recipe, path: str | os.PathLike) -> Path:
    """Usage: ``save_recipe(recipe, "runs/x/recipe.yaml")``; writes YAML that loads back to an equal Recipe."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False, allow_unicode=True), encoding="utf-8")
    return out


# ------------------------------------------------------------------------------------------ description


def describe_keys() -> list[tuple[str, str, str, str]]:
    """Usage: ``for key, type_text, default, help in describe_keys(): ...``; one row per recipe key.

    Sections are listed before their keys; items of lists of sections appear as ``data.train.N.path``.
    """
    rows: list[tuple[str, str, str, str]] = []
    _describe(Recipe, "", rows)
    return rows


def _describe(cls: type, prefix: str, rows: list[tuple[str, str, str, str]]) -> None:
    for f in dataclasses.fields(cls):
        key, tp, meta = _join(prefix, f.name), _hints(cls)[f.name], f.metadata
        if meta.get("required"):
            default = "required"
        else:
            default = "" if dataclasses.is_dataclass(tp) else _yaml_text(_default(f))
        help_text = meta.get("help", "")
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            rows.append((key, "section", default, help_text))
            _describe(tp, key, rows)
        elif typing.get_origin(tp) is list and dataclasses.is_dataclass(typing.get_args(tp)[0]):
            rows.append((key, _type_text(tp, meta), default, help_text))
            _describe(typing.get_args(tp)[0], f"{key}.N", rows)
        else:
            rows.append((key, _type_text(tp, meta), default, help_text))


def _type_text(tp: Any, meta: typing.Mapping[str, Any] | None = None) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        text = " | ".join("null" if a is type(None) else _type_text(a) for a in args)
    elif origin is Literal:
        text = " | ".join(map(str, args))
    elif origin is list:
        text = "list of sections" if dataclasses.is_dataclass(args[0]) else f"list[{_type_text(args[0])}]"
    elif dataclasses.is_dataclass(tp):
        text = "section"
    else:
        text = getattr(tp, "__name__", str(tp))
    meta = meta or {}
    lo, hi = meta.get("min"), meta.get("max")
    if lo is not None and hi is not None:
        text += f", {lo}..{hi}"
    elif lo is not None:
        text += f", >= {lo}"
    elif hi is not None:
        text += f", <= {hi}"
    if meta.get("min_items"):
        text += f", at least {meta['min_items']} item{'s' if meta['min_items'] != 1 else ''}"
    return text


def _yaml_text(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ", ".join(_yaml_text(v) for v in value) + "]"
    return str(value)


def input_paths(recipe: Recipe) -> list[str]:
    """The files and folders a recipe reads its data from (sources and image folders): a run leaves them alone,
    also where they lie inside its output_dir."""
    sources = [*recipe.data.train, *recipe.data.eval]
    return [p for s in sources for p in (s.path, s.image_folder) if p]
