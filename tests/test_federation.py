"""Per-user federation end to end: a JWT caller's own token exchanged at STS AssumeRoleWithOIDC."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import alibabacloud_oss_v2 as oss
import pytest
from aiohttp.test_utils import TestClient
from alibabacloud_oss_v2.aio import AsyncClient

from broker.credentials.sts import static_credential
from broker.dev.emulators.oss import OssEmulator, start_oss_emulator
from broker.dev.emulators.sts import StsEmulator, start_sts_emulator
from broker.policies import load_policies
from broker.services import build_services
from tests.conftest import (
    CALLERS,
    SOURCE_KEY_ID,
    SOURCE_SECRET,
    FakeClock,
    make_settings,
    start_test_server,
)
from tests.oidc_tokens import PROVIDER_ARN, IdentityProvider, identity_provider

ROLE = "acs:ram::1234567890123456:role/oss-avatar-upload"
FEDERATED_POLICY = f"""
name: my-files
role_arn: {ROLE}
bucket: examplebucket
region: cn-hangzhou
prefix: "users/${{subject}}/"
actions: [put, get]
duration_seconds: 900
max_url_expires_seconds: 600
callers: ["group:browser", "svc-a"]
federation: oidc
oidc_provider_arn: {PROVIDER_ARN}
"""


@dataclass
class Stack:
    client: TestClient[Any, Any]
    sts: StsEmulator
    idp: IdentityProvider
    clock: FakeClock

    async def credentials(self, bearer: str) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {bearer}"}
        async with self.client.get("/v1/credentials/my-files", headers=headers) as resp:
            return resp.status, await resp.json()

    def token(self, **claims: Any) -> str:
        return self.idp.token(self.clock(), groups=["browser"], **claims)


@pytest.fixture
async def stack(tmp_path: Path, clock: FakeClock, aiohttp_client: Any) -> AsyncIterator[Stack]:
    idp = identity_provider()
    policies_dir = tmp_path / "policies"
    policies_dir.mkdir()
    (policies_dir / "my-files.yaml").write_text(FEDERATED_POLICY)
    sts = StsEmulator(
        access_keys={SOURCE_KEY_ID: SOURCE_SECRET},
        clock=clock,
        oidc_providers={PROVIDER_ARN: idp.provider(roles=(ROLE,))},
    )
    store = OssEmulator(
        sts=sts, storage_dir=tmp_path / "oss", clock=clock, buckets={"examplebucket"}
    )
    sts_runner, sts_url = await start_sts_emulator(sts)
    oss_runner, oss_url = await start_oss_emulator(store)
    jwt = {
        "issuer": idp.issuer,
        "audience": idp.client_id,
        "jwks_file": str(idp.write_jwks(tmp_path / "jwks.json")),
        "groups_claim": "groups",
    }
    settings = make_settings(
        sts_url, policies_dir, auth={"jwt": jwt}, oss={"endpoint": oss_url, "addressing": "path"}
    )
    credential = static_credential(SOURCE_KEY_ID, SOURCE_SECRET)
    services = build_services(
        settings, load_policies(policies_dir), credential=credential, clock=clock
    )
    client = await aiohttp_client(await start_test_server(services))
    yield Stack(client, sts, idp, clock)
    await oss_runner.cleanup()
    await sts_runner.cleanup()


def _oss_client(creds: dict[str, Any]) -> AsyncClient:
    provider = oss.credentials.StaticCredentialsProvider(
        creds["AccessKeyId"], creds["AccessKeySecret"], creds["SecurityToken"]
    )
    location = creds["Oss"]
    config = oss.config.Config(
        region=location["Region"],
        endpoint=location["Endpoint"],
        credentials_provider=provider,
        use_path_style=location["AddressStyle"] == "path",
    )
    return AsyncClient(config)


async def test_jwt_caller_gets_credentials_from_assume_role_with_oidc_that_work_in_scope(
    stack: Stack,
) -> None:
    """AssumeRoleWithOIDC via the official SDK, Policy present; the token works only in scope."""
    status, creds = await stack.credentials(stack.token(sub="alice"))
    assert status == 200, creds
    (call,) = stack.sts.calls
    assert call.params["Action"] == "AssumeRoleWithOIDC"
    assert call.access_key_id == ""  # the broker's own identity was not used
    assert call.params["OIDCProviderArn"] == PROVIDER_ARN
    assert call.params["Policy"]
    assert "users/alice/" in call.params["Policy"]
    assert stack.sts.issued[creds["AccessKeyId"]].policy == call.params["Policy"]
    client = _oss_client(creds)
    async with client:
        put = oss.PutObjectRequest(bucket="examplebucket", key="users/alice/a.txt", body=b"hi")
        assert (await client.put_object(put)).status_code == 200
        got = await client.get_object(
            oss.GetObjectRequest(bucket="examplebucket", key="users/alice/a.txt")
        )
        assert got.status_code == 200
        outside = oss.PutObjectRequest(bucket="examplebucket", key="users/bob/a.txt", body=b"x")
        with pytest.raises(oss.exceptions.OperationError) as caught:
            await client.put_object(outside)
        assert "AccessDenied" in str(caught.value)


async def test_two_users_never_share_and_one_users_concurrent_misses_share_one_call(
    stack: Stack,
) -> None:
    """Cache and single flight follow the user: 5 parallel alice misses → 1 call; bob → his own."""
    alice = stack.token(sub="alice")
    results = await asyncio.gather(*(stack.credentials(alice) for _ in range(5)))
    assert {status for status, _ in results} == {200}
    assert len({creds["AccessKeyId"] for _, creds in results}) == 1
    status, bob = await stack.credentials(stack.token(sub="bob"))
    assert status == 200
    assert bob["AccessKeyId"] != results[0][1]["AccessKeyId"]
    assert stack.sts.assume_role_calls() == 2
    assert [c.params["RoleSessionName"] for c in stack.sts.calls] == ["u.alice", "u.bob"]


async def test_cached_credentials_expire_with_the_users_token(stack: Stack) -> None:
    """A token with 300 s left caps the credentials at 300 s although the policy asks 900 s."""
    status, creds = await stack.credentials(stack.token(exp=int(stack.clock()) + 300))
    assert status == 200
    assert creds["ExpiresIn"] == 300
    issued = stack.sts.issued[creds["AccessKeyId"]]
    assert issued.expires_at == stack.clock() + 900  # what STS granted; the broker serves less
    stack.clock.advance(300 - 60)  # inside the refresh margin: the same user's next call refreshes
    status, again = await stack.credentials(stack.token())
    assert status == 200
    assert again["AccessKeyId"] != creds["AccessKeyId"]
    assert stack.sts.assume_role_calls() == 2


async def test_api_key_callers_of_a_federated_policy_are_refused(stack: Stack) -> None:
    """An API-key caller has no token of its own to exchange: 403, and STS is never called."""
    status, body = await stack.credentials(CALLERS["svc-a"][0])
    assert status == 403
    assert body["error"]["code"] == "AccessDenied"
    assert stack.sts.received == 0


async def test_a_token_about_to_expire_is_refused_before_sts(stack: Stack) -> None:
    """A bearer token with less than the refresh margin left: 401, never sent to STS."""
    status, body = await stack.credentials(stack.token(exp=int(stack.clock()) + 20))
    assert status == 401
    assert body["error"]["code"] == "AuthenticationFailed"
    assert stack.sts.received == 0
