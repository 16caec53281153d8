"""The benchmark's report: machine facts and the figures table, as Markdown."""

from __future__ import annotations

import os
import platform
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import aiohttp

__all__ = ["Figure", "Secondary", "machine_facts", "render"]


@dataclass(frozen=True)
class Figure:
    """One figure with a target: its ratio or value, the raw numbers, and whether it is met."""

    name: str
    target: str
    value: str
    raw: str
    met: bool


@dataclass(frozen=True)
class Secondary:
    """A figure reported for context, without a target."""

    name: str
    value: str
    raw: str


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith(("model name", "Model", "cpu model")):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _broker_revision(repo: Path) -> str:
    """The commit, and whether broker/ has uncommitted changes (read-only git calls)."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=repo,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "--no-optional-locks", "status", "--porcelain", "--", "broker"],
            cwd=repo,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown (no git)"
    return f"{head}" + (" + uncommitted changes in broker/" if dirty else "")


def machine_facts(repo: Path, wrk: str, load_before: str) -> list[tuple[str, str]]:
    """The facts a reader needs to judge the numbers."""
    return [
        ("date", datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")),
        ("cores (os.cpu_count())", str(os.cpu_count())),
        ("CPU", _cpu_model()),
        ("Python", platform.python_version()),
        ("aiohttp", aiohttp.__version__),
        ("wrk", wrk),
        ("broker code", _broker_revision(repo)),
        ("load average (1/5/15 min) before / after", f"{load_before} / {load_average()}"),
    ]


def load_average() -> str:
    """The 1, 5 and 15 minute load averages, from /proc/loadavg."""
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", "<br>")


def render(
    command: str,
    facts: Sequence[tuple[str, str]],
    figures: Sequence[Figure],
    secondary: Sequence[Secondary],
    notes: Sequence[str],
) -> str:
    """The whole report, as Markdown."""
    lines = ["# oss-sts-broker benchmark results", "", f"Command: `{command}`", ""]
    lines += ["| machine | |", "| --- | --- |"]
    lines += [f"| {_cell(key)} | {_cell(value)} |" for key, value in facts]
    lines += ["", "## Figures against targets", ""]
    lines += [
        "| figure | target | measured | raw numbers | status |",
        "| --- | --- | --- | --- | --- |",
    ]
    for f in figures:
        cells = [f.name, f.target, f.value, f.raw, "MET" if f.met else "**NOT MET**"]
        lines.append("| " + " | ".join(_cell(cell) for cell in cells) + " |")
    lines += ["", "## Secondary figures (no target)", ""]
    lines += ["| figure | measured | raw numbers |", "| --- | --- | --- |"]
    lines += [f"| {_cell(s.name)} | {_cell(s.value)} | {_cell(s.raw)} |" for s in secondary]
    lines += ["", "## How these were measured", ""]
    lines += [f"- {note}" for note in notes]
    return "\n".join(lines) + "\n"
