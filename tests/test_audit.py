"""The audit trail: one record per issuance and per auth refusal, required mode, no secret ever."""

from __future__ import annotations

import asyncio
import gc
import io
import json
import logging
import os
import re
import signal
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import aiohttp
import jwt
import pytest
import structlog
from cryptography.hazmat.primitives.asymmetric import rsa
from prometheus_client.parser import text_string_to_metric_families

from broker import audit, request_context
from broker.audit import check_sink, open_auditor
from broker.auth import hash_api_key
from broker.cli import main
from broker.config import AuditSettings, load_settings
from broker.dev.emulators.sts import StsEmulator, start_sts_emulator
from broker.errors import AccessDenied, AuditUnavailable, ConfigError
from broker.logs import REDACTED, configure_logging
from broker.metrics import Metrics
from broker.models import Credentials, Principal
from broker.policies import load_policies
from tests.conftest import (
    CALLERS,
    POLICIES_DIR,
    REPO,
    SOURCE_SECRET,
    BrokerFactory,
    BrokerHarness,
    FakeClock,
    free_port,
    write_jwks,
)
from tests.oidc_tokens import PROVIDER_ARN
from tests.wire import POST_POLICY, PRESIGN, post_json

ISSUER = "https://idp.example.com/"
AUDIENCE = "upload-web"
CANARY_BEARER = "eyJhbGciOiJSUzI1NiJ9.canary-audit-payload.canary-audit-signature"
UUID_UPPER = re.compile(r"^[0-9A-F]{8}-[0-9A-F]{4}-[0-9A-F]{4}-[0-9A-F]{4}-[0-9A-F]{12}$")
COMMON_FIELDS = {
    "time",
    "type",
    "event",
    "request_id",
    "route",
    "client_address",
    "caller",
    "auth_method",
    "policy",
}
ISSUANCE_FIELDS = COMMON_FIELDS | {
    "role_arn",
    "federation",
    "bucket",
    "region",
    "prefix",
    "actions",
    "narrowed",
    "policy_digest",
    "access_key_id",
    "expiration",
    "expires_in",
    "cache",
    "sts_request_id",
}


@pytest.fixture(scope="module")
def signing_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


async def _audited(
    make_broker: BrokerFactory, sink: Path | str, mode: str = "best_effort", **audit_extra: Any
) -> BrokerHarness:
    return await make_broker(audit={"sink": str(sink), "mode": mode, **audit_extra})


async def _records(broker: BrokerHarness, sink: Path) -> list[dict[str, Any]]:
    """Every record in ``sink`` once all handed over so far are written."""
    await broker.services.audit.flushed()
    return [json.loads(line) for line in sink.read_text().splitlines()]


async def _metric(broker: BrokerHarness, name: str, **labels: str) -> float:
    async with broker.client.get("/metrics") as resp:
        text = await resp.text()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return sample.value
    raise AssertionError(f"{name} {labels} is not exported")


async def _issue_all_kinds(broker: BrokerHarness) -> list[Any]:
    """A miss, a hit, a presigned URL and a post policy; the replies."""
    replies = []
    for _ in range(2):
        status, body = await broker.get_json("/v1/credentials/avatar-upload", caller="alice")
        assert status == 200
        replies.append(body)
    for path, payload in (("/v1/presign", PRESIGN), ("/v1/post-policy", POST_POLICY)):
        status, body = await post_json(broker, path, payload)
        assert status == 200
        replies.append(body)
    return replies


