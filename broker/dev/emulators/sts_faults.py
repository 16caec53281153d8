"""Faults the STS emulator injects on demand, set in code or over ``/__emulator__/faults``.

Each request meets at most one *outcome*, written as a short spec (the same
in Python and in the JSON the admin endpoint takes)::

    ok                      answer normally
    throttle[:CODE]         HTTP 400 + a Throttling code (default Throttling.Api; any Throttling*)
    error:STATUS            a 5xx JSON error: ServiceUnavailable for 503, InternalError otherwise
    error:CODE              an STS error from the catalogue, e.g. error:NoPermission
    html:STATUS             an HTML error page, as a front proxy sends it (e.g. html:502)
    reset                   TCP RST, no reply
    truncated               HTTP 200 whose body stops short of its Content-Length
    garbage                 HTTP 200 application/json whose body is not JSON
    delay:SECONDS           wait that long, then answer normally
    expiration:past | expiration:far_future | expiration:unparseable | expiration:missing
    credentials:missing     HTTP 200 without a Credentials object

Which outcome a request meets, first match wins: the head of ``sequence``
(consumed one per request); every ``every_nth``-th request (counted from when
it was set) meets ``nth_outcome``; ``always``; then the older flags
(``throttle``, ``error_status``, ``reset_connection``, ``malformed_body``,
``omit_credentials``, ``omit_expiration``, ``expired_credentials``).
``delay_seconds`` holds back every answer; ``remaining`` switches the
persistent faults (``always``, the flags, ``delay_seconds``) off after that
many requests.  ``clock_skew_seconds`` is how far STS's clock is ahead of the
emulator's (negative: behind): it moves both the issued ``Expiration`` and the
``x-acs-date`` freshness check, as a real STS with a skewed clock would.
"""

from __future__ import annotations

import math
import socket
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from http import HTTPStatus
from typing import Any, Final

from aiohttp import web

from broker.dev.emulators.sts_errors import CATALOGUE, error_response

__all__ = ["Outcome", "Plan", "StsFaults", "fault_response"]

_EXPIRATION_SPOILERS: Final = frozenset({"past", "far_future", "unparseable", "missing"})
_EARLY: Final = frozenset({"reset", "truncated", "garbage", "html"})
_REFUSALS: Final = frozenset({"throttle", "error"})
_SPOILERS: Final = frozenset({"expiration", "credentials"})
_PERSISTENT: Final = (
    "always",
    "throttle",
    "error_status",
    "reset_connection",
    "malformed_body",
    "omit_credentials",
    "omit_expiration",
    "expired_credentials",
    "delay_seconds",
)


@dataclass(frozen=True)
class Outcome:
    """One request's fault: ``kind`` and its argument; ``label`` names it in the call log."""

    kind: str
    arg: str = ""
    label: str = ""

    @classmethod
    def parse(cls, spec: str) -> Outcome:
        """An outcome from its spec; ``ValueError`` names what is wrong."""
        if not isinstance(spec, str):
            raise ValueError("an outcome is a string such as 'error:500'")
        kind, _, arg = spec.partition(":")
        check = _CHECKS.get(kind)
        if check is None or not check(arg):
            raise ValueError(f"unknown outcome {spec!r}")
        return cls(kind, arg, spec)

    @property
    def early(self) -> bool:
        """Answered before any check of the request (a broken proxy or network)."""
        return self.kind in _EARLY

    @property
    def refusal(self) -> bool:
        """An STS error answer, given after the signature check."""
        return self.kind in _REFUSALS

    @property
    def spoils(self) -> bool:
        """A successful answer with its credentials spoiled."""
        return self.kind in _SPOILERS


def _is_status(arg: str, low: int, high: int) -> bool:
    return arg.isdigit() and low <= int(arg) <= high


def _is_seconds(arg: str) -> bool:
    try:
        seconds = float(arg)
    except ValueError:
        return False
    return math.isfinite(seconds) and 0 <= seconds <= 3600


