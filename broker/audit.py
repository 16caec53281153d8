"""Audit records: one JSON line per issuance and per authorization refusal, on a sink of its own.

Independent of ``logging.level`` and of the log stream, every credentials reply
(cache hit or not), presigned URL and post policy, and every 401/403 refusal,
writes exactly one record to ``audit.sink`` (``stdout``, ``stderr`` or a file).
A record says who asked (caller, auth method, client address, request id),
for what (policy, role, bucket, prefix or key, actions, the sha256 of the
rendered policy) and what was handed out (AccessKeyId, expiry, cache source,
the RequestId of the AssumeRole call that minted the token).  Never a secret:
records are built from named fields only, and the log's scrub of named
secrets (``access_token=``, signatures, ``Bearer``...) runs over every line
whose values may hold one; not its shape masking, which would hide the opaque
identifiers a record must keep (JWT subjects, object keys).  The fields:
docs/deployment.md, "Audit trail".  Rendering: ``broker.audit_render`` (an
issuance's fixed fields are rendered once per caller, scope and token).

Records never make the event loop wait on a write (``broker.audit_writer``)::

    request ─record─▶ this loop iteration's batch ─▶ writer thread ─▶ one write(2) (+ fsync)
       ▲                                                                │
       └── audit.mode required: the issuance waits for its batch ◀──────┘ call_soon_threadsafe

``best_effort`` (the default) hands the record over and replies at once; a
record that cannot be written (full buffer, write error) is counted in
``broker_audit_failures_total`` and logged.  ``required`` (Vault's stance: no
record, no issuance) waits until the batch holding the record is written; a
write error, a full buffer or ``write_timeout_seconds`` without an answer
refuse the issuance with 503 ``AuditUnavailable`` before any credential is put
in a reply.  A record that timed out may still reach the sink later: an
issuance may be on record that was refused in the end, never the reverse.
Refusals are never held up: they issue nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

import structlog

from broker import request_context
from broker.audit_render import IssuanceRenderer, RecordParts, render_line, who
from broker.audit_writer import AuditWriter, Entry, open_file
from broker.config import AUDIT_STREAMS, AuditSettings
from broker.errors import AuditUnavailable, BrokerError, ConfigError
from broker.metrics import Metrics
from broker.models import Clock, Credentials, Principal
from broker.scopes import Scope

__all__ = [
    "HAND_OVER_LINES",
    "HAND_OVER_SECONDS",
    "REFUSAL_STATUSES",
    "Auditor",
    "IssuanceEvent",
    "check_sink",
    "open_auditor",
]

log = structlog.get_logger("broker.audit")

IssuanceEvent = Literal["credentials_issued", "url_presigned", "post_policy_signed"]
REFUSAL_STATUSES = frozenset({401, 403})
"""Replies that are refusals for authorization reasons, and so audited."""

_STREAM_FDS = {"stdout": 1, "stderr": 2}
_EVENTS = ("credentials_issued", "url_presigned", "post_policy_signed", "request_refused")
_REASONS = ("write_error", "buffer_full", "timeout", "closed")
HAND_OVER_SECONDS = 0.01
"""How long ``best_effort`` records are gathered before the writer thread is woken."""
HAND_OVER_LINES = 512
"""Or how many: a batch this large is handed over at once."""
_MILLIS = tuple(f".{millis:03d}Z" for millis in range(1000))
"""A record's ``time`` ends in one of these (formatting them per record costs more)."""


