"""The processes under test: the STS emulator, brokers (1 or N workers), the hello-world baseline.

Each is its own process in its own process group, registered with an
``ExitStack`` the moment it starts, so an error anywhere stops all of them.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from procs import Child, free_port, get_json, start_child
from sts_server import ACCESS_KEY_ID, ACCESS_KEY_SECRET

from broker.auth import hash_api_key
from broker.config import QuotaSettings, Settings, load_settings

__all__ = ["BROWSER_ID", "SERVICE_ID", "ApiKeys", "Broker", "Stack", "caller_rate_limit"]

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "bench"
STS_BROKER = Path(sys.executable).parent / "sts-broker"
SERVICE_ID = "svc-bench"  # group internal: service-uploads
BROWSER_ID = "web-bench"  # group browser: avatar-upload
WANTED_CALLER_RATE = 1e6
_EVENT_LOOP = re.compile(r'"event_loop": ?"([a-z]+)"')


@dataclass(frozen=True)
class ApiKeys:
    """The two callers' API keys, new for every run."""

    service: str
    browser: str

    @classmethod
    def generate(cls) -> ApiKeys:
        """Fresh random keys."""
        return cls(
            f"bench-svc-{secrets.token_urlsafe(24)}", f"bench-web-{secrets.token_urlsafe(24)}"
        )


@dataclass(frozen=True)
class Broker:
    """A running ``sts-broker serve``."""

    name: str
    child: Child
    url: str
    settings: Settings
    workers: int
    event_loop: str
    """What its ``broker_started`` line says it runs on (``?`` below info level)."""
    api_keys: int

    @property
    def log_path(self) -> Path:
        """Where its stderr (the production JSON log) goes."""
        assert self.child.log_path is not None
        return self.child.log_path


def caller_rate_limit() -> float:
    """1e6 requests/s per caller, or the most ``quotas.caller_requests_per_second`` accepts."""
    field = QuotaSettings.model_fields["caller_requests_per_second"]
    limits = [getattr(item, "le", None) for item in field.metadata]
    return min([WANTED_CALLER_RATE, *(float(le) for le in limits if le is not None)])


def _other_keys(count: int) -> str:
    """``count`` further API keys (random digests of keys nobody holds), as config YAML."""
    digests = (hash_api_key(secrets.token_urlsafe(24)) for _ in range(count))
    return "".join(
        f"    - id: bench-k{index:04d}\n      key_sha256: {digest}\n      groups: [internal]\n"
        for index, digest in enumerate(digests)
    )


def _config_text(
    port: int, sts_url: str, level: str, keys: ApiKeys, api_keys: int, event_loop: str | None
) -> str:
    """The bench broker's config: ``api_keys`` keys, the two callers' LAST in the list."""
    loop = f", event_loop: {event_loop}" if event_loop else ""
    return (
        f"listen: {{host: 127.0.0.1, port: {port}{loop}}}\n"
        f"sts: {{endpoint: '{sts_url}', timeout_seconds: 5}}\n"
        f"policies_dir: {REPO / 'policies'}\n"
        "quotas:\n"
        f"  caller_requests_per_second: {caller_rate_limit():.0f}\n"
        "  caller_burst: 1000000\n"
        "  sts_calls_per_second: 20\n"
        "  sts_burst: 20\n"
        f"logging: {{format: json, level: {level}}}\n"
        "auth:\n  api_keys:\n"
        + _other_keys(api_keys - 2)
        + f"    - id: {BROWSER_ID}\n      key_sha256: {hash_api_key(keys.browser)}\n"
        "      groups: [browser]\n"
        f"    - id: {SERVICE_ID}\n      key_sha256: {hash_api_key(keys.service)}\n"
        "      groups: [internal]\n"
    )