_CHECKS: Final[Mapping[str, Callable[[str], bool]]] = {
    "ok": lambda arg: arg == "",
    "throttle": lambda arg: arg == "" or arg.startswith("Throttling"),
    "error": lambda arg: _is_status(arg, 500, 599) or arg in CATALOGUE,
    "html": lambda arg: _is_status(arg, 400, 599),
    "reset": lambda arg: arg == "",
    "truncated": lambda arg: arg == "",
    "garbage": lambda arg: arg == "",
    "delay": _is_seconds,
    "expiration": lambda arg: arg in _EXPIRATION_SPOILERS,
    "credentials": lambda arg: arg == "missing",
}


@dataclass(frozen=True)
class Plan:
    """What one request meets: an outcome (None: a normal answer), a delay, STS's clock skew."""

    outcome: Outcome | None
    delay_seconds: float
    clock_skew_seconds: float


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
    always: str | None = None
    sequence: list[str] = field(default_factory=list)
    every_nth: int | None = None
    nth_outcome: str = "error:500"
    clock_skew_seconds: float = 0.0

    def __post_init__(self) -> None:
        self._requests = 0  # since every_nth was set

    def clear(self) -> None:
        """Switch every fault off."""
        for spec in fields(self):
            setattr(self, spec.name, _default(spec.name))
        self._requests = 0

    def active(self) -> bool:
        """Whether a persistent fault (``always``, a flag, a delay) is switched on."""
        return any(getattr(self, name) != _default(name) for name in _PERSISTENT)

    def take(self) -> Plan:
        """The plan for one request; consumes ``sequence``, counts ``every_nth``, ``remaining``."""
        self._requests += 1
        if self.remaining is not None and self.remaining <= 0:
            self._switch_off_persistent()
        outcome = self._scripted()
        delay = self.delay_seconds
        if self.active():
            outcome = outcome or self._persistent()
            self._count_down()
        if outcome is not None and outcome.kind == "delay":
            delay += float(outcome.arg)
        if outcome is not None and outcome.kind in ("delay", "ok"):
            outcome = None
        return Plan(outcome, delay, self.clock_skew_seconds)

    def update(self, changes: Mapping[str, Any]) -> None:
        """Set fields from a JSON object; ValueError names the first bad one."""
        for name, value in changes.items():
            validate = _VALIDATORS.get(name)
            if validate is None:
                raise ValueError(f"unknown fault {name!r}")
            if not validate(value):
                raise ValueError(f"bad value for fault {name!r}")
        for name, value in changes.items():
            setattr(self, name, list(value) if name == "sequence" else value)
        if "every_nth" in changes:
            self._requests = 0

    def _scripted(self) -> Outcome | None:
        if self.sequence:
            return Outcome.parse(self.sequence.pop(0))
        if self.every_nth and self._requests % self.every_nth == 0:
            return Outcome.parse(self.nth_outcome)
        return None

    def _persistent(self) -> Outcome | None:
        """The outcome ``always`` or the older flags give, if any."""
        if self.always is not None:
            return Outcome.parse(self.always)
        status = str(self.error_status)
        flags = (
            (self.reset_connection, Outcome("reset", label="reset_connection")),
            (self.throttle, Outcome("throttle", self.throttle_code, "throttle")),
            (self.malformed_body, Outcome("garbage", label="malformed_body")),
            (self.error_status is not None, Outcome("error", status, "error_status")),
            (self.omit_credentials, Outcome("credentials", "missing", "omit_credentials")),
            (self.omit_expiration, Outcome("expiration", "missing", "omit_expiration")),
            (self.expired_credentials, Outcome("expiration", "past", "expired_credentials")),
        )
        return next((outcome for on, outcome in flags if on), None)

    def _count_down(self) -> None:
        if self.remaining is not None:
            self.remaining -= 1
            if self.remaining <= 0:
                self._switch_off_persistent()

    def _switch_off_persistent(self) -> None:
        for name in (*_PERSISTENT, "remaining"):
            setattr(self, name, _default(name))


