"""The cached-credentials fast lane (broker/http/fast_lane.py), pinned against the general path.

Every request here goes through a real socket to a broker on 127.0.0.1 with
the STS emulator behind it.  The equivalence harness sends one request with
the lane on, then the same request with it off (``app[FAST_LANE].enabled``),
and captures each: status, reply headers, JSON body, the log lines written,
the audit records, the /metrics deltas.  The two must be equal once request
ids, times, durations and the latency histogram are normalised away; the
lane's ``served`` counter says which run the lane answered itself.
Fallbacks (requests the lane must hand to the general path) must leave
``served`` alone and come out as the general path's.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re
import shutil
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import structlog
from cryptography.hazmat.primitives.asymmetric import rsa
from multidict import CIMultiDict
from prometheus_client.parser import text_string_to_metric_families

from broker.auth import Revocations, hash_api_key
from broker.config import QuotaSettings
from broker.http.fast_lane import FastLane
from broker.http.keys import FAST_LANE, REPLIES
from broker.logs import configure_logging
from broker.reload import reload_auth, reload_policies
from broker.revocation import revoke
from tests.conftest import (
    CALLERS,
    POLICIES_DIR,
    BrokerFactory,
    BrokerHarness,
    RedisServer,
    write_jwks,
)
from tests.credentials.test_sealing import keys_document, new_key
from tests.http import test_jwt
from tests.http.test_admissions import _write_auth
from tests.http.test_client_address import _bound_to
from tests.http.test_credentials import PROVIDER_KEY, _as_provider, _restricted_broker
from tests.http.test_jwt import AUDIENCE, ISSUER, _token
from tests.wire import raw_request, send_raw

signing_key = test_jwt.signing_key  # fixture: the identity provider's RSA key

CREDENTIALS = "/v1/credentials/service-uploads"
ORIGIN = "https://app.example.com"
CLIENT_REQUEST_ID = "client-req-0001"
ODD_KEY = "canary-apikey-odd-4f0b"
NORMALISED_FIELDS = frozenset({"request_id", "RequestId", "timestamp", "time", "duration_ms"})
"""Fields that differ between two runs of one request by nature: ids, clocks, durations."""
NORMALISED_HEADERS = frozenset({"x-request-id", "date"})
"""Reply headers that do: the request id, and the wall-clock second the reply was sent."""
LATENCY = "broker_request_duration_seconds"


@pytest.fixture
def log_stream() -> Iterator[io.StringIO]:
    """The daemon's JSON logging chain at debug, written at once into a StringIO; reset after."""
    output = io.StringIO()
    configure_logging("json", "debug", stream=output)
    yield output
    structlog.reset_defaults()
    logging.getLogger().handlers.clear()


@dataclass
class Run:
    """What one request produced: the reply, its log lines, audit records and metric deltas."""

    status: int
    headers: CIMultiDict[str]
    body: Any
    logs: list[dict[str, Any]]
    audit: list[dict[str, Any]]
    metrics: dict[tuple[str, tuple[tuple[str, str], ...]], float]
    served: int

    @property
    def request_id(self) -> str:
        """The request id the body carries (a success's ``RequestId``, an error's)."""
        if "error" in self.body:
            return str(self.body["error"]["request_id"])
        return str(self.body["RequestId"])

    def comparable(self) -> dict[str, Any]:
        """Everything but request ids, times, durations and the latency histogram."""
        headers = sorted(
            (name.lower(), "-" if name.lower() in NORMALISED_HEADERS else value)
            for name, value in self.headers.items()
        )
        return {
            "status": self.status,
            "headers": headers,
            "body": _normalised(self.body),
            "logs": _normalised(self.logs),
            "audit": _normalised(self.audit),
            "metrics": self.metrics,
        }


def _normalised(value: Any) -> Any:
    if isinstance(value, dict):
        return {
            key: "-" if key in NORMALISED_FIELDS else _normalised(item)
            for key, item in value.items()
        }
    if isinstance(value, list):
        return [_normalised(item) for item in value]
    return value


