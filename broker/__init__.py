"""oss-sts-broker: temporary, narrowly scoped Alibaba Cloud credentials for OSS."""

from __future__ import annotations

__all__ = ["__version__"]

__version__ = "0.1.0"
