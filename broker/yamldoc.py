"""YAML files with line numbers, so every validation error can say file:line: key: problem."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydantic
import yaml

__all__ = ["YamlDocument", "format_validation_error", "load_yaml"]

KeyPath = tuple[str | int, ...]


@dataclass(frozen=True)
class YamlDocument:
    """A parsed YAML mapping and the line of every key in it."""

    path: Path
    data: Any
    lines: dict[KeyPath, int] = field(default_factory=dict)

    def line_of(self, loc: KeyPath) -> int:
        """The line of the deepest known key on ``loc`` (1 when nothing matches)."""
        for end in range(len(loc), 0, -1):
            line = self.lines.get(tuple(loc[:end]))
            if line is not None:
                return line
        return 1


def load_yaml(path: Path) -> YamlDocument:
    """Parse ``path``; raise ``ValueError`` with ``file:line: problem`` on bad YAML."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: cannot read file: {err}") from err
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = mark.line + 1 if mark is not None else 1
        problem = getattr(err, "problem", None) or str(err)
        raise ValueError(f"{path}:{line}: invalid YAML: {problem}") from err
    lines: dict[KeyPath, int] = {}
    if node is not None:
        for loc, line in _walk(node, ()):
            lines[loc] = line
    return YamlDocument(path=path, data=data, lines=lines)


def _walk(node: yaml.Node, loc: KeyPath) -> Iterator[tuple[KeyPath, int]]:
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = (*loc, str(key_node.value))
            yield key, key_node.start_mark.line + 1
            yield from _walk(value_node, key)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            key = (*loc, index)
            yield key, item.start_mark.line + 1
            yield from _walk(item, key)


def format_validation_error(doc: YamlDocument, err: pydantic.ValidationError) -> list[str]:
    """One ``file:line: key: problem`` string per pydantic error."""
    problems = []
    for item in err.errors(include_url=False, include_input=False):
        loc = tuple(part for part in item["loc"] if isinstance(part, str | int))
        key = ".".join(str(part) for part in loc) or "(top level)"
        message = item["msg"].removeprefix("Value error, ")
        problems.append(f"{doc.path}:{doc.line_of(loc)}: {key}: {message}")
    return problems