async def test_each_issuance_writes_one_record_with_its_fields(
    make_broker: BrokerFactory, tmp_path: Path
) -> None:
    """Miss, hit, presign and post policy: one record each, with who, what and which token."""
    sink = tmp_path / "audit.jsonl"
    broker = await _audited(make_broker, sink)
    replies = await _issue_all_kinds(broker)
    records = await _records(broker, sink)
    assert [r["event"] for r in records] == [
        "credentials_issued",
        "credentials_issued",
        "url_presigned",
        "post_policy_signed",
    ]
    assert all(record.keys() >= ISSUANCE_FIELDS for record in records)
    miss, hit, url, form = records
    assert (miss["cache"], hit["cache"]) == ("miss", "hit")
    assert miss["request_id"] == replies[0]["RequestId"]
    assert miss["access_key_id"] == hit["access_key_id"] == replies[0]["AccessKeyId"]
    assert miss["expiration"] == replies[0]["Expiration"]
    assert miss["expires_in"] == replies[0]["ExpiresIn"]
    assert UUID_UPPER.match(miss["sts_request_id"])
    assert hit["sts_request_id"] == miss["sts_request_id"]  # the call that minted the token
    assert miss["caller"] == "alice"
    assert miss["auth_method"] == "api_key"
    assert miss["client_address"] == "127.0.0.1"
    assert miss["route"] == "credentials"
    assert miss["policy"] == "avatar-upload"
    assert miss["prefix"] == "avatars/alice/"
    assert miss["actions"] == ["put"]
    assert miss["role_arn"] == "acs:ram::1234567890123456:role/oss-avatar-upload"
    assert miss["federation"] == "none"
    assert re.fullmatch(r"[0-9a-f]{64}", miss["policy_digest"])
    assert (url["key"], url["operation"]) == ("avatars/alice/me.png", "put_object")
    assert url["expires_in"] == replies[2]["expires_in"]
    assert url["expiration"] == replies[2]["expiration"]
    assert form["key_prefix"] == "avatars/alice/"
    assert form["clamped"] is False
    assert all(record["time"].endswith("Z") for record in records)


async def test_records_name_the_scope_as_handed_out_narrowed_or_in_several_grants(
    make_broker: BrokerFactory, tmp_path: Path
) -> None:
    """Several grants are listed; a narrowed token is recorded narrowed (prefix, key, actions)."""
    sink = tmp_path / "audit.jsonl"
    broker = await _audited(make_broker, sink)
    paths = [
        "/v1/credentials/report-jobs",
        "/v1/credentials/report-jobs?prefix=services/svc-a/run-42/&actions=put,multipart",
        "/v1/credentials/service-uploads?key=services/svc-a/report.csv",
    ]
    for path in paths:
        status, body = await broker.get_json(path, caller="svc-a")
        assert status == 200, body
    whole, narrowed, one_key = await _records(broker, sink)
    assert (whole["prefix"], whole["narrowed"]) == ("reports/", False)
    assert [(g["prefix"], g["actions"]) for g in whole["grants"]] == [
        ("reports/", ["get", "list"]),
        ("services/svc-a/", ["put", "multipart", "get", "list"]),
    ]
    assert (narrowed["prefix"], narrowed["actions"]) == (
        "services/svc-a/run-42/",
        ["put", "multipart"],
    )
    assert narrowed["narrowed"] is True
    assert "grants" not in narrowed
    assert one_key["key"] == "services/svc-a/report.csv"
    assert len({whole["policy_digest"], narrowed["policy_digest"]}) == 2


async def test_refusals_for_authorization_reasons_are_recorded(
    make_broker: BrokerFactory, tmp_path: Path
) -> None:
    """401 and 403 write a refusal record (caller when known); other errors write none."""
    sink = tmp_path / "audit.jsonl"
    broker = await _audited(make_broker, sink)
    await broker.get_json("/v1/credentials/avatar-upload", caller=None)  # 401: no token
    headers = {"Authorization": f"Bearer {CANARY_BEARER}"}
    await broker.client.get("/v1/credentials/avatar-upload", headers=headers)  # 401
    await broker.get_json("/v1/credentials/reports-read", caller="alice")  # 403
    await broker.get_json("/v1/credentials/avatar-upload?min_ttl_seconds=x", caller="alice")  # 400
    await broker.get_json("/v1/nowhere", caller="alice")  # 404
    await broker.get_json("/v1/policies", caller="alice")  # 200, issues nothing
    records = await _records(broker, sink)
    assert [(r["status"], r["error_code"]) for r in records] == [
        (401, "AuthenticationFailed"),
        (401, "AuthenticationFailed"),
        (403, "AccessDenied"),
    ]
    assert all(r.keys() >= COMMON_FIELDS and r["type"] == "refusal" for r in records)
    unknown, _, denied = records
    assert (unknown["caller"], unknown["auth_method"], unknown["policy"]) == (None, None, None)
    assert (denied["caller"], denied["auth_method"]) == ("alice", "api_key")
    assert denied["policy"] == "reports-read"
    assert denied["route"] == "credentials"
    assert await _metric(broker, "broker_audit_records_total", event="request_refused") == 3