class Stack:
    """Starts the processes; ``exits`` stops every one of them."""

    def __init__(self, workdir: Path, exits: contextlib.ExitStack, keys: ApiKeys) -> None:
        self.workdir = workdir
        self.keys = keys
        self.sts_url = ""
        self._exits = exits
        self.children: list[Child] = []

    def _start(
        self,
        name: str,
        argv: list[str],
        *,
        env: dict[str, str] | None = None,
        log_path: Path | None = None,
        stdout_pipe: bool = True,
    ) -> Child:
        child = start_child(name, argv, env=env, log_path=log_path, stdout_pipe=stdout_pipe)
        self._exits.callback(child.stop)
        self.children.append(child)
        return child

    def start_sts(self) -> str:
        """The STS emulator (bench/sts_server.py); returns its base URL."""
        child = self._start("sts-emulator", [sys.executable, str(BENCH / "sts_server.py")])
        self.sts_url = child.read_line()
        return self.sts_url

    def start_hello(self, get_bytes: int, post_bytes: int) -> str:
        """The hello-world baseline (bench/hello.py); returns its base URL."""
        argv = [sys.executable, str(BENCH / "hello.py")]
        argv += ["--get-bytes", str(get_bytes), "--post-bytes", str(post_bytes)]
        return self._start("hello-world", argv).read_line()

    def start_broker(
        self,
        name: str,
        *,
        workers: int = 1,
        level: str = "info",
        extra_config: str = "",
        api_keys: int = 2,
        event_loop: str | None = None,
    ) -> Broker:
        """``sts-broker serve --config <temp config> --workers N``, ready to serve.

        ``api_keys`` keys are configured (the two callers' are the last two);
        ``event_loop`` sets ``listen.event_loop`` (None: the default, auto).
        ``extra_config`` is YAML appended to the config (top-level sections not set here).
        """
        port = free_port()
        config = self.workdir / f"{name}.yaml"
        text = _config_text(port, self.sts_url, level, self.keys, api_keys, event_loop)
        text += extra_config
        config.write_text(text, encoding="utf-8")
        settings = load_settings(config)  # fail here, with the problem, if it is invalid
        argv = [str(STS_BROKER), "serve", "--config", str(config), "--workers", str(workers)]
        log_path = self.workdir / f"{name}.log"
        child = self._start(name, argv, env=_broker_env(), log_path=log_path, stdout_pipe=False)
        url = f"http://127.0.0.1:{port}"
        child.wait_http_ok(f"{url}/healthz")
        loop = "?"
        if level == "info":
            loop = _wait_for_log(child, log_path, "broker_started", workers)
        return Broker(name, child, url, settings, workers, loop, api_keys)

    def sts_issued(self) -> int:
        """AssumeRole calls the emulator has answered with credentials so far."""
        return int(get_json(f"{self.sts_url}/__emulator__/calls")["issued"])


def _broker_env() -> dict[str, str]:
    """The environment, with the broker's identity matching the emulator's key."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("ALIBABA_CLOUD")}
    env["ALIBABA_CLOUD_ACCESS_KEY_ID"] = ACCESS_KEY_ID
    env["ALIBABA_CLOUD_ACCESS_KEY_SECRET"] = ACCESS_KEY_SECRET
    env["ALIBABA_CLOUD_ECS_METADATA_DISABLED"] = "true"
    return env


def _wait_for_log(child: Child, log_path: Path, event: str, count: int) -> str:
    """Wait (at most 30 s) until ``event`` was logged ``count`` times; its ``event_loop``."""
    deadline = time.monotonic() + 30.0
    while time.monotonic() < deadline:
        text = log_path.read_text(errors="replace")
        if text.count(f'"{event}"') >= count:
            found = _EVENT_LOOP.search(text)
            return found[1] if found else "?"
        if child.popen.poll() is not None:
            raise RuntimeError(f"{child.name} exited with {child.popen.returncode}")
        time.sleep(0.1)
    raise RuntimeError(f"{child.name}: {event} logged fewer than {count} times within 30 s")
