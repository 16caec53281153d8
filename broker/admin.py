"""The local admin channel: a unix socket per process to show and revoke a caller's credentials.

Off unless ``admin.socket_dir`` is set.  Safe by construction rather than by
a token: the directory is made 0700 and each socket 0600, so only the
broker's user (and root) can reach it, and each connection's peer uid is
checked (``SO_PEERCRED``) as well.  Nothing is ever reachable over TCP, unlike
``/metrics``.  One request, one reply, each a JSON line::

    {"op": "cached", "callers": ["svc-a"], "subjects": []}
    {"op": "revoke", "callers": ["svc-a"], "subjects": ["user-7"]}

Replies never hold a secret or a token: policy scope digest, role, session
name, AccessKeyId, expiry and where the entry lives (memory or redis).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import stat
import struct
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import structlog

from broker.auth import Revocations, revoked_session_names
from broker.credentials.redis import SharedCacheUnavailable
from broker.credentials.shared_store import SharedCredentialCache
from broker.revocation import listen_for_revocations, revoke
from broker.services import Services

__all__ = ["MAX_REQUEST_BYTES", "admin_channel", "handle", "serve_admin_socket", "socket_path"]

log = structlog.get_logger("broker.admin")

MAX_REQUEST_BYTES = 64 * 1024
_READ_TIMEOUT_SECONDS = 5.0


def socket_path(socket_dir: Path, pid: int | None = None) -> Path:
    """This process's admin socket in ``socket_dir``."""
    return socket_dir / f"broker-{os.getpid() if pid is None else pid}.sock"


async def admin_channel(services: Services) -> AsyncIterator[None]:
    """A cleanup context: the revocation listener (Redis) and the admin socket (if configured)."""
    listener = asyncio.get_running_loop().create_task(listen_for_revocations(services))
    server = None
    socket_dir = services.settings.admin.socket_dir
    if socket_dir is not None:
        server = await serve_admin_socket(services, socket_dir)
    try:
        yield
    finally:
        listener.cancel()
        if server is not None:
            server.close()
            with contextlib.suppress(FileNotFoundError):
                socket_path(socket_dir or Path()).unlink()


async def serve_admin_socket(services: Services, socket_dir: Path) -> asyncio.Server:
    """Listen on ``socket_dir/broker-PID.sock``: directory 0700, socket 0600."""
    sock = _bound_socket(socket_dir)
    server = await asyncio.start_unix_server(
        lambda r, w: _connection(services, r, w), sock=sock, limit=MAX_REQUEST_BYTES
    )
    log.info("admin_socket_listening", path=str(socket_path(socket_dir)))
    return server


def _bound_socket(socket_dir: Path) -> socket.socket:
    """A unix socket bound at this process's path, born 0600 (umask), in a 0700 directory."""
    socket_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    socket_dir.chmod(0o700)
    path = socket_path(socket_dir)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()  # a stale socket of a process that had our pid
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    umask = os.umask(0o177)  # no moment with a wider mode
    try:
        sock.bind(str(path))
    finally:
        os.umask(umask)
    path.chmod(stat.S_IRUSR | stat.S_IWUSR)
    return sock


def _peer_uid(writer: asyncio.StreamWriter) -> int | None:
    sock = writer.get_extra_info("socket")
    if sock is None or not hasattr(socket, "SO_PEERCRED"):
        return None
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return int(struct.unpack("3i", creds)[1])


async def _connection(
    services: Services, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    try:
        uid = _peer_uid(writer)
        if uid is not None and uid not in (0, os.getuid()):
            reply: dict[str, Any] = {"ok": False, "error": "not the broker's user"}
        else:
            async with asyncio.timeout(_READ_TIMEOUT_SECONDS):
                line = await reader.readline()
            reply = await handle(services, line)
        writer.write(json.dumps(reply).encode() + b"\n")
        await writer.drain()
    except (TimeoutError, ValueError, OSError) as err:  # too long, too slow, gone
        log.warning("admin_request_failed", error=type(err).__name__)
    finally:
        writer.close()


def _revocations(request: dict[str, Any]) -> Revocations:
    callers, subjects = request.get("callers", []), request.get("subjects", [])
    if not isinstance(callers, list) or not isinstance(subjects, list):
        raise ValueError("callers and subjects are lists of names")
    names = [*callers, *subjects]
    if not names or not all(isinstance(name, str) and name for name in names):
        raise ValueError("give callers and/or subjects as lists of names")
    return Revocations(frozenset(callers), frozenset(subjects))


async def handle(services: Services, line: bytes) -> dict[str, Any]:
    """One admin request (a JSON line) → its reply."""
    try:
        request = json.loads(line)
        if not isinstance(request, dict):
            raise ValueError("a request is a JSON object")
        op, who = request.get("op"), _revocations(request)
    except ValueError as err:
        return {"ok": False, "error": str(err)}
    if op == "cached":
        return {"ok": True, "pid": os.getpid(), "entries": await _cached(services, who)}
    if op == "revoke":
        report = await revoke(services, who)
        log.warning("admin_revoked", callers=sorted(who.callers), subjects=sorted(who.subjects))
        return {
            "ok": True,
            "pid": os.getpid(),
            "purged": {"memory": report.memory, "redis": report.redis},
        }
    return {"ok": False, "error": "op must be cached or revoke"}


async def _cached(services: Services, who: Revocations) -> list[dict[str, Any]]:
    names = revoked_session_names(who)
    shown: list[dict[str, Any]] = [
        {
            "source": "memory",
            "role_session_name": entry.key.role_session_name,
            "role_arn": entry.key.role_arn,
            "policy_digest": entry.key.policy_digest,
            "duration_seconds": entry.key.duration_seconds,
            "access_key_id": entry.access_key_id,
            "expires_at": entry.expires_at,
        }
        for entry in services.cache.entries(names)
    ]
    cache = services.cache
    if isinstance(cache, SharedCredentialCache):
        with contextlib.suppress(SharedCacheUnavailable):
            for held in await cache.shared.store.held(names):
                shown.append(
                    {
                        "source": "redis",
                        "redis_key": held.value_key,
                        "access_key_id": held.access_key_id,
                        "expires_at": held.expires_at,
                    }
                )
    return shown
