"""The broker's HTTP API (aiohttp)."""

from __future__ import annotations

__all__: list[str] = []
