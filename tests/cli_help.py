"""Test helper: the options and arguments an argparse ``--help`` text lists, with their help."""

from __future__ import annotations

import re

__all__ = ["help_entries"]


def help_entries(text: str) -> dict[str, str]:
    """Each option or argument in an argparse help text (two-space indent), with its help."""
    entries: dict[str, str] = {}
    name = ""
    for line in text.splitlines():
        entry = re.fullmatch(r"  (\S.*?)(?: {2,}(\S.*))?", line)
        if entry is not None:
            name = entry[1]
            entries[name] = entry[2] or ""
        elif name and line.startswith("   ") and line.strip():
            entries[name] = f"{entries[name]} {line.strip()}".strip()
        else:
            name = ""
    return entries
