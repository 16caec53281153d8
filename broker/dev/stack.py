"""Everything ``sts-broker dev`` runs, with no cloud account: STS and OSS emulators, wired in.

The broker's own source AccessKey is a random one the STS emulator accepts;
signed URLs point at the OSS emulator (path style); a random dev API key
(caller id ``dev``) belongs to every group the example policies name.

``token_lifetime_seconds`` (``sts-broker dev --token-lifetime``, dev only) makes
the STS emulator issue tokens that live that long while the broker still
requests the policy's ``duration_seconds`` (900..43200, as real STS demands),
so token rotation can be watched with real clients in minutes.  It must exceed
the broker's refresh margin, or no token could ever be served.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from broker.auth import generate_api_key, hash_api_key
from broker.config import Settings
from broker.credentials.sts import static_credential
from broker.dev.emulators.oss import OssEmulator, start_oss_emulator
from broker.dev.emulators.sts import StsEmulator, start_sts_emulator
from broker.models import Clock, system_clock
from broker.policies import PolicySet
from broker.services import Services, build_services

__all__ = [
    "DEV_CALLER",
    "MAX_TOKEN_LIFETIME_SECONDS",
    "DevStack",
    "check_token_lifetime",
    "dev_stack",
    "shortest_duration",
]

DEV_CALLER = "dev"
MAX_TOKEN_LIFETIME_SECONDS = 43200
_SOURCE_KEY_ID = "LTAI-dev-broker"


@dataclass(frozen=True)
class DevStack:
    """The running emulators and the broker services that use them."""

    services: Services
    dev_key: str
    sts: StsEmulator
    sts_url: str
    oss: OssEmulator
    oss_url: str
    storage_dir: Path
    token_lifetime_seconds: int | None = None
    """What the STS emulator issues, whatever is requested (None: what is requested)."""


def check_token_lifetime(
    seconds: int,
    refresh_margin_seconds: float,
    longest_seconds: int = MAX_TOKEN_LIFETIME_SECONDS,
) -> None:
    """Raise ValueError unless ``refresh_margin_seconds < seconds <= longest_seconds``.

    ``longest_seconds`` is the shortest ``duration_seconds`` of the policies served:
    real STS never issues more than asked, and the broker refuses a token that
    claims to live longer than it asked for.
    """
    if not refresh_margin_seconds < seconds <= longest_seconds:
        raise ValueError(
            f"--token-lifetime must be more than the broker's {refresh_margin_seconds:g} s "
            f"refresh margin (tokens are served until that long before they expire) and at "
            f"most {longest_seconds} (the shortest duration_seconds of the policies, as real "
            f"STS never issues more than asked); for example 120"
        )


def shortest_duration(policies: PolicySet) -> int:
    """The shortest ``duration_seconds`` among ``policies`` (43200 when there are none)."""
    return min((policy.duration_seconds for policy in policies), default=MAX_TOKEN_LIFETIME_SECONDS)


@asynccontextmanager
async def dev_stack(
    policies: PolicySet,
    policies_dir: Path,
    storage_dir: Path,
    *,
    port: int = 8080,
    clock: Clock = system_clock,
    extra_api_keys: Sequence[Mapping[str, object]] = (),
    token_lifetime_seconds: int | None = None,
) -> AsyncIterator[DevStack]:
    """Start both emulators and build the broker's services against them.

    ``extra_api_keys`` adds callers (``auth.api_keys`` entries) beside the dev key;
    ``token_lifetime_seconds`` shortens the tokens the STS emulator issues.
    """
    source_secret = secrets.token_urlsafe(24)
    sts = _sts_emulator(policies, source_secret, clock, token_lifetime_seconds)
    buckets = frozenset().union(*(policy.buckets for policy in policies))
    oss = OssEmulator(sts=sts, storage_dir=storage_dir, clock=clock, buckets=buckets)
    sts_runner, sts_url = await start_sts_emulator(sts)
    oss_runner, oss_url = await start_oss_emulator(oss)
    try:
        dev_key = generate_api_key()
        api_keys = [_dev_caller(dev_key, policies), *extra_api_keys]
        settings = _dev_settings(port, sts_url, oss_url, policies_dir, api_keys)
        if token_lifetime_seconds is not None:
            check_token_lifetime(
                token_lifetime_seconds,
                settings.cache.refresh_margin_seconds,
                shortest_duration(policies),
            )
        credential = static_credential(_SOURCE_KEY_ID, source_secret)
        services = build_services(settings, policies, credential=credential, clock=clock)
        yield DevStack(
            services, dev_key, sts, sts_url, oss, oss_url, storage_dir, token_lifetime_seconds
        )
    finally:
        await oss_runner.cleanup()
        await sts_runner.cleanup()


def _sts_emulator(
    policies: PolicySet, source_secret: str, clock: Clock, issued_lifetime_seconds: int | None
) -> StsEmulator:
    """An STS emulator accepting the broker's random source key, roles allowed up to 12 h."""
    return StsEmulator(
        access_keys={_SOURCE_KEY_ID: source_secret},
        clock=clock,
        role_max_duration_seconds={policy.role_arn: 43200 for policy in policies},
        issued_lifetime_seconds=issued_lifetime_seconds,
    )


def _dev_settings(
    port: int, sts_url: str, oss_url: str, policies_dir: Path, api_keys: list[Mapping[str, object]]
) -> Settings:
    """The broker's settings in dev mode: the emulators' URLs, path-style OSS, the callers."""
    return Settings.model_validate(
        {
            "listen": {"host": "127.0.0.1", "port": port},
            "sts": {"endpoint": sts_url},
            "oss": {"endpoint": oss_url, "addressing": "path"},
            "policies_dir": policies_dir,
            "auth": {"api_keys": api_keys},
        }
    )


def _dev_caller(dev_key: str, policies: PolicySet) -> dict[str, object]:
    groups = sorted(
        {
            caller.removeprefix("group:")
            for policy in policies
            for caller in policy.callers
            if caller.startswith("group:")
        }
    )
    return {"id": DEV_CALLER, "key_sha256": hash_api_key(dev_key), "groups": groups}
