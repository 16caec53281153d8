"""YAML files with line numbers, so every validation error can say file:line: key: problem.

Shared by the configuration and the policy files, so both refuse the same
mistakes the same way: a syntax error names the line that is broken, a key
given twice in one mapping is refused (YAML would silently keep the last), and
an unknown key suggests the closest known one.
"""

from __future__ import annotations

import difflib
import typing
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydantic
import yaml

from broker.errors import ConfigError

__all__ = ["YamlDocument", "format_validation_error", "load_yaml", "unknown_key_problem"]

KeyPath = tuple[str | int, ...]

# Errors inside one construct that opens on an earlier line (``[put, get`` never
# closed, a quote never ended, a key without its ``:``) are noticed where the
# next token starts; the line to fix is where the construct opened.
_OPENED_CONSTRUCTS = ("while parsing a flow", "while scanning a")


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
    """Parse ``path``; ``ConfigError`` with ``file:line: problem`` on bad YAML or duplicate keys."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError([f"{path}: cannot read file: {err}"]) from err
    try:
        node, data = _parse(text)
    except yaml.YAMLError as err:
        raise ConfigError([_syntax_problem(path, text, err)]) from err
    lines: dict[KeyPath, int] = {}
    problems: list[str] = []
    if node is not None:
        for loc, line, first in _walk(node, ()):
            if first is not None:
                problems.append(
                    f"{path}:{line}: {_dotted(loc)}: duplicate key (first at line {first})"
                )
            else:
                lines[loc] = line
    if problems:
        raise ConfigError(problems)
    return YamlDocument(path=path, data=data, lines=lines)


def _parse(text: str) -> tuple[yaml.Node | None, Any]:
    """Compose and construct in one pass: the node tree (for lines) and the data."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        return node, None if node is None else loader.construct_document(node)
    finally:
        loader.dispose()


def _syntax_problem(path: Path, text: str, err: yaml.YAMLError) -> str:
    """``file:line: invalid YAML: ...`` naming the line to fix (PyYAML marks are 0-based)."""
    if isinstance(err, yaml.reader.ReaderError):
        line = text.count("\n", 0, err.position) + 1
        return f"{path}:{line}: invalid YAML: {err.reason} (character {err.character!r})"
    problem_mark = getattr(err, "problem_mark", None)
    context_mark = getattr(err, "context_mark", None)
    context: str = getattr(err, "context", None) or ""
    problem: str = getattr(err, "problem", None) or str(err)
    if problem_mark is None:
        return f"{path}:1: invalid YAML: {problem}"
    found_at = problem_mark.line + 1
    if context.startswith(_OPENED_CONSTRUCTS) and context_mark is not None:
        opened_at = context_mark.line + 1
        if opened_at < found_at:
            construct = context.removeprefix("while parsing ").removeprefix("while scanning ")
            return (
                f"{path}:{opened_at}: invalid YAML: in {construct} that starts on this line: "
                f"{problem} (found on line {found_at})"
            )
    return f"{path}:{min(found_at, _last_content_line(text))}: invalid YAML: {problem}"


def _last_content_line(text: str) -> int:
    """The last line holding more than blanks or a comment (where "end of stream" points)."""
    lines = text.splitlines()
    for number in range(len(lines), 0, -1):
        stripped = lines[number - 1].strip()
        if stripped and not stripped.startswith("#"):
            return number
    return 1


def _walk(node: yaml.Node, loc: KeyPath) -> Iterator[tuple[KeyPath, int, int | None]]:
    """Every key path, its line, and (for a repeated key) the line it was first given on."""
    if isinstance(node, yaml.MappingNode):
        seen: dict[tuple[str, str], int] = {}
        for key_node, value_node in node.value:
            key = (*loc, str(key_node.value))
            line = key_node.start_mark.line + 1
            identity = (key_node.tag, str(key_node.value))
            yield key, line, seen.get(identity)
            seen.setdefault(identity, line)
            yield from _walk(value_node, key)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            key = (*loc, index)
            yield key, item.start_mark.line + 1, None
            yield from _walk(item, key)


def _dotted(loc: KeyPath) -> str:
    return ".".join(str(part) for part in loc) or "(top level)"


def unknown_key_problem(key: str, allowed: Iterable[str]) -> str:
    """``unknown key (did you mean port?); allowed keys: ...`` for a key no schema declares."""
    names = sorted(allowed)
    close = difflib.get_close_matches(key, names, n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    return f"unknown key{hint}; allowed keys: {', '.join(names)}"


def format_validation_error(
    doc: YamlDocument, err: pydantic.ValidationError, model: type[pydantic.BaseModel] | None = None
) -> list[str]:
    """One ``file:line: key: problem`` string per pydantic error.

    With the validated ``model``, an unknown key also names the closest known one.
    """
    problems = []
    for item in err.errors(include_url=False, include_input=False):
        loc = tuple(part for part in item["loc"] if isinstance(part, str | int))
        message = item["msg"].removeprefix("Value error, ")
        allowed = _allowed_keys(model, loc[:-1]) if item["type"] == "extra_forbidden" else None
        if allowed is not None and loc:
            message = unknown_key_problem(str(loc[-1]), allowed)
        problems.append(f"{doc.path}:{doc.line_of(loc)}: {_dotted(loc)}: {message}")
    return problems


def _allowed_keys(model: type[pydantic.BaseModel] | None, loc: KeyPath) -> list[str] | None:
    """The keys a file may give at ``loc`` in ``model`` (aliases where fields have one), or None."""
    for part in loc:
        if model is None:
            return None
        if isinstance(part, int):
            continue  # an item of a list of models
        declared = {info.alias or name: info for name, info in model.model_fields.items()}
        model = _model_in(declared[part].annotation) if part in declared else None
    if model is None:
        return None
    return [info.alias or name for name, info in model.model_fields.items() if not info.exclude]


def _model_in(annotation: Any) -> type[pydantic.BaseModel] | None:
    """The model inside ``X``, ``X | None`` or ``tuple[X, ...]``, if any."""
    if isinstance(annotation, type) and issubclass(annotation, pydantic.BaseModel):
        return annotation
    for argument in typing.get_args(annotation):
        found = _model_in(argument)
        if found is not None:
            return found
    return None
