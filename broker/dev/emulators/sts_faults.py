"""Faults the STS emulator injects on demand: delays, throttling, 5xx, resets, bad replies."""

from __future__ import annotations

import socket
import struct
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import Any

from aiohttp import web

from broker.dev.emulators.sts_errors import CATALOGUE, error_response

__all__ = ["StsFaults", "early_fault", "fault_response", "late_fault"]


@dataclass
class StsFaults:
    """Faults to inject into the next AssumeRole answers; change them at run time."""

    delay_seconds: float = 0.0
    throttle: bool = False
    throttle_code: str = "Throttling.Api"
    error_status: int | None = None
    reset_connection: bool = False
    malformed_body: bool = False
    omit_credentials: bool = False
    omit_expiration: bool = False
    expired_credentials: bool = False
    remaining: int | None = None

    def clear(self) -> None:
        """Switch every fault off."""
        for spec in fields(self):
            setattr(self, spec.name, spec.default)

    def active(self) -> bool:
        """Whether any fault is switched on."""
        return any(
            getattr(self, spec.name) != spec.default
            for spec in fields(self)
            if spec.name not in {"remaining", "throttle_code"}
        )

    def take(self) -> StsFaults | None:
        """The faults for one request (a copy), counting ``remaining`` down."""
        if self.remaining is not None and self.remaining <= 0:
            self.clear()
        if not self.active():
            return None
        snapshot = replace(self)
        if self.remaining is not None:
            self.remaining -= 1
            if self.remaining <= 0:
                self.clear()
        return snapshot

    def update(self, changes: Mapping[str, Any]) -> None:
        """Set fields from a JSON object; ValueError names the first bad one."""
        types = {spec.name: spec.type for spec in fields(self)}
        for name, value in changes.items():
            if name not in types:
                raise ValueError(f"unknown fault {name!r}")
            if not _fits(str(types[name]), value):
                raise ValueError(f"bad value for fault {name!r}")
        for name, value in changes.items():
            setattr(self, name, value)


def _fits(type_name: str, value: object) -> bool:
    """Whether a JSON value suits a StsFaults field annotation."""
    if value is None:
        return "None" in type_name
    if type_name.startswith("bool"):
        return isinstance(value, bool)
    if type_name.startswith("float"):
        return isinstance(value, int | float) and not isinstance(value, bool) and value >= 0
    if type_name.startswith("int"):
        return isinstance(value, int) and not isinstance(value, bool) and value >= 0
    return isinstance(value, str) and bool(value)


def early_fault(faults: StsFaults | None) -> str | None:
    """The fault that answers before any checks, if one is on."""
    if faults is None:
        return None
    for name in ("reset_connection", "throttle", "malformed_body"):
        if getattr(faults, name):
            return name
    return "error_status" if faults.error_status is not None else None


def late_fault(faults: StsFaults | None) -> str | None:
    """The fault that spoils a successful answer, if one is on."""
    if faults is None:
        return None
    for name in ("omit_credentials", "omit_expiration", "expired_credentials"):
        if getattr(faults, name):
            return name
    return None


def _reset_connection(request: web.Request) -> web.StreamResponse:
    """Drop the TCP connection with a RST and no reply."""
    transport = request.transport
    if transport is not None:
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        transport.abort()
    return web.Response(status=500)


def fault_response(request: web.Request, name: str, faults: StsFaults) -> web.StreamResponse:
    """The answer an early fault gives instead of STS's."""
    if name == "reset_connection":
        return _reset_connection(request)
    if name == "throttle":
        code = faults.throttle_code
        status, message = CATALOGUE.get(code, (400, "Request was denied due to flow control."))
        return error_response(request, status, code, message)
    if name == "malformed_body":
        return web.Response(text="<html>upstream proxy error", content_type="application/json")
    status = faults.error_status or 500
    code = "ServiceUnavailable" if status == 503 else "InternalError"
    return error_response(request, status, code, CATALOGUE[code][1])
