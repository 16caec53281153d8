"""Policy reload: whole-set validation off the event loop, atomic swap, old set kept on errors."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from broker.auth import hash_api_key
from broker.policies import PolicySet, load_policies
from broker.reload import PolicyReloader, reload, reload_policies, watch_policies
from tests.conftest import CALLERS, POLICIES_DIR, BrokerFactory, BrokerHarness


@pytest.fixture
def policies(tmp_path: Path) -> Path:
    directory = tmp_path / "policies"
    shutil.copytree(POLICIES_DIR, directory, ignore=shutil.ignore_patterns("*.md"))
    return directory


@pytest.fixture
async def broker(make_broker: BrokerFactory, policies: Path) -> BrokerHarness:
    return await make_broker(policies_dir=policies)


def _reload_gauge(broker: BrokerHarness) -> float:
    return broker.services.metrics.reload_successful._value.get()  # type: ignore[attr-defined, no-any-return]


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("avatar-upload.yaml", "name: [unclosed\n"),
        ("avatar-upload.yaml", "name: avatar-upload\nbucket: examplebucket\n"),
        ("extra.yaml", "name: extra\nprefix: '*'\n"),
        ("dup.yaml", (POLICIES_DIR / "reports-read.yaml").read_text()),
    ],
    ids=["yaml-syntax", "schema", "widening-prefix", "duplicate-name"],
)
async def test_broken_file_keeps_previous_set(
    broker: BrokerHarness, policies: Path, name: str, text: str
) -> None:
    """A reload that meets a broken file keeps every old policy and reports 0."""
    before = broker.services.policies
    (policies / name).write_text(text)
    assert await reload_policies(broker.services) is False
    assert broker.services.policies is before
    assert _reload_gauge(broker) == 0
    status, _ = await broker.get_json("/v1/credentials/avatar-upload", caller="alice")
    assert status == 200


async def test_removed_file_removes_its_policy_and_empty_dir_is_refused(
    broker: BrokerHarness, policies: Path
) -> None:
    """Deleting a file drops that policy; deleting them all is refused and keeps the set."""
    (policies / "reports-read.yaml").unlink()
    assert await reload_policies(broker.services) is True
    assert broker.services.policies.get("reports-read") is None
    status, _ = await broker.get_json("/v1/credentials/reports-read", caller="svc-reports")
    assert status == 403
    for path in policies.glob("*.yaml"):
        path.unlink()
    assert await reload_policies(broker.services) is False
    assert broker.services.policies.get("avatar-upload") is not None


async def test_edit_takes_effect_on_next_request(broker: BrokerHarness, policies: Path) -> None:
    """An edited prefix is used at once: the cache key follows the rendered policy."""
    _, first = await broker.get_json("/v1/credentials/avatar-upload", caller="alice")
    path = policies / "avatar-upload.yaml"
    path.write_text(path.read_text().replace("avatars/${subject}/", "faces/${subject}/"))
    assert await reload_policies(broker.services) is True
    _, second = await broker.get_json("/v1/credentials/avatar-upload", caller="alice")
    assert (first["Oss"]["Prefix"], second["Oss"]["Prefix"]) == ("avatars/alice/", "faces/alice/")
    assert second["AccessKeyId"] != first["AccessKeyId"]
    assert "faces/alice/" in broker.sts.emulator.calls[-1].params["Policy"]


def _configmap(root: Path, version: str, files: dict[str, str]) -> None:
    """Lay out files as the kubelet does: ..VERSION/ holds them, ..data points at it."""
    target = root / f"..{version}"
    target.mkdir()
    for name, text in files.items():
        (target / name).write_text(text)
        link = root / name
        if not link.is_symlink():
            link.symlink_to(Path("..data") / name)
    temporary = root / "..data_tmp"
    temporary.symlink_to(target.name)
    os.replace(temporary, root / "..data")  # the atomic swap


async def test_kubernetes_symlink_swap(make_broker: BrokerFactory, tmp_path: Path) -> None:
    """A ConfigMap-style ..data symlink swap is picked up whole on reload."""
    root = tmp_path / "configmap"
    root.mkdir()
    original = {p.name: p.read_text() for p in POLICIES_DIR.glob("*.yaml")}
    _configmap(root, "2026_11_21_v1", original)
    broker = await make_broker(policies_dir=root)
    assert broker.services.policies.get("avatar-upload") is not None
    edited = dict(original)
    edited["avatar-upload.yaml"] = original["avatar-upload.yaml"].replace("avatars/", "pics/")
    _configmap(root, "2026_11_21_v2", edited)
    assert await reload_policies(broker.services) is True
    _, body = await broker.get_json("/v1/credentials/avatar-upload", caller="alice")
    assert body["Oss"]["Prefix"] == "pics/alice/"


@contextlib.asynccontextmanager
async def _watching(broker: BrokerHarness) -> AsyncIterator[asyncio.Queue[bool]]:
    """Run the watcher until the block ends; yield once it watches, with its reload outcomes."""
    ready = asyncio.Event()
    outcomes: asyncio.Queue[bool] = asyncio.Queue()
    task = asyncio.create_task(
        watch_policies(broker.services, ready=ready, reloaded=outcomes.put_nowait)
    )
    try:
        async with asyncio.timeout(30):  # a guard against a hang, not a measurement
            await ready.wait()
            yield outcomes
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_watcher_reloads_on_change(broker: BrokerHarness, policies: Path) -> None:
    """With watching on, a changed file is reloaded without a signal, once the watcher is ready."""
    async with _watching(broker) as outcomes:
        path = policies / "avatar-upload.yaml"
        path.write_text(path.read_text().replace("avatars/${subject}/", "watched/${subject}/"))
        while "watched/" not in _avatar_prefix(broker):
            await outcomes.get()  # a reload happened: look again


async def test_watcher_keeps_the_set_when_a_change_breaks_it(
    broker: BrokerHarness, policies: Path
) -> None:
    """A watched change that breaks a file is reported as a failed reload; the old set stays."""
    before = broker.services.policies
    async with _watching(broker) as outcomes:
        (policies / "avatar-upload.yaml").write_text("name: [unclosed\n")
        assert await outcomes.get() is False
    assert broker.services.policies is before


def _avatar_prefix(broker: BrokerHarness) -> str:
    policy = broker.services.policies.get("avatar-upload")
    assert policy is not None
    return policy.prefix


def _write_auth(path: Path, revoked: dict[str, list[str]] | None = None, drop: str = "") -> None:
    """A configuration file holding the harness's API keys (minus ``drop``) and a deny list."""
    keys = [
        {"id": caller, "key_sha256": hash_api_key(key), "groups": list(groups)}
        for caller, (key, groups) in CALLERS.items()
        if caller != drop
    ]
    auth: dict[str, object] = {"api_keys": keys}
    if revoked is not None:
        auth["revoked"] = revoked
    path.write_text(json.dumps({"auth": auth}))  # JSON is YAML


