"""µs per audit record: ``Auditor.issued`` for a cached credentials reply, before and after.

Run as ``.venv/bin/python bench/audit_render.py [--calls N] [--runs R] [--batch B]``.

"Before" is the auditor as it was: the former renderer (a dict of ~22 fields
per record, rendered by orjson, its string values joined and scrubbed), kept
as the reference in tests/test_audit_render.py, and the former formatting of
``time``; "after" is ``broker.audit.Auditor`` (``broker.audit_render``: the
fixed middle rendered once per caller, scope and token).  Both run in the same
process, interleaved run by run, on the same record, inside a running event
loop, best_effort mode into /dev/null: each record joins the batch of its loop
iteration, handed to the writer thread (untimed) every B records (50 requests
in flight), then once more with all N records in one batch.  The lines are
first checked byte-identical.  Figure: min of R runs of N calls, per call, and
the floor (a coroutine with the same arguments that does nothing).  Nothing
here is a test: figures depend on the machine.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
import timeit
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests/: the reference

from broker import request_context
from broker.audit import Auditor
from broker.audit_render import IssuanceRenderer
from broker.audit_writer import AuditWriter
from broker.config import AuditSettings
from broker.metrics import Metrics
from broker.models import Credentials, Principal
from broker.policies import load_policies
from broker.request_context import RequestContext
from broker.scopes import Scope
from tests.test_audit_render import reference_issued

REPO = Path(__file__).resolve().parent.parent


class _OldRenderer:
    """The former rendering behind ``IssuanceRenderer.line``'s signature."""

    def line(self, *args: Any) -> bytes:
        return reference_issued(*args)


class _OldAuditor(Auditor):
    """The auditor as it was: the former renderer and the former clock formatting."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self._render = _OldRenderer()  # type: ignore[assignment]

    def _now(self) -> str:
        now = self._clock()
        second = int(now)
        if second != self._second:
            self._second = second
            self._second_text = datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%S")
        return f"{self._second_text}.{int((now - second) * 1000):03d}Z"


# --- the measurement ---


def _sample() -> tuple[Principal, Scope, Credentials]:
    policies = load_policies(REPO / "policies")
    principal = Principal("svc-uploader", ("internal",))
    scope = policies.scope("service-uploads", principal)
    assert scope is not None
    token = Credentials(
        access_key_id="STS.NUxb3bench0000000000000",
        access_key_secret="s" * 30,
        security_token="CAIS" + "t" * 1200,
        expiration=datetime.now(UTC) + timedelta(hours=1),
        sts_request_id="6894B13B-6D71-4EF5-88FA-F32781734A7F",
    )
    return principal, scope, token


def _auditor(kind: type[Auditor]) -> Auditor:
    """An auditor of ``kind`` writing to /dev/null (best_effort), on the real clock."""
    settings = AuditSettings(sink="/dev/null", max_buffer_bytes=256 * 1024 * 1024)
    writer = AuditWriter(
        os.open(os.devnull, os.O_WRONLY), owns_fd=True, max_buffer_bytes=1 << 28, fsync=False
    )
    return kind(settings, writer, Metrics(), time.time)


async def _never_waits(
    event: str, principal: Principal, scope: Scope, token: Credentials, **fields: object
) -> None:
    """The floor: a coroutine with ``issued``'s arguments that does nothing."""


def _caller(issue: Callable[..., Coroutine[Any, Any, None]]) -> Callable[[], None]:
    """One cached credentials reply's call of ``issue``, driven to its end."""
    principal, scope, token = _sample()
    expiration = token.expiration_iso()

    def once() -> None:
        coroutine = issue(
            "credentials_issued",
            principal,
            scope,
            token,
            cache="hit",
            expiration=expiration,
            expires_in=3000,
        )
        try:
            coroutine.send(None)
        except StopIteration:
            return
        raise AssertionError("best_effort issued() waited")

    return once


async def _run(once: Callable[[], None], calls: int, batch: int) -> float:
    """Seconds for ``calls`` calls, the batch handed over (untimed) every ``batch`` calls."""
    total = 0.0
    for _ in range(calls // batch):
        total += timeit.timeit(once, number=batch)
        await asyncio.sleep(0)
    return total


async def _measure(calls: int, runs: int, batch: int) -> dict[str, float]:
    """µs per call, min of ``runs`` runs, the cases interleaved run by run."""
    request_context.begin("5f0c3b8e-6a55-4b1c-9a53-1f0e2d7c9b11", "credentials", "10.1.2.3")
    auditors = {"before": _auditor(_OldAuditor), "after": _auditor(Auditor)}
    cases = {name: _caller(auditor.issued) for name, auditor in auditors.items()}
    cases["floor"] = _caller(_never_waits)
    best = dict.fromkeys(cases, float("inf"))
    for _ in range(runs):
        for name, once in cases.items():
            best[name] = min(best[name], await _run(once, calls, batch))
    for auditor in auditors.values():
        await auditor.close()
    return {name: seconds / calls * 1e6 for name, seconds in best.items()}


def _same_bytes() -> None:
    """The line of the sample record, old and new, must be identical."""
    principal, scope, token = _sample()
    context = RequestContext("req-1", "credentials", "10.1.2.3", principal, "x")
    args: tuple[Any, ...] = (
        context,
        "credentials_issued",
        "2023-11-14T22:13:20.250Z",
        principal,
        scope,
        token,
        (token.expiration_iso(), 3000, "hit"),
        {},
    )
    new, old = IssuanceRenderer().line(*args), reference_issued(*args)
    if new != old:
        sys.exit(f"the lines differ:\n{new!r}\n{old!r}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=20_000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--batch", type=int, default=50, help="records per loop iteration")
    args = parser.parse_args(argv)
    _same_bytes()
    for batch in (args.batch, args.calls):
        figures = asyncio.run(_measure(args.calls, args.runs, batch))
        before, after, floor = figures["before"], figures["after"], figures["floor"]
        print(
            f"Auditor.issued, cached credentials, min of {args.runs} runs x {args.calls:,} "
            f"calls, {batch:,} records per loop iteration:"
        )
        print(f"  before  {before:5.2f} µs per record")
        print(f"  after   {after:5.2f} µs per record  ({after / before:.0%} of before)")
        print(f"  (floor: calling a coroutine that does nothing, {floor:4.2f} µs)")


if __name__ == "__main__":
    main()
