"""Tokens shorter than STS's 900 s: RAM's ``acs:CurrentTime`` deadline, rendered at fetch time.

STS issues nothing shorter than 900 s, but a token's inline policy can stop
working sooner: ``DateLessThan`` ``acs:CurrentTime`` (RAM "Policy elements:
Condition"; the key as Alibaba spells it, the time in ISO 8601 UTC,
``2026-11-21T05:00:00Z``).  A request with ``effective_lifetime_seconds``
carries its policy without the deadline, so its cache key stays the same from
one fetch to the next; the deadline (the clock's whole second now, plus the
lifetime) is rendered here, just before each STS attempt, and the token's
``Expiration`` becomes that deadline.  The cache then serves the token until
``refresh_margin_seconds`` before it, and presigned URLs are clamped to it,
as for any token.  The STS token itself stays valid until STS's own
expiration; OSS refuses it after the deadline.
"""

from __future__ import annotations

import math
from dataclasses import replace
from datetime import UTC, datetime

from broker.credentials.cache import Fetch
from broker.errors import BrokerError
from broker.models import AssumeRoleRequest, Clock, Credentials
from broker.names import format_sts_time
from broker.ram import MAX_POLICY_CHARS, with_deadline

__all__ = ["with_effective_lifetime"]


def with_effective_lifetime(fetch: Fetch, clock: Clock) -> Fetch:
    """``fetch`` that renders a request's deadline first and expires its token then."""

    async def fetch_with_deadline(request: AssumeRoleRequest) -> Credentials:
        lifetime = request.effective_lifetime_seconds
        if lifetime is None:
            return await fetch(request)
        deadline = datetime.fromtimestamp(math.floor(clock()) + lifetime, UTC)
        policy = with_deadline(request.policy, format_sts_time(deadline))
        if len(policy) > MAX_POLICY_CHARS:  # scopes.py measured it with the deadline: a bug
            raise BrokerError("the policy with its deadline is over STS's 2,048 characters")
        credentials = await fetch(replace(request, policy=policy, effective_lifetime_seconds=None))
        if credentials.expires_at <= deadline.timestamp():
            return credentials
        return replace(credentials, expiration=deadline)

    return fetch_with_deadline