@pytest.fixture
def config_file(broker: BrokerHarness, tmp_path: Path) -> Path:
    path = tmp_path / "broker.yaml"
    _write_auth(path)
    services = broker.services
    services.settings = services.settings.model_copy(update={"source": path})
    return path


async def test_revoked_caller_is_refused_and_purged_at_once(
    broker: BrokerHarness, config_file: Path
) -> None:
    """A reload revoking a caller: its next request is 401, its entries gone, others served."""
    assert (await broker.get_json("/v1/credentials/avatar-upload", caller="alice"))[0] == 200
    assert (await broker.get_json("/v1/credentials/service-uploads", caller="svc-a"))[0] == 200
    _write_auth(config_file, revoked={"callers": ["alice"]})
    assert reload(broker.services) is True
    status, body = await broker.get_json("/v1/credentials/avatar-upload", caller="alice")
    assert (status, body["error"]["code"]) == (401, "AuthenticationFailed")
    assert broker.services.cache.entries(frozenset({"alice"})) == []
    assert len(broker.services.cache.entries(frozenset({"svc-a"}))) == 1
    assert (await broker.get_json("/v1/credentials/service-uploads", caller="svc-a"))[0] == 200


async def test_removed_key_is_refused_like_a_revoked_one_and_purged(
    broker: BrokerHarness, config_file: Path
) -> None:
    """A key taken out of the file: the same 401 as revoked, and its cached entries purged."""
    assert (await broker.get_json("/v1/credentials/avatar-upload", caller="alice"))[0] == 200
    _write_auth(config_file, drop="alice")
    assert reload(broker.services) is True
    status, body = await broker.get_json("/v1/credentials/avatar-upload", caller="alice")
    assert (status, body["error"]["code"]) == (401, "AuthenticationFailed")
    assert broker.services.cache.entries(frozenset({"alice"})) == []


@pytest.mark.parametrize(
    "text",
    ["auth: [unclosed\n", "auth:\n  revoked:\n    callers: ['bad id!']\n", "auth:\n  nope: 1\n"],
    ids=["yaml-syntax", "bad-caller-id", "unknown-key"],
)
async def test_broken_auth_section_keeps_the_previous_one(
    broker: BrokerHarness, config_file: Path, text: str
) -> None:
    """A broken auth section is reported (gauge 0) and the previous keys and deny list stay."""
    _write_auth(config_file, revoked={"callers": ["nobody"]})
    assert reload(broker.services) is True
    before = broker.services.authenticator
    config_file.write_text(text)
    assert reload(broker.services) is False
    assert broker.services.authenticator is before
    assert _reload_gauge(broker) == 0
    assert (await broker.get_json("/v1/credentials/avatar-upload", caller="alice"))[0] == 200
    assert (await broker.get_json("/v1/policies", caller="nobody"))[0] == 401


