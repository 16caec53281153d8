"""Least privilege at the OSS emulator with real clients: narrowed, multi-grant, short, bound.

The broker, the STS emulator and the OSS emulator run on sockets and share one
FakeClock; the tokens are used by alibabacloud-oss-v2 and oss2 as vended.
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import alibabacloud_oss_v2 as oss
import oss2
import pytest
from aiohttp.test_utils import TestClient
from alibabacloud_oss_v2.aio import AsyncClient

from broker.auth import hash_api_key
from broker.dev.stack import DevStack, dev_stack
from broker.policies import load_policies
from tests.conftest import POLICIES_DIR, TWO_BUCKETS_POLICY, FakeClock, start_test_server

KEYS = {"svc-a": "canary-scopes-svc-a", "alice": "canary-scopes-alice"}
GROUPS = {"svc-a": ["internal"], "alice": ["browser"]}
BUCKET = "examplebucket"

# Test-only policies beside the shipped examples: one to publish reports/, one HTTPS-only,
# one granting two buckets.
_EXTRA = {
    "reports-publisher.yaml": """
name: reports-publisher
role_arn: acs:ram::1234567890123456:role/oss-reports-publisher
bucket: examplebucket
region: cn-hangzhou
prefix: "reports/"
actions: [put]
duration_seconds: 3600
max_url_expires_seconds: 600
callers: ["group:internal"]
""",
    "two-buckets.yaml": TWO_BUCKETS_POLICY,
    "https-only.yaml": """