async def test_a_revoked_caller_is_named_in_its_refusal_record(
    make_broker: BrokerFactory, tmp_path: Path
) -> None:
    """A revoked key gets the unknown key's 401, but its refusal record says whose it was."""
    sink = tmp_path / "audit.jsonl"
    broker = await make_broker(audit={"sink": str(sink)}, auth={"revoked": {"callers": ["svc-a"]}})
    status, body = await broker.get_json("/v1/credentials/service-uploads", caller="svc-a")
    assert (status, body["error"]["code"]) == (401, "AuthenticationFailed")
    (record,) = await _records(broker, sink)
    assert (record["caller"], record["auth_method"], record["status"]) == ("svc-a", "api_key", 401)


async def test_a_refused_cors_preflight_is_recorded(
    make_broker: BrokerFactory, tmp_path: Path
) -> None:
    """A preflight from an origin not allowed (403 CorsRejected) leaves a refusal record."""
    sink = tmp_path / "audit.jsonl"
    broker = await make_broker(
        audit={"sink": str(sink)}, cors={"allow_origins": ["https://app.example.com"]}
    )
    headers = {"Origin": "https://app.example.com.evil", "Access-Control-Request-Method": "GET"}
    async with broker.client.options("/v1/credentials/avatar-upload", headers=headers) as resp:
        assert resp.status == 403
    (record,) = await _records(broker, sink)
    assert (record["type"], record["error_code"], record["caller"]) == (
        "refusal",
        "CorsRejected",
        None,
    )


# Entra ID (Azure AD) subjects look like this: 43 characters of base64url, often no - or _.
OPAQUE_SUBJECT = "AAAAAAAAAAAAAAAAAAAAAIkzqFVrSaSaFHy782bbtaQ"


@pytest.mark.parametrize("subject", ["bob", OPAQUE_SUBJECT])
async def test_jwt_callers_are_recorded_by_subject_and_method(
    make_broker: BrokerFactory, tmp_path: Path, signing_key: rsa.RSAPrivateKey, subject: str
) -> None:
    """A JWT caller's record names its subject, even an opaque one, and jwt; never the token."""
    sink = tmp_path / "audit.jsonl"
    jwks = write_jwks(tmp_path / "jwks.json", signing_key.public_key())
    jwt_settings = {"issuer": ISSUER, "audience": AUDIENCE, "jwks_file": str(jwks)}
    broker = await make_broker(
        audit={"sink": str(sink)}, auth={"jwt": {**jwt_settings, "groups": ["browser"]}}
    )
    now = broker.clock()
    claims = {"iss": ISSUER, "aud": AUDIENCE, "sub": subject, "iat": now, "exp": now + 300}
    token = jwt.encode(claims, signing_key, algorithm="RS256", headers={"kid": "k1"})
    headers = {"Authorization": f"Bearer {token}"}
    async with broker.client.get("/v1/credentials/avatar-upload", headers=headers) as resp:
        assert resp.status == 200
    (record,) = await _records(broker, sink)
    assert (record["caller"], record["auth_method"]) == (subject, "jwt")
    assert record["prefix"] == f"avatars/{subject}/"
    text = sink.read_text()
    assert all(part not in text for part in token.split("."))


async def test_identifiers_that_look_random_are_recorded_intact(
    make_broker: BrokerFactory, tmp_path: Path
) -> None:
    """An object key named by a random id and a client's own request id survive the scrub."""
    sink = tmp_path / "audit.jsonl"
    broker = await _audited(make_broker, sink)
    key = "avatars/alice/Q3x9TmZpR2vL8wYbN4cK7sD1fH6jG5aEw.png"
    request_id = "Zk8Qw2Lm5Np7Rt9Vx3By6Cd1Fg4Hj0KsTu"
    body = json.dumps({**PRESIGN, "key": key}).encode()
    headers = {**broker.auth("alice"), "X-Request-Id": request_id}
    async with broker.client.post("/v1/presign", data=body, headers=headers) as resp:
        assert resp.status == 200
    (record,) = await _records(broker, sink)
    assert (record["key"], record["request_id"]) == (key, request_id)


