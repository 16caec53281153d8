"""The request being handled: one object per request, in one context variable.

The HTTP layer starts it (request id, route, client address); authentication
notes the caller, the use cases the policy.  Two readers share it:

* the audit records (``broker.audit``): who asked, from where, for what;
* the log lines: ``merge_request_context`` adds ``request_id``, ``caller``
  and ``policy`` to every line logged while the request is handled, as
  binding them with ``structlog.contextvars`` did, for one assignment per
  field instead of a context variable each (and no clearing between the
  requests of one connection).

Outside a request (start-up, background tasks) the context is an empty one
that nothing writes to.
"""

from __future__ import annotations

from collections.abc import MutableMapping
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

from broker.models import Principal

__all__ = [
    "RequestContext",
    "begin",
    "current",
    "merge_request_context",
    "note_caller",
    "note_policy",
]


@dataclass(slots=True)
class RequestContext:
    """Who is asking, from where, through which route: filled in as one request is handled."""

    request_id: str | None = None
    route: str | None = None
    client_address: str | None = None
    principal: Principal | None = None
    policy: str | None = None
    log_request_id: str | None = None
    """The id as log lines show it: scrubbed of secret shapes, if the client sent it."""

    def log_fields(self) -> dict[str, Any]:
        """What a log line of this request carries: its id, and caller and policy once known."""
        fields: dict[str, Any] = {}
        if self.request_id is not None:
            fields["request_id"] = self.request_id
        if self.principal is not None:
            fields["caller"] = self.principal.subject
        if self.policy is not None:
            fields["policy"] = self.policy
        return fields


_NONE = RequestContext()
_CURRENT: ContextVar[RequestContext] = ContextVar("broker_request", default=_NONE)


def begin(
    request_id: str,
    route: str | None,
    client_address: str | None,
    log_request_id: str | None = None,
) -> RequestContext:
    """Start the context of a request (the HTTP layer, once per request).

    ``log_request_id``: the id as the log shows it (by default ``request_id``).
    """
    log_id = request_id if log_request_id is None else log_request_id
    context = RequestContext(request_id, route, client_address, log_request_id=log_id)
    _CURRENT.set(context)
    return context


def current() -> RequestContext:
    """The context of the request being handled (an empty one outside a request)."""
    return _CURRENT.get()


def note_caller(principal: Principal) -> None:
    """The request's caller, once authenticated."""
    context = _CURRENT.get()
    if context is not _NONE:
        context.principal = principal


def note_policy(name: str) -> None:
    """The policy the request names."""
    context = _CURRENT.get()
    if context is not _NONE:
        context.policy = name


def merge_request_context(
    logger: Any, method_name: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """structlog processor: the request's id, caller and policy (a line's own fields win)."""
    context = _CURRENT.get()
    if context is not _NONE:
        for name, value in context.log_fields().items():
            event_dict.setdefault(name, value)
    return event_dict
