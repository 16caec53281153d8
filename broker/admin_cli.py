"""``sts-broker cached`` and ``sts-broker revoke``: the admin channel's client (``broker.admin``).

Both read the config file for ``admin.socket_dir`` and talk to every broker
process listening there (each of ``serve --workers N`` has its own socket).
Exit codes: 0 done, 1 a process refused or could not be reached, 2 a config
problem (no admin socket configured, no broker listening).
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
from pathlib import Path
from typing import Any

from broker.admin import MAX_REQUEST_BYTES
from broker.config import load_settings
from broker.errors import ConfigError

__all__ = ["add_admin_commands", "ask_all"]

_EXIT_OK, _EXIT_FAILURE, _EXIT_CONFIG = 0, 1, 2
_TIMEOUT_SECONDS = 10.0


def add_admin_commands(sub: Any, config_default: str) -> None:
    """Register ``cached`` and ``revoke`` on the ``sts-broker`` subcommands ``sub``."""
    for name, summary in (
        ("cached", "show what a running broker has cached for a caller (never secrets)"),
        ("revoke", "revoke a caller on a running broker: refuse it and purge its credentials"),
    ):
        command = sub.add_parser(
            name, help=summary, description=summary[0].upper() + summary[1:] + "."
        )
        command.add_argument(
            "--config",
            type=Path,
            default=Path(config_default),
            metavar="FILE",
            help="the broker's config file, for admin.socket_dir (default: %(default)s)",
        )
        command.add_argument(
            "--caller",
            action="append",
            default=[],
            metavar="ID",
            help="an API-key or mTLS caller id (repeatable)",
        )
        command.add_argument(
            "--subject",
            action="append",
            default=[],
            metavar="SUB",
            help="a JWT subject (repeatable)",
        )
        command.set_defaults(run=_run, op=name)


def ask_all(socket_dir: Path, request: dict[str, Any]) -> list[tuple[Path, dict[str, Any]]]:
    """Send ``request`` to every broker socket in ``socket_dir``; each one's reply (or error)."""
    replies = []
    for path in sorted(socket_dir.glob("broker-*.sock")):
        try:
            replies.append((path, _ask(path, request)))
        except (OSError, ValueError) as err:
            replies.append((path, {"ok": False, "error": f"unreachable ({type(err).__name__})"}))
    return replies


def _ask(path: Path, request: dict[str, Any]) -> dict[str, Any]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(_TIMEOUT_SECONDS)
        sock.connect(str(path))
        sock.sendall(json.dumps(request).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n") and len(data) <= 64 * MAX_REQUEST_BYTES:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    reply = json.loads(data)
    if not isinstance(reply, dict):
        raise ValueError("not a JSON object")
    return reply


def _run(args: argparse.Namespace) -> int:
    if not args.caller and not args.subject:
        print(f"sts-broker {args.op}: give --caller ID and/or --subject SUB", file=sys.stderr)
        return _EXIT_CONFIG
    try:
        socket_dir = load_settings(args.config).admin.socket_dir
    except ConfigError as err:
        print("\n".join(err.problems), file=sys.stderr)
        return _EXIT_CONFIG
    if socket_dir is None or not any(socket_dir.glob("broker-*.sock")):
        print(
            f"sts-broker {args.op}: no broker listening (admin.socket_dir in {args.config})",
            file=sys.stderr,
        )
        return _EXIT_CONFIG
    request = {"op": args.op, "callers": args.caller, "subjects": args.subject}
    replies = ask_all(socket_dir, request)
    print(json.dumps([{"socket": str(path), **reply} for path, reply in replies], indent=2))
    return _EXIT_OK if all(reply.get("ok") for _, reply in replies) else _EXIT_FAILURE
