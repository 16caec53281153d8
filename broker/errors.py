"""The broker's one exception tree, and the only place HTTP statuses are chosen.

::

    BrokerError                 500 InternalError
      ConfigError               start-up only: exit code 2, never an HTTP reply
      RequestInvalid            400 RequestInvalid (subclasses refine the code)
        BucketAmbiguous         400 BucketAmbiguous  a multi-bucket policy, and no bucket named
      AuthenticationFailed      401 AuthenticationFailed
      AccessDenied              403 AccessDenied
        TemplateValueRejected   403 TemplateValueRejected  identity value unsafe for a prefix
      NotFound                  404 NotFound
      MethodNotAllowed          405 MethodNotAllowed
      RequestTooLarge           413 RequestTooLarge
      TooManyRequests           429 TooManyRequests   + Retry-After (per-caller quota)
      AuditUnavailable          503 AuditUnavailable  + Retry-After (audit mode required)
      IdentityProviderUnavailable
                                503 IdentityProviderUnavailable + Retry-After  JWKS not loadable
      UpstreamError             502 UpstreamError      STS said no (4xx), or unusable credentials
        UpstreamThrottled       503 UpstreamThrottled  + Retry-After: a Throttling* code
        UpstreamUnavailable     503 UpstreamUnavailable + Retry-After: 5xx, unreachable, no reply
        UpstreamTimeout         504 UpstreamTimeout    + Retry-After: no answer in time

Every class carries its status, a stable ``code``, a message and
``retryable``: whether another attempt may succeed (true for
IdentityProviderUnavailable, UpstreamThrottled, UpstreamUnavailable and
UpstreamTimeout; any instance may say otherwise with the ``retryable=``
keyword).  The retryable classes are the ones a client should simply try
again later, so their replies carry ``Retry-After``: 503 when STS or the
identity provider is busy or down, 504 when STS did not answer within the
deadline (RFC 9110 allows ``Retry-After`` on any reply).  Other keyword arguments
are context: they stay on the exception (``err.context``) for the log, and
reach the reply only where the message template names them (or, for
MethodNotAllowed, as the ``Allow`` header); templates never name secrets.
"""

from __future__ import annotations

from typing import Any, ClassVar

__all__ = [
    "AccessDenied",
    "AuditUnavailable",
    "AuthenticationFailed",
    "BrokerError",
    "BucketAmbiguous",
    "ConfigError",
    "IdentityProviderUnavailable",
    "MethodNotAllowed",
    "NotFound",
    "RequestInvalid",
    "RequestTooLarge",
    "TemplateValueRejected",
    "TooManyRequests",
    "UpstreamError",
    "UpstreamThrottled",
    "UpstreamTimeout",
    "UpstreamUnavailable",
]


class BrokerError(Exception):
    """Base of every error the broker raises on purpose."""

    status: ClassVar[int] = 500
    code: ClassVar[str] = "InternalError"
    fmt: ClassVar[str] = "internal error"
    retryable: bool = False
    """Whether another attempt may succeed; the class default, unless given per instance."""

    def __init__(
        self, message: str | None = None, /, *, retryable: bool | None = None, **context: Any
    ) -> None:
        self.message = message if message is not None else self.fmt.format(**context)
        self.context = context
        if retryable is not None:
            self.retryable = retryable
        super().__init__(self.message)

    @property
    def retry_after_seconds(self) -> int | None:
        """Seconds a client should wait before retrying, when that is known."""
        return None


class ConfigError(BrokerError):
    """Configuration or policy files are invalid; ``problems`` lists each one."""

    code = "ConfigInvalid"
    fmt = "invalid configuration"

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(self.problems) or self.fmt)


class RequestInvalid(BrokerError):
    """The caller sent something malformed or out of range."""

    status = 400
    code = "RequestInvalid"
    fmt = "the request is invalid"