name: https-only
role_arn: acs:ram::1234567890123456:role/oss-service-uploads
bucket: examplebucket
region: cn-hangzhou
prefix: "services/${subject}/"
actions: [put, get]
conditions: {secure_transport: true}
duration_seconds: 3600
max_url_expires_seconds: 600
callers: ["group:internal"]
""",
}


@dataclass
class Stack:
    dev: DevStack
    client: TestClient[Any, Any]
    clock: FakeClock

    def auth(self, caller: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {KEYS[caller]}"}

    async def credentials(self, path: str, caller: str = "svc-a", local: str = "") -> Any:
        """The reply of GET ``path``, sent from ``local`` (a loopback address) if given."""
        if not local:
            async with self.client.get(path, headers=self.auth(caller)) as resp:
                assert resp.status == 200, await resp.text()
                return await resp.json()
        connector = aiohttp.TCPConnector(local_addr=(local, 0))
        async with (
            aiohttp.ClientSession(connector=connector) as session,
            session.get(self.client.make_url(path), headers=self.auth(caller)) as resp,
        ):
            assert resp.status == 200, await resp.text()
            return await resp.json()


@pytest.fixture
async def stack(tmp_path: Path, clock: FakeClock, aiohttp_client: Any) -> AsyncIterator[Stack]:
    policies_dir = tmp_path / "policies"
    shutil.copytree(POLICIES_DIR, policies_dir, ignore=shutil.ignore_patterns("*.md"))
    for name, text in _EXTRA.items():
        (policies_dir / name).write_text(text)
    api_keys = [
        {"id": caller, "key_sha256": hash_api_key(key), "groups": GROUPS[caller]}
        for caller, key in KEYS.items()
    ]
    async with dev_stack(
        load_policies(policies_dir),
        policies_dir,
        tmp_path / "oss",
        port=0,
        clock=clock,
        extra_api_keys=api_keys,
    ) as dev:
        client = await aiohttp_client(await start_test_server(dev.services))
        yield Stack(dev, client, clock)


def _sdk(creds: dict[str, Any]) -> AsyncClient:
    provider = oss.credentials.StaticCredentialsProvider(
        creds["AccessKeyId"], creds["AccessKeySecret"], creds["SecurityToken"]
    )
    config = oss.config.Config(
        region=creds["Oss"]["Region"],
        endpoint=creds["Oss"]["Endpoint"],
        credentials_provider=provider,
        use_path_style=creds["Oss"]["AddressStyle"] == "path",
    )
    config.retry_max_attempts = 1
    return AsyncClient(config)


async def _put(client: AsyncClient, key: str, body: bytes = b"x") -> str | None:
    """None if the SDK's PutObject succeeded, else OSS's error code."""
    try:
        await client.put_object(oss.PutObjectRequest(bucket=BUCKET, key=key, body=body))
    except oss.exceptions.OperationError as err:
        error = err.unwrap()
        assert isinstance(error, oss.exceptions.ServiceError)
        return str(error.code)
    return None


async def _get(client: AsyncClient, key: str) -> bytes | str:
    """The object's bytes, or OSS's error code."""
    try:
        result = await client.get_object(oss.GetObjectRequest(bucket=BUCKET, key=key))
    except oss.exceptions.OperationError as err:
        error = err.unwrap()
        assert isinstance(error, oss.exceptions.ServiceError)
        return str(error.code)
    return bytes(await result.body.read())


async def _list(client: AsyncClient, prefix: str) -> list[str] | str:
    try:
        result = await client.list_objects_v2(
            oss.ListObjectsV2Request(bucket=BUCKET, prefix=prefix)
        )
    except oss.exceptions.OperationError as err:
        error = err.unwrap()
        assert isinstance(error, oss.exceptions.ServiceError)
        return str(error.code)
    return [item.key for item in result.contents or []]


async def _publish_report(stack: Stack, key: str, body: bytes) -> None:
    creds = await stack.credentials("/v1/credentials/reports-publisher")
    async with _sdk(creds) as client:
        assert await _put(client, key, body) is None


async def test_a_multi_grant_token_reads_reports_and_writes_its_own_prefix_only(
    stack: Stack,
) -> None:
    """report-jobs: read and list reports/, write services/svc-a/; nothing else, one token."""
    await _publish_report(stack, "reports/2026/summary.csv", b"total,42\n")
    creds = await stack.credentials("/v1/credentials/report-jobs")
    assert [g["Prefix"] for g in creds["Oss"]["Grants"]] == ["reports/", "services/svc-a/"]
    async with _sdk(creds) as client:
        assert await _get(client, "reports/2026/summary.csv") == b"total,42\n"
        assert await _list(client, "reports/") == ["reports/2026/summary.csv"]
        assert await _put(client, "services/svc-a/out.csv", b"a,b\n") is None
        assert await _get(client, "services/svc-a/out.csv") == b"a,b\n"
        assert await _list(client, "services/svc-a/") == ["services/svc-a/out.csv"]
        # And nothing else: no writes to reports/, no other prefix, no listing above.
        assert await _put(client, "reports/2026/forged.csv") == "AccessDenied"
        assert await _put(client, "services/svc-b/out.csv") == "AccessDenied"
        assert await _get(client, "avatars/alice/me.png") == "AccessDenied"
        assert await _list(client, "services/") == "AccessDenied"
        assert await _list(client, "") == "AccessDenied"
        with pytest.raises(oss.exceptions.OperationError, match="AccessDenied"):
            await client.delete_object(
                oss.DeleteObjectRequest(bucket=BUCKET, key="services/svc-a/out.csv")
            )
    assert stack.dev.oss.read_object(BUCKET, "services/svc-a/out.csv") == b"a,b\n"


async def test_a_narrowed_token_does_exactly_what_it_was_narrowed_to(stack: Stack) -> None:
    """prefix=.../run-1/&actions=put: writes run-1/ only; the whole token shows the difference."""
    narrowed = await stack.credentials(
        "/v1/credentials/service-uploads?prefix=services/svc-a/run-1/&actions=put"
    )
    whole = await stack.credentials("/v1/credentials/service-uploads")
    assert narrowed["AccessKeyId"] != whole["AccessKeyId"]
    async with _sdk(narrowed) as small, _sdk(whole) as large:
        assert await _put(small, "services/svc-a/run-1/part-0") is None
        for key in ("services/svc-a/top-level", "services/svc-a/run-2/part-0"):
            assert await _put(small, key) == "AccessDenied"  # the sibling and the parent
            assert await _put(large, key) is None  # which the whole token may
        assert await _get(small, "services/svc-a/run-1/part-0") == "AccessDenied"  # put only
        assert await _get(large, "services/svc-a/run-1/part-0") == b"x"
        assert await _list(small, "services/svc-a/run-1/") == "AccessDenied"
        assert await _put(small, "services/svc-b/run-1/part-0") == "AccessDenied"


async def test_a_key_narrowed_token_reaches_that_one_object(stack: Stack) -> None:
    """key=...: that object may be written and read; its neighbour may not."""
    creds = await stack.credentials("/v1/credentials/service-uploads?key=services/svc-a/report.pdf")
    async with _sdk(creds) as client:
        assert await _put(client, "services/svc-a/report.pdf", b"%PDF") is None
        assert await _get(client, "services/svc-a/report.pdf") == b"%PDF"
        assert await _put(client, "services/svc-a/report.pdf.bak") == "AccessDenied"
        assert await _list(client, "services/svc-a/") == "AccessDenied"


async def test_a_120_s_token_works_at_119_s_and_is_refused_at_121_s(stack: Stack) -> None:
    """quick-upload: the emulator's RAM evaluation refuses the token after its deadline."""
    creds = await stack.credentials("/v1/credentials/quick-upload", caller="alice")
    assert creds["ExpiresIn"] == 120
    async with _sdk(creds) as client:
        assert await _put(client, "uploads/alice/at-0.png") is None
        stack.clock.advance(119)
        assert await _put(client, "uploads/alice/at-119.png") is None
        stack.clock.advance(2)
        assert await _put(client, "uploads/alice/at-121.png") == "AccessDenied"
    assert stack.dev.oss.read_object(BUCKET, "uploads/alice/at-121.png") is None
    issued = stack.dev.sts.issued[creds["AccessKeyId"]]
    assert issued.expires_at - stack.clock.now >= 900 - 121  # still valid at STS level


