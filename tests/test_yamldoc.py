"""broker.yamldoc: syntax errors on the broken line, duplicate keys refused, typos explained."""

from __future__ import annotations

from pathlib import Path

import pydantic
import pytest

from broker.errors import ConfigError
from broker.yamldoc import format_validation_error, load_yaml, unknown_key_problem


def _load(tmp_path: Path, text: str) -> list[str]:
    """The problems of loading ``text`` as a YAML file (none if it loads)."""
    path = tmp_path / "doc.yaml"
    path.write_text(text)
    try:
        load_yaml(path)
    except ConfigError as err:
        return err.problems
    return []


def test_lines_of_keys_and_list_items(tmp_path: Path) -> None:
    """Every key and list item has its 1-based line; a deeper unknown path falls back upward."""
    path = tmp_path / "doc.yaml"
    path.write_text("# comment\nlisten:\n  port: 1\nitems:\n  - a\n  - b: 2\n")
    doc = load_yaml(path)
    assert doc.data == {"listen": {"port": 1}, "items": ["a", {"b": 2}]}
    assert doc.line_of(("listen", "port")) == 3
    assert doc.line_of(("items", 1, "b")) == 6
    assert doc.line_of(("listen", "nope", "deeper")) == 2
    assert doc.line_of(()) == 1


def test_empty_file_is_none(tmp_path: Path) -> None:
    """An empty (or comment-only) file loads as None, for the caller to judge."""
    path = tmp_path / "doc.yaml"
    path.write_text("# nothing here\n")
    assert load_yaml(path).data is None


@pytest.mark.parametrize(
    ("text", "line", "fragment"),
    [
        ("name: x\nactions: [put, get\nduration_seconds: 900\n", 2, "flow sequence"),
        ("name: x\nactions: [put, get\n", 2, "flow sequence"),
        ("name: x\nactions: [put, get\n# trailing comment\n\n", 2, "flow sequence"),
        ("name: x\nlisten: {host: a, port: 1\nb: 2\n", 2, "flow mapping"),
        ('name: "abc\nbucket: y\n', 1, "quoted scalar"),
        ("name: x\nbucket\nregion: y\n", 2, "could not find expected ':'"),
        ("name: x\n  bucket: y\nz: 1\n", 2, "mapping values are not allowed here"),
        ("name: x\nbucket: a: b\n", 2, "mapping values are not allowed here"),
        ("name: x\n\tbucket: y\n", 2, "cannot start any token"),
        ("listen:\n  host: a\n port: 1\n", 3, "expected <block end>"),
        ("name: x\nbucket: *nope\n", 2, "undefined alias"),
        ("name: x\nbucket: y\nregion: \x07\n", 3, "special characters are not allowed"),
    ],
    ids=[
        "unclosed-flow-sequence",
        "unclosed-flow-sequence-at-end",
        "unclosed-flow-sequence-then-comment",
        "unclosed-flow-mapping",
        "unclosed-quote",
        "key-without-colon",
        "bad-indent",
        "two-colons",
        "tab",
        "dedent",
        "undefined-alias",
        "control-character",
    ],
)
def test_syntax_error_names_the_broken_line(
    tmp_path: Path, text: str, line: int, fragment: str
) -> None:
    """A syntax error is reported on the line to fix, not on the line where PyYAML noticed it."""
    [problem] = _load(tmp_path, text)
    assert problem.startswith(f"{tmp_path / 'doc.yaml'}:{line}: invalid YAML: "), problem
    assert fragment in problem, problem


