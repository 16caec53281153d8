"""Where OSS is reached, and the URL a bucket (or an object in it) has there."""

from __future__ import annotations

import socket
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

__all__ = ["Addressing", "OssEndpoint", "bucket_url", "object_url_base"]

Addressing = Literal["virtual", "path", "cname"]


@dataclass(frozen=True, slots=True)
class OssEndpoint:
    """Where OSS is reached: a bare ``host[:port]`` and a scheme.

    Hosts such as ``oss-cn-hangzhou.aliyuncs.com``, ``cdn.example.com`` or
    ``127.0.0.1:9100``.  ``virtual`` puts the bucket in the host name,
    ``path`` in the path, ``cname`` in neither (the host serves one bucket).
    As in the SDK, an IP-address host always uses path-style addressing.
    """

    host: str
    scheme: str = "https"
    addressing: Addressing = "virtual"

    def __post_init__(self) -> None:
        if self.scheme not in ("http", "https"):
            raise ValueError(f"endpoint scheme must be http or https, not {self.scheme!r}")
        if self.addressing not in ("virtual", "path", "cname"):
            raise ValueError(f"unknown addressing style {self.addressing!r}")
        if not self.host or any(c in self.host for c in "/?#@ \t\r\n"):
            raise ValueError(f"endpoint host must be a bare host[:port], not {self.host!r}")

    @property
    def url(self) -> str:
        """``scheme://host[:port]``, usable as given (oss-v2 reads a bare host as HTTPS)."""
        return f"{self.scheme}://{self.host}"

    @property
    def address_style(self) -> Addressing:
        """The addressing URLs really use: ``path`` for an IP-address host, as in the SDK."""
        return "path" if _is_ip(self.host) else self.addressing


def bucket_url(endpoint: OssEndpoint, bucket: str) -> str:
    """The bucket's base URL (no trailing slash), e.g. where a PostObject form is sent."""
    return object_url_base(endpoint, bucket).rstrip("/")


def object_url_base(endpoint: OssEndpoint, bucket: str) -> str:
    """Everything of an object's URL before its encoded key, ending in ``/``."""
    return _url_base(endpoint.scheme, endpoint.host, endpoint.addressing, bucket)


@lru_cache(maxsize=1024)
def _url_base(scheme: str, host: str, addressing: str, bucket: str) -> str:
    """The URL base for this addressing style.

    As the SDK does, an IP-address host forces path-style addressing.
    """
    if addressing == "path" or _is_ip(host):
        return f"{scheme}://{host}/{bucket}/"
    if addressing == "cname":
        return f"{scheme}://{host}/"
    return f"{scheme}://{bucket}.{host}/"


def _is_ip(host: str) -> bool:
    """The SDK's test (``endpoints.is_ip``), plus bracketed IPv6 literals."""
    if host.startswith("["):
        return True
    try:
        socket.inet_aton(host.split(":")[0])
    except OSError:
        return False
    return True
