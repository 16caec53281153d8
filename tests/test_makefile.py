"""The Makefile's two commands, read with ``make -n``: what each would install and run."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import REPO

MAKE = shutil.which("make") or "make"


def _dry_run(venv: Path, *args: str, remake_all: bool = True) -> list[str]:
    """The commands ``make ARGS`` would run with ``VENV=venv`` (none are run)."""
    flags = ["-n", "-B"] if remake_all else ["-n"]
    # Under `make test` this runs as a sub-make: keep the outer make's flags out of it.
    env = {k: v for k, v in os.environ.items() if k not in {"MAKEFLAGS", "MFLAGS", "MAKELEVEL"}}
    result = subprocess.run(  # noqa: S603 - make, fixed arguments
        [MAKE, "--no-print-directory", *flags, f"VENV={venv}", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return result.stdout.splitlines()


def _pip_installs(lines: list[str]) -> list[str]:
    return [line for line in lines if " -m pip install " in line]


def test_make_run_installs_only_what_running_needs(tmp_path: Path) -> None:
    """make run installs the package alone (no test extra), loudly, then starts dev mode."""
    lines = _dry_run(tmp_path / "venv", "run")
    installs = _pip_installs(lines)
    assert len(installs) == 1
    assert installs[0].endswith(" -e .")
    assert "--quiet" not in installs[0]
    assert any(line.startswith('echo "==> installing') for line in lines)
    assert lines[-1] == f"{tmp_path / 'venv'}/bin/sts-broker dev"


def test_make_run_port_passes_the_port(tmp_path: Path) -> None:
    """make run PORT=9000 starts sts-broker dev --port 9000."""
    lines = _dry_run(tmp_path / "venv", "run", "PORT=9000")
    assert lines[-1] == f"{tmp_path / 'venv'}/bin/sts-broker dev --port 9000"


def test_make_test_after_make_run_adds_only_the_test_extra(tmp_path: Path) -> None:
    """With make run's install done, make test installs the test extra and not the rest again."""
    venv = tmp_path / "venv"
    venv.mkdir()
    (venv / ".installed-run").touch()
    installs = _pip_installs(_dry_run(venv, "test", remake_all=False))
    assert len(installs) == 1
    assert installs[0].endswith(" -e '.[test]'")


@pytest.mark.parametrize("target", ["test", "lint", "typecheck", "pytest"])
def test_every_test_target_installs_the_test_extra(tmp_path: Path, target: str) -> None:
    """On a fresh clone, each test target installs the package, then its test extra."""
    installs = _pip_installs(_dry_run(tmp_path / "venv", target))
    assert [line.rsplit(" ", 1)[-1] for line in installs] == [".", "'.[test]'"]


@pytest.mark.parametrize("target", ["test", "pytest"])
def test_test_targets_install_the_pinned_node_clients_before_pytest(
    tmp_path: Path, target: str
) -> None:
    """make test and make pytest run tools/install-node-deps.sh (npm ci from the lock) first."""
    lines = _dry_run(tmp_path / "venv", target)
    install = lines.index("bash tools/install-node-deps.sh")
    assert install < next(i for i, line in enumerate(lines) if line.endswith("/bin/pytest "))
