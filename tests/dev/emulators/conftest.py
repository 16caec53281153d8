"""The OSS emulator harness: STS and OSS emulators on real sockets, a token from the STS SDK."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar
from xml.etree import ElementTree

import aiohttp
import alibabacloud_oss_v2 as oss
import alibabacloud_oss_v2.aio as oss_aio
import oss2
import pytest
from aiohttp import web
from alibabacloud_sts20150401 import models as sts_models
from alibabacloud_sts20150401.client import Client as StsSdkClient
from alibabacloud_tea_openapi.utils_models import Config as StsConfig
from multidict import CIMultiDict
from yarl import URL

from broker.dev.emulators.oss import OssEmulator, start_oss_emulator
from broker.dev.emulators.sts import StsEmulator, start_sts_emulator
from tests.conftest import FakeClock

SOURCE_KEY_ID = "LTAI5tOssEmulatorSource"
SOURCE_SECRET = "oss-emulator-source-secret-4c1d"
ROLE_ARN = "acs:ram::1234567890123456:role/oss-avatar-upload"
ACCOUNT = "1234567890123456"
BUCKET = "examplebucket"
REGION = "cn-hangzhou"
ALICE_POLICY = json.dumps(
    {
        "Version": "1",
        "Statement": [
            {
                "Effect": "Allow",
                "Action": [
                    "oss:PutObject",
                    "oss:GetObject",
                    "oss:DeleteObject",
                    "oss:AbortMultipartUpload",
                    "oss:ListParts",
                ],
                "Resource": ["acs:oss:*:*:examplebucket/user/alice/*"],
            },
            {
                "Effect": "Allow",
                "Action": ["oss:ListObjects"],
                "Resource": ["acs:oss:*:*:examplebucket"],
                "Condition": {"StringLike": {"oss:Prefix": ["user/alice/*"]}},
            },
            {
                "Effect": "Deny",
                "Action": "oss:*",
                "Resource": "acs:oss:*:*:examplebucket/user/alice/private/*",
            },
        ],
    }
)

T = TypeVar("T")


@dataclass(frozen=True)
class Creds:
    access_key_id: str
    access_key_secret: str
    security_token: str


@dataclass
class Harness:
    emulator: OssEmulator
    sts: StsEmulator
    url: str
    sts_url: str
    clock: FakeClock
    creds: Creds
    storage_dir: Path


async def assume_role(sts_url: str, policy: str = ALICE_POLICY) -> Creds:
    """STS credentials from the STS emulator, through the official STS SDK."""
    config = StsConfig(
        endpoint=sts_url.removeprefix("http://"),
        protocol="http",
        region_id=REGION,
        access_key_id=SOURCE_KEY_ID,
        access_key_secret=SOURCE_SECRET,
    )
    request = sts_models.AssumeRoleRequest(
        role_arn=ROLE_ARN, role_session_name="alice", duration_seconds=3600, policy=policy
    )
    response = await StsSdkClient(config).assume_role_async(request)
    credentials = response.body.credentials
    return Creds(
        credentials.access_key_id, credentials.access_key_secret, credentials.security_token
    )


async def start_oss(
    sts: StsEmulator, clock: FakeClock, tmp_path: Path, **kwargs: Any
) -> tuple[OssEmulator, web.AppRunner, str]:
    """An OSS emulator on a free port, storing under tmp_path/oss."""
    emulator = OssEmulator(sts=sts, storage_dir=tmp_path / "oss", clock=clock, **kwargs)
    runner, url = await start_oss_emulator(emulator)
    return emulator, runner, url


@pytest.fixture
async def harness(clock: FakeClock, tmp_path: Path) -> AsyncIterator[Harness]:
    sts = StsEmulator(access_keys={SOURCE_KEY_ID: SOURCE_SECRET}, clock=clock)
    sts_runner, sts_url = await start_sts_emulator(sts)
    emulator, runner, url = await start_oss(sts, clock, tmp_path)
    creds = await assume_role(sts_url)
    yield Harness(emulator, sts, url, sts_url, clock, creds, tmp_path / "oss")
    await runner.cleanup()
    await sts_runner.cleanup()


def sdk_client(
    h: Harness,
    *,
    creds: Creds | None = None,
    secret: str | None = None,
    virtual_host: bool = False,
    signature_version: str | None = None,
) -> oss_aio.AsyncClient:
    """The official async OSS client: path style on the emulator's IP, or virtual-host via proxy."""
    c = creds or h.creds
    provider = oss.credentials.StaticCredentialsProvider(
        c.access_key_id, secret or c.access_key_secret, c.security_token
    )
    if virtual_host:
        config = oss.config.Config(
            region=REGION,
            endpoint=f"http://oss-{REGION}.aliyuncs.com",
            credentials_provider=provider,
            proxy_host=h.url,
        )
    else:
        config = oss.config.Config(
            region=REGION, endpoint=h.url, credentials_provider=provider, use_path_style=True
        )
    config.retry_max_attempts = 1
    if signature_version is not None:
        config.signature_version = signature_version
    return oss_aio.AsyncClient(config)


def oss2_bucket(
    h: Harness, *, creds: Creds | None = None, secret: str | None = None, v4: bool = False
) -> oss2.Bucket:
    """oss2 (the SDK users still run) with StsAuth: signature V1 by default, else V4."""
    c = creds or h.creds
    version = oss2.AUTH_VERSION_4 if v4 else oss2.AUTH_VERSION_1
    auth = oss2.StsAuth(
        c.access_key_id, secret or c.access_key_secret, c.security_token, auth_version=version
    )
    # An IP endpoint makes oss2 address the bucket path style; no retries.
    return oss2.Bucket(auth, h.url, BUCKET, region=REGION, connect_timeout=10, app_name="")


async def in_thread(call: Callable[[], T]) -> T:
    """Run a blocking client call (oss2 uses requests) off the event loop serving the emulator."""
    return await asyncio.to_thread(call)


async def oss2_error(call: Callable[[], object]) -> oss2.exceptions.OssError:
    """The OSS error an oss2 call raises."""
    with pytest.raises(oss2.exceptions.OssError) as info:
        await in_thread(call)
    return info.value


async def service_error(call: Awaitable[Any]) -> oss.exceptions.ServiceError:
    """The ServiceError an alibabacloud-oss-v2 call raises."""
    with pytest.raises(oss.exceptions.OperationError) as info:
        await call
    error = info.value.unwrap()
    assert isinstance(error, oss.exceptions.ServiceError)
    return error


def error_xml(body: bytes) -> dict[str, str]:
    """An OSS <Error> body's elements by tag."""
    assert body.startswith(b'<?xml version="1.0" encoding="UTF-8"?>')
    root = ElementTree.fromstring(body)  # noqa: S314 - the emulator's own reply
    assert root.tag == "Error"
    return {child.tag: child.text or "" for child in root}


async def raw(method: str, url: str | URL, **kwargs: Any) -> tuple[int, CIMultiDict[str], bytes]:
    """One plain HTTP request; status, headers (case-insensitive) and body."""
    async with aiohttp.ClientSession() as session, session.request(method, url, **kwargs) as resp:
        return resp.status, CIMultiDict(resp.headers), await resp.read()


async def presign(h: Harness, request: Any, seconds: int = 300) -> oss.PresignResult:
    """The official SDK's V4 presign of ``request``."""
    async with sdk_client(h) as client:
        return await client.presign(request, expires=timedelta(seconds=seconds))
