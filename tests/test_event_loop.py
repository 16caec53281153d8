"""broker/event_loop.py: listen.event_loop / --loop choose the loop; uvloop when installed."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest

from broker.auth import hash_api_key
from broker.cli import main
from broker.config import load_settings
from broker.errors import ConfigError
from broker.event_loop import install, running_loop_name
from tests.conftest import POLICIES_DIR, free_port

STS_BROKER = str(Path(sys.executable).parent / "sts-broker")


@pytest.fixture(autouse=True)
def _default_policy_after() -> Iterator[None]:
    """Every test leaves asyncio's default loop policy behind."""
    yield
    asyncio.set_event_loop_policy(None)


@pytest.fixture
def no_uvloop(monkeypatch: pytest.MonkeyPatch) -> None:
    """``import uvloop`` fails as it does where the ``fast`` extra is not installed."""
    monkeypatch.setitem(sys.modules, "uvloop", None)


async def _loop_name() -> str:
    return running_loop_name()


def _runs_on() -> str:
    """The loop a fresh ``asyncio.run`` gets under the installed policy."""
    return asyncio.run(_loop_name())


@pytest.mark.parametrize("choice", ["asyncio", "uvloop"])
def test_each_choice_installs_what_it_names(choice: str) -> None:
    """install('asyncio') runs asyncio's loop, install('uvloop') runs uvloop's, and says so."""
    assert install(choice) == choice
    assert _runs_on() == choice


def test_auto_is_uvloop_when_installed() -> None:
    """auto picks uvloop when it can be imported."""
    assert install("auto") == "uvloop"
    assert _runs_on() == "uvloop"


@pytest.mark.usefixtures("no_uvloop")
def test_auto_falls_back_to_asyncio_without_uvloop() -> None:
    """auto without uvloop installs asyncio's loop, not an error."""
    assert install("auto") == "asyncio"
    assert _runs_on() == "asyncio"


@pytest.mark.usefixtures("no_uvloop")
def test_uvloop_when_missing_is_a_clear_config_error() -> None:
    """Asking for uvloop without it installed names the extra to install."""
    with pytest.raises(ConfigError, match=r"pip install 'oss-sts-broker\[fast\]'"):
        install("uvloop")


def test_an_unknown_choice_is_refused() -> None:
    """install() refuses a loop it does not know."""
    with pytest.raises(ConfigError, match="not one of auto, asyncio, uvloop"):
        install("tokio")


def test_config_accepts_the_three_choices_and_defaults_to_auto(tmp_path: Path) -> None:
    """listen.event_loop defaults to auto and refuses an unknown value at load."""
    config = tmp_path / "broker.yaml"
    config.write_text(f"policies_dir: {POLICIES_DIR}\n", encoding="utf-8")
    assert load_settings(config).listen.event_loop == "auto"
    config.write_text(f"policies_dir: {POLICIES_DIR}\nlisten: {{event_loop: tokio}}\n")
    with pytest.raises(ConfigError, match="event_loop"):
        load_settings(config)


def _config(tmp_path: Path, port: int, event_loop: str) -> Path:
    path = tmp_path / "broker.yaml"
    path.write_text(
        f"listen: {{host: 127.0.0.1, port: {port}, event_loop: {event_loop}}}\n"
        "sts: {endpoint: 'http://127.0.0.1:9', timeout_seconds: 5}\n"
        f"policies_dir: {POLICIES_DIR}\n"
        "logging: {format: json}\n"
        f"auth:\n  api_keys:\n    - id: svc-a\n      key_sha256: {hash_api_key('k-svc-a')}\n"
        "      groups: [internal]\n",
        encoding="utf-8",
    )
    return path


def _env() -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("ALIBABA_CLOUD")}
    env.update(
        ALIBABA_CLOUD_ACCESS_KEY_ID="LTAI-loop-test",
        ALIBABA_CLOUD_ACCESS_KEY_SECRET="loop-secret",
        ALIBABA_CLOUD_ECS_METADATA_DISABLED="true",
    )
    return env


@pytest.mark.usefixtures("no_uvloop")
def test_serve_with_uvloop_missing_exits_2_naming_the_extra(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """serve with listen.event_loop: uvloop and no uvloop: exit 2 before listening, says why."""
    for key, value in _env().items():
        monkeypatch.setenv(key, value)
    config = _config(tmp_path, free_port(), "uvloop")
    assert main(["serve", "--config", str(config)]) == 2
    assert "oss-sts-broker[fast]" in capsys.readouterr().err


@contextlib.asynccontextmanager
async def _serve(*args: str) -> AsyncIterator[asyncio.subprocess.Process]:
    """A real ``sts-broker serve`` (stderr piped); SIGTERM'd and reaped at the end."""
    proc = await asyncio.create_subprocess_exec(
        STS_BROKER, "serve", *args, env=_env(), stderr=asyncio.subprocess.PIPE
    )
    try:
        yield proc
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(20):
                    await proc.wait()
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def _started_lines(stream: asyncio.StreamReader, count: int) -> list[dict[str, object]]:
    """The first ``count`` broker_started log records (waiting at most 30 s)."""
    found: list[dict[str, object]] = []
    async with asyncio.timeout(30):
        while len(found) < count:
            line = (await stream.readline()).decode()
            if not line:
                raise AssertionError("the broker exited before it started")
            if '"broker_started"' in line:
                found.append(json.loads(line))
    return found


async def _healthz(port: int) -> int:
    url = f"http://127.0.0.1:{port}/healthz"
    async with aiohttp.ClientSession() as session, session.get(url) as reply:
        return reply.status


async def test_serve_under_uvloop_serves_healthz(tmp_path: Path) -> None:
    """serve with listen.event_loop: uvloop runs on uvloop (broker_started says so) and serves."""
    port = free_port()
    async with _serve("--config", str(_config(tmp_path, port, "uvloop"))) as proc:
        assert proc.stderr is not None
        (started,) = await _started_lines(proc.stderr, 1)
        assert started["event_loop"] == "uvloop"
        assert await _healthz(port) == 200


async def test_loop_flag_overrides_the_config_in_every_worker(tmp_path: Path) -> None:
    """--loop asyncio beats listen.event_loop: uvloop, in each of --workers 2."""
    port = free_port()
    config = _config(tmp_path, port, "uvloop")
    async with _serve("--config", str(config), "--workers", "2", "--loop", "asyncio") as proc:
        assert proc.stderr is not None
        lines = await _started_lines(proc.stderr, 2)
        assert {line["worker"] for line in lines} == {0, 1}
        assert {line["event_loop"] for line in lines} == {"asyncio"}
        assert await _healthz(port) == 200


def test_settle_heap_freezes_start_up_and_collects_the_young_less_often() -> None:
    """settle_heap moves start-up objects out of the collector and raises the young threshold."""
    import gc

    from broker.event_loop import GC_YOUNG_THRESHOLD, settle_heap

    before = gc.get_threshold()
    try:
        settle_heap()
        assert gc.get_freeze_count() > 0
        assert gc.get_threshold() == (GC_YOUNG_THRESHOLD, before[1], before[2])
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
