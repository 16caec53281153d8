"""sts-broker credentials: what the official credentials library, shells and scripts get."""

from __future__ import annotations

import asyncio
import calendar
import datetime as dt
import io
import ipaddress
import json
import os
import re
import ssl
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from alibabacloud_credentials.provider.cli_profile import CLIProfileCredentialsProvider
from alibabacloud_credentials.provider.external import ExternalCredentialsProvider
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from broker.cli import main as cli_main
from broker.process_credentials import (
    EXIT_FAILURE,
    EXIT_OK,
    EXIT_REFUSED,
    EXIT_UNAVAILABLE,
    EXIT_UNREACHABLE,
    EXIT_USAGE,
    FetchFailed,
    base_url,
    main,
)
from tests.cli_help import help_entries
from tests.conftest import CALLERS, REPO, BrokerHarness, free_port

STS_BROKER = str(Path(sys.executable).parent / "sts-broker")
POLICY = "service-uploads"
KEY = CALLERS["svc-a"][0]

ServerFactory = Callable[..., Awaitable[TestServer]]


def _url(broker: BrokerHarness) -> str:
    return str(broker.client.make_url("")).rstrip("/")


async def _reply(broker: BrokerHarness, caller: str = "svc-a") -> dict[str, Any]:
    """The broker's own reply for ``caller`` (a cache hit after the command's fetch)."""
    status, body = await broker.get_json(f"/v1/credentials/{POLICY}", caller=caller)
    assert status == 200
    return dict(body)


async def _run(*argv: str) -> tuple[int, str, str]:
    """The command in this process, in a thread (the broker shares this event loop).

    Its output goes to buffers of its own: the broker's log lines go to sys.stdout.
    """
    stdout, stderr = io.StringIO(), io.StringIO()
    code = await asyncio.to_thread(main, list(argv), stdout=stdout, stderr=stderr)
    return code, stdout.getvalue(), stderr.getvalue()


async def _console_script(*argv: str, key: str = KEY) -> tuple[int, str, str]:
    """``sts-broker ARGV`` as a real process, with ``key`` in $STS_BROKER_API_KEY."""
    env = {**os.environ, "STS_BROKER_API_KEY": key}
    proc = await asyncio.create_subprocess_exec(
        STS_BROKER, *argv, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    async with asyncio.timeout(30):
        out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_official_external_provider_accepts_the_process_output(
    broker: BrokerHarness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """alibabacloud-credentials' ExternalCredentialsProvider runs `sts-broker credentials`."""
    monkeypatch.setenv("STS_BROKER_API_KEY", KEY)
    command = f"{STS_BROKER} credentials --url {_url(broker)} --policy {POLICY}"
    provider = ExternalCredentialsProvider(process_command=command, timeout=30)
    credentials = await provider.get_credentials_async()
    reply = await _reply(broker)
    assert credentials.get_access_key_id() == reply["AccessKeyId"]
    assert credentials.get_access_key_secret() == reply["AccessKeySecret"]
    assert credentials.get_security_token() == reply["SecurityToken"]
    expiration = calendar.timegm(time.strptime(reply["Expiration"], "%Y-%m-%dT%H:%M:%SZ"))
    assert credentials.get_expiration() == expiration
    assert credentials.get_provider_name() == "external"


async def test_aliyun_cli_external_profile_is_read_by_the_official_library(
    broker: BrokerHarness, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """An aliyun CLI config.json profile in External mode, read by CLIProfileCredentialsProvider."""
    monkeypatch.setenv("STS_BROKER_API_KEY", KEY)
    monkeypatch.delenv("ALIBABA_CLOUD_CLI_PROFILE_DISABLED", raising=False)
    module = f"{sys.executable} -m broker.process_credentials"
    command = f"{module} --url {_url(broker)} --policy {POLICY}"
    profile = {"name": "broker", "mode": "External", "process_command": command}
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"current": "broker", "profiles": [profile]}))
    provider = CLIProfileCredentialsProvider(profile_file=str(config))
    credentials = await provider.get_credentials_async()
    assert credentials.get_access_key_id() == (await _reply(broker))["AccessKeyId"]
    assert credentials.get_provider_name() == "cli_profile/external"


