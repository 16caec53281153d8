"""policies/README.md: every policy it shows passes `sts-broker check`, and renders as it says."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from broker.cli import main
from broker.models import Principal
from broker.policies import load_policy_file, scope_for
from tests.conftest import POLICIES_DIR

README = POLICIES_DIR / "README.md"
_BLOCK = re.compile(r"```(yaml|json)\n(.*?)```", re.DOTALL)


def _blocks(kind: str) -> list[str]:
    return [text for found, text in _BLOCK.findall(README.read_text()) if found == kind]


_POLICIES = [text for text in _blocks("yaml") if re.search(r"^name: ", text, re.MULTILINE)]


def _name(text: str) -> str:
    found = re.search(r"^name: (\S+)", text, re.MULTILINE)
    assert found is not None
    return found[1]


def test_readme_shows_every_option() -> None:
    """A worked example of each option: several grants, a lifetime, every condition key."""
    shown = "\n".join(_POLICIES)
    for option in (
        "grants:",
        "effective_lifetime_seconds:",
        "source_ip: caller",
        "source_ip: [",
        "source_vpc:",
        "secure_transport: true",
        "    conditions:",  # per grant
    ):
        assert option in shown, option
    assert "?prefix=" in README.read_text()  # and narrowing, per request


@pytest.mark.parametrize("text", _POLICIES, ids=_name)
def test_every_policy_in_the_readme_passes_check(
    text: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Each policy example in the README, saved as a file, passes `sts-broker check`."""
    path = tmp_path / f"{_name(text)}.yaml"
    path.write_text(text)
    assert main(["check", str(path)]) == 0, capsys.readouterr().err
    assert capsys.readouterr().out.startswith(f"{path}: ok (policy '{_name(text)}'; at most ")


@pytest.mark.parametrize(
    ("name", "principal"),
    [
        ("avatar-upload", Principal("alice", ("browser",))),
        ("service-uploads", Principal("alice", ("internal",))),
        ("report-jobs", Principal("svc-reports", ("internal",))),
        ("pinned-reads", Principal("svc-reports", ("internal",), source_ip="203.0.113.7")),
    ],
)
def test_the_readme_shows_exactly_what_is_rendered(name: str, principal: Principal) -> None:
    """Each rendered document the README shows is byte for byte what the broker sends."""
    document = scope_for(load_policy_file(POLICIES_DIR / f"{name}.yaml"), principal).document
    assert document in [block.strip() for block in _blocks("json")]
    assert json.loads(document)


def test_readme_examples_match_the_shipped_files() -> None:
    """A README example named like a shipped file holds the same settings as that file."""
    for text in _POLICIES:
        shipped = POLICIES_DIR / f"{_name(text)}.yaml"
        if shipped.exists():
            path = shipped.with_name("readme-copy.yaml")
            try:
                path.write_text(text)
                shown = load_policy_file(path).model_dump()
            finally:
                path.unlink()
            assert shown == load_policy_file(shipped).model_dump(), _name(text)