def _default(name: str) -> Any:
    value = _DEFAULTS[name]
    return list(value) if isinstance(value, list) else value


def _is_number(value: object, *, signed: bool = False) -> bool:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return False
    return signed or value >= 0


def _is_count(value: object) -> bool:
    return value is None or (isinstance(value, int) and not isinstance(value, bool) and value >= 0)


def _is_spec(value: object) -> bool:
    try:
        Outcome.parse(value)  # type: ignore[arg-type]
    except ValueError:
        return False
    return True


_VALIDATORS: Final[Mapping[str, Callable[[Any], bool]]] = {
    "delay_seconds": lambda value: _is_number(value) and value <= 3600,
    "throttle": lambda value: isinstance(value, bool),
    "throttle_code": lambda value: isinstance(value, str) and value.startswith("Throttling"),
    "error_status": lambda value: value is None or _is_status(str(value), 400, 599),
    "reset_connection": lambda value: isinstance(value, bool),
    "malformed_body": lambda value: isinstance(value, bool),
    "omit_credentials": lambda value: isinstance(value, bool),
    "omit_expiration": lambda value: isinstance(value, bool),
    "expired_credentials": lambda value: isinstance(value, bool),
    "remaining": _is_count,
    "always": lambda value: value is None or _is_spec(value),
    "sequence": lambda value: isinstance(value, list) and all(_is_spec(item) for item in value),
    "every_nth": lambda value: value is None or (_is_count(value) and value >= 1),
    "nth_outcome": _is_spec,
    "clock_skew_seconds": lambda value: _is_number(value, signed=True) and abs(value) <= 86400,
}

_PRISTINE: Final = StsFaults()
_DEFAULTS: Final[Mapping[str, Any]] = {
    spec.name: getattr(_PRISTINE, spec.name) for spec in fields(StsFaults)
}


def _reset_connection(request: web.Request) -> web.StreamResponse:
    """Drop the TCP connection with a RST and no reply."""
    transport = request.transport
    if transport is not None:
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        transport.abort()
    return web.Response(status=500)


async def _truncated(request: web.Request) -> web.StreamResponse:
    """A 200 that promises more body than it sends, then closes the connection."""
    partial = b'{"RequestId":"6C5B0C4E","Credentials":{"AccessKeyId":"STS.NUg'
    response = web.StreamResponse(status=200, headers={"Content-Type": "application/json"})
    response.content_length = len(partial) + 512
    await response.prepare(request)
    await response.write(partial)
    return _reset_connection(request)


def _html_page(status: int) -> web.Response:
    """The error page a front proxy (Tengine, as Alibaba's gateways run) sends."""
    title = f"{status} {HTTPStatus(status).phrase}"
    page = (
        f"<html>\r\n<head><title>{title}</title></head>\r\n<body>\r\n"
        f"<center><h1>{title}</h1></center>\r\n<hr><center>Tengine</center>\r\n"
        "</body>\r\n</html>\r\n"
    )
    return web.Response(status=status, text=page, content_type="text/html")


async def fault_response(request: web.Request, outcome: Outcome) -> web.StreamResponse:
    """The answer an early fault or a refusal gives instead of STS's."""
    if outcome.kind == "reset":
        return _reset_connection(request)
    if outcome.kind == "truncated":
        return await _truncated(request)
    if outcome.kind == "garbage":
        body = b'\x00\x1f\x8b<html>upstream proxy error {"Request'
        return web.Response(body=body, content_type="application/json")
    if outcome.kind == "html":
        return _html_page(int(outcome.arg))
    if outcome.kind == "throttle":
        code = outcome.arg or "Throttling.Api"
        status, message = CATALOGUE.get(code, (400, "Request was denied due to flow control."))
        return error_response(request, status, code, message)
    if outcome.arg in CATALOGUE:
        status, message = CATALOGUE[outcome.arg]
        return error_response(request, status, outcome.arg, message)
    status = int(outcome.arg)
    code = "ServiceUnavailable" if status == 503 else "InternalError"
    return error_response(request, status, code, CATALOGUE[code][1])