@pytest.mark.parametrize("level", ["debug", "info", "warning", "error"])
async def test_n_issuances_make_n_records_at_every_log_level(
    make_broker: BrokerFactory, tmp_path: Path, level: str
) -> None:
    """The audit trail does not depend on logging.level: N issuances, exactly N records."""
    stream = io.StringIO()
    configure_logging("json", level, stream=stream)
    try:
        sink = tmp_path / "audit.jsonl"
        broker = await _audited(make_broker, sink)
        issued = 0
        for caller, policy in [("alice", "avatar-upload"), ("svc-a", "service-uploads")] * 3:
            status, _ = await broker.get_json(f"/v1/credentials/{policy}", caller=caller)
            issued += status == 200
        for _ in range(3):
            status, _ = await post_json(broker, "/v1/presign", PRESIGN)
            issued += status == 200
            status, _ = await post_json(broker, "/v1/post-policy", POST_POLICY)
            issued += status == 200
        records = await _records(broker, sink)
    finally:
        structlog.reset_defaults()
        logging.getLogger().handlers.clear()
    assert issued == 12
    assert len(records) == issued
    assert all(record["type"] == "issuance" for record in records)
    total = 0.0
    for event in ("credentials_issued", "url_presigned", "post_policy_signed"):
        total += await _metric(broker, "broker_audit_records_total", event=event)
    assert total == issued
    logged = "credentials_issued" in stream.getvalue()
    assert logged is (level in ("debug", "info"))  # the log obeys its level; the audit does not


async def test_no_secret_ever_reaches_the_audit_sink(
    make_broker: BrokerFactory, tmp_path: Path
) -> None:
    """Canaries: STS secrets and tokens, API keys, a bearer JWT, URL and form signatures."""
    sink = tmp_path / "audit.jsonl"
    broker = await _audited(make_broker, sink)
    replies = await _issue_all_kinds(broker)
    key = CALLERS["svc-reports"][0]
    _, body = await broker.get_json(f"/v1/credentials/reports-read?access_token={key}", caller=None)
    replies.append(body)
    await broker.client.get(f"/v1/credentials/reports-read?access_token={CANARY_BEARER}")
    await broker.client.get("/v1/policies", headers={"Authorization": f"Bearer {CANARY_BEARER}"})
    await broker.get_json("/v1/credentials/reports-read", caller="alice")  # 403 with a known key
    records = await _records(broker, sink)
    assert len(records) == 8  # 5 issuances, 3 refusals
    text = sink.read_text()
    url = parse_qs(urlsplit(replies[2]["url"]).query)
    form = replies[3]["fields"]
    canaries = [
        *(reply["AccessKeySecret"] for reply in replies if "AccessKeySecret" in reply),
        *(reply["SecurityToken"] for reply in replies if "SecurityToken" in reply),
        url["x-oss-signature"][0],
        url["x-oss-security-token"][0],
        form["x-oss-signature"],
        form["x-oss-security-token"],
        form["policy"],
        CANARY_BEARER,
        *(part for part in CANARY_BEARER.split(".") if len(part) > 8),
        *(api_key for api_key, _ in CALLERS.values()),
        SOURCE_SECRET,
    ]
    assert len(canaries) > 15
    for canary in canaries:
        assert canary not in text


async def test_required_mode_with_a_failing_sink_issues_nothing(
    make_broker: BrokerFactory,
) -> None:
    """/dev/full in required mode: 503 AuditUnavailable + Retry-After, no secret in any reply."""
    broker = await _audited(make_broker, "/dev/full", "required")
    replies = []
    for _ in range(2):
        async with broker.client.get(
            "/v1/credentials/avatar-upload", headers=broker.auth("alice")
        ) as resp:
            replies.append((resp.status, resp.headers.get("Retry-After"), await resp.text()))
    for path, payload in (("/v1/presign", PRESIGN), ("/v1/post-policy", POST_POLICY)):
        headers = broker.auth("alice")
        async with broker.client.post(path, json=payload, headers=headers) as resp:
            replies.append((resp.status, resp.headers.get("Retry-After"), await resp.text()))
    for status, retry_after, text in replies:
        assert (status, retry_after) == (503, "1")
        assert json.loads(text)["error"]["code"] == "AuditUnavailable"
        assert "SecurityToken" not in text
        assert "Secret" not in text
        assert "signature" not in text
    assert await _metric(broker, "broker_audit_failures_total", reason="write_error") == 4
    status, body = await broker.get_json("/v1/credentials/reports-read", caller="alice")
    assert (status, body["error"]["code"]) == (403, "AccessDenied")  # refusals stay refusals


