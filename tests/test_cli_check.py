"""`sts-broker check` and `render` as ops meet them: one set of files, and reasons, not just 1."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from broker.cli import main
from tests.conftest import POLICIES_DIR, REPO

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


# --- warnings: valid files that will not work well (exit 0) ---

_HEX = "0" * 64


def test_shipped_config_and_policies_check_without_a_warning(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """config/broker.yaml and the example policies pass with nothing on stderr."""
    assert main(["check", "--config", str(REPO / "config" / "broker.yaml")]) == 0
    assert capsys.readouterr().err == ""


def _short_policy_dir(tmp_path: Path, callers: str) -> Path:
    """A policies dir holding avatar-upload (900 s) with ``callers`` instead of browsers."""
    folder = tmp_path / "policies"
    folder.mkdir()
    source = (POLICIES_DIR / "avatar-upload.yaml").read_text()
    (folder / "avatar-upload.yaml").write_text(
        source.replace('callers: ["group:browser"]', f"callers: {callers}")
    )
    return folder


def test_short_policy_for_an_api_key_warns_and_exits_0(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A 900 s policy an API key may fetch: file:line: warning: saying what to choose; exit 0."""
    path = _short_policy_dir(tmp_path, "[svc-up]") / "avatar-upload.yaml"
    assert main(["check", str(path)]) == 0
    captured = capsys.readouterr()
    assert captured.out == f"{path}: ok (policy 'avatar-upload')\n"
    [warning] = captured.err.splitlines()
    assert warning.startswith(f"{path}:{_line_of(path, 'duration_seconds:')}: warning: ")
    assert "choose duration_seconds: 3600 or more" in warning


def _config(tmp_path: Path, policies: Path, allow: str = "") -> Path:
    config = tmp_path / "broker.yaml"
    config.write_text(
        f"policies_dir: {policies}\nauth:\n  api_keys:\n    - id: svc-up\n"
        f"      key_sha256: '{_HEX}'\n      groups: [internal]\n{allow}"
    )
    return config


@pytest.mark.parametrize(
    ("allow", "warned"),
    [
        ("", True),
        ("      allow: {routes: [credentials]}\n", True),
        ("      allow: {routes: [presign, post_policy]}\n", False),
    ],
)
def test_config_resolves_group_callers_and_allow(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], allow: str, warned: bool
) -> None:
    """With --config, a group holding an API key counts, unless its allow has no credentials."""
    policies = _short_policy_dir(tmp_path, '["group:internal"]')
    config = _config(tmp_path, policies, allow)
    path = policies / "avatar-upload.yaml"
    assert main(["check", "--config", str(config), str(path)]) == 0
    err = capsys.readouterr().err
    assert err.count("warning: duration_seconds: 900") == (1 if warned else 0), err


def test_without_config_group_callers_get_a_note(capsys: pytest.CaptureFixture[str]) -> None:
    """Checking the examples alone says the browser group's lifetime was not checked."""
    assert main(["check", *map(str, sorted(POLICIES_DIR.glob("*.yaml")))]) == 0
    err = capsys.readouterr().err
    assert "warning" not in err
    assert err.startswith("note: avatar-upload: credential-provider lifetimes not checked")


def test_allow_naming_a_missing_policy_warns(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An allow.policies entry no policy answers to is a warning at its config line; exit 0."""
    config = _config(tmp_path, POLICIES_DIR, "      allow: {policies: [servce-uploads]}\n")
    assert main(["check", "--config", str(config)]) == 0
    assert f"{config}:7: warning: auth.api_keys.0.allow.policies.0: no policy named " in (
        capsys.readouterr().err
    )


def _line_of(path: Path, start: str) -> int:
    lines = path.read_text().splitlines()
    return 1 + next(index for index, line in enumerate(lines) if line.startswith(start))


def _readme_policies() -> list[str]:
    """The YAML blocks of policies/README.md that are whole policy files."""
    text = (POLICIES_DIR / "README.md").read_text()
    blocks = re.findall(r"```yaml\n(.*?)```", text, re.DOTALL)
    return [block for block in blocks if block.startswith("name:") and "role_arn:" in block]


def test_policies_readme_examples_pass_check(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Every worked policy in policies/README.md (forbid_overwrite's too) passes check."""
    examples = _readme_policies()
    assert any("forbid_overwrite: true" in block for block in examples)
    for index, block in enumerate(examples):
        path = tmp_path / f"example-{index}.yaml"
        path.write_text(block)
        assert main(["check", str(path)]) == 0, capsys.readouterr().err