async def test_unrevoking_in_the_file_admits_the_caller_again(
    broker: BrokerHarness, config_file: Path
) -> None:
    """Taking a caller off the deny list and reloading lets it in again."""
    _write_auth(config_file, revoked={"callers": ["alice"]})
    assert reload(broker.services) is True
    assert (await broker.get_json("/v1/credentials/avatar-upload", caller="alice"))[0] == 401
    _write_auth(config_file, revoked={"callers": []})
    assert reload(broker.services) is True
    assert (await broker.get_json("/v1/credentials/avatar-upload", caller="alice"))[0] == 200


# --- off the event loop, one at a time, gauges ---

_GUARD_SECONDS = 30.0
"""How long a blocked loader waits before it gives up: a guard against a hang, not a measurement."""


def _timestamp_gauge(broker: BrokerHarness) -> float:
    return broker.services.metrics.reload_timestamp._value.get()  # type: ignore[attr-defined, no-any-return]


def _many_policies(directory: Path, count: int) -> None:
    template = (POLICIES_DIR / "avatar-upload.yaml").read_text()
    for index in range(count):
        text = template.replace("name: avatar-upload", f"name: bulk-{index:03d}")
        (directory / f"bulk-{index:03d}.yaml").write_text(text)


class _GatedLoader:
    """``load_policies`` that signals ``started``, then waits in its thread for ``proceed``."""

    def __init__(self) -> None:
        self.started = threading.Event()
        self.proceed = threading.Event()
        self.running = 0
        self.most_at_once = 0
        self._count = threading.Lock()

    def __call__(self, directory: Path) -> PolicySet:
        with self._count:
            self.running += 1
            self.most_at_once = max(self.most_at_once, self.running)
        try:
            self.started.set()
            if not self.proceed.wait(_GUARD_SECONDS):
                raise AssertionError("the loader was never released")
            return load_policies(directory)
        finally:
            with self._count:
                self.running -= 1


async def test_a_400_file_reload_does_not_stall_requests(
    broker: BrokerHarness, policies: Path
) -> None:
    """While 400 files are being parsed, /healthz and a credentials request are answered."""
    _many_policies(policies, 400)
    loader = _GatedLoader()
    reload = asyncio.create_task(PolicyReloader(broker.services, load=loader).reload())
    assert await asyncio.to_thread(loader.started.wait, _GUARD_SECONDS)
    async with broker.client.get("/healthz") as resp:
        assert resp.status == 200
    status, _ = await broker.get_json("/v1/credentials/avatar-upload", caller="alice")
    assert status == 200
    assert not reload.done()  # both answered while the loader still held the reload
    assert broker.services.policies.get("bulk-000") is None
    loader.proceed.set()
    assert await reload is True
    assert len(broker.services.policies) == 403
    status, _ = await broker.get_json("/v1/credentials/bulk-399", caller="alice")
    assert status == 200


async def test_reloads_run_one_at_a_time_and_the_last_one_wins(
    broker: BrokerHarness, policies: Path
) -> None:
    """Two SIGHUP-style reloads never parse at once; the set loaded last is the one in force."""
    loader = _GatedLoader()
    reloader = PolicyReloader(broker.services, load=loader)
    first = asyncio.create_task(reloader.reload())
    assert await asyncio.to_thread(loader.started.wait, _GUARD_SECONDS)
    path = policies / "avatar-upload.yaml"
    path.write_text(path.read_text().replace("avatars/${subject}/", "second/${subject}/"))
    second = asyncio.create_task(reloader.reload())
    await asyncio.sleep(0)  # one turn of the loop: the second reload runs up to the lock
    loader.proceed.set()
    assert await asyncio.gather(first, second) == [True, True]
    assert loader.most_at_once == 1
    assert _avatar_prefix(broker) == "second/${subject}/"


async def test_failed_reload_keeps_the_timestamp_gauge(
    broker: BrokerHarness, policies: Path
) -> None:
    """A failed reload sets last_reload_successful to 0; the timestamp stays the last good one's."""
    broker.clock.advance(100)
    assert await reload_policies(broker.services) is True
    good_at = _timestamp_gauge(broker)
    assert good_at == broker.clock()
    (policies / "avatar-upload.yaml").write_text("name: [unclosed\n")
    broker.clock.advance(100)
    assert await reload_policies(broker.services) is False
    assert (_reload_gauge(broker), _timestamp_gauge(broker)) == (0, good_at)


async def test_sighup_handler_reloads_in_the_background(
    broker: BrokerHarness, policies: Path
) -> None:
    """reload_soon (what SIGHUP calls) starts a reload without blocking its caller."""
    loader = _GatedLoader()
    reloader = PolicyReloader(broker.services, load=loader)
    path = policies / "avatar-upload.yaml"
    path.write_text(path.read_text().replace("avatars/${subject}/", "hup/${subject}/"))
    task = reloader.reload_soon()  # returns at once: the load waits for `proceed` in its thread
    assert await asyncio.to_thread(loader.started.wait, _GUARD_SECONDS)
    assert "hup/" not in _avatar_prefix(broker)
    loader.proceed.set()
    assert await task is True
    assert _avatar_prefix(broker) == "hup/${subject}/"