async def test_best_effort_mode_with_a_failing_sink_serves_and_counts(
    make_broker: BrokerFactory,
) -> None:
    """/dev/full in best_effort mode: served, and broker_audit_failures_total rises per record."""
    broker = await _audited(make_broker, "/dev/full")
    replies = await _issue_all_kinds(broker)
    assert all(
        reply.get("AccessKeySecret") or reply.get("url") or reply.get("fields") for reply in replies
    )
    await broker.services.audit.flushed()
    assert await _metric(broker, "broker_audit_failures_total", reason="write_error") == 4
    assert await _metric(broker, "broker_audit_records_total", event="credentials_issued") == 0


async def test_required_mode_writes_the_record_before_the_reply(
    make_broker: BrokerFactory, tmp_path: Path
) -> None:
    """In required mode a reply's record is already in the file when the reply arrives."""
    sink = tmp_path / "audit.jsonl"
    broker = await _audited(make_broker, sink, "required")
    for expected in range(1, 4):
        status, body = await broker.get_json("/v1/credentials/avatar-upload", caller="alice")
        assert status == 200
        lines = sink.read_text().splitlines()  # no flush: the reply waited for the write
        assert len(lines) == expected
        assert json.loads(lines[-1])["request_id"] == body["RequestId"]


async def test_required_mode_refuses_when_the_sink_is_stuck(
    make_broker: BrokerFactory,
) -> None:
    """A sink that accepts nothing (a full pipe nobody reads): 503 after write_timeout_seconds."""
    read_end, write_end = os.pipe()
    os.set_blocking(write_end, False)
    _until_would_block(lambda: os.write(write_end, b"x" * 65536))
    os.set_blocking(write_end, True)
    sink = f"/proc/self/fd/{write_end}"
    try:
        broker = await _audited(make_broker, sink, "required", write_timeout_seconds=0.2)
        status, body = await broker.get_json("/v1/credentials/avatar-upload", caller="alice")
        assert (status, body["error"]["code"]) == (503, "AuditUnavailable")
        assert "AccessKeySecret" not in body
        assert await _metric(broker, "broker_audit_failures_total", reason="timeout") == 1
    finally:
        os.set_blocking(read_end, False)
        _until_would_block(lambda: os.read(read_end, 65536))  # so the stuck writer finishes
        os.close(read_end)
        os.close(write_end)


def _until_would_block(operation: Callable[[], object]) -> None:
    """Repeat a non-blocking pipe operation until the pipe is full (or empty)."""
    for _ in range(10_000):  # a pipe holds at most 1 MiB by default
        try:
            operation()
        except BlockingIOError:
            return
    raise AssertionError("the pipe never filled or emptied")


async def test_scrub_runs_over_every_line(tmp_path: Path, clock: FakeClock) -> None:
    """A secret fragment that slipped into a field (an error message here) is masked anyway."""
    sink = tmp_path / "audit.jsonl"
    clock.now = 1_700_000_000.25
    auditor = open_auditor(AuditSettings(sink=str(sink)), Metrics(), clock)
    request_context.begin("req-12345678", "credentials", "127.0.0.1")
    request_context.note_caller(Principal("alice"))
    auditor.refused(AccessDenied("denied for access_token=canary-fragment-1234 and Bearer abc.def"))
    await auditor.close()
    (record,) = [json.loads(line) for line in sink.read_text().splitlines()]
    assert "canary-fragment-1234" not in record["reason"]
    assert REDACTED in record["reason"]
    assert "abc.def" not in record["reason"]
    assert record["caller"] == "alice"
    assert record["request_id"] == "req-12345678"
    assert record["time"] == "2023-11-14T22:13:20.250Z"  # the injected clock, in milliseconds