async def test_a_url_signed_with_a_short_token_is_clamped_to_its_deadline(
    stack: Stack,
) -> None:
    """A presigned PUT from a 120 s token 30 s old lives 90 s: works at 119 s, refused at 121 s."""
    body = {
        "policy": "quick-upload",
        "key": "uploads/alice/me.png",
        "content_type": "image/png",
        "content_length": 3,  # the policy sets max_object_bytes: the size is signed
    }
    async with stack.client.post("/v1/presign", json=body, headers=stack.auth("alice")) as resp:
        assert resp.status == 200
    stack.clock.advance(30)
    body["expires_seconds"] = 120
    async with stack.client.post("/v1/presign", json=body, headers=stack.auth("alice")) as resp:
        signed = await resp.json()
    assert (signed["expires_in"], signed["clamped"]) == (90, True)
    assert stack.dev.sts.assume_role_calls() == 1  # the cached token signed, clamped
    headers = signed["signed_headers"]
    stack.clock.advance(89)  # 119 s after the token was fetched
    assert (await _send("PUT", signed["url"], headers, b"png"))[0] == 200
    stack.clock.advance(2)  # 121 s
    status, text = await _send("PUT", signed["url"], headers, b"png")
    assert status == 403
    assert "AccessDenied" in text


async def _send(
    method: str, url: str, headers: dict[str, str], data: bytes = b"", local: str = "127.0.0.1"
) -> tuple[int, str]:
    """Exactly the given headers, from the loopback address ``local``."""
    connector = aiohttp.TCPConnector(local_addr=(local, 0))
    async with (
        aiohttp.ClientSession(connector=connector, skip_auto_headers=["Content-Type"]) as session,
        session.request(method, url, headers=headers, data=data) as resp,
    ):
        return resp.status, await resp.text()


def _signed_get(stack: Stack, creds: dict[str, Any], key: str) -> str:
    """A GET URL signed by the token itself (oss2, V1), not by the broker."""
    auth = oss2.StsAuth(creds["AccessKeyId"], creds["AccessKeySecret"], creds["SecurityToken"])
    bucket = oss2.Bucket(auth, stack.dev.oss_url, BUCKET, region="cn-hangzhou", app_name="")
    return str(bucket.sign_url("GET", key, 300))


@pytest.mark.parametrize(
    ("fetched_from", "other"), [("127.0.0.1", "127.0.0.2"), ("127.0.0.2", "127.0.0.1")]
)
async def test_a_source_bound_token_works_only_from_its_address(
    stack: Stack, fetched_from: str, other: str
) -> None:
    """pinned-reads: bound to the address that asked; the emulator refuses another one."""
    async with _sdk(await stack.credentials("/v1/credentials/service-uploads")) as writer:
        assert await _put(writer, "services/svc-a/data.csv", b"1,2\n") is None
    creds = await stack.credentials("/v1/credentials/pinned-reads", local=fetched_from)
    url = await asyncio.to_thread(_signed_get, stack, creds, "services/svc-a/data.csv")
    assert await _send("GET", url, {}, local=fetched_from) == (200, "1,2\n")
    status, text = await _send("GET", url, {}, local=other)
    assert status == 403
    assert "AccessDenied" in text


