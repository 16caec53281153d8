"""No secret ever reaches the log: the real production chain, searched for canary values.

Secret keys are masked at any depth, secret shapes wherever they appear in a
line.  (The writer behind the chain is tests/test_log_writer.py's.)
"""

from __future__ import annotations

import base64
import io
import json
import logging
import random
import re
import secrets
import string
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from types import MappingProxyType
from typing import Any
from urllib.parse import parse_qs, urlsplit

import jwt
import pytest
import structlog

from broker.auth import generate_api_key
from broker.logs import (
    REDACTED,
    IsoTimeStamper,
    configure_logging,
    redact_secrets,
    scrub_rendered,
    scrub_text,
)
from broker.reload import reload_policies
from tests.conftest import CALLERS, SOURCE_SECRET, BrokerHarness

CANARY_BEARER = "eyJhbGciOiJSUzI1NiJ9.canary-bearer-payload.canary-bearer-signature"


@pytest.fixture
def log_output() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    configure_logging("json", "debug", stream=stream)
    yield stream
    structlog.reset_defaults()
    logging.getLogger().handlers.clear()


async def _full_cycle(broker: BrokerHarness) -> list[str]:
    """Success by header and by query, auth failures, an STS failure; returns the secrets seen."""
    seen: list[str] = []
    for caller, policy in [("alice", "avatar-upload"), ("svc-a", "service-uploads")]:
        _, body = await broker.get_json(f"/v1/credentials/{policy}", caller=caller)
        seen += [body["AccessKeySecret"], body["SecurityToken"]]
    key = CALLERS["svc-reports"][0]
    _, body = await broker.get_json(f"/v1/credentials/reports-read?access_token={key}", caller=None)
    seen += [body["AccessKeySecret"], body["SecurityToken"]]
    await broker.client.get("/v1/policies", headers={"Authorization": f"Bearer {CANARY_BEARER}"})
    await broker.client.get(f"/v1/credentials/reports-read?access_token={CANARY_BEARER}")
    broker.clock.advance(4000)  # every cached token is past its margin: the next one calls STS
    broker.sts.emulator.faults.update({"error_status": 500, "remaining": 1})
    await broker.client.get("/v1/credentials/reports-read", headers=broker.auth("svc-reports"))
    return seen


async def test_no_secret_in_real_log_output(broker: BrokerHarness, log_output: io.StringIO) -> None:
    """A full request cycle logs no secret: STS secret or token, API key, bearer, source secret."""
    issued = await _full_cycle(broker)
    text = log_output.getvalue()
    events = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
    names = {event["event"] for event in events}
    assert {"credentials_issued", "request_finished", "request_failed"} <= names
    canaries = [*issued, SOURCE_SECRET, CANARY_BEARER, *(key for key, _ in CALLERS.values())]
    canaries += [part for part in CANARY_BEARER.split(".") if len(part) > 8]
    for canary in canaries:
        assert canary not in text
    audit = [event for event in events if event["event"] == "credentials_issued"]
    assert {event["cache"] for event in audit} == {"miss"}
    assert {event["caller"] for event in audit} == {"alice", "svc-a", "svc-reports"}
    assert all(event["access_key_id"].startswith("STS.") for event in audit)
    assert all("?" not in event.get("path", "") for event in events)


def test_redaction_masks_keys_at_any_depth_and_fragments_in_strings() -> None:
    """Secret keys are masked at any depth; access_token=, signatures, bearer tokens in text too."""
    event = {
        "event": "x",
        "AccessKeySecret": "s1",
        "nested": {"deeper": [{"security_token": "s2", "ok": "fine"}]},
        "url": "https://b.oss.example/k?x-oss-signature=s3&x-oss-security-token=s4&a=1",
        "query": "access_token=s5&min_ttl_seconds=10",
        "header": "Bearer s6",
        "authorization": "Bearer s7",
    }
    out = redact_secrets(None, "info", dict(event))
    text = scrub_rendered(None, "info", json.dumps(out))
    for secret in ["s1", "s2", "s3", "s4", "s5", "s6", "s7"]:
        assert not re.search(rf"[\"= ]{secret}\b", text), secret
    assert out["nested"]["deeper"][0]["ok"] == "fine"
    assert out["AccessKeySecret"] == REDACTED
    assert "min_ttl_seconds=10" in text


