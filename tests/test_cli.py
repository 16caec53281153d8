"""sts-broker's subcommands, in-process and as real processes."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest

from broker.auth import hash_api_key
from broker.cli import main
from broker.dev.emulators.sts import StsEmulator, start_sts_emulator
from tests.cli_help import help_entries
from tests.conftest import POLICIES_DIR, REPO

STS_BROKER = str(Path(sys.executable).parent / "sts-broker")
VALID_HASH = "a" * 64


def _write(tmp_path: Path, text: str, name: str = "broker.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize(
    ("text", "line", "key", "problem"),
    [
        ("listen: {port: 70000}\n", 1, "listen.port", "less than or equal to 65535"),
        ("listen:\n  host: 127.0.0.1\n  prot: 8080\n", 3, "listen.prot", "did you mean port?"),
        ("sts:\n  endpoint: 'ftp://x'\n", 2, "sts.endpoint", "http(s):// URL"),
        ("sts:\n  endpoint: 'http://127.0.0.1:9/path'\n", 2, "sts.endpoint", "may not have a path"),
        ("sts:\n  timeout_seconds: -1\n", 2, "sts.timeout_seconds", "greater than 0"),
        ("cache:\n  refresh_margin_seconds: 99999\n", 2, "cache.refresh_margin_seconds", "3600"),
        ("cache:\n  max_entries: zero\n", 2, "cache.max_entries", "valid integer"),
        (
            "auth:\n  api_keys:\n    - id: svc\n      key_sha256: NOTHEX\n",
            4,
            "auth.api_keys.0.key_sha256",
            "64 lower-case hex",
        ),
        (
            f"auth:\n  api_keys:\n    - id: a\n      key_sha256: {VALID_HASH}\n"
            f"    - id: a\n      key_sha256: {VALID_HASH}\n",
            2,
            "auth.api_keys",
            "listed twice",
        ),
        (
            f"auth:\n  api_keys:\n    - id: 'bad id*'\n      key_sha256: {VALID_HASH}\n",
            3,
            "auth.api_keys.0.id",
            "should match pattern",
        ),
        ("auth:\n  api_keys:\n    - id: svc\n", 3, "auth.api_keys.0", "exactly one of key_sha256"),
        (
            "auth:\n  api_keys:\n    - id: svc\n      key_sha256_env: NOT_SET_ANYWHERE_42\n",
            4,
            "auth.api_keys.0.key_sha256_env",
            "NOT_SET_ANYWHERE_42 is not set",
        ),
        (
            "auth:\n  jwt:\n    issuer: https://idp/\n    audience: web\n",
            2,
            "auth.jwt",
            "exactly one of jwks_file or jwks_url",
        ),
        ("cors:\n  allow_origins: ['app.example.com']\n", 2, "cors.allow_origins", "not an origin"),
        ("logging:\n  format: xml\n", 2, "logging.format", "'auto', 'json' or 'console'"),
        ("listen: [1, 2\n", 1, "", "invalid YAML"),
        ("- just\n- a list\n", 1, "(top level)", "must be a mapping"),
        ("policies_dir: ./does-not-exist\n", 0, "", "does-not-exist"),
    ],
)
def test_bad_config_exits_2_naming_file_line_key_problem(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    text: str,
    line: int,
    key: str,
    problem: str,
) -> None:
    """Each configuration mistake exits 2 with file, line, key and what is wrong."""
    path = _write(tmp_path, text)
    assert main(["check", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert problem in err
    if line:
        assert f"{path}:{line}: {key}" in err


def test_bad_policy_file_exits_2_with_file_and_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """check on a policy file with an undefined variable exits 2 naming file:line and key."""
    text = (POLICIES_DIR / "avatar-upload.yaml").read_text().replace("${subject}", "${subjct}")
    path = _write(tmp_path, text, "avatar.yaml")
    assert main(["check", str(path)]) == 2
    err = capsys.readouterr().err
    assert re.search(rf"{re.escape(str(path))}:\d+: prefix: .*\$\{{subjct\}}", err)


def test_check_accepts_the_example_config_and_policies(capsys: pytest.CaptureFixture[str]) -> None:
    """The shipped example config and policies pass check."""
    files = [str(path) for path in sorted(POLICIES_DIR.glob("*.yaml"))]
    assert main(["check", "--config", str(REPO / "config" / "broker.yaml"), *files]) == 0
    assert f"{len(files)} policies" in capsys.readouterr().out


def test_render_prints_policy_and_length(capsys: pytest.CaptureFixture[str]) -> None:
    """render prints the exact RAM policy for a subject and its length against 2,048."""
    assert (
        main(["render", "avatar-upload", "--subject", "alice", "--policies-dir", str(POLICIES_DIR)])
        == 0
    )
    out = capsys.readouterr().out
    document, _, tail = out.partition("\n\n")
    parsed = json.loads(document)
    assert parsed["Statement"][0]["Resource"] == ["acs:oss:*:*:examplebucket/avatars/alice/*"]
    minified = json.dumps(parsed, separators=(",", ":"))
    assert f"{len(minified)} of 2048 characters" in tail


def test_render_refuses_unsafe_subject_without_echoing_it(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """render with a widening subject exits non-zero and never prints the value."""
    code = main(["render", "avatar-upload", "--subject", "*", "--policies-dir", str(POLICIES_DIR)])
    assert code == 1
    captured = capsys.readouterr()
    assert "*" not in captured.out
    assert "${subject}" in captured.err


_COMMANDS = ("serve", "dev", "check", "render", "hash-key")


def _help(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    with pytest.raises(SystemExit) as exited:
        main([*argv, "--help"])
    assert exited.value.code == 0
    return capsys.readouterr().out


def test_help_says_what_the_tool_does_its_commands_and_where_docs_are(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """sts-broker --help: a user-facing purpose, every command with a summary, the docs."""
    text = _help(capsys)
    assert "temporary, narrowly scoped Alibaba Cloud STS credentials" in text
    assert "argv" not in text  # not the module's internal docstring
    for command in _COMMANDS:
        assert re.search(rf"^    {command} +\w", text, re.MULTILINE), command
    for doc in ("README.md", "policies/README.md", "docs/api.md"):
        assert doc in text
    assert "sts-broker dev" in text


@pytest.mark.parametrize("command", _COMMANDS)
def test_every_option_of_every_command_has_a_help_line(
    capsys: pytest.CaptureFixture[str], command: str
) -> None:
    """Each option and argument that COMMAND --help lists comes with a line of help."""
    entries = help_entries(_help(capsys, command))
    assert "-h, --help" in entries
    assert len(entries) > 1
    assert [name for name, text in entries.items() if not text] == []


def test_import_cli_loads_no_dev_mode() -> None:
    """import broker.cli (what serve runs) imports nothing from broker.dev."""
    check = "import sys, broker.cli; print([m for m in sys.modules if m.startswith('broker.dev')])"
    result = subprocess.run(  # noqa: S603 - our own interpreter, fixed arguments
        [sys.executable, "-c", check], capture_output=True, text=True, check=True, cwd=REPO
    )
    assert result.stdout.strip() == "[]"


def test_hash_key(capsys: pytest.CaptureFixture[str]) -> None:
    """hash-key prints the sha256 the config wants; without a key it makes one."""
    assert main(["hash-key", "--key", "example-key-do-not-use"]) == 0
    assert hash_api_key("example-key-do-not-use") in capsys.readouterr().out


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def _wait_for_line(stream: asyncio.StreamReader, pattern: str, seconds: float = 20) -> str:
    async with asyncio.timeout(seconds):
        while True:
            line = (await stream.readline()).decode()
            if not line:
                raise AssertionError(f"process ended before printing {pattern!r}")
            if re.search(pattern, line):
                return line


def _chain_env() -> dict[str, str]:
    """The environment with the broker's identity for the default credential chain."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("ALIBABA_CLOUD")}
    env.update(
        ALIBABA_CLOUD_ACCESS_KEY_ID="LTAI-chain-test",
        ALIBABA_CLOUD_ACCESS_KEY_SECRET="chain-secret",
        ALIBABA_CLOUD_ECS_METADATA_DISABLED="true",
    )
    return env


