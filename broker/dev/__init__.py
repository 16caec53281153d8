"""Files served only by ``sts-broker dev``: the demo upload page."""

from __future__ import annotations

from importlib.resources import files

__all__ = ["demo_page"]


def demo_page() -> str:
    """The demo page's HTML (it reads the dev API key from the URL fragment)."""
    return files(__package__).joinpath("demo.html").read_text(encoding="utf-8")