def test_redaction_reaches_into_every_container_type() -> None:
    """Tuples, sets, frozensets and read-only mappings are searched like dicts and lists."""
    event = {
        "a": ({"token": "s1"},),
        "b": {frozenset({("password", "s2")})},
        "c": MappingProxyType({"cookie": "s3", "n": 1}),
        "d": "plain",
        "e": 1.5,
        "f": None,
    }
    out = redact_secrets(None, "info", dict(event))
    assert out["a"] == [{"token": REDACTED}]
    assert out["c"] == {"cookie": REDACTED, "n": 1}
    assert out["b"] == [[["password", "s2"]]]  # a pair in a set is not a mapping: the scrub's part
    assert (out["d"], out["e"], out["f"]) == ("plain", 1.5, None)


def _stock_stamp(nanos: int) -> str:
    """What structlog's TimeStamper(fmt="iso", utc=True) writes for ``nanos``."""
    moment = datetime.fromtimestamp(nanos // 10**9, UTC).replace(microsecond=nanos // 1000 % 10**6)
    return moment.isoformat().replace("+00:00", "Z")


def test_time_stamper_writes_what_structlogs_does() -> None:
    """The cached-per-second stamper matches TimeStamper's ISO UTC form, with or without micros."""
    now = [1_764_657_601_405_469_123]
    stamper = IsoTimeStamper(clock=lambda: now[0])
    for nanos in (now[0], now[0] + 1_000_000, 1_764_657_602_000_000_999, 1_764_657_659_999_999_000):
        now[0] = nanos
        assert stamper(None, "info", {})["timestamp"] == _stock_stamp(nanos)
    assert _stock_stamp(1_764_657_602_000_000_999) == "2025-12-02T06:40:02Z"
    stock = structlog.processors.TimeStamper(fmt="iso", utc=True)(None, "info", {})["timestamp"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{6})?Z", stock)


async def test_no_secret_from_signing_metrics_or_reload(
    broker: BrokerHarness, log_output: io.StringIO, tmp_path: Path
) -> None:
    """Presign, post-policy, /metrics and a failed reload log no signature, token or key."""
    headers = broker.auth("alice")
    presign: dict[str, Any] = {"policy": "avatar-upload", "key": "avatars/alice/a.png"}
    presign |= {"content_type": "image/png", "content_length": 1024}  # a size limit: signed
    async with broker.client.post("/v1/presign", json=presign, headers=headers) as resp:
        signed = await resp.json()
    form_body = {"policy": "avatar-upload", "content_type": "image/png"}
    async with broker.client.post("/v1/post-policy", json=form_body, headers=headers) as resp:
        form = (await resp.json())["fields"]
    async with broker.client.get("/metrics") as resp:
        metrics_text = await resp.text()
    broken = tmp_path / "policies"
    broken.mkdir()
    (broken / "bad.yaml").write_text(f"name: [unclosed {CALLERS['alice'][0]}\n")
    settings = broker.services.settings
    broker.services.settings = settings.model_copy(update={"policies_dir": broken})
    assert await reload_policies(broker.services) is False
    broker.services.settings = settings
    query = parse_qs(urlsplit(signed["url"]).query)
    canaries = [
        query["x-oss-signature"][0],
        query["x-oss-security-token"][0],
        form["x-oss-signature"],
        form["x-oss-security-token"],
        form["policy"],
        *(key for key, _ in CALLERS.values()),
        SOURCE_SECRET,
    ]
    text = log_output.getvalue()
    assert "url_presigned" in text
    assert "post_policy_signed" in text
    assert "policies_reload_failed" in text
    for canary in canaries:
        assert canary not in text
        assert canary not in metrics_text


# --- secret shapes, wherever they appear ---

API_KEY = generate_api_key()
JWT = jwt.encode({"sub": "alice", "aud": "upload-web"}, "k" * 32, algorithm="HS256")
# The STS emulator's shapes (broker/dev/emulators/sts.py), which follow real STS's:
# a SecurityToken is base64 starting "CAIS", an AccessKeySecret 40 letters and digits.
STS_TOKEN = "CAIS" + base64.b64encode(secrets.token_bytes(300)).decode()
STS_SECRET = "wyLTSmsyPGP1ohvvw8xYgB29dlGI8KMiH2pKCNZ9"
_ALNUM = string.ascii_letters + string.digits


@pytest.mark.parametrize(
    ("template", "secret"),
    [
        ("b'Authorization: {}\\x00'\n   ^", API_KEY),  # aiohttp's parser error, as JSON escapes it
        ("b'Authorization: Basic {}\\x00'", API_KEY),
        ("Token {}\x7f", API_KEY),
        ("b'X-Api-Key: {}\\x01'", API_KEY),
        ("Got more than 8190 bytes when reading: b'Bearer {}aaaaaaaa'", API_KEY),
        ("line\\n{}", API_KEY),
        ("no scheme at all: {}", API_KEY),
        ("GET /v1/policies?access_token={}&min_ttl_seconds=5", "opaque-token-1"),
        ("id token {}", JWT),
        ("{{'authorization': 'Bearer {}'}}", JWT),
        ("SecurityToken={}", STS_TOKEN),
        ("token in prose {} here", STS_TOKEN),
        ("token in prose {} here", "CAES" + STS_TOKEN[4:]),
        ("AccessKeySecret: {}", STS_SECRET),
        ("an exception quoting {} alone", STS_SECRET),
        ("Basic {}", "dXNlcjpwYXNzd29yZA=="),
        ("https://b.oss/k?x-oss-signature={}&x-oss-date=20261202T000000Z", "ab12" * 16),
        ("https://b.oss/k?OSSAccessKeyId=LTAI&Signature={}&Expires=1", "c2lnbmF0dXJl%3D"),
        ("Cookie: session={}", "opaque-cookie-9"),
    ],
)
def test_secret_shapes_are_scrubbed_wherever_they_appear(template: str, secret: str) -> None:
    """API keys, JWTs, STS tokens and secrets, credential schemes and signatures are masked."""
    scrubbed = scrub_text(template.format(secret))
    assert secret not in scrubbed
    assert REDACTED in scrubbed


@pytest.mark.parametrize(
    "ordinary",
    [
        '"request_id":"df4d62f93b4a4450a3a8f6b1c2270a95"',
        '"policy_digest":"0123456789abcdef0123456789abcdef"',
        '"access_key_id":"STS.NUgYrLnoC37mZZCNnAbez2Ksn4AbCdEf"',
        '"timestamp":"2026-12-02T06:20:01.405469Z"',
        '"path":"/v1/credentials/avatar-upload"',
        '"event":"token_refreshed","code":"InvalidAuthorizationHeaderFormat"',
        "the Authorization header must be given once",
        "UPPERCASE_CONSTANT_NAMES_ARE_NOT_SECRETS_0123456789",
        "EntityNotExistRoleArnForAssumedRoleSession",
    ],
)
def test_ordinary_values_are_left_alone(ordinary: str) -> None:
    """Request ids, digests, AccessKeyIds, timestamps, paths and names are not masked."""
    assert scrub_text(ordinary) == ordinary


def test_random_key_secrets_are_scrubbed() -> None:
    """500 random 30- and 40-character AccessKey secrets (a fixed seed) are all masked."""
    rng = random.Random(11)
    for length in (30, 40):
        for _ in range(500):
            secret = "".join(rng.choice(_ALNUM) for _ in range(length))
            assert secret not in scrub_text(f'{{"error":"bad key {secret}"}}')


def test_stdlib_records_go_through_the_sink_scrubbed() -> None:
    """aiohttp's and asyncio's stdlib records pass the same sink and scrubber as our own."""
    stream = io.StringIO()
    sink = configure_logging("json", "info", stream=stream, background=True)
    assert sink is not None
    try:
        try:
            raise ValueError(f"bad header b'Authorization: {API_KEY}\\x00'")
        except ValueError:
            logging.getLogger("aiohttp.server").exception("Error handling request")
        assert sink.flush(20.0)
    finally:
        sink.close()
        structlog.reset_defaults()
        logging.getLogger().handlers.clear()
    text = stream.getvalue()
    assert '"logger":"aiohttp.server"' in text
    assert "ValueError" in text
    assert API_KEY not in text
