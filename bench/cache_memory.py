"""Resident memory of the broker's CredentialCache holding N distinct scopes.

Run as ``python bench/cache_memory.py [--scopes 100000]``; prints one JSON
object.  STS is bypassed: ``fetch`` returns fresh random credentials of STS's
sizes at once, because 100,000 real AssumeRole calls would take minutes under
the STS call budget (20/s by default, ~100/s per account at most).  Each scope
is a distinct caller's policy rendered by ``broker.policies`` exactly as a
request would render it, then dropped, so the figure is what the cache keeps.
The broker's HTTP modules are imported first, so the "before" figure is a
comparable starting point (aiohttp, structlog, pydantic, the STS SDK loaded).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import gc
import importlib
import json
import os
import random
import string
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

from broker.auth import role_session_name
from broker.credentials.cache import CredentialCache
from broker.models import AssumeRoleRequest, Credentials, Principal, system_clock
from broker.policies import Policy, load_policies, render_policy, render_prefix

__all__ = ["main", "measure"]

POLICIES_DIR = Path(__file__).resolve().parent.parent / "policies"
_ALPHANUMERIC = string.ascii_letters + string.digits
# Three browser scopes to one service scope: ~220 characters per policy on average.
_MIX = (("avatar-upload", "browser"),) * 3 + (("service-uploads", "internal"),)


def _rss_kb() -> int:
    """VmRSS of this process, in kB, from /proc/self/status."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS in /proc/self/status")


def _random_text(length: int) -> str:
    return "".join(random.choices(_ALPHANUMERIC, k=length))


async def _fake_sts(_request: AssumeRoleRequest) -> Credentials:
    """Credentials shaped like STS's: 28-char id, 44-char secret, ~600-char token."""
    return Credentials(
        access_key_id="STS." + _random_text(24),
        access_key_secret=_random_text(44),
        security_token="CAIS" + base64.b64encode(random.randbytes(447)).decode(),
        expiration=datetime.now(UTC) + timedelta(hours=1),
    )


def _request_for(policy: Policy, group: str) -> AssumeRoleRequest:
    """The AssumeRoleRequest a new caller (a UUID subject) would make for ``policy``."""
    principal = Principal(subject=str(uuid.uuid4()), groups=(group,))
    document = render_policy(policy, render_prefix(policy, principal))
    return AssumeRoleRequest(
        role_arn=policy.role_arn,
        policy=document,
        duration_seconds=policy.duration_seconds,
        role_session_name=role_session_name(principal),
        external_id=policy.external_id,
    )


async def measure(scopes: int) -> dict[str, float]:
    """Fill a cache with ``scopes`` distinct scopes; RSS before and after, in MB."""
    importlib.import_module("broker.http.app")  # what a running broker has loaded
    policies = load_policies(POLICIES_DIR)
    mix = [(policies.policies[name], group) for name, group in _MIX]
    cache = CredentialCache(
        _fake_sts,
        clock=system_clock,
        refresh_margin_seconds=60,
        max_entries=200_000,
        refresh_fraction=0.5,
    )
    gc.collect()
    before_kb = _rss_kb()
    started = time.perf_counter()
    policy_chars = 0
    for index in range(scopes):
        request = _request_for(*mix[index % len(mix)])
        policy_chars += len(request.policy)
        await cache.get(request)
    seconds = time.perf_counter() - started
    gc.collect()
    after_kb = _rss_kb()
    if len(cache) != scopes:
        raise RuntimeError(f"cache holds {len(cache)} entries, expected {scopes}")
    return {
        "scopes": scopes,
        "entries": len(cache),
        "mean_policy_chars": policy_chars / scopes,
        "rss_before_mb": before_kb / 1024,
        "rss_after_mb": after_kb / 1024,
        "delta_mb": (after_kb - before_kb) / 1024,
        "fill_seconds": seconds,
        "pid": os.getpid(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scopes", type=int, default=100_000)
    print(json.dumps(asyncio.run(measure(parser.parse_args().scopes))))


if __name__ == "__main__":
    main()
