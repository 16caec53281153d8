"""`sts-broker check` and `render` as ops meet them: one set of files, and reasons, not just 1."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from broker.cli import main
from tests.conftest import POLICIES_DIR, REPO

_DUPLICATES = Path(__file__).resolve().parent / "data" / "policies_bad" / "duplicate"
_AVATAR_BUDGET = "policy 'avatar-upload'; at most 191 of 2048 characters: grant 1 161, envelope 30"


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
    assert capsys.readouterr().out == f"{path}: ok ({_AVATAR_BUDGET})\n"


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
    assert captured.out == f"{path}: ok ({_AVATAR_BUDGET})\n"
    [warning] = captured.err.splitlines()
    assert warning.startswith(f"{path}:{_line_of(path, 'duration_seconds:')}: warning: ")
    assert "choose duration_seconds: 3600 or more" in warning


def _effective_policy(tmp_path: Path, duration: int, effective: int) -> Path:
    """service-uploads for the API key svc-up, with ``duration`` and ``effective`` lifetimes."""
    folder = tmp_path / "policies"
    folder.mkdir()
    text = (POLICIES_DIR / "service-uploads.yaml").read_text()
    text = text.replace("duration_seconds: 3600 ", f"duration_seconds: {duration} ")
    text = text.replace('callers: ["group:internal"]', "callers: [svc-up]")
    path = folder / "service-uploads.yaml"
    path.write_text(f"{text}effective_lifetime_seconds: {effective}\n")
    return path


def test_a_short_effective_lifetime_warns_at_its_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """duration_seconds 3600 with effective_lifetime_seconds 300: the 300 s is what warns."""
    path = _effective_policy(tmp_path, 3600, 300)
    assert main(["check", str(path)]) == 0
    [warning] = capsys.readouterr().err.splitlines()
    line = _line_of(path, "effective_lifetime_seconds:")
    assert warning.startswith(f"{path}:{line}: warning: effective_lifetime_seconds: 300 is too ")
    assert "may be handed one with 150 s left" in warning
    assert "leave effective_lifetime_seconds out and choose duration_seconds: 3600" in warning


def test_a_long_enough_effective_lifetime_does_not_warn(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """duration_seconds 7200 with effective_lifetime_seconds 3600 leaves providers enough."""
    path = _effective_policy(tmp_path, 7200, 3600)
    assert main(["check", str(path)]) == 0
    assert capsys.readouterr().err == ""


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
    assert err.startswith(
        "note: avatar-upload, quick-upload: credential-provider lifetimes not checked"
    )


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
# --- budgets per grant, bound and short-lived policies ---


def test_render_shows_the_budget_of_each_grant(capsys: pytest.CaptureFixture[str]) -> None:
    """render report-jobs: one line per grant, the envelope, the total and the worst case."""
    args = ["render", "report-jobs", "--subject", "svc-reports", "--policies-dir"]
    assert main([*args, str(POLICIES_DIR)]) == 0
    document, _, tail = capsys.readouterr().out.partition("\n\n")
    minified = json.dumps(json.loads(document), separators=(",", ":"))
    assert tail.splitlines() == [
        "grant 1 (examplebucket/reports/): 241",
        "grant 2 (examplebucket/services/svc-reports/): 326",
        "envelope: 31",
        f"{len(minified)} of 2048 characters (minified, as sent to STS)",
        "at most 704 of 2048 for any caller",
    ]
    assert len(minified) == 241 + 326 + 31


def test_render_a_caller_bound_policy_needs_its_address(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """pinned-reads binds tokens to the caller: render asks for --source-ip, then shows it."""
    args = ["render", "pinned-reads", "--subject", "svc-a", "--policies-dir", str(POLICIES_DIR)]
    assert main(args) == 1
    assert "give --source-ip" in capsys.readouterr().err
    assert main([*args, "--source-ip", "203.0.113.7"]) == 0
    assert '"203.0.113.7"' in capsys.readouterr().out


def test_render_a_short_lived_policy_shows_its_deadline(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """quick-upload is shown as sent: DateLessThan acs:CurrentTime, counted in the total."""
    args = ["render", "quick-upload", "--subject", "alice", "--policies-dir", str(POLICIES_DIR)]
    assert main(args) == 0
    document, _, tail = capsys.readouterr().out.partition("\n\n")
    [statement] = json.loads(document)["Statement"]
    assert set(statement["Condition"]) == {"DateLessThan"}
    minified = json.dumps(json.loads(document), separators=(",", ":"))
    assert f"{len(minified)} of 2048 characters" in tail


def test_check_refuses_a_lifetime_within_the_refresh_margin(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """check --config: effective_lifetime_seconds at or under the margin is a problem (exit 2)."""
    policies = tmp_path / "policies"
    policies.mkdir()
    shutil.copy(POLICIES_DIR / "quick-upload.yaml", policies)
    config = tmp_path / "broker.yaml"
    config.write_text(f"policies_dir: {policies}\ncache: {{refresh_margin_seconds: 120}}\n")
    assert main(["check", "--config", str(config)]) == 2
    path = policies / "quick-upload.yaml"
    line = _line_of(path, "effective_lifetime_seconds:")
    assert capsys.readouterr().err.startswith(
        f"{path}:{line}: effective_lifetime_seconds: 120 must be more than "
        "cache.refresh_margin_seconds (120)"
    )