class Auditor:
    """Writes the audit records of one broker and counts them; the use cases call it.

    ``issued`` returns once the record is handed over (``best_effort``) or
    written (``required``, else ``AuditUnavailable``); ``refused`` never waits.
    """

    def __init__(
        self, settings: AuditSettings, writer: AuditWriter, metrics: Metrics, clock: Clock
    ) -> None:
        self._settings = settings
        self._required = settings.mode == "required"
        self._writer = writer
        self._clock = clock
        # Every child bound (and so exported, at 0) from the start: dashboards and alerts see them.
        self._written = {event: metrics.audit_records.labels(event) for event in _EVENTS}
        self._failed = {reason: metrics.audit_failures.labels(reason) for reason in _REASONS}
        self._pending: list[Entry] = []
        self._pending_loop: asyncio.AbstractEventLoop | None = None
        self._soon = False  # a hand-over at the end of this loop iteration is scheduled
        self._second = -1
        self._second_text = ""
        self._failing = False
        self._render = IssuanceRenderer()

    async def issued(
        self,
        event: IssuanceEvent,
        principal: Principal,
        scope: Scope,
        token: Credentials,
        *,
        cache: str,
        expiration: str,
        expires_in: int,
        **detail: object,
    ) -> None:
        """Record one issuance: what ``principal`` got under ``scope`` from ``token``."""
        line = self._line(event, principal, scope, token, (expiration, expires_in, cache), detail)
        if self._required:
            await self._written_within(self._settings.write_timeout_seconds, line, event)
        else:
            self._hand(line, event, None)

    @property
    def waits(self) -> bool:
        """Whether an issuance waits for its record to be written (``audit.mode: required``)."""
        return self._required

    def handed(
        self,
        event: IssuanceEvent,
        principal: Principal,
        scope: Scope,
        token: Credentials,
        *,
        cache: str,
        expiration: str,
        expires_in: int,
    ) -> None:
        """``issued`` without waiting, for ``best_effort`` (``waits`` False): the hot path's."""
        if self._required:
            raise RuntimeError("audit.mode required: use issued() and wait for the write")
        line = self._line(event, principal, scope, token, (expiration, expires_in, cache), {})
        self._hand(line, event, None)

    def record_parts(
        self,
        event: IssuanceEvent,
        principal: Principal,
        scope: Scope,
        token: Credentials,
        *,
        cache: str,
        expiration: str,
    ) -> RecordParts | None:
        """The current request's records of this issuance, but their time, request id and
        ``expires_in`` (``IssuanceRenderer.spliced``): for ``handed_parts``."""
        context = request_context.current()
        return self._render.spliced(context, event, principal, scope, token, expiration, cache)

    def handed_parts(
        self, event: IssuanceEvent, parts: RecordParts, request_id: str, expires_in: int
    ) -> None:
        """``handed`` for the record ``parts`` make with ``request_id`` and ``expires_in``."""
        if self._required:
            raise RuntimeError("audit.mode required: use issued() and wait for the write")
        self._hand(parts.line(self._now(), request_id, expires_in), event, None)

    def _line(
        self,
        event: IssuanceEvent,
        principal: Principal,
        scope: Scope,
        token: Credentials,
        tail: tuple[str, int, str],
        detail: Mapping[str, object],
    ) -> bytes:
        """An issuance record of the current request, rendered; ``tail``: expiration, in, cache."""
        context = request_context.current()
        return self._render.line(context, event, self._now(), principal, scope, token, tail, detail)

    def refused(self, err: BrokerError) -> None:
        """Record a refusal for authorization reasons (401/403) of the current request."""
        context = request_context.current()
        record = who(context, "refusal", "request_refused", self._now())
        record.update(status=err.status, error_code=err.code, reason=err.message)
        self._hand(render_line(record), "request_refused", None)

    async def flushed(self) -> None:
        """Return once every record handed over so far has been written or has failed (counted)."""
        with contextlib.suppress(AuditUnavailable):
            await self._written_within(None, b"", None)

    def reopen(self) -> None:
        """Open the sink's file anew (after log rotation moved it); streams stay as they are.

        Called on SIGHUP.  If the file cannot be opened, records keep going to the old one.
        """
        if self._settings.sink in AUDIT_STREAMS:
            return
        try:
            fd = open_file(Path(self._settings.sink))
        except ConfigError as err:
            log.error("audit_reopen_failed", problem=err.problems[0])
            return
        self._writer.replace_fd(fd)
        log.info("audit_sink_reopened", sink=self._settings.sink)

    async def close(self) -> None:
        """Write what is pending (waiting up to ``write_timeout_seconds``), then close the sink."""
        with contextlib.suppress(AuditUnavailable):  # counted and logged; shutting down anyway
            await self._written_within(self._settings.write_timeout_seconds, b"", None)
        self._writer.close()

    def _now(self) -> str:
        """The clock as ``2026-11-21T04:46:00.123Z``; the seconds are formatted once per second."""
        now = self._clock()
        second = int(now)
        if second != self._second:
            self._second = second
            self._second_text = datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%S")
        millis = int((now - second) * 1000)
        return self._second_text + (_MILLIS[millis] if 0 <= millis < 1000 else f".{millis:03d}Z")

    async def _written_within(self, seconds: float | None, line: bytes, event: str | None) -> None:
        """Hand ``line`` over and wait until its batch is written; ``AuditUnavailable`` if not."""
        waiter: asyncio.Future[str | None] = asyncio.get_running_loop().create_future()
        self._hand(line, event, waiter)
        try:
            async with asyncio.timeout(seconds):
                error = await waiter
        except TimeoutError:
            self._note_failure("timeout", 1 if event is not None else 0, "timed out")
            raise AuditUnavailable(reason="timeout") from None
        if error is not None:
            raise AuditUnavailable(reason=error)

    def _hand(
        self, line: bytes, event: str | None, waiter: asyncio.Future[str | None] | None
    ) -> None:
        """Add a line to the batch handed to the writer within ``HAND_OVER_SECONDS``.

        Each hand-over wakes the writer thread, which then competes with the
        loop for the GIL, so ``best_effort`` records are gathered for up to 10 ms
        (or ``HAND_OVER_LINES``); a line someone waits for (``required``, a
        flush, closing) is handed over, with what was gathered, at the end of
        this loop iteration.
        """
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            entries: list[Entry] = [(line, event, waiter)]
            self._settle(entries, self._writer.write_now(entries))
            return
        if not self._pending or self._pending_loop is not loop:
            if self._pending:  # left by a loop that closed before handing them over
                self._pending = [(text, name, None) for text, name, _ in self._pending]
            self._pending_loop = loop
            loop.call_later(HAND_OVER_SECONDS, self._hand_over, loop)
        self._pending.append((line, event, waiter))
        if not self._soon and (waiter is not None or len(self._pending) >= HAND_OVER_LINES):
            self._soon = True
            loop.call_soon(self._hand_over, loop)

    def _hand_over(self, loop: asyncio.AbstractEventLoop) -> None:
        self._soon = False
        entries, self._pending = self._pending, []
        if not entries:
            return

        def settle(done: Sequence[Entry], error: str | None) -> None:
            """In the writer thread: a plain success is counted here, the rest on the loop."""
            if error is None and not self._failing and _nobody_waits(done):
                self._count_written(done)  # prometheus counters are thread-safe
                return
            with contextlib.suppress(RuntimeError):  # a closed loop: nobody waits any more
                loop.call_soon_threadsafe(self._settle, done, error)

        refused = self._writer.submit(entries, settle)
        if refused:
            self._settle(refused, "closed" if self._writer.closed else "buffer_full")

    def _settle(self, entries: Sequence[Entry], error: str | None) -> None:
        """On the loop: count the outcome, log a change of health, wake whoever waits."""
        records = [event for _, event, _ in entries if event is not None]
        if error is None and records:
            self._count_written(entries)
            if self._failing:
                self._failing = False
                log.warning("audit_write_recovered", sink=self._settings.sink)
        elif error is not None:
            reason = error if error in ("buffer_full", "closed") else "write_error"
            self._note_failure(reason, len(records), error)
        for _, _, waiter in entries:
            if waiter is not None and not waiter.done():
                waiter.set_result(error)

    def _count_written(self, entries: Sequence[Entry]) -> None:
        for event, count in Counter(event for _, event, _ in entries if event is not None).items():
            self._written[event].inc(count)

    def _note_failure(self, reason: str, records: int, error: str) -> None:
        if records:
            self._failed[reason].inc(records)
        if not self._failing:
            self._failing = True
            log.error("audit_write_failed", sink=self._settings.sink, reason=reason, error=error)