def test_unclosed_construct_also_says_where_it_was_noticed(tmp_path: Path) -> None:
    """For an unclosed bracket, the problem names the opening line and where parsing failed."""
    [problem] = _load(tmp_path, "name: x\nactions: [put, get\nduration_seconds: 900\n")
    assert "in a flow sequence that starts on this line" in problem
    assert "(found on line 3)" in problem


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("prefix: a/\nbucket: b\nprefix: c/\n", "3: prefix: duplicate key (first at line 1)"),
        (
            "listen:\n  port: 1\n  host: a\n  port: 2\n",
            "4: listen.port: duplicate key (first at line 2)",
        ),
        ("keys:\n  - id: a\n    id: b\n", "3: keys.0.id: duplicate key (first at line 2)"),
        ("a: {b: 1, b: 2}\n", "1: a.b: duplicate key (first at line 1)"),
    ],
    ids=["top-level", "nested", "in-a-list", "flow-mapping"],
)
def test_duplicate_key_is_refused_naming_both_lines(
    tmp_path: Path, text: str, problem: str
) -> None:
    """A key given twice in one mapping is refused (YAML would keep the last), naming both lines."""
    assert _load(tmp_path, text) == [f"{tmp_path / 'doc.yaml'}:{problem}"]


def test_every_duplicate_is_reported_at_once(tmp_path: Path) -> None:
    """Several duplicate keys give one problem each, in file order."""
    problems = _load(tmp_path, "a: 1\na: 2\nb:\n  c: 1\n  c: 2\na: 3\n")
    assert [problem.split(": ", 1)[0].rsplit(":", 1)[1] for problem in problems] == ["2", "5", "6"]


def test_same_key_in_different_mappings_is_fine(tmp_path: Path) -> None:
    """The same key in two mappings, a string key next to a number key, are not duplicates."""
    assert _load(tmp_path, "a:\n  port: 1\nb:\n  port: 1\nc: {1: x, '1': y}\n") == []


def test_unreadable_file_names_the_file(tmp_path: Path) -> None:
    """A missing file is a problem naming the path."""
    with pytest.raises(ConfigError, match="cannot read file"):
        load_yaml(tmp_path / "missing.yaml")


def test_unknown_key_problem_suggests_the_closest_key() -> None:
    """A typo gets the closest allowed key; a key like nothing gets only the list."""
    assert unknown_key_problem("prot", ["host", "port"]) == (
        "unknown key (did you mean port?); allowed keys: host, port"
    )
    assert unknown_key_problem("zzz", ["port", "host"]) == "unknown key; allowed keys: host, port"


class _Inner(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")
    port: int = 0
    host: str = ""


class _Outer(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")
    listen: _Inner = _Inner()
    items: tuple[_Inner, ...] = ()
    hidden: str = pydantic.Field(default="", exclude=True)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("listen:\n  prot: 1\n", "2: listen.prot: unknown key (did you mean port?)"),
        (
            "listn: {}\n",
            "1: listn: unknown key (did you mean listen?); allowed keys: items, listen",
        ),
        ("items:\n  - hots: a\n", "2: items.0.hots: unknown key (did you mean host?)"),
    ],
)
def test_validation_errors_name_line_key_and_closest_key(
    tmp_path: Path, text: str, expected: str
) -> None:
    """With the model, an unknown key at any depth says file:line: key and the closest known key."""
    path = tmp_path / "doc.yaml"
    path.write_text(text)
    doc = load_yaml(path)
    with pytest.raises(pydantic.ValidationError) as caught:
        _Outer.model_validate(doc.data)
    [problem] = format_validation_error(doc, caught.value, _Outer)
    assert problem.startswith(f"{path}:{expected}"), problem


def test_validation_errors_without_a_model_keep_pydantics_words(tmp_path: Path) -> None:
    """Without the model, an unknown key keeps pydantic's message; other errors always do."""
    path = tmp_path / "doc.yaml"
    path.write_text("listen:\n  prot: 1\n  port: x\n")
    doc = load_yaml(path)
    with pytest.raises(pydantic.ValidationError) as caught:
        _Outer.model_validate(doc.data)
    problems = format_validation_error(doc, caught.value)
    assert problems == [
        f"{path}:3: listen.port: Input should be a valid integer, "
        "unable to parse string as an integer",
        f"{path}:2: listen.prot: Extra inputs are not permitted",
    ]
