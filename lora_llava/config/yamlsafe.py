"""Reading YAML strictly: safe tags only, and a mapping that repeats a key is an error.

Usage::

    data = load_yaml(text, "recipe my.yaml")   # UserError: "recipe my.yaml: key 'train' appears twice (...)"
    value = strict_load(text)                  # raises DuplicateKeyError (a yaml.YAMLError) or yaml.YAMLError

``yaml.safe_load`` keeps the last of two equal keys and silently drops the first, so a recipe copied with a
second ``train:`` block would lose the first one. Merge keys (``<<: *base``) are not duplicates of the keys
they bring in: explicit keys override merged ones, as YAML specifies.
"""

from __future__ import annotations

from typing import Any

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from lora_llava.errors import UserError

_MERGE_TAG = "tag:yaml.org,2002:merge"
_VALUE_TAG = "tag:yaml.org,2002:value"
_MERGE = object()


class DuplicateKeyError(yaml.MarkedYAMLError):
    """A mapping gives one key twice: ``key`` as written at ``first`` and again at ``second`` (yaml Marks)."""

    def __init__(self, key: str, other: str, first: yaml.Mark, second: yaml.Mark, merge: bool = False) -> None:
        super().__init__(
            context="while constructing a mapping", context_mark=first, problem="duplicate key", problem_mark=second
        )
        self.key = key
        self.other = other  # the second spelling when it differs (yes / true), else equal to key
        self.first = first
        self.second = second
        self.merge = merge  # two merge keys (<<)

    def describe(self) -> str:
        """``key 'train' appears twice (lines 3 and 12); keep one``."""
        a, b = self.first, self.second
        where = f"lines {a.line + 1} and {b.line + 1}"
        if a.line == b.line:
            where = f"line {a.line + 1}, columns {a.column + 1} and {b.column + 1}"
        if self.merge:
            return f"merge key '<<' appears twice ({where}); merge a list instead: <<: [*a, *b]"
        if self.other != self.key:
            return f"keys {self.key!r} and {self.other!r} are the same key ({where}); keep one"
        return f"key {self.key!r} appears twice ({where}); keep one"

    def __str__(self) -> str:
        return self.describe()


class StrictLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` (no arbitrary objects) that raises DuplicateKeyError for a mapping repeating a key.

    Every mapping of the document is checked as written, before construction: PyYAML's merge-key handling
    rewrites mapping nodes in place (merged pairs put in front of explicit ones), which must not read as a
    duplicate.
    """

    def construct_document(self, node: Node) -> Any:
        _check_expansion(node)
        self._check_keys(node)
        return super().construct_document(node)

    def _check_keys(self, root: Node) -> None:
        seen_nodes: set[int] = set()  # aliases share nodes; recursive documents would loop
        stack = [root]
        while stack:
            node = stack.pop()
            if id(node) in seen_nodes:
                continue
            seen_nodes.add(id(node))
            if isinstance(node, SequenceNode):
                stack.extend(reversed(node.value))
            elif isinstance(node, MappingNode):
                self._check_mapping(node)
                for key_node, value_node in reversed(node.value):
                    stack.extend((value_node, key_node))

    def _check_mapping(self, node: MappingNode) -> None:
        first: dict[Any, ScalarNode] = {}
        for key_node, _ in node.value:
            if not isinstance(key_node, ScalarNode) or key_node.tag == _VALUE_TAG:
                continue  # complex keys: rare, and construction reports unhashable ones
            if key_node.tag == _MERGE_TAG:
                key: Any = _MERGE  # two '<<' keys repeat a key too; merge a list instead: <<: [*a, *b]
            else:
                # equal as Python keys (yes/true, 1/1.0) is what a dict would collapse; a tag that is not safe
                # raises here as it would in construction
                key = self.construct_object(key_node, deep=True)
            if key in first:
                earlier = first[key]
                raise DuplicateKeyError(
                    earlier.value, key_node.value, earlier.start_mark, key_node.start_mark, key is _MERGE
                )
            first[key] = key_node


EXPANDED_MAX = 100_000  # nodes of a document with its aliases expanded; a recipe has a few hundred


class ShapeError(yaml.MarkedYAMLError):
    """A document that parses but cannot be read safely: an alias bomb, an alias inside itself, deep nesting."""


def _check_expansion(root: Node) -> None:
    """A YAMLError when expanding the document's aliases (``*a``) would make it bigger than ``EXPANDED_MAX``
    nodes (an alias bomb: a few lines that expand a billion times) or endless (an alias inside its own anchor).
    Each node's expanded size is counted once (aliases share nodes), without recursion."""
    size: dict[int, int] = {}
    on_path: set[int] = set()
    stack: list[tuple[Node, bool]] = [(root, False)]
    while stack:
        node, done = stack.pop()
        children = (
            [c for kv in node.value for c in kv]
            if isinstance(node, MappingNode)
            else (list(node.value) if isinstance(node, SequenceNode) else [])
        )
        if done:
            on_path.discard(id(node))
            size[id(node)] = 1 + sum(size[id(c)] for c in children)
            if size[id(node)] > EXPANDED_MAX:
                raise ShapeError(
                    problem=f"its aliases (*name) expand it past {EXPANDED_MAX} values; write the values out, "
                    "or use fewer nested aliases",
                    problem_mark=node.start_mark,
                )
            continue
        if id(node) in size:
            continue
        if id(node) in on_path:
            raise ShapeError(problem="an alias (*name) refers to the value that holds it", problem_mark=node.start_mark)
        on_path.add(id(node))
        stack.append((node, True))
        stack.extend((c, False) for c in children if id(c) not in size)


def strict_load(text: str) -> Any:
    """``yaml.safe_load(text)``, except that a mapping repeating a key raises DuplicateKeyError, and a document
    too deep or too big through its aliases a ShapeError (both YAMLErrors)."""
    try:
        return yaml.load(text, Loader=StrictLoader)  # StrictLoader is a SafeLoader: safe tags only
    except RecursionError:
        raise ShapeError(
            problem="it is nested deeper than it can be read (lists or mappings inside each other)"
        ) from None


def yaml_problem(e: yaml.YAMLError) -> str:
    """What is wrong, for a message after ``recipe my.yaml: ``: the duplicate key, or where the syntax breaks."""
    if isinstance(e, DuplicateKeyError):
        return e.describe()
    mark = getattr(e, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    what = "YAML" if isinstance(e, ShapeError) else "YAML syntax error"
    return f"{what}{where}: {getattr(e, 'problem', None) or e}"


def load_yaml(text: str, what: str) -> Any:
    """``strict_load(text)``; a YAML problem is a UserError under ``what`` (``"recipe my.yaml"``)."""
    try:
        return strict_load(text)
    except yaml.YAMLError as e:
        raise UserError(f"{what}: {yaml_problem(e)}") from None