def check_sink(settings: AuditSettings) -> None:
    """``ConfigError`` if ``settings.sink`` could not be opened for appending (creates nothing).

    For ``sts-broker check`` and before ``serve --workers N`` starts its workers.
    """
    if settings.sink in AUDIT_STREAMS:
        return
    path = Path(settings.sink)
    problem = None
    if path.is_dir():
        problem = "it is a folder"
    elif path.exists():
        problem = None if os.access(path, os.W_OK) else "it is not writable"
    elif not path.parent.is_dir():
        problem = f"the folder {path.parent} does not exist"
    elif not os.access(path.parent, os.W_OK | os.X_OK):
        problem = f"it cannot be created in {path.parent}"
    if problem is not None:
        raise ConfigError([f"audit.sink: cannot open {path}: {problem}"])


def open_auditor(settings: AuditSettings, metrics: Metrics, clock: Clock) -> Auditor:
    """The auditor writing to ``settings.sink``; ``ConfigError`` if that cannot be opened."""
    if settings.sink in AUDIT_STREAMS:
        fd = os.dup(_STREAM_FDS[settings.sink])
    else:
        fd = open_file(Path(settings.sink))
    writer = AuditWriter(
        fd, owns_fd=True, max_buffer_bytes=settings.max_buffer_bytes, fsync=settings.fsync
    )
    return Auditor(settings, writer, metrics, clock)


def _nobody_waits(entries: Sequence[Entry]) -> bool:
    """Whether no entry has a waiter (``best_effort`` records): nothing to wake on the loop."""
    return all(waiter is None for _, _, waiter in entries)