def test_file_sink_is_relative_to_the_config_file(tmp_path: Path) -> None:
    """audit.sink names a file relative to the config file; stdout and stderr are streams."""
    config = tmp_path / "broker.yaml"
    config.write_text("audit:\n  sink: logs/audit.jsonl\n  mode: required\n")
    settings = load_settings(config)
    assert settings.audit.sink == str(tmp_path / "logs" / "audit.jsonl")
    assert settings.audit.mode == "required"
    config.write_text("audit:\n  sink: stderr\n")
    assert load_settings(config).audit.sink == "stderr"
    assert load_settings(config).audit.mode == "best_effort"


def test_a_sink_that_cannot_be_opened_is_a_config_error(tmp_path: Path, clock: FakeClock) -> None:
    """A sink in a missing folder (or a folder itself) stops the start with a clear error."""
    for sink in (tmp_path / "missing" / "audit.jsonl", tmp_path):
        with pytest.raises(ConfigError, match=r"audit\.sink: cannot open"):
            open_auditor(AuditSettings(sink=str(sink)), Metrics(), clock)


def test_audit_files_are_created_private(tmp_path: Path, clock: FakeClock) -> None:
    """A new audit file is readable by the broker's user only (0600)."""
    sink = tmp_path / "audit.jsonl"
    auditor = open_auditor(AuditSettings(sink=str(sink)), Metrics(), clock)
    asyncio.run(auditor.close())
    assert sink.stat().st_mode & 0o777 == 0o600


def test_audit_unavailable_is_a_retryable_503() -> None:
    """AuditUnavailable: 503, a stable code, Retry-After, and a message without context."""
    err = AuditUnavailable(reason="ENOSPC")
    assert (err.status, err.code, err.retry_after_seconds) == (503, "AuditUnavailable", 1)
    assert "ENOSPC" not in err.message


def test_deployment_guide_lists_every_record_field() -> None:
    """docs/deployment.md's field table names every field a record can carry."""
    guide = (REPO / "docs" / "deployment.md").read_text()
    section = guide.split("## Audit trail", 1)[1].split("\n## ", 1)[0]
    documented = {
        name
        for line in section.splitlines()
        if line.startswith("| `")
        for name in re.findall(r"`([a-z_]+)`", line.split(" | ")[0])
    }
    extra = {"key", "grants", "operation", "key_prefix", "clamped"}
    extra |= {"status", "error_code", "reason"}  # refusals
    assert ISSUANCE_FIELDS | extra <= documented


def test_example_config_shows_every_audit_setting() -> None:
    """config/broker.yaml's audit section sets every key AuditSettings has, to its default."""
    settings = load_settings(REPO / "config" / "broker.yaml").audit
    assert settings == AuditSettings()
    text = (REPO / "config" / "broker.yaml").read_text().split("\naudit:", 1)[1]
    assert all(f"\n  {name}:" in text for name in AuditSettings.model_fields)


def test_a_dropped_auditor_closes_its_sink(tmp_path: Path, clock: FakeClock) -> None:
    """An auditor never closed (tests, a start-up that failed later) leaks no descriptor."""
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(20):
        open_auditor(AuditSettings(sink=str(tmp_path / "audit.jsonl")), Metrics(), clock)
        open_auditor(AuditSettings(sink="stdout"), Metrics(), clock)
    gc.collect()
    assert len(os.listdir("/proc/self/fd")) <= before


async def test_serve_with_two_workers_shares_one_file_and_reopens_it_on_sighup(
    tmp_path: Path,
) -> None:
    """serve --workers 2: one whole line per issuance from both; SIGHUP reopens after rotation."""
    emulator = StsEmulator(access_keys={"LTAI-audit-test": "audit-source-secret"})
    runner, sts_url = await start_sts_emulator(emulator)
    try:
        before, after = await _serve_rotate_and_issue(tmp_path, sts_url, 10)
    finally:
        await runner.cleanup()
    rotated = _lines(tmp_path / "audit.jsonl.1")
    current = _lines(tmp_path / "audit.jsonl")
    assert sorted(record["request_id"] for record in rotated) == sorted(before)
    issued = [record for record in current if record["type"] == "issuance"]
    assert sorted(record["request_id"] for record in issued) == sorted(after)
    assert [record["status"] for record in current if record["type"] == "refusal"] == [401]
    misses = [record for record in rotated if record["cache"] == "miss"]
    assert len(misses) == emulator.assume_role_calls() == 2  # a worker: its own cache, one miss
    assert len({record["sts_request_id"] for record in misses}) == 2