class BucketAmbiguous(RequestInvalid):
    """A presign or post-policy request under a policy granting several buckets names none.

    The message lists the buckets to choose from (the policy's own, not a secret).
    """

    code = "BucketAmbiguous"
    fmt = "this policy grants several buckets; give bucket"


class AuthenticationFailed(BrokerError):
    """No credentials, or credentials that match no caller."""

    status = 401
    code = "AuthenticationFailed"
    fmt = "missing or invalid bearer token"


class AccessDenied(BrokerError):
    """The caller is known but no policy lets it do this.

    Raised identically whether or not the named policy exists, so that
    callers cannot probe for policy names.
    """

    status = 403
    code = "AccessDenied"
    fmt = "policy {policy!r} does not exist or may not be used by this caller"


class TemplateValueRejected(AccessDenied):
    """A caller's identity value cannot be rendered safely into a policy prefix.

    The value is never rendered and never echoed; only the variable's name is.
    """

    code = "TemplateValueRejected"
    fmt = "the caller's {variable} cannot be used in a policy prefix"


class NotFound(BrokerError):
    """No such route."""

    status = 404
    code = "NotFound"
    fmt = "no such endpoint"


class MethodNotAllowed(BrokerError):
    """The route exists but not with this method."""

    status = 405
    code = "MethodNotAllowed"
    fmt = "method not allowed on this endpoint"


class RequestTooLarge(BrokerError):
    """The body exceeded the configured limit."""

    status = 413
    code = "RequestTooLarge"
    fmt = "request body too large"


class _RetryLater(BrokerError):
    """An error the caller should retry after ``retry_after`` seconds (sent as ``Retry-After``)."""

    def __init__(self, message: str | None = None, /, *, retry_after: int = 1, **context: Any):
        self.retry_after = max(1, int(retry_after))
        super().__init__(message, **context)

    @property
    def retry_after_seconds(self) -> int | None:
        return self.retry_after


class TooManyRequests(_RetryLater):
    """This caller is over a per-caller quota (STS calls caused, or requests); retry later."""

    status = 429
    code = "TooManyRequests"
    fmt = "too many requests; retry later"


class AuditUnavailable(_RetryLater):
    """``audit.mode: required`` and the audit record could not be written: nothing is issued."""

    status = 503
    code = "AuditUnavailable"
    fmt = "the audit record could not be written, so nothing was issued; retry later"
    retryable = True


class IdentityProviderUnavailable(_RetryLater):
    """The identity provider's keys (JWKS) cannot be loaded: the caller did nothing wrong.

    A JWT cannot be checked without them, so this is a 503 with ``Retry-After``
    (when the broker will try the provider again), never a 401.
    """

    status = 503
    code = "IdentityProviderUnavailable"
    fmt = "the identity provider's signing keys cannot be loaded; retry later"
    retryable = True


class UpstreamError(BrokerError):
    """STS refused the call (a 4xx answer) or answered with something unusable; not retried."""

    status = 502
    code = "UpstreamError"
    fmt = "STS request failed"


class _RetryableUpstream(_RetryLater, UpstreamError):
    """An STS failure worth retrying after ``retry_after`` seconds (sent as ``Retry-After``)."""

    status = 503
    retryable = True


class UpstreamThrottled(_RetryableUpstream):
    """STS answered with one of its throttling codes."""

    code = "UpstreamThrottled"
    fmt = "STS is throttling requests; retry later"


class UpstreamUnavailable(_RetryableUpstream):
    """STS answered 5xx, could not be reached, or sent no usable reply (reset, garbage, HTML)."""

    code = "UpstreamUnavailable"
    fmt = "STS is temporarily unavailable; retry later"


class UpstreamTimeout(_RetryableUpstream):
    """STS did not answer within the attempt's timeout (``sts.timeout_seconds``, or less)."""

    status = 504
    code = "UpstreamTimeout"
    fmt = "STS did not answer in time; retry later"
