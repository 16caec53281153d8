"""Local stand-ins for Alibaba Cloud STS and OSS that speak the real wire protocols."""

from __future__ import annotations

__all__: list[str] = []