def _lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


async def _serve_rotate_and_issue(
    tmp_path: Path, sts_url: str, count: int
) -> tuple[list[str], list[str]]:
    """serve --workers 2 (audit file, required): issuances, rotation, SIGHUP, issuances."""
    port = free_port()
    config = tmp_path / "broker.yaml"
    config.write_text(
        f"listen: {{host: 127.0.0.1, port: {port}}}\n"
        f"sts: {{endpoint: '{sts_url}', timeout_seconds: 5}}\n"
        f"policies_dir: {POLICIES_DIR}\n"
        "logging: {format: json, level: info}\n"
        "audit: {sink: audit.jsonl, mode: required}\n"
        f"auth:\n  api_keys:\n    - id: svc-a\n      key_sha256: {hash_api_key('k-svc-a')}\n"
        "      groups: [internal]\n"
    )
    env = {key: value for key, value in os.environ.items() if not key.startswith("ALIBABA_CLOUD")}
    env.update(
        ALIBABA_CLOUD_ACCESS_KEY_ID="LTAI-audit-test",
        ALIBABA_CLOUD_ACCESS_KEY_SECRET="audit-source-secret",
        ALIBABA_CLOUD_ECS_METADATA_DISABLED="true",
    )
    argv = [str(Path(sys.executable).parent / "sts-broker"), "serve", "--config", str(config)]
    proc = await asyncio.create_subprocess_exec(
        *argv, "--workers", "2", env=env, stderr=asyncio.subprocess.PIPE
    )
    try:
        assert proc.stderr is not None
        await _logged_twice(proc.stderr, b'"broker_started"')  # both workers listen
        before = await _issue_over_http(port, count)
        (tmp_path / "audit.jsonl").rename(tmp_path / "audit.jsonl.1")  # what logrotate does
        proc.send_signal(signal.SIGHUP)
        await _logged_twice(proc.stderr, b'"audit_sink_reopened"')
        after = await _issue_over_http(port, count, refused=True)
        proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(20):
            assert await proc.wait() == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    return before, after


async def _logged_twice(stderr: asyncio.StreamReader, event: bytes) -> None:
    async with asyncio.timeout(30):
        for _ in range(2):
            while event not in await stderr.readline():
                pass


async def _issue_over_http(port: int, count: int, *, refused: bool = False) -> list[str]:
    """``count`` credentials requests (new connections, so both workers answer), then a 401."""
    url = f"http://127.0.0.1:{port}/v1/credentials/service-uploads"
    request_ids = []
    async with aiohttp.ClientSession() as session:
        headers = {"Authorization": "Bearer k-svc-a", "Connection": "close"}
        for _ in range(count):
            async with session.get(url, headers=headers) as resp:
                assert resp.status == 200
                request_ids.append(resp.headers["X-Request-Id"])
        if refused:
            async with session.get(url, headers={"Connection": "close"}) as resp:
                assert resp.status == 401
    return request_ids


def test_reopen_follows_a_rotated_file(tmp_path: Path, clock: FakeClock) -> None:
    """After the file is moved away, reopen() sends later records to a new file at the path."""
    sink = tmp_path / "audit.jsonl"
    auditor = open_auditor(AuditSettings(sink=str(sink)), Metrics(), clock)

    async def scenario() -> None:
        request_context.begin("req-before-1", "credentials", "127.0.0.1")
        auditor.refused(AccessDenied(policy="reports-read"))
        await auditor.flushed()
        sink.rename(tmp_path / "audit.jsonl.1")
        auditor.reopen()
        request_context.begin("req-after-01", "credentials", "127.0.0.1")
        auditor.refused(AccessDenied(policy="reports-read"))
        await auditor.close()

    asyncio.run(scenario())
    assert [r["request_id"] for r in _lines(tmp_path / "audit.jsonl.1")] == ["req-before-1"]
    assert [r["request_id"] for r in _lines(sink)] == ["req-after-01"]