async def test_env_format_is_evaluated_by_a_shell_into_the_three_variables(
    broker: BrokerHarness,
) -> None:
    """eval "$(sts-broker credentials --format env)" sets the ALIBABA_CLOUD_* trio exactly."""
    script = (
        f'eval "$({STS_BROKER} credentials --format env --url {_url(broker)} --policy {POLICY})"'
        ' && printf "%s\\n%s\\n%s\\n" "$ALIBABA_CLOUD_ACCESS_KEY_ID"'
        ' "$ALIBABA_CLOUD_ACCESS_KEY_SECRET" "$ALIBABA_CLOUD_SECURITY_TOKEN"'
    )
    env = {**os.environ, "STS_BROKER_API_KEY": KEY}
    proc = await asyncio.create_subprocess_exec(
        "bash", "-c", script, env=env, stdout=asyncio.subprocess.PIPE
    )
    async with asyncio.timeout(30):
        out, _ = await proc.communicate()
    assert proc.returncode == 0
    reply = await _reply(broker)
    wanted = [reply["AccessKeyId"], reply["AccessKeySecret"], reply["SecurityToken"]]
    assert out.decode().splitlines() == wanted


async def test_json_format_prints_the_reply_as_is(
    broker: BrokerHarness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--format json prints the broker's reply (the credentials-URI body) unchanged."""
    monkeypatch.setenv("STS_BROKER_API_KEY", KEY)
    code, out, err = await _run("--format", "json", "--url", _url(broker), "--policy", POLICY)
    assert (code, err) == (EXIT_OK, "")
    printed = json.loads(out)
    reply = await _reply(broker)
    assert printed.pop("RequestId") != reply.pop("RequestId")
    assert printed == reply


async def test_process_format_is_exactly_the_documented_fields(broker: BrokerHarness) -> None:
    """sts-broker credentials prints one JSON object: mode, three keys, expiration; no more."""
    argv = ["credentials", "--url", _url(broker), "--policy", POLICY, "--min-ttl", "300"]
    code, out, err = await _console_script(*argv)
    assert (code, err) == (EXIT_OK, "")
    reply = await _reply(broker)
    assert json.loads(out) == {
        "mode": "StsToken",
        "access_key_id": reply["AccessKeyId"],
        "access_key_secret": reply["AccessKeySecret"],
        "sts_token": reply["SecurityToken"],
        "expiration": reply["Expiration"],
    }
    assert out.endswith("}\n")
    assert out.count("\n") == 1


async def test_api_key_file_is_read_and_its_first_line_used(
    broker: BrokerHarness, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """--api-key-file: the first line of the file is the key (and beats the env variable)."""
    monkeypatch.setenv("STS_BROKER_API_KEY", "not-the-key")
    key_file = tmp_path / "key"
    key_file.write_text(f"{KEY}\n")
    argv = ["--url", _url(broker), "--policy", POLICY, "--api-key-file", str(key_file)]
    code, out, _ = await _run(*argv)
    assert code == EXIT_OK
    assert json.loads(out)["access_key_id"] == (await _reply(broker))["AccessKeyId"]


@pytest.mark.parametrize(
    ("caller_key", "argv", "exit_code", "error_code"),
    [
        ("wrong-key-canary-0b7e", [], EXIT_REFUSED, "AuthenticationFailed"),
        (CALLERS["nobody"][0], [], EXIT_REFUSED, "AccessDenied"),
        (KEY, ["--min-ttl", "999999"], EXIT_USAGE, "RequestInvalid"),
    ],
)
async def test_refusals_exit_with_their_code_and_one_line_without_the_key(
    broker: BrokerHarness,
    monkeypatch: pytest.MonkeyPatch,
    caller_key: str,
    argv: list[str],
    exit_code: int,
    error_code: str,
) -> None:
    """401/403 exit 3, a 400 exits 2: one stderr line naming the code, never the key; no stdout."""
    monkeypatch.setenv("STS_BROKER_API_KEY", caller_key)
    code, out, err = await _run("--url", _url(broker), "--policy", POLICY, *argv)
    assert code == exit_code
    assert out == ""
    assert err.count("\n") == 1
    assert error_code in err
    assert "request id" in err
    assert caller_key not in err


async def test_a_wrong_url_path_is_a_usage_error(
    broker: BrokerHarness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A --url whose path is not the broker's (404) exits 2."""
    monkeypatch.setenv("STS_BROKER_API_KEY", KEY)
    code, _, err = await _run("--url", f"{_url(broker)}/wrong", "--policy", POLICY)
    assert code == EXIT_USAGE
    assert "404" in err


async def test_sts_throttling_exits_5(
    broker: BrokerHarness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """STS throttling (the broker's 503) exits 5: the broker or STS is unavailable, retry later."""
    monkeypatch.setenv("STS_BROKER_API_KEY", KEY)
    broker.sts.emulator.faults.update({"throttle": True, "remaining": 1})
    code, out, err = await _run("--url", _url(broker), "--policy", POLICY)
    assert (code, out) == (EXIT_UNAVAILABLE, "")
    assert "retry later" in err
    assert "UpstreamThrottled" in err


async def test_nothing_listening_exits_4(monkeypatch: pytest.MonkeyPatch) -> None:
    """No broker at --url (connection refused) exits 4 with one line naming the URL."""
    monkeypatch.setenv("STS_BROKER_API_KEY", KEY)
    url = f"http://127.0.0.1:{free_port()}"
    code, out, err = await _run("--url", url, "--policy", POLICY, "--timeout", "10")
    assert (code, out) == (EXIT_UNREACHABLE, "")
    assert err.startswith(f"sts-broker credentials: cannot reach the broker at {url}")
    assert err.count("\n") == 1


@pytest.mark.parametrize(
    ("argv", "env", "message"),
    [
        (["--policy", POLICY], {}, "no API key in $STS_BROKER_API_KEY"),
        (["--policy", POLICY, "--api-key-env", "MY_KEY"], {}, "no API key in $MY_KEY"),
        (["--policy", "Bad*Name"], {"STS_BROKER_API_KEY": KEY}, "--policy: a policy name"),
        (["--policy", POLICY], {"STS_BROKER_API_KEY": "two words"}, "characters a header"),
        (["--policy", POLICY, "--min-ttl", "-1"], {"STS_BROKER_API_KEY": KEY}, "--min-ttl"),
        (["--policy", POLICY, "--timeout", "0"], {"STS_BROKER_API_KEY": KEY}, "--timeout"),
        (
            ["--policy", POLICY, "--url", "http://127.0.0.1:1/?access_token=x"],
            {"STS_BROKER_API_KEY": KEY},
            "may not carry user info, a query",
        ),
        (
            ["--policy", POLICY, "--api-key-file", "/nonexistent/key"],
            {},
            "cannot read --api-key-file",
        ),
    ],
)
async def test_usage_errors_exit_2_before_any_request(
    monkeypatch: pytest.MonkeyPatch,
    argv: list[str],
    env: dict[str, str],
    message: str,
) -> None:
    """Missing key, bad policy name, key unfit for a header, bad numbers, a URL with a query: 2."""
    monkeypatch.delenv("STS_BROKER_API_KEY", raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    code, out, err = await _run(*argv)
    assert (code, out) == (EXIT_USAGE, "")
    assert message in err
    assert "two words" not in err


@pytest.mark.parametrize(
    ("url", "allow_http", "problem"),
    [
        ("http://broker.example.com:8080", False, "clear text"),
        ("http://10.0.0.8", False, "clear text"),
        ("https://user:pass@broker.example.com", False, "user info"),
        ("https://broker.example.com/#frag", False, "fragment"),
        ("ftp://broker.example.com", False, "http:// or https://"),
        ("http://127.0.0.1:99999", False, "not a valid URL"),
    ],
)
def test_urls_that_would_leak_the_key_are_refused(url: str, allow_http: bool, problem: str) -> None:
    """Plain http off loopback, credentials or query in the URL, other schemes: refused (exit 2)."""
    with pytest.raises(FetchFailed) as failed:
        base_url(url, allow_http=allow_http)
    assert failed.value.exit_code == EXIT_USAGE
    assert problem in failed.value.message


@pytest.mark.parametrize(
    ("url", "allow_http"),
    [
        ("http://127.0.0.1:8080/", False),
        ("http://localhost:8080", False),
        ("http://[::1]:8080", False),
        ("https://broker.example.com/sts", False),
        ("http://broker.internal:8080", True),
    ],
)
def test_urls_that_keep_the_key_safe_are_accepted(url: str, allow_http: bool) -> None:
    """https anywhere, http on loopback (or with --allow-http); a trailing / is dropped."""
    assert base_url(url, allow_http=allow_http) == url.rstrip("/")


def _hostile_app(key_seen: list[str]) -> web.Application:
    """A server on 127.0.0.1 answering as a broken, hostile or misplaced broker would."""
    secret = "'; touch PWNED; echo '"
    good = {"Code": "Success", "AccessKeyId": "STS.k", "AccessKeySecret": secret}
    good |= {"SecurityToken": "$(touch PWNED)`x`", "Expiration": "2099-01-01T00:00:00Z"}
    echo_error = {"error": {"code": "Bad\x1b[31m", "message": "", "request_id": "r-1"}}
    replies: dict[str, tuple[int, str]] = {
        "hostile-values": (200, json.dumps(good)),
        "no-token": (200, json.dumps({**good, "SecurityToken": ""})),
        "bad-expiration": (200, json.dumps({**good, "Expiration": "tomorrow"})),
        "not-json": (200, "<html>hello</html>"),
        "proxy-502": (502, "<html>Bad Gateway</html>"),
        "echo": (400, json.dumps(echo_error)),
        "huge": (200, " " * (2 << 20)),
    }

    async def handle(request: web.Request) -> web.Response:
        name = request.match_info["policy"]
        if name == "moved":
            raise web.HTTPTemporaryRedirect("/elsewhere")
        status, text = replies[name]
        if name == "echo":
            key = request.headers["Authorization"].removeprefix("Bearer ")
            echo_error["error"]["message"] = f"bad key {key}\nsecond line"
            text = json.dumps(echo_error)
        return web.Response(status=status, text=text, content_type="application/json")

    async def elsewhere(request: web.Request) -> web.Response:
        key_seen.append(request.headers.get("Authorization", ""))
        return web.Response(text="{}")

    app = web.Application()
    app.router.add_get("/v1/credentials/{policy}", handle)
    app.router.add_get("/elsewhere", elsewhere)
    return app


@pytest.mark.parametrize(
    ("policy", "exit_code", "message"),
    [
        ("moved", EXIT_FAILURE, "redirected (give the final URL in --url)"),
        ("no-token", EXIT_FAILURE, "the broker's reply lacks SecurityToken"),
        ("bad-expiration", EXIT_FAILURE, "Expiration is not in STS's format"),
        ("not-json", EXIT_FAILURE, "the broker's reply is not JSON"),
        ("proxy-502", EXIT_UNAVAILABLE, "HTTP 502 (not a broker reply)"),
        ("echo", EXIT_USAGE, "bad key [api key]?second line"),
        ("huge", EXIT_FAILURE, "the reply is larger than 1048576 bytes"),
    ],
)
async def test_broken_replies_fail_loudly_and_safely(
    aiohttp_server: ServerFactory,
    monkeypatch: pytest.MonkeyPatch,
    policy: str,
    exit_code: int,
    message: str,
) -> None:
    """Redirects are not followed; incomplete replies fail; error text is one clean line."""
    key_seen: list[str] = []
    server = await aiohttp_server(_hostile_app(key_seen))
    monkeypatch.setenv("STS_BROKER_API_KEY", KEY)
    url = str(server.make_url("")).rstrip("/")
    code, out, err = await _run("--url", url, "--policy", policy)
    assert (code, out) == (exit_code, "")
    assert message in err
    assert err.count("\n") == 1
    assert "\x1b" not in err
    assert KEY not in err
    assert key_seen == []  # the redirect target never got the key


def _self_signed(directory: Path) -> tuple[Path, ssl.SSLContext]:
    """A certificate for 127.0.0.1 signed by itself: its path (the CA file) and a server context."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = dt.datetime.now(dt.UTC)
    san = x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(san, critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "broker.crt", directory / "broker.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert_path, key_path)
    return cert_path, context


async def test_https_verifies_the_broker_against_ca_file(
    aiohttp_server: ServerFactory, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """https: with --ca-file the reply is printed; without it the unknown CA is refused (exit 4)."""
    ca_file, context = _self_signed(tmp_path)
    server = await aiohttp_server(_hostile_app([]), ssl=context)
    monkeypatch.setenv("STS_BROKER_API_KEY", KEY)
    url = f"https://127.0.0.1:{server.port}"
    argv = ["--url", url, "--policy", "hostile-values"]
    code, out, _ = await _run(*argv, "--ca-file", str(ca_file))
    assert code == EXIT_OK
    assert json.loads(out)["access_key_id"] == "STS.k"
    code, out, err = await _run(*argv)
    assert (code, out) == (EXIT_UNREACHABLE, "")
    assert f"TLS with the broker at {url} failed" in err


async def test_env_values_are_shell_quoted_against_injection(
    aiohttp_server: ServerFactory, tmp_path: Path
) -> None:
    """Values holding quotes, $() and backticks come out of eval literally; nothing runs."""
    server = await aiohttp_server(_hostile_app([]))
    url = str(server.make_url("")).rstrip("/")
    script = (
        f'eval "$({sys.executable} -m broker.process_credentials --format env --url {url}'
        ' --policy hostile-values)" && printf "%s\\n%s\\n"'
        ' "$ALIBABA_CLOUD_ACCESS_KEY_SECRET" "$ALIBABA_CLOUD_SECURITY_TOKEN"'
    )
    env = {**os.environ, "STS_BROKER_API_KEY": KEY}
    proc = await asyncio.create_subprocess_exec(
        "bash", "-c", script, env=env, cwd=tmp_path, stdout=asyncio.subprocess.PIPE
    )
    async with asyncio.timeout(30):
        out, _ = await proc.communicate()
    assert proc.returncode == 0
    assert out.decode().splitlines() == ["'; touch PWNED; echo '", "$(touch PWNED)`x`"]
    assert not (tmp_path / "PWNED").exists()


def test_help_says_where_the_key_comes_from_and_lists_exit_codes(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """credentials --help: every option explained, the key never from argv, the exit codes."""
    with pytest.raises(SystemExit) as exited:
        cli_main(["credentials", "--help"])
    assert exited.value.code == 0
    text = capsys.readouterr().out
    entries = {name: line for name, line in help_entries(text).items() if name.startswith("-")}
    assert {"--policy POLICY", "--api-key-file FILE", "--min-ttl SECONDS"} <= set(entries)
    assert [name for name, help_text in entries.items() if not help_text] == []
    assert "never from the command line, where ps" in text
    for line in ("0 ok", "2 usage", "3 refused", "4 broker unreachable", "5 broker or STS"):
        assert line in text
    with pytest.raises(SystemExit):
        cli_main(["--help"])
    assert re.search(r"^    credentials\s+\w", capsys.readouterr().out, re.MULTILINE)


def test_the_module_alone_imports_no_broker_machinery() -> None:
    """python -m broker.process_credentials loads neither aiohttp nor the SDKs (fast start)."""
    check = (
        "import sys, broker.process_credentials; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('aiohttp', 'structlog', 'alibabacloud_credentials', 'alibabacloud_sts20150401', "
        "'broker') and m not in ('broker', 'broker.names', 'broker.process_credentials')))"
    )
    result = subprocess.run(  # noqa: S603 - our own interpreter, fixed arguments
        [sys.executable, "-c", check], capture_output=True, text=True, check=True, cwd=REPO
    )
    assert result.stdout.strip() == "[]"