@contextlib.asynccontextmanager
async def _sts_broker(
    *args: str, env: dict[str, str] | None = None, cwd: Path | None = None
) -> AsyncIterator[asyncio.subprocess.Process]:
    """``sts-broker ARGS`` as a real process (stderr piped); killed if still running at the end."""
    proc = await asyncio.create_subprocess_exec(
        STS_BROKER, *args, env=env, cwd=cwd, stderr=asyncio.subprocess.PIPE
    )
    try:
        yield proc
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


@pytest.fixture
async def real_sts() -> AsyncIterator[tuple[StsEmulator, str]]:
    emulator = StsEmulator(access_keys={"LTAI-chain-test": "chain-secret"})
    runner, url = await start_sts_emulator(emulator)
    yield emulator, url
    await runner.cleanup()


async def test_serve_uses_the_default_chain_reloads_and_stops(
    tmp_path: Path, real_sts: tuple[StsEmulator, str]
) -> None:
    """serve: identity from the env credential chain, SIGHUP reload, SIGTERM exits 0."""
    emulator, sts_url = real_sts
    port = _free_port()
    policies = tmp_path / "policies"
    policies.mkdir()
    for source in POLICIES_DIR.glob("*.yaml"):
        (policies / source.name).write_text(source.read_text())
    config = _write(
        tmp_path,
        f"listen: {{host: 127.0.0.1, port: {port}}}\n"
        f"sts: {{endpoint: '{sts_url}', timeout_seconds: 5}}\n"
        "policies_dir: policies\n"
        "logging: {format: json}\n"
        f"auth:\n  api_keys:\n    - id: svc-a\n      key_sha256: {hash_api_key('k-svc-a')}\n"
        "      groups: [internal]\n",
    )
    async with _sts_broker("serve", "--config", str(config), env=_chain_env()) as proc:
        assert proc.stderr is not None
        await _wait_for_line(proc.stderr, "broker_started")
        url = f"http://127.0.0.1:{port}/v1/credentials/service-uploads"
        headers = {"Authorization": "Bearer k-svc-a"}
        async with aiohttp.ClientSession() as session, session.get(url, headers=headers) as resp:
            assert resp.status == 200
            assert (await resp.json())["Oss"]["Prefix"] == "services/svc-a/"
        assert emulator.calls[0].access_key_id == "LTAI-chain-test"
        (policies / "broken.yaml").write_text("name: [\n")
        proc.send_signal(signal.SIGHUP)
        await _wait_for_line(proc.stderr, "policies_reload_failed")
        (policies / "broken.yaml").unlink()
        proc.send_signal(signal.SIGHUP)
        await _wait_for_line(proc.stderr, "policies_reloaded")
        proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(20):
            assert await proc.wait() == 0


