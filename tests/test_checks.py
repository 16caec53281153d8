"""broker.checks: which policies credential providers fetch, and lifetimes too short for them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from alibabacloud_credentials.provider.uri import _get_stale_time

from broker.checks import (
    PROVIDER_STALE_SECONDS,
    allow_warnings,
    minimum_provider_duration,
    provider_lifetime_warnings,
    providers_of,
    unchecked_group_policies,
)
from broker.config import Settings, load_settings
from broker.policies import Policy, PolicySet, load_policies
from tests.conftest import POLICIES_DIR

_HEX = "0" * 64


def _policy(duration: int, callers: list[str], name: str = "p") -> Policy:
    return Policy.model_validate(
        {
            "name": name,
            "role_arn": "acs:ram::1:role/r",
            "bucket": "examplebucket",
            "region": "cn-hangzhou",
            "actions": ["put"],
            "prefix": "x/${subject}/",
            "duration_seconds": duration,
            "max_url_expires_seconds": 600,
            "callers": callers,
        }
    )


def _settings(*keys: dict[str, Any], **sections: Any) -> Settings:
    api_keys = [{"key_sha256": _HEX, **key} for key in keys]
    return Settings.model_validate({"auth": {"api_keys": api_keys}, **sections})


def test_stale_window_is_the_python_sdks_own() -> None:
    """PROVIDER_STALE_SECONDS is how early alibabacloud-credentials' URI provider refetches."""
    expiration = 1_900_000_000
    assert expiration - _get_stale_time(expiration) == PROVIDER_STALE_SECONDS == 900


@pytest.mark.parametrize(("fraction", "minimum"), [(0.5, 3600), (0.9, 2000), (0.25, 7200)])
def test_minimum_duration_leaves_a_provider_fifteen_minutes(fraction: float, minimum: int) -> None:
    """A token handed out with refresh_fraction of its life left still has 900 + 900 s."""
    assert minimum_provider_duration(fraction) == minimum
    assert minimum * fraction >= 2 * PROVIDER_STALE_SECONDS


def test_without_config_bare_ids_are_the_providers() -> None:
    """Without the config, bare caller ids count, group entries cannot be resolved."""
    policy = _policy(900, ["svc-a", "group:internal"])
    assert providers_of(policy, None) == ["svc-a"]
    assert unchecked_group_policies([_policy(900, ["group:internal"])]) == ["p"]
    assert unchecked_group_policies([policy, _policy(3600, ["group:x"], "q")]) == []


def test_the_effective_lifetime_is_the_one_compared() -> None:
    """A 3600 s policy cut to 300 s by effective_lifetime_seconds warns; uncut, it does not."""
    cut = Policy.model_validate(
        {**_policy(3600, ["svc-a"]).model_dump(), "effective_lifetime_seconds": 300}
    )
    assert provider_lifetime_warnings([_policy(3600, ["svc-a"])]) == []
    [warning] = provider_lifetime_warnings([cut])
    assert "warning: effective_lifetime_seconds: 300 is too short" in warning
    grouped = cut.model_copy(update={"callers": ("group:internal",)})
    assert unchecked_group_policies([grouped]) == ["p"]


def test_with_config_api_keys_by_id_or_group_unless_allow_excludes() -> None:
    """Keys named or in a listed group count; allow without credentials or this policy does not."""
    settings = _settings(
        {"id": "svc-a", "groups": ["internal"]},
        {"id": "svc-b"},
        {"id": "svc-c", "groups": ["internal"], "allow": {"routes": ["presign"]}},
        {"id": "svc-d", "groups": ["internal"], "allow": {"policies": ["other"]}},
        {"id": "svc-e", "groups": ["internal"], "allow": {"routes": ["credentials"]}},
        {"id": "svc-f", "groups": ["browser"]},
    )
    policy = _policy(900, ["svc-b", "group:internal"])
    assert providers_of(policy, settings.auth.api_keys) == ["svc-a", "svc-b", "svc-e"]
    assert providers_of(_policy(900, ["group:browser"]), ()) == []


def test_shipped_examples_give_no_warning() -> None:
    """policies/*.yaml with config/broker.yaml's keys, and on their own, warn about nothing."""
    policies = load_policies(POLICIES_DIR)
    keys = _settings({"id": "svc-reports", "groups": ["internal"]})
    assert provider_lifetime_warnings(policies, keys) == []
    assert provider_lifetime_warnings(policies) == []
    assert policies.get("service-uploads").duration_seconds >= 3600  # type: ignore[union-attr]


def test_short_policy_warning_names_line_caller_effect_and_choice(tmp_path: Path) -> None:
    """The warning is file:line: warning:, names the key, what happens and what to choose."""
    source = (POLICIES_DIR / "avatar-upload.yaml").read_text()
    path = tmp_path / "avatar-upload.yaml"
    path.write_text(source.replace('callers: ["group:browser"]', "callers: [svc-up]"))
    line = 1 + path.read_text().splitlines().index("duration_seconds: 900")
    [warning] = provider_lifetime_warnings(load_policies(tmp_path))
    assert warning.startswith(f"{path}:{line}: warning: duration_seconds: 900 is too short ")
    assert "(API key svc-up can fetch this policy)" in warning
    assert "with 450 s left, so they would call the broker on every SDK call" in warning
    assert "choose duration_seconds: 3600 or more" in warning


def test_refresh_fraction_moves_the_minimum() -> None:
    """With cache.refresh_fraction 0.9, 1800 s is too short and 2000 s is enough."""
    settings = _settings({"id": "svc-a"}, cache={"refresh_fraction": 0.9})
    [warning] = provider_lifetime_warnings([_policy(1800, ["svc-a"])], settings)
    assert "every few minutes; choose duration_seconds: 2000 or more" in warning
    assert provider_lifetime_warnings([_policy(2000, ["svc-a"])], settings) == []


def test_allow_naming_an_unusable_policy_is_a_warning(tmp_path: Path) -> None:
    """allow.policies naming no policy, or one whose callers leave the key out, is pointed at."""
    config = tmp_path / "broker.yaml"
    config.write_text(
        f"policies_dir: {POLICIES_DIR}\nauth:\n  api_keys:\n    - id: svc-p\n"
        f"      key_sha256: '{_HEX}'\n      groups: [internal]\n"
        "      allow:\n        policies: [service-uploads, avatar-upload, nope]\n"
    )
    settings = load_settings(config, environ={})
    warnings = allow_warnings(load_policies(POLICIES_DIR), settings)
    assert warnings == [
        f"{config}:8: warning: auth.api_keys.0.allow.policies.1: policy 'avatar-upload' does "
        "not list svc-p or its groups in callers, so this key can never use it",
        f"{config}:8: warning: auth.api_keys.0.allow.policies.2: no policy named 'nope' in "
        f"{POLICIES_DIR}, so this key can never use it",
    ]
    assert allow_warnings(PolicySet({}), _settings({"id": "svc-q"})) == []
