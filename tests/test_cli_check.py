"""`sts-broker check` and `render` as ops meet them: one set of files, and reasons, not just 1."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from broker.cli import main
from tests.conftest import POLICIES_DIR

_DUPLICATES = Path(__file__).resolve().parent / "data" / "policies_bad" / "duplicate"


def test_check_refuses_one_name_in_two_files(capsys: pytest.CaptureFixture[str]) -> None:
    """Two files with the same policy name exit 2 with a problem naming both files."""
    first, second = _DUPLICATES / "first.yaml", _DUPLICATES / "second.yaml"
    assert main(["check", str(first), str(second)]) == 2
    err = capsys.readouterr().err
    assert f"{second}:2: name: policy 'same-name' is already defined in {first}" in err


def test_check_reads_a_file_given_twice_once(capsys: pytest.CaptureFixture[str]) -> None:
    """The same file named twice is one policy, not a duplicate."""
    path = POLICIES_DIR / "avatar-upload.yaml"
    assert main(["check", str(path), str(path)]) == 0
    assert capsys.readouterr().out == f"{path}: ok (policy 'avatar-upload')\n"


def test_check_refuses_a_duplicate_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A policy file that gives prefix twice exits 2 naming both lines."""
    lines = (POLICIES_DIR / "avatar-upload.yaml").read_text().splitlines()
    first = 1 + next(index for index, line in enumerate(lines) if line.startswith("prefix:"))
    path = tmp_path / "avatar.yaml"
    path.write_text("\n".join([*lines, 'prefix: "avatars/"', ""]))
    last = len(lines) + 1
    assert main(["check", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"{path}:{last}: prefix: duplicate key (first at line {first})" in err


def test_check_points_at_the_broken_yaml_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An unclosed list on line 2 is reported on line 2, not on the line after it."""
    path = tmp_path / "broken.yaml"
    path.write_text("name: broken\nactions: [put, get\nduration_seconds: 900\n")
    assert main(["check", str(path)]) == 2
    assert capsys.readouterr().err.startswith(f"{path}:2: invalid YAML: ")


@pytest.mark.parametrize("subject", ["a*", "../admin", "a/b", "x" * 65])
def test_render_says_why_a_subject_is_refused(
    capsys: pytest.CaptureFixture[str], subject: str
) -> None:
    """A subject that could widen the scope exits 1 saying why and what is allowed, not echoed."""
    args = ["render", "avatar-upload", "--subject", subject, "--policies-dir", str(POLICIES_DIR)]
    assert main(args) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("error: ${subject} cannot be rendered: template value must")
    assert "could widen the scope" in captured.err
    assert "A-Z a-z 0-9 . _ @ -" in captured.err
    assert subject not in captured.err


def test_render_says_which_group_is_missing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A ${group} policy without a listed --group says to give one."""
    policies = tmp_path / "policies"
    shutil.copytree(POLICIES_DIR, policies, ignore=shutil.ignore_patterns("*.md"))
    path = policies / "avatar-upload.yaml"
    path.write_text(path.read_text().replace("avatars/${subject}/", "teams/${group}/"))
    args = ["render", "avatar-upload", "--subject", "alice", "--policies-dir", str(policies)]
    assert main([*args, "--group", "staff"]) == 1
    err = capsys.readouterr().err
    assert "${group} cannot be rendered" in err
    assert "give a --group the policy's callers list" in err
    assert main([*args, "--group", "browser"]) == 0
    assert "teams/browser/" in capsys.readouterr().out
