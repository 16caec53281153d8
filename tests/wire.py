"""Talking to a test broker on the wire: JSON requests, raw bytes, and the error code of a reply.

For the hostile-input tests, which send what a client library would refuse to send.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from tests.conftest import CALLERS, BrokerHarness

__all__ = [
    "ALICE_KEY",
    "POST_POLICY",
    "PRESIGN",
    "bearer_header",
    "error_code",
    "post_json",
    "raw_request",
    "raw_status",
    "send",
    "send_raw",
]

PRESIGN = {
    "policy": "avatar-upload",
    "key": "avatars/alice/me.png",
    "content_type": "image/png",
    "content_length": 1024,
}
POST_POLICY = {"policy": "avatar-upload", "content_type": "image/png"}
ALICE_KEY = CALLERS["alice"][0]


async def send(
    broker: BrokerHarness,
    method: str,
    path: str,
    *,
    data: bytes | None = None,
    caller: str | None = "alice",
    headers: dict[str, str] | None = None,
) -> tuple[int, Any]:
    """Send one request; the status and the JSON reply (or the text, if it is not JSON)."""
    sent = {**(broker.auth(caller) if caller else {}), **(headers or {})}
    async with broker.client.request(method, path, data=data, headers=sent) as resp:
        text = await resp.text()
        try:
            return resp.status, json.loads(text)
        except ValueError:
            return resp.status, text


async def post_json(
    broker: BrokerHarness, path: str, body: Any, caller: str = "alice"
) -> tuple[int, Any]:
    """POST ``body`` as JSON; the status and the JSON reply."""
    return await send(broker, "POST", path, data=json.dumps(body).encode(), caller=caller)


async def send_raw(broker: BrokerHarness, request: bytes) -> bytes:
    """Write ``request`` verbatim to the broker's socket and read the reply to EOF."""
    reader, writer = await asyncio.open_connection(broker.client.host, broker.client.port)
    try:
        writer.write(request)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), timeout=10)
    finally:
        writer.close()
        await writer.wait_closed()


def raw_request(target: bytes, *headers: bytes, method: bytes = b"GET", body: bytes = b"") -> bytes:
    """An HTTP/1.1 request as bytes, exactly as given (``Connection: close`` added)."""
    lines = [method + b" " + target + b" HTTP/1.1", b"Host: 127.0.0.1", *headers]
    if body:
        lines.append(b"Content-Length: %d" % len(body))
    return b"\r\n".join([*lines, b"Connection: close", b"", b""]) + body


def raw_status(reply: bytes) -> int:
    """The status code of a raw HTTP reply."""
    return int(reply.split(b" ", 2)[1])


def error_code(reply: Any) -> str:
    """The ``error.code`` of a JSON error reply."""
    assert isinstance(reply, dict), reply
    code: str = reply["error"]["code"]
    return code


def bearer_header() -> bytes:
    """alice's ``Authorization`` header line."""
    return b"Authorization: Bearer " + ALICE_KEY.encode()