def _samples(text: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample but creation times and the latency histogram's buckets and sum."""
    found = {}
    for family in text_string_to_metric_families(text.decode()):
        for sample in family.samples:
            name = sample.name
            if name.endswith("_created") or name in (f"{LATENCY}_bucket", f"{LATENCY}_sum"):
                continue
            found[(name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


@dataclass
class LaneHarness:
    """A broker with its audit trail in a file and its logs in ``logs``."""

    broker: BrokerHarness
    logs: io.StringIO
    sink: Path

    @property
    def lane(self) -> FastLane:
        fast_lane: FastLane = self.broker.client.app[FAST_LANE]
        return fast_lane

    async def audit_lines(self) -> list[dict[str, Any]]:
        """Every audit record written so far (after the ones handed over are written)."""
        await self.broker.services.audit.flushed()
        text = self.sink.read_text() if self.sink.exists() else ""
        return [json.loads(line) for line in text.splitlines()]

    async def send(
        self,
        path: str = CREDENTIALS,
        caller: str | None = "svc-a",
        headers: Mapping[str, str] | CIMultiDict[str] | None = None,
        *,
        enabled: bool = True,
        method: str = "GET",
        data: bytes | None = None,
    ) -> Run:
        """Send one request with the lane ``enabled`` or not, capturing what it produced."""
        broker, lane = self.broker, self.lane
        lane.enabled = enabled
        served = lane.served
        log_mark = len(self.logs.getvalue())
        audit_mark = len(await self.audit_lines())
        before = _samples(broker.services.metrics.render())
        sent = CIMultiDict(broker.auth(caller) if caller else {})
        sent.extend(headers or {})
        async with broker.client.request(method, path, headers=sent, data=data) as resp:
            status, reply_headers, raw = resp.status, resp.headers.copy(), await resp.read()
        body = json.loads(raw) if raw else None  # HEAD: no body
        audit = (await self.audit_lines())[audit_mark:]  # written and counted: then the metrics
        after = _samples(broker.services.metrics.render())
        deltas = {key: after[key] - before.get(key, 0.0) for key in after}
        logs = self.logs.getvalue()[log_mark:].splitlines()
        return Run(
            status=status,
            headers=reply_headers,
            body=body,
            logs=[json.loads(line) for line in logs],
            audit=audit,
            metrics={key: delta for key, delta in deltas.items() if delta},
            served=lane.served - served,
        )

    async def lane_then_general(
        self,
        path: str = CREDENTIALS,
        caller: str | None = "svc-a",
        headers: Mapping[str, str] | CIMultiDict[str] | None = None,
        **options: Any,
    ) -> tuple[Run, Run]:
        """The same request with the lane on, then off: both runs, asserted equal."""
        on = await self.send(path, caller, headers, enabled=True, **options)
        off = await self.send(path, caller, headers, enabled=False, **options)
        assert on.comparable() == off.comparable()
        assert off.served == 0
        return on, off


LaneFactory = Callable[..., Awaitable[LaneHarness]]


@pytest.fixture
def lane_broker(make_broker: BrokerFactory, log_stream: io.StringIO, tmp_path: Path) -> LaneFactory:
    """A factory: a ``LaneHarness`` for a broker built with ``make_broker(**overrides)``."""

    async def factory(**overrides: Any) -> LaneHarness:
        sink = tmp_path / "audit.jsonl"
        audit = {"sink": str(sink), **overrides.pop("audit", {})}
        broker = await make_broker(audit=audit, **overrides)
        return LaneHarness(broker, log_stream, sink)

    return factory


@pytest.fixture
async def lane(lane_broker: LaneFactory) -> LaneHarness:
    return await lane_broker()


def _expires_at(body: dict[str, Any]) -> float:
    moment = datetime.strptime(body["Expiration"], "%Y-%m-%dT%H:%M:%SZ")
    return moment.replace(tzinfo=UTC).timestamp()


def _events(run: Run) -> list[str]:
    return [line["event"] for line in run.logs]


# 1. Equivalence -------------------------------------------------------------------------------


async def test_a_plain_hit_is_the_general_paths_reply(lane: LaneHarness) -> None:
    """svc-a's cached service-uploads: the lane's reply, lines, record, metrics = the general's."""
    warm = await lane.send()
    assert (warm.status, warm.served) == (200, 0)
    on, off = await lane.lane_then_general()
    assert (on.status, on.served) == (200, 1)
    assert on.body["AccessKeyId"] == warm.body["AccessKeyId"]
    assert on.body["Oss"]["Prefix"] == "services/svc-a/"
    assert _events(on) == _events(off) == ["credentials_issued", "request_finished"]
    assert [record["cache"] for record in on.audit] == ["hit"]
    assert on.metrics[("broker_requests_total", (("route", "credentials"), ("status", "200")))] == 1
    assert lane.broker.sts.emulator.assume_role_calls() == 1


@pytest.mark.parametrize(
    ("caller", "policy"),
    [
        ("svc-reports", "report-jobs"),  # two grants: Oss.Grants
        ("alice", "avatar-upload"),  # a browser group, a 900 s token
        ("svc-a", "pinned-reads"),  # source_ip: caller, bound to the address
        ("alice", "quick-upload"),  # effective_lifetime_seconds 120: an earlier Expiration
    ],
)
async def test_other_callers_and_policies_are_the_general_paths_reply(
    lane: LaneHarness, caller: str, policy: str
) -> None:
    """Another caller and policy (multi-grant, browser, address-bound): the lane = the general."""
    path = f"/v1/credentials/{policy}"
    assert (await lane.send(path, caller)).status == 200
    on, _ = await lane.lane_then_general(path, caller)
    assert (on.status, on.served) == (200, 1)
    if policy == "report-jobs":
        assert len(on.body["Oss"]["Grants"]) == 2


@pytest.mark.parametrize(
    ("path", "headers"),
    [
        (f"{CREDENTIALS}?", {}),  # an empty query
        ("/v1/credentials/service%2Duploads", {}),  # the policy name percent-encoded
        (CREDENTIALS, {"Content-Length": "0"}),  # an empty body, said so
        (CREDENTIALS, {"Origin": ORIGIN}),  # an Origin, no CORS configured
        (CREDENTIALS, {"X-Forwarded-For": "198.51.100.1"}),  # no trusted proxy: ignored
    ],
    ids=["empty-query", "encoded-name", "content-length-0", "origin", "untrusted-xff"],
)
async def test_edge_shapes_of_a_plain_request_are_the_general_paths_reply(
    lane: LaneHarness, path: str, headers: dict[str, str]
) -> None:
    """Plain requests in other shapes (empty query, encoded name...): served, as the general."""
    assert (await lane.send()).status == 200
    on, _ = await lane.lane_then_general(path, headers=headers)
    assert (on.status, on.served) == (200, 1)  # every condition of the lane holds


async def test_default_quotas_the_lane_is_the_general_path(lane_broker: LaneFactory) -> None:
    """With no request rate configured (the default), the lane serves as the general path."""
    harness = await lane_broker(quotas=QuotaSettings().model_dump())
    assert (await harness.send()).status == 200
    on, _ = await harness.lane_then_general()
    assert (on.status, on.served) == (200, 1)


async def test_a_bound_worker_index_is_on_both_lines_of_both_runs(
    lane_broker: LaneFactory,
) -> None:
    """With worker=1 bound as --workers does, both lines of both runs carry worker 1."""
    structlog.contextvars.bind_contextvars(worker=1)
    try:
        harness = await lane_broker()
        assert (await harness.send()).status == 200
        on, off = await harness.lane_then_general()
    finally:
        structlog.contextvars.unbind_contextvars("worker")
    assert on.served == 1
    for run in (on, off):
        assert _events(run) == ["credentials_issued", "request_finished"]
        assert [line["worker"] for line in run.logs] == [1, 1]


async def test_a_redis_backed_cache_hit_is_the_general_paths_reply(
    lane_broker: LaneFactory, redis_server: RedisServer, tmp_path: Path
) -> None:
    """cache.backend: redis: an in-memory hit is the lane's, equal to the general path's."""
    keys = tmp_path / "cache-keys.json"
    keys.write_text(keys_document("k1", k1=new_key()))
    redis = {"url": redis_server.url, "key_prefix": "fast-lane:", "encryption_keys_file": keys}
    harness = await lane_broker(cache={"backend": "redis", "redis": redis})
    assert (await harness.send()).status == 200
    on, _ = await harness.lane_then_general()
    assert (on.status, on.served) == (200, 1)
    assert harness.broker.sts.emulator.assume_role_calls() == 1


async def test_a_caller_named_like_a_secret_is_the_general_paths_reply(
    lane_broker: LaneFactory,
) -> None:
    """A key id holding "auth" and "token" (its record is rendered whole): the general's reply."""
    keys = [
        {"id": caller, "key_sha256": hash_api_key(key), "groups": list(groups)}
        for caller, (key, groups) in CALLERS.items()
    ]
    keys.append(
        {"id": "svc-auth-token", "key_sha256": hash_api_key(ODD_KEY), "groups": ["internal"]}
    )
    harness = await lane_broker(auth={"api_keys": keys})
    odd = {"Authorization": f"Bearer {ODD_KEY}"}
    assert (await harness.send(caller=None, headers=odd)).status == 200
    on, _ = await harness.lane_then_general(caller=None, headers=odd)
    assert (on.status, on.served) == (200, 1)
    assert on.body["Oss"]["Prefix"] == "services/svc-auth-token/"
    assert [record["caller"] for record in on.audit] == ["svc-auth-token"]


async def test_a_bound_list_value_gives_the_general_paths_lines(lane_broker: LaneFactory) -> None:
    """A non-scalar value bound in structlog's context (lines rendered whole): equal lines."""
    structlog.contextvars.bind_contextvars(tags=["blue", "green"])
    try:
        harness = await lane_broker()
        assert (await harness.send()).status == 200
        on, _ = await harness.lane_then_general()
    finally:
        structlog.contextvars.unbind_contextvars("tags")
    assert on.served == 1
    assert [line["tags"] for line in on.logs] == [["blue", "green"]] * 2


# 2. Fallbacks -------------------------------------------------------------------------------


async def test_a_query_string_goes_the_general_way(lane: LaneHarness) -> None:
    """?min_ttl_seconds=0 after a warm-up: not served by the lane, the general path's 200."""
    assert (await lane.send()).status == 200
    on, _ = await lane.lane_then_general(f"{CREDENTIALS}?min_ttl_seconds=0")
    assert (on.status, on.served) == (200, 0)


async def test_a_client_request_id_goes_the_general_way(lane: LaneHarness) -> None:
    """An X-Request-Id header: not served by the lane; the reply and its lines echo the id."""
    assert (await lane.send()).status == 200
    on, off = await lane.lane_then_general(headers={"X-Request-Id": CLIENT_REQUEST_ID})
    assert (on.status, on.served) == (200, 0)
    for run in (on, off):
        assert run.headers["X-Request-Id"] == run.body["RequestId"] == CLIENT_REQUEST_ID
        assert {line["request_id"] for line in run.logs} == {CLIENT_REQUEST_ID}
    after = await lane.send()  # likely on the same kept-alive connection: nothing carried over
    assert after.served == 1
    assert {line["request_id"] for line in after.logs} == {after.body["RequestId"]}
    assert after.body["RequestId"] != CLIENT_REQUEST_ID


async def test_an_unusable_client_request_id_goes_the_general_way(lane: LaneHarness) -> None:
    """An X-Request-Id the broker replaces (too short): not served by the lane, a fresh id."""
    assert (await lane.send()).status == 200
    on, off = await lane.lane_then_general(headers={"X-Request-Id": "short"})
    assert (on.status, on.served) == (200, 0)
    for run in (on, off):
        assert run.headers["X-Request-Id"] == run.body["RequestId"] != "short"


async def test_two_authorization_headers_go_the_general_way(lane: LaneHarness) -> None:
    """The admitted header twice: not served by the lane, the general path's 400."""
    assert (await lane.send()).status == 200
    on, _ = await lane.lane_then_general(headers=lane.broker.auth("svc-a"))
    assert (on.status, on.served) == (400, 0)
    assert on.body["error"]["code"] == "RequestInvalid"


@pytest.mark.parametrize(
    ("policy", "status"),
    [
        ("reports-read", 200),  # allowed, never asked for by svc-a before: resolved the whole way
        ("avatar-upload", 403),  # not svc-a's
        ("no-such-policy", 403),
        ("UPPER", 400),  # not a policy name
    ],
)
async def test_a_policy_not_resolved_before_goes_the_general_way(
    lane: LaneHarness, policy: str, status: int
) -> None:
    """svc-a admitted on service-uploads asks for another policy: the general path answers."""
    assert (await lane.send()).status == 200
    first = await lane.send(f"/v1/credentials/{policy}")
    assert (first.status, first.served) == (status, 0)
    if status != 200:
        on, _ = await lane.lane_then_general(f"/v1/credentials/{policy}")
        assert (on.status, on.served) == (status, 0)


async def test_a_body_goes_the_general_way(lane: LaneHarness) -> None:
    """A GET with a body: not served by the lane, the general path's reply."""
    assert (await lane.send()).status == 200
    on, _ = await lane.lane_then_general(data=b"{}")
    assert (on.status, on.served) == (200, 0)


@pytest.mark.parametrize("method", ["HEAD", "POST"])
async def test_another_method_goes_the_general_way(lane: LaneHarness, method: str) -> None:
    """HEAD (aiohttp's, on the GET route) and POST: never served by the lane, as the general."""
    assert (await lane.send()).status == 200
    on, _ = await lane.lane_then_general(method=method)
    assert on.served == 0
    assert on.status == (200 if method == "HEAD" else 405)


async def test_another_forwarded_address_goes_the_general_way(lane_broker: LaneFactory) -> None:
    """Admitted from one forwarded address, a request from another is not served by the lane."""
    harness = await lane_broker(listen={"trusted_proxies": ["127.0.0.0/8"]})
    path = "/v1/credentials/pinned-reads"
    first, second = ({"X-Forwarded-For": ip} for ip in ("198.51.100.1", "203.0.113.9"))
    assert (await harness.send(path, headers=first)).status == 200
    on_first, _ = await harness.lane_then_general(path, headers=first)
    assert on_first.served == 1
    elsewhere = await harness.send(path, headers=second)
    assert (elsewhere.status, elsewhere.served) == (200, 0)
    assert elsewhere.body["AccessKeyId"] != on_first.body["AccessKeyId"]
    assert [_bound_to(call.params["Policy"]) for call in harness.broker.sts.emulator.calls] == [
        "198.51.100.1",
        "203.0.113.9",
    ]
    on_second, _ = await harness.lane_then_general(path, headers=second)
    assert on_second.served == 1
    assert on_second.body["AccessKeyId"] == elsewhere.body["AccessKeyId"]


async def _from(harness: LaneHarness, address: str, path: str) -> tuple[int, Any, int]:
    """GET ``path`` as svc-a from the loopback ``address``: status, body, and whether served."""
    served = harness.lane.served
    connector = aiohttp.TCPConnector(local_addr=(address, 0))
    async with (
        aiohttp.ClientSession(connector=connector) as session,
        session.get(
            harness.broker.client.make_url(path), headers=harness.broker.auth("svc-a")
        ) as resp,
    ):
        return resp.status, await resp.json(), harness.lane.served - served


async def test_another_client_address_goes_the_general_way(lane: LaneHarness) -> None:
    """Admitted from 127.0.0.1, the same key from 127.0.0.2 is not served until admitted there."""
    path = "/v1/credentials/pinned-reads"
    assert (await _from(lane, "127.0.0.1", path))[0] == 200
    status, here, served = await _from(lane, "127.0.0.1", path)
    assert (status, served) == (200, 1)
    status, there, served = await _from(lane, "127.0.0.2", path)
    assert (status, served) == (200, 0)
    assert there["AccessKeyId"] != here["AccessKeyId"]
    status, again, served = await _from(lane, "127.0.0.2", path)
    assert (status, served, again["AccessKeyId"]) == (200, 1, there["AccessKeyId"])
    assert [_bound_to(call.params["Policy"]) for call in lane.broker.sts.emulator.calls] == [
        "127.0.0.1",
        "127.0.0.2",
    ]


async def test_a_jwt_caller_goes_the_general_way(
    lane_broker: LaneFactory, tmp_path: Path, signing_key: rsa.RSAPrivateKey
) -> None:
    """The same browser JWT twice (a cache hit): never served by the lane, the general's reply."""
    jwks = write_jwks(tmp_path / "jwks.json", signing_key.public_key())
    jwt_settings = {"issuer": ISSUER, "audience": AUDIENCE, "jwks_file": str(jwks)}
    harness = await lane_broker(auth={"jwt": jwt_settings | {"groups": ["browser"]}})
    token = _token(signing_key, harness.broker.clock(), sub="bob")
    headers = {"Authorization": f"Bearer {token}"}
    path = "/v1/credentials/avatar-upload"
    assert (await harness.send(path, None, headers)).status == 200
    on, _ = await harness.lane_then_general(path, None, headers)
    assert (on.status, on.served, on.body["Oss"]["Prefix"]) == (200, 0, "avatars/bob/")
    assert [record["cache"] for record in on.audit] == ["hit"]


async def test_a_first_request_goes_the_general_way(lane: LaneHarness) -> None:
    """A caller not yet remembered: not served by the lane, STS called once, then remembered."""
    first = await lane.send()
    assert (first.status, first.served) == (200, 0)
    assert [record["cache"] for record in first.audit] == ["miss"]
    assert lane.broker.sts.emulator.assume_role_calls() == 1
    assert (await lane.send()).served == 1


async def test_a_cached_token_of_an_unremembered_header_goes_the_general_way(
    lane: LaneHarness,
) -> None:
    """Token cached via ?access_token= (header never admitted): the header's first is general."""
    key = CALLERS["svc-a"][0]
    assert (await lane.send(f"{CREDENTIALS}?access_token={key}", None)).status == 200
    first = await lane.send()
    assert (first.status, first.served) == (200, 0)
    assert [record["cache"] for record in first.audit] == ["hit"]
    assert (await lane.send()).served == 1


async def test_audit_required_goes_the_general_way(lane_broker: LaneFactory) -> None:
    """audit.mode: required: never served by the lane; the general path's reply and record."""
    harness = await lane_broker(audit={"mode": "required"})
    assert (await harness.send()).status == 200
    on, _ = await harness.lane_then_general()
    assert (on.status, on.served) == (200, 0)
    assert [record["cache"] for record in on.audit] == ["hit"]


async def test_an_entry_due_for_refresh_goes_the_general_way(lane: LaneHarness) -> None:
    """Past refresh_at: the general path serves the old token and refreshes it in the background."""
    warm = await lane.send()
    # service-uploads lasts 3600 s: refresh_at is 1440-1800 s before expiry, serving stops 60 s
    # before it (cache.refresh_fraction 0.5 minus up to 20% jitter, refresh_margin 60).
    lane.broker.clock.advance(2200)
    due = await lane.send()
    assert (due.status, due.served) == (200, 0)
    assert due.body["AccessKeyId"] == warm.body["AccessKeyId"]
    assert due.body["ExpiresIn"] == 3600 - 2200
    await lane.broker.services.cache.join()
    assert lane.broker.sts.emulator.assume_role_calls() == 2
    fresh, _ = await lane.lane_then_general()  # the new token's record and lines, not the old's
    assert (fresh.status, fresh.served) == (200, 1)
    assert fresh.body["AccessKeyId"] != warm.body["AccessKeyId"]
    assert fresh.body["ExpiresIn"] == 3600
    assert [record["access_key_id"] for record in fresh.audit] == [fresh.body["AccessKeyId"]]


@pytest.mark.parametrize("origin", [ORIGIN, "https://evil.example.com"])
async def test_an_origin_with_cors_configured_goes_the_general_way(
    lane_broker: LaneFactory, origin: str
) -> None:
    """cors.allow_origins set and an Origin: not served; Vary and (if allowed) the CORS headers."""
    harness = await lane_broker(cors={"allow_origins": [ORIGIN]})
    assert (await harness.send()).status == 200
    on, _ = await harness.lane_then_general(headers={"Origin": origin})
    assert (on.status, on.served) == (200, 0)
    assert on.headers["Vary"] == "Origin"
    assert on.headers.get("Access-Control-Allow-Origin") == (origin if origin == ORIGIN else None)
    without_origin, _ = await harness.lane_then_general()
    assert without_origin.served == 1
    assert not {"Vary", "Access-Control-Allow-Origin"} & without_origin.headers.keys()


async def test_a_logging_reconfiguration_reaches_the_lanes_lines(lane: LaneHarness) -> None:
    """Logging reconfigured (warning, then debug to a new stream): the lane's lines follow."""
    assert (await lane.send()).status == 200
    assert len((await lane.send()).logs) == 2  # the lane's lines, rendered for this chain
    lane.logs = io.StringIO()
    configure_logging("json", "warning", stream=lane.logs)
    on, off = await lane.lane_then_general()
    assert (on.served, on.logs, off.logs) == (1, [], [])
    lane.logs = io.StringIO()
    configure_logging("json", "debug", stream=lane.logs)
    on, _ = await lane.lane_then_general()
    assert (on.served, _events(on)) == (1, ["credentials_issued", "request_finished"])


async def test_console_logging_writes_the_general_paths_lines(lane: LaneHarness) -> None:
    """With the console renderer the lane writes the general path's two lines, in order."""
    assert (await lane.send()).status == 200
    output = io.StringIO()
    configure_logging("console", "info", stream=output)
    texts = []
    for enabled in (True, False):
        mark = len(output.getvalue())
        run = await lane.send(enabled=enabled)
        assert (run.status, run.served) == (200, 1 if enabled else 0)
        lines = output.getvalue()[mark:].splitlines()
        assert [("credentials_issued" in line, "request_finished" in line) for line in lines] == [
            (True, False),
            (False, True),
        ]
        assert all(run.request_id in line for line in lines)
        texts.append([_without_times(line.replace(run.request_id, "-")) for line in lines])
    assert texts[0] == texts[1]


def _without_times(line: str) -> str:
    """A console line without its timestamp and duration."""
    line = re.sub(r"\d{4}-\d\d-\d\dT[\d:.]+Z", "-", line)
    return re.sub(r"duration_ms=\S+", "duration_ms=-", line)


async def test_a_crash_while_serving_is_the_general_paths_json_500(
    lane: LaneHarness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failure rendering the reply: a JSON 500 with request_crashed, lane and general alike."""
    assert (await lane.send()).status == 200

    def broken(*args: Any, **kwargs: Any) -> bytes:
        raise RuntimeError("rendering failed")

    monkeypatch.setattr(lane.broker.client.app[REPLIES], "body", broken)
    runs = [await lane.send(enabled=enabled) for enabled in (True, False)]
    for run in runs:
        assert (run.status, run.body["error"]["code"]) == (500, "InternalError")
        assert run.headers["X-Request-Id"] == run.request_id
        assert _events(run) == [
            "credentials_issued",
            "request_crashed",
            "request_failed",
            "request_finished",
        ]
        assert "rendering failed" in run.logs[1]["exception"]
        del run.logs[1]["exception"]  # its traceback names the frames of the path taken
    on, off = runs
    assert on.comparable() == off.comparable()


# 3. Security and guarantees on the lane --------------------------------------------------------


async def test_expires_in_is_exact_to_the_second_as_the_clock_moves(lane: LaneHarness) -> None:
    """At each clock step (whole and part seconds) ExpiresIn is int(Expiration - now), both ways."""
    warm = await lane.send()
    expires_at = _expires_at(warm.body)
    clock = lane.broker.clock
    for step in (1, 0.25, 0.5, 0.25, 0.999, 0.001, 59, 600.5, 0.5, 1):
        clock.advance(step)
        on, _ = await lane.lane_then_general()
        assert on.served == 1
        assert on.body["Expiration"] == warm.body["Expiration"]
        expected = int(expires_at - clock.now)
        assert on.body["ExpiresIn"] == expected, step
        assert [record["expires_in"] for record in on.audit] == [expected]
        assert [line.get("expires_in") for line in on.logs] == [expected, None]


async def test_no_secret_reaches_logs_output_or_audit(
    lane: LaneHarness, capsys: pytest.CaptureFixture[str]
) -> None:
    """API keys, AccessKeySecrets and SecurityTokens of lane-served replies are written nowhere."""
    canaries = [key for key, _ in CALLERS.values()]
    for caller, policy in (("svc-a", "service-uploads"), ("alice", "avatar-upload")):
        path = f"/v1/credentials/{policy}"
        for _ in range(3):
            run = await lane.send(path, caller)
            assert run.status == 200
            canaries += [run.body["AccessKeySecret"], run.body["SecurityToken"]]
        assert run.served == 1
    captured = capsys.readouterr()
    written = "\n".join([lane.logs.getvalue(), lane.sink.read_text(), captured.out, captured.err])
    assert '"credentials_issued"' in lane.logs.getvalue()
    for canary in canaries:
        assert canary not in written


async def test_the_daemons_log_chain_gets_the_general_paths_lines_and_no_secret(
    lane: LaneHarness,
) -> None:
    """Through the daemon's LogSink: lane and general lines equal, no key or secret written."""
    output = io.StringIO()
    sink = configure_logging("json", "info", stream=output, background=True)
    assert sink is not None
    canaries = [key for key, _ in CALLERS.values()]
    ids: dict[bool, list[str]] = {True: [], False: []}
    try:
        assert (await lane.send()).status == 200
        served = lane.lane.served
        for enabled in (True, False, True, False):
            lane.lane.enabled = enabled
            async with lane.broker.client.get(CREDENTIALS, headers=lane.broker.auth("svc-a")) as r:
                body = await r.json()
            ids[enabled].append(body["RequestId"])
            canaries += [body["AccessKeySecret"], body["SecurityToken"]]
        assert lane.lane.served - served == 2
        assert sink.flush(30.0)  # this loop's gathered lines handed over, then all written
    finally:
        sink.close()
    text = output.getvalue()
    lines = [json.loads(line) for line in text.splitlines()]
    by_request = {
        enabled: [[line for line in lines if line.get("request_id") == rid] for rid in rids]
        for enabled, rids in ids.items()
    }
    for groups in by_request.values():
        for group in groups:
            assert [line["event"] for line in group] == ["credentials_issued", "request_finished"]
    assert _normalised(by_request[True]) == _normalised(by_request[False])
    for canary in canaries:
        assert canary not in text


async def test_each_lane_reply_has_one_hit_record_with_its_request_id(lane: LaneHarness) -> None:
    """Every lane-served request: exactly one credentials_issued record, cache hit, its id."""
    assert (await lane.send()).status == 200
    for _ in range(5):
        run = await lane.send()
        assert run.served == 1
        [record] = run.audit
        assert (record["event"], record["cache"], record["caller"]) == (
            "credentials_issued",
            "hit",
            "svc-a",
        )
        assert record["request_id"] == run.body["RequestId"] == run.headers["X-Request-Id"]
        assert record["access_key_id"] == run.body["AccessKeyId"]


async def test_concurrent_lane_replies_keep_their_own_ids_and_callers(lane: LaneHarness) -> None:
    """50 concurrent lane-served requests of two callers: each reply its own id and prefix."""
    callers = {"svc-a": "services/svc-a/", "svc-reports": "services/svc-reports/"}
    for caller in callers:
        assert (await lane.send(caller=caller)).status == 200
    served = lane.lane.served

    async def fetch(caller: str) -> tuple[str, str, str, str]:
        async with lane.broker.client.get(CREDENTIALS, headers=lane.broker.auth(caller)) as resp:
            assert resp.status == 200
            body = await resp.json()
            return caller, body["Oss"]["Prefix"], body["RequestId"], resp.headers["X-Request-Id"]

    replies = await asyncio.gather(*(fetch(caller) for caller in callers for _ in range(25)))
    assert lane.lane.served - served == 50
    assert all(prefix == callers[caller] for caller, prefix, _, _ in replies)
    assert all(in_body == in_header for _, _, in_body, in_header in replies)
    assert len({in_body for _, _, in_body, _ in replies}) == 50
    records = (await lane.audit_lines())[-50:]
    assert {record["request_id"] for record in records} == {reply[2] for reply in replies}
    assert {record["cache"] for record in records} == {"hit"}


async def test_a_revoked_caller_is_refused_on_the_very_next_request(lane: LaneHarness) -> None:
    """After revoke(), the next request is 401 and never served by the lane."""
    assert (await lane.send()).status == 200
    assert (await lane.send()).served == 1
    await revoke(lane.broker.services, Revocations(callers=frozenset({"svc-a"})))
    for _ in range(2):
        refused = await lane.send()
        assert (refused.status, refused.served) == (401, 0)
        assert refused.body["error"]["code"] == "AuthenticationFailed"
        assert "AccessKeySecret" not in refused.body


async def test_an_auth_reload_dropping_the_key_refuses_the_next_request(
    lane: LaneHarness, tmp_path: Path
) -> None:
    """reload_auth without svc-a's key: the next request is 401, never served by the lane."""
    config = tmp_path / "broker.yaml"
    _write_auth(config)
    services = lane.broker.services
    services.settings = services.settings.model_copy(update={"source": config})
    assert (await lane.send()).status == 200
    assert (await lane.send()).served == 1
    _write_auth(config, drop="svc-a")
    assert reload_auth(services) is True
    refused = await lane.send()
    assert (refused.status, refused.served) == (401, 0)
    assert refused.body["error"]["code"] == "AuthenticationFailed"


async def test_a_policy_reload_changes_the_next_reply(
    lane_broker: LaneFactory, tmp_path: Path
) -> None:
    """An edited prefix reloaded: the next request gets it (the general way), then the lane does."""
    policies = tmp_path / "policies"
    shutil.copytree(POLICIES_DIR, policies, ignore=shutil.ignore_patterns("*.md"))
    harness = await lane_broker(policies_dir=policies)
    assert (await harness.send()).status == 200
    assert (await harness.send()).served == 1
    path = policies / "service-uploads.yaml"
    path.write_text(path.read_text().replace('"services/${subject}/"', '"moved/${subject}/"'))
    assert await reload_policies(harness.broker.services) is True
    after = await harness.send()
    assert (after.status, after.served) == (200, 0)
    assert after.body["Oss"]["Prefix"] == "moved/svc-a/"
    again = await harness.send()
    assert (again.served, again.body["Oss"]["Prefix"]) == (1, "moved/svc-a/")
    assert again.body["AccessKeyId"] == after.body["AccessKeyId"]
    assert harness.broker.sts.emulator.assume_role_calls() == 2


async def test_a_key_without_the_credentials_route_is_refused_not_served(
    make_broker: BrokerFactory,
) -> None:
    """A presign-only key, admitted on presign, is 403 on credentials every time, never served."""
    broker = await _restricted_broker(make_broker, {"routes": ["presign"]})
    fast_lane = broker.client.app[FAST_LANE]
    presign = {"policy": "service-uploads", "key": "services/svc-provider/x", "method": "PUT"}
    status, _ = await _as_provider(broker, "POST", "/v1/presign", presign | {"content_length": 1})
    assert status == 200
    sts_calls = broker.sts.emulator.assume_role_calls()
    for _ in range(3):
        status, reply = await _as_provider(broker, "GET", CREDENTIALS)
        assert (status, reply["error"]["code"]) == (403, "AccessDenied")
        assert "AccessKeySecret" not in reply
    assert fast_lane.served == 0
    assert broker.sts.emulator.assume_role_calls() == sts_calls
    assert PROVIDER_KEY not in json.dumps(reply)


async def test_the_request_past_the_burst_is_the_general_paths_429(
    lane_broker: LaneFactory,
) -> None:
    """caller_burst 2: the 3rd request is 429 as the general path's, counted once, not twice."""
    harness = await lane_broker(quotas={"caller_requests_per_second": 1, "caller_burst": 2})
    rejections = ("broker_quota_rejections_total", (("kind", "caller_requests"),))
    runs = []
    for enabled in (True, False):
        first = await harness.send(enabled=enabled)  # the warm-up, then a general hit
        second = await harness.send(enabled=enabled)  # the lane's (when on)
        refused = await harness.send(enabled=enabled)
        assert (first.status, second.status, refused.status) == (200, 200, 429)
        assert second.served == (1 if enabled else 0)
        assert refused.served == 0
        assert refused.body["error"]["code"] == "TooManyRequests"
        assert refused.headers["Retry-After"] == "1"
        assert refused.metrics[rejections] == 1
        runs.append(refused)
        harness.broker.clock.advance(2)  # the bucket is full again
    assert runs[0].comparable() == runs[1].comparable()


# 4. The reply bytes ---------------------------------------------------------------------------


async def test_reply_headers_on_both_paths(lane: LaneHarness) -> None:
    """no-store, no-cache, application/json and X-Request-Id = RequestId, lane and general."""
    assert (await lane.send()).status == 200
    on, off = await lane.lane_then_general()
    assert (on.served, off.served) == (1, 0)
    for run in (on, off):
        assert run.headers["Cache-Control"] == "no-store"
        assert run.headers["Pragma"] == "no-cache"
        assert run.headers["Content-Type"] == "application/json"
        assert run.headers["X-Request-Id"] == run.body["RequestId"]
        assert re.fullmatch(r"[0-9a-f]{32}", run.body["RequestId"])
    assert on.request_id != off.request_id


async def test_reply_bytes_on_the_wire_are_the_general_paths(lane: LaneHarness) -> None:
    """On a raw socket the lane's reply is the general's byte for byte, bar id and Date."""
    assert (await lane.send()).status == 200
    request = raw_request(
        CREDENTIALS.encode(), b"Authorization: Bearer " + CALLERS["svc-a"][0].encode()
    )
    replies = []
    for enabled in (True, False):
        lane.lane.enabled = enabled
        served = lane.lane.served
        reply = await send_raw(lane.broker, request)
        assert lane.lane.served - served == (1 if enabled else 0)
        head, _, body = reply.partition(b"\r\n\r\n")
        request_id = json.loads(body)["RequestId"].encode()
        lines = head.replace(request_id, b"-").split(b"\r\n")
        assert lines[0] == b"HTTP/1.1 200 OK"
        assert b"X-Request-Id: -" in lines
        headers = sorted(line for line in lines[1:] if not line.lower().startswith(b"date:"))
        replies.append((lines[0], headers, body.replace(request_id, b"-")))
    assert replies[0] == replies[1]