@pytest.mark.parametrize("command", [["check"], ["serve", "--workers", "2"]])
def test_an_unusable_sink_stops_check_and_serve_with_exit_2(
    tmp_path: Path, command: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    """check, and serve before it starts workers, name an audit sink that cannot be opened."""
    config = tmp_path / "broker.yaml"
    config.write_text(f"policies_dir: {POLICIES_DIR}\naudit: {{sink: missing/audit.jsonl}}\n")
    assert main([command[0], "--config", str(config), *command[1:]]) == 2
    sink = tmp_path / "missing" / "audit.jsonl"
    assert f"audit.sink: cannot open {sink}: the folder" in capsys.readouterr().err
    assert not (tmp_path / "missing").exists()


def test_check_creates_no_audit_file(tmp_path: Path) -> None:
    """sts-broker check accepts a sink that can be created, without creating it."""
    config = tmp_path / "broker.yaml"
    config.write_text(f"policies_dir: {POLICIES_DIR}\naudit: {{sink: audit.jsonl}}\n")
    assert main(["check", "--config", str(config)]) == 0
    assert not (tmp_path / "audit.jsonl").exists()
    with pytest.raises(ConfigError, match="it is a folder"):
        check_sink(AuditSettings(sink=str(tmp_path)))


async def test_federated_issuance_says_so(tmp_path: Path, clock: FakeClock) -> None:
    """A token minted by AssumeRoleWithOIDC (federation: oidc) is recorded as such."""
    policies_dir = tmp_path / "policies"
    policies_dir.mkdir()
    (policies_dir / "my-files.yaml").write_text(
        "name: my-files\nrole_arn: acs:ram::1234567890123456:role/oss-avatar-upload\n"
        'bucket: examplebucket\nregion: cn-hangzhou\nprefix: "users/${subject}/"\n'
        "actions: [put]\nduration_seconds: 900\nmax_url_expires_seconds: 600\n"
        'callers: ["group:browser"]\n'
        f"federation: oidc\noidc_provider_arn: {PROVIDER_ARN}\n"
    )
    principal = Principal("alice", ("browser",), auth_method="jwt")
    scope = load_policies(policies_dir).scope("my-files", principal)
    assert scope is not None
    sink = tmp_path / "audit.jsonl"
    auditor = open_auditor(AuditSettings(sink=str(sink), mode="required"), Metrics(), clock)
    token = Credentials("STS.federated0001", "s" * 30, "CAIS" + "t" * 40, datetime.now(UTC))
    await auditor.issued(
        "credentials_issued", principal, scope, token, cache="miss", expiration="-", expires_in=1
    )
    await auditor.close()
    (record,) = _lines(sink)
    assert (record["federation"], record["auth_method"], record["caller"]) == (
        "oidc",
        "jwt",
        "alice",
    )
    assert "s" * 30 not in sink.read_text()


@pytest.mark.parametrize(
    "now",
    [
        1_700_000_000.0,
        1_700_000_000.0005,
        1_700_000_000.25,
        1_700_000_000.9995,
        1_700_000_059.999999,
    ],
)
def test_record_times_are_formatted_to_the_millisecond_as_before(
    tmp_path: Path, clock: FakeClock, now: float
) -> None:
    """``time`` reads as the former ``f"{second}.{millis:03d}Z"`` gave, the edges included."""
    clock.now = now
    auditor = open_auditor(AuditSettings(sink=str(tmp_path / "audit.jsonl")), Metrics(), clock)
    second = int(now)
    text = datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%S")
    assert auditor._now() == f"{text}.{int((now - second) * 1000):03d}Z"
    auditor._writer.close()


def test_best_effort_records_are_gathered_then_handed_over_together(
    tmp_path: Path, clock: FakeClock
) -> None:
    """Refusals wait (up to HAND_OVER_SECONDS) to go in one write; a flush sends them at once."""
    sink = tmp_path / "audit.jsonl"
    auditor = open_auditor(AuditSettings(sink=str(sink)), Metrics(), clock)

    async def scenario() -> tuple[int, int]:
        for index in range(3):
            request_context.begin(f"req-gather-{index}", "credentials", "127.0.0.1")
            auditor.refused(AccessDenied(policy="reports-read"))
        written_early = len(auditor._pending)  # gathered, not yet handed to the writer
        await auditor.flushed()
        written = len(_lines(sink))
        await auditor.close()
        return written_early, written

    assert asyncio.run(scenario()) == (3, 3)
    assert audit.HAND_OVER_SECONDS <= 0.05