async def test_https_only_and_vpc_tokens_are_refused_over_plain_http(stack: Stack) -> None:
    """secure_transport (and source_vpc) hold nowhere in the emulator: plain HTTP, no VPC."""
    for policy in ("https-only", "vpc-ingest"):
        creds = await stack.credentials(f"/v1/credentials/{policy}")
        prefix = creds["Oss"]["Prefix"]
        async with _sdk(creds) as client:
            assert await _put(client, prefix + "x") == "AccessDenied", policy


# --- presigned URLs and post policies for multi-grant policies ---


async def _sign(stack: Stack, path: str, body: dict[str, Any]) -> tuple[int, Any]:
    async with stack.client.post(path, json=body, headers=stack.auth("svc-a")) as resp:
        return resp.status, await resp.json()


async def _post_form(host: str, fields: dict[str, str], content: bytes) -> int:
    data = aiohttp.FormData()
    for name, value in fields.items():
        data.add_field(name, value)
    data.add_field("file", content, filename="out.csv", content_type="text/csv")
    async with aiohttp.ClientSession() as session, session.post(host, data=data) as resp:
        return resp.status


async def test_a_multi_grant_policy_presigns_for_the_grant_holding_the_key(stack: Stack) -> None:
    """report-jobs: GET URLs on reports/, PUT URLs in services/svc-a/ work; PUT reports/ is 403."""
    await _publish_report(stack, "reports/2026/summary.csv", b"total,42\n")
    get = {"policy": "report-jobs", "key": "reports/2026/summary.csv", "method": "GET"}
    status, signed = await _sign(stack, "/v1/presign", get)
    assert status == 200, signed
    assert await _send("GET", signed["url"], {}) == (200, "total,42\n")
    forged = {"policy": "report-jobs", "key": "reports/2026/forged.csv", "content_length": 1}
    status, refused = await _sign(stack, "/v1/presign", forged)
    assert (status, refused["error"]["code"]) == (403, "AccessDenied")
    assert "does not allow put_object under examplebucket/reports/" in refused["error"]["message"]
    own = {"policy": "report-jobs", "key": "services/svc-a/out.csv", "content_length": 4}
    status, signed = await _sign(stack, "/v1/presign", own)
    assert status == 200, signed
    assert (await _send("PUT", signed["url"], signed["signed_headers"], b"a,b\n"))[0] == 200
    assert stack.dev.oss.read_object(BUCKET, "services/svc-a/out.csv") == b"a,b\n"
    assert stack.dev.oss.read_object(BUCKET, "reports/2026/forged.csv") is None


async def test_a_multi_grant_policy_signs_forms_only_under_a_grant_with_put(stack: Stack) -> None:
    """report-jobs: a form defaults to services/svc-a/ and uploads; one under reports/ is 403."""
    status, form = await _sign(stack, "/v1/post-policy", {"policy": "report-jobs"})
    assert status == 200, form
    assert form["fields"]["key"] == "services/svc-a/${filename}"
    assert await _post_form(form["host"], form["fields"], b"a,b\n") == 204
    assert stack.dev.oss.read_object(BUCKET, "services/svc-a/out.csv") == b"a,b\n"
    for where in ({"key_prefix": "reports/"}, {"key": "reports/out.csv"}):
        status, refused = await _sign(stack, "/v1/post-policy", {"policy": "report-jobs", **where})
        assert (status, refused["error"]["code"]) == (403, "AccessDenied"), refused
        assert "does not allow uploads under examplebucket/reports/" in refused["error"]["message"]
    assert stack.dev.oss.read_object(BUCKET, "reports/out.csv") is None


async def test_a_url_for_a_second_bucket_goes_to_that_bucket(stack: Stack) -> None:
    """two-buckets: bucket=otherbucket signs a PUT that lands in otherbucket; none named is 400."""
    body = {"policy": "two-buckets", "key": "drop/svc-a/in.csv"}
    status, refused = await _sign(stack, "/v1/presign", body)
    assert (status, refused["error"]["code"]) == (400, "BucketAmbiguous"), refused
    status, signed = await _sign(stack, "/v1/presign", {**body, "bucket": "otherbucket"})
    assert status == 200, signed
    assert (await _send("PUT", signed["url"], signed["signed_headers"], b"a,b\n"))[0] == 200
    assert stack.dev.oss.read_object("otherbucket", "drop/svc-a/in.csv") == b"a,b\n"
    assert stack.dev.oss.read_object(BUCKET, "drop/svc-a/in.csv") is None