async def test_dev_mode_prints_a_working_key_and_curl() -> None:
    """dev: emulators and example policies; the printed key works; the banner says how to stop."""
    port = _free_port()
    async with _sts_broker("dev", "--port", str(port), cwd=REPO) as proc:
        assert proc.stderr is not None
        line = await _wait_for_line(proc.stderr, r"dev API key:")
        key = line.split(":", 1)[1].split()[0]
        curl = await _wait_for_line(proc.stderr, r"curl -s -H")
        assert key in curl
        await _wait_for_line(proc.stderr, r"stop: +Ctrl-C")
        url = f"http://127.0.0.1:{port}/v1/credentials/service-uploads"
        headers = {"Authorization": f"Bearer {key}"}
        async with aiohttp.ClientSession() as session, session.get(url, headers=headers) as resp:
            assert resp.status == 200
            body = await resp.json()
        assert body["Oss"]["Prefix"] == "services/dev/"
        assert body["AccessKeyId"].startswith("STS.")
        proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(20):
            assert await proc.wait() == 0


async def test_sigterm_during_load_fails_no_accepted_request(
    tmp_path: Path, real_sts: tuple[StsEmulator, str]
) -> None:
    """SIGTERM while 40 requests wait on a slow STS: all 40 succeed, exit code 0."""
    emulator, sts_url = real_sts
    emulator.faults.delay_seconds = 2.0
    port = _free_port()
    config = _write(
        tmp_path,
        f"listen: {{host: 127.0.0.1, port: {port}, shutdown_timeout_seconds: 10}}\n"
        f"sts: {{endpoint: '{sts_url}', timeout_seconds: 5}}\n"
        f"policies_dir: {POLICIES_DIR}\n"
        "logging: {format: json}\n"
        "auth:\n  api_keys:\n"
        + "".join(
            f"    - id: svc-{i}\n      key_sha256: {hash_api_key(f'k-{i}')}\n"
            "      groups: [internal]\n"
            for i in range(40)
        ),
    )
    async with _sts_broker("serve", "--config", str(config), env=_chain_env()) as proc:
        assert proc.stderr is not None
        await _wait_for_line(proc.stderr, "broker_started")
        url = f"http://127.0.0.1:{port}/v1/credentials/service-uploads"
        async with aiohttp.ClientSession() as session:

            async def fetch(i: int) -> int:
                headers = {"Authorization": f"Bearer k-{i}"}
                async with session.get(url, headers=headers) as resp:
                    await resp.read()
                    return resp.status

            pending = [asyncio.create_task(fetch(i)) for i in range(40)]
            async with asyncio.timeout(10):
                while emulator.received < 40:  # every request is waiting on STS
                    await asyncio.sleep(0.02)
            assert emulator.calls == []  # none answered yet: the signal lands mid-flight
            proc.send_signal(signal.SIGTERM)
            statuses = await asyncio.gather(*pending)
        assert statuses == [200] * 40
        async with asyncio.timeout(20):
            assert await proc.wait() == 0


