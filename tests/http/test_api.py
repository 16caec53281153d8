"""The rest of the HTTP surface: one JSON error shape, health, policies list, request ids."""

from __future__ import annotations

import subprocess
import sys

import pytest
from alibabacloud_credentials.client import Client as CredentialClient
from alibabacloud_credentials.provider import URLCredentialsProvider

from tests.conftest import CALLERS, BrokerHarness


async def test_credentials_uri_provider_obtains_credentials(broker: BrokerHarness) -> None:
    """The official alibabacloud-credentials URI provider reads our endpoint as it is."""
    key = CALLERS["alice"][0]
    uri = str(broker.client.make_url(f"/v1/credentials/avatar-upload?access_token={key}"))
    client = CredentialClient(provider=URLCredentialsProvider(uri=uri))
    credential = await client.get_credential_async()
    issued = broker.sts.emulator.issued[credential.access_key_id]
    assert credential.access_key_secret == issued.access_key_secret
    assert credential.security_token == issued.security_token


@pytest.mark.parametrize(
    ("method", "path", "status", "code"),
    [
        ("GET", "/nope", 404, "NotFound"),
        ("GET", "/v1/credentials/", 404, "NotFound"),
        ("POST", "/v1/policies", 405, "MethodNotAllowed"),
        ("DELETE", "/v1/credentials/avatar-upload", 405, "MethodNotAllowed"),
    ],
)
async def test_framework_errors_use_the_json_shape(
    broker: BrokerHarness, method: str, path: str, status: int, code: str
) -> None:
    """aiohttp's own 404 and 405 come back in the broker's JSON error shape."""
    async with broker.client.request(method, path, headers=broker.auth("svc-a")) as resp:
        assert resp.status == status
        assert resp.content_type == "application/json"
        body = await resp.json()
    assert body["error"]["code"] == code
    assert body["error"]["request_id"] == resp.headers["X-Request-Id"]


async def test_request_id_is_echoed_or_generated(broker: BrokerHarness) -> None:
    """A well-formed incoming X-Request-Id is kept; a malformed one is replaced."""
    async with broker.client.get("/healthz", headers={"X-Request-Id": "abcdef12-3456"}) as resp:
        assert resp.headers["X-Request-Id"] == "abcdef12-3456"
    async with broker.client.get("/healthz", headers={"X-Request-Id": "bad id\t!"}) as resp:
        assert resp.headers["X-Request-Id"] != "bad id\t!"
        assert len(resp.headers["X-Request-Id"]) == 32


async def test_healthz_and_readyz(broker: BrokerHarness) -> None:
    """healthz answers ok; readyz is ready with policies and source credentials, not after stop."""
    status, body = await broker.get_json("/healthz", caller=None)
    assert (status, body) == (200, {"status": "ok"})
    status, body = await broker.get_json("/readyz", caller=None)
    assert status == 200
    assert body["checks"] == {
        "policies_loaded": True,
        "source_credentials": True,
        "accepting_requests": True,
    }
    broker.services.shutting_down = True
    status, body = await broker.get_json("/readyz", caller=None)
    assert status == 503
    assert body["status"] == "not_ready"


async def test_policies_lists_only_usable_ones_with_rendered_prefix(broker: BrokerHarness) -> None:
    """GET /v1/policies shows each caller only its policies, with its own prefix."""
    _, alice = await broker.get_json("/v1/policies", caller="alice")
    assert [(p["name"], p["prefix"]) for p in alice["policies"]] == [
        ("avatar-upload", "avatars/alice/"),
        ("quick-upload", "uploads/alice/"),
    ]
    _, svc = await broker.get_json("/v1/policies", caller="svc-a")
    assert [(p["name"], p["prefix"]) for p in svc["policies"]] == [
        ("pinned-reads", "services/svc-a/"),
        ("report-jobs", "reports/"),
        ("reports-read", "reports/"),
        ("service-uploads", "services/svc-a/"),
        ("vpc-ingest", "ingest/svc-a/"),
    ]
    _, nobody = await broker.get_json("/v1/policies", caller="nobody")
    assert nobody == {"policies": []}
    status, body = await broker.get_json("/v1/policies", caller=None)
    assert status == 401
    assert "ErrorCode" not in body  # mobile-SDK fields only on the credentials endpoint


async def test_policies_list_every_grant_in_one_shape(broker: BrokerHarness) -> None:
    """GET /v1/policies lists every grant (bucket, prefix, key, actions); the top is the primary."""
    _, svc = await broker.get_json("/v1/policies", caller="svc-a")
    described = {policy["name"]: policy for policy in svc["policies"]}
    jobs = described["report-jobs"]
    assert jobs["grants"] == [
        {"bucket": "examplebucket", "prefix": "reports/", "key": None, "actions": ["get", "list"]},
        {
            "bucket": "examplebucket",
            "prefix": "services/svc-a/",
            "key": None,
            "actions": ["put", "multipart", "get", "list"],
        },
    ]
    assert (jobs["bucket"], jobs["prefix"], jobs["actions"]) == (
        "examplebucket",
        "reports/",
        ["get", "list"],
    )
    uploads = described["service-uploads"]
    assert uploads["grants"] == [
        {
            "bucket": uploads["bucket"],
            "prefix": uploads["prefix"],
            "key": None,
            "actions": uploads["actions"],
        }
    ]


async def test_credentials_replies_are_not_cacheable(broker: BrokerHarness) -> None:
    """Credential replies carry Cache-Control: no-store."""
    async with broker.client.get(
        "/v1/credentials/avatar-upload", headers=broker.auth("alice")
    ) as resp:
        assert resp.headers["Cache-Control"] == "no-store"


def test_the_api_never_loads_dev_mode() -> None:
    """Importing the HTTP app and the use cases loads nothing of broker.dev (serve stays lean)."""
    check = (
        "import sys, broker.http.app, broker.vending; "
        "loaded = [m for m in sys.modules if m.startswith('broker.dev')]; "
        "assert not loaded, loaded"
    )
    subprocess.run([sys.executable, "-c", check], check=True, timeout=60)  # noqa: S603