async def test_serve_with_two_workers_shares_the_port(
    tmp_path: Path, real_sts: tuple[StsEmulator, str]
) -> None:
    """--workers 2: both processes answer on one port and SIGTERM stops them all with 0."""
    _, sts_url = real_sts
    port = _free_port()
    config = _write(
        tmp_path,
        f"listen: {{host: 127.0.0.1, port: {port}}}\n"
        f"sts: {{endpoint: '{sts_url}', timeout_seconds: 5}}\n"
        f"policies_dir: {POLICIES_DIR}\n"
        "logging: {format: json}\n"
        f"auth:\n  api_keys:\n    - id: svc-a\n      key_sha256: {hash_api_key('k-svc-a')}\n"
        "      groups: [internal]\n",
    )
    async with _sts_broker(
        "serve", "--config", str(config), "--workers", "2", env=_chain_env()
    ) as proc:
        assert proc.stderr is not None
        workers = set()
        for _ in range(2):
            line = await _wait_for_line(proc.stderr, "broker_started")
            workers.add(json.loads(line)["worker"])
        assert workers == {0, 1}
        url = f"http://127.0.0.1:{port}/v1/credentials/service-uploads"
        async with aiohttp.ClientSession() as session:
            for _ in range(10):
                headers = {"Authorization": "Bearer k-svc-a", "Connection": "close"}
                async with session.get(url, headers=headers) as resp:
                    assert resp.status == 200
        proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(20):
            assert await proc.wait() == 0


def test_check_reads_the_shared_cache_keys(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """check fails with exit 2 when cache.redis's encryption keys file is unreadable."""
    config = _write(
        tmp_path,
        f"policies_dir: {POLICIES_DIR}\n"
        "cache:\n  backend: redis\n  redis:\n    encryption_keys_file: missing-keys.json\n",
    )
    assert main(["check", "--config", str(config)]) == 2
    assert "missing-keys.json: cannot read file" in capsys.readouterr().err


@pytest.fixture
def taken_port() -> Iterator[int]:
    """A port on 127.0.0.1 that a real listening socket holds for the test's duration."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield int(sock.getsockname()[1])


async def _failure(*args: str, env: dict[str, str] | None = None) -> tuple[int, list[str]]:
    """Run ``sts-broker ARGS`` to its end: exit code and stderr's non-empty lines."""
    async with _sts_broker(*args, env=env, cwd=REPO) as proc:
        assert proc.stderr is not None
        async with asyncio.timeout(30):
            stderr = (await proc.stderr.read()).decode()
            code = await proc.wait()
    return code, [line for line in stderr.splitlines() if line.strip()]


async def test_dev_on_a_taken_port_says_so_in_one_line(taken_port: int) -> None:
    """dev --port P with P taken: one line naming the port and --port / PORT=, exit 1."""
    code, lines = await _failure("dev", "--port", str(taken_port))
    assert code == 1
    assert len(lines) == 1, lines
    assert f"port {taken_port} on 127.0.0.1 is already in use" in lines[0]
    assert "--port N" in lines[0]
    assert "make run PORT=N" in lines[0]


async def test_dev_token_lifetime_outside_its_bounds_is_one_line_exit_2() -> None:
    """dev --token-lifetime 30 (inside the 60 s cache margin): one line saying why, exit 2."""
    code, lines = await _failure("dev", "--port", "0", "--token-lifetime", "30")
    assert code == 2
    assert len(lines) == 1, lines
    assert "--token-lifetime must be more than the broker's 60 s refresh margin" in lines[0]


async def test_dev_token_lifetime_is_in_the_banner_and_the_tokens() -> None:
    """dev --token-lifetime 120: the banner says so; vended tokens expire within 120 s."""
    port = _free_port()
    args = ("dev", "--port", str(port), "--token-lifetime", "120")
    async with _sts_broker(*args, cwd=REPO) as proc:
        assert proc.stderr is not None
        key = (await _wait_for_line(proc.stderr, r"dev API key:")).split(":", 1)[1].split()[0]
        await _wait_for_line(proc.stderr, r"token lifetime: 120 s as issued by the STS emulator")
        url = f"http://127.0.0.1:{port}/v1/credentials/service-uploads"
        headers = {"Authorization": f"Bearer {key}"}
        async with aiohttp.ClientSession() as session, session.get(url, headers=headers) as resp:
            assert resp.status == 200
            body = await resp.json()
        assert 60 < body["ExpiresIn"] <= 120
        proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(20):
            assert await proc.wait() == 0


async def test_serve_on_a_taken_port_says_so_in_one_line(
    tmp_path: Path, taken_port: int, real_sts: tuple[StsEmulator, str]
) -> None:
    """serve with listen.port taken: one line naming the port and listen.port, exit 1."""
    config = _write(
        tmp_path,
        f"listen: {{host: 127.0.0.1, port: {taken_port}}}\n"
        f"sts: {{endpoint: '{real_sts[1]}'}}\n"
        f"policies_dir: {POLICIES_DIR}\n"
        "logging: {format: json}\n",
    )
    code, lines = await _failure("serve", "--config", str(config), env=_chain_env())
    assert code == 1
    assert len(lines) == 1, lines
    assert f"port {taken_port} on 127.0.0.1 is already in use" in lines[0]
    assert f"listen.port in {config}" in lines[0]

