"""The clients' harness: ``sts-broker dev`` as a real server, its replies, and the Node runner.

One ``sts-broker dev --port 0`` process serves the whole ``tests/clients`` session, with the
shipped example policies plus ``tests/clients/policies/`` (a policy granting every action).
The clients get everything from the broker exactly as users do: credentials (bearer header or
``?access_token=`` for credential providers), presigned URLs and post policies.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import requests

REPO = Path(__file__).resolve().parents[2]
NODE_DIR = Path(__file__).resolve().parent / "node"
TEST_POLICY = "client-tests"
# The shipped example meant for credential providers (>= 3600 s: their 15-minute stale window).
PROVIDER_POLICY = "service-uploads"
# Both below pytest's 60 s per-test timeout, so that a hang fails with its own message.
_START_SECONDS = 40.0
_NODE_SECONDS = 45.0
_BANNER = {
    "url": re.compile(r"^\s*broker:\s+(http://\S+)", re.M),
    "oss_url": re.compile(r"^\s*OSS emulator:\s+(http://\S+)", re.M),
    "api_key": re.compile(r"^\s*dev API key:\s+(\S+)", re.M),
}
_METRIC = re.compile(r"^(\w+)(\{[^}]*\})?\s+(\S+)$")


@dataclass
class DevServer:
    """A running ``sts-broker dev``: its URLs, its dev API key and a session to call it."""

    url: str
    oss_url: str
    api_key: str
    http: requests.Session = field(default_factory=requests.Session, repr=False)

    @property
    def caller(self) -> str:
        """The dev key's caller id (what ``${subject}`` renders to)."""
        return "dev"

    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"}

    def credentials_uri(self, policy: str) -> str:
        """The URI a credential provider is given: the API key rides in ``access_token``."""
        return f"{self.url}/v1/credentials/{policy}?access_token={self.api_key}"

    def credentials(self, policy: str = TEST_POLICY) -> dict[str, Any]:
        """``GET /v1/credentials/{policy}``; the reply, which must be a 200."""
        reply = self.http.get(
            f"{self.url}/v1/credentials/{policy}", headers=self.auth(), timeout=10
        )
        assert reply.status_code == 200, reply.text
        body: dict[str, Any] = reply.json()
        return body

    def post(self, path: str, body: Mapping[str, Any]) -> tuple[int, dict[str, Any]]:
        """POST JSON to the broker; its status and JSON reply."""
        reply = self.http.post(f"{self.url}{path}", json=body, headers=self.auth(), timeout=10)
        signed: dict[str, Any] = reply.json()
        for name in ("url", "host"):
            if name in signed:
                loopback_only(signed[name])
        return reply.status_code, signed

    def metrics(self) -> dict[str, float]:
        """``/metrics`` as ``{"name{labels}": value}``."""
        reply = self.http.get(f"{self.url}/metrics", timeout=10)
        assert reply.status_code == 200, reply.text
        values: dict[str, float] = {}
        for line in reply.text.splitlines():
            match = _METRIC.match(line)
            if match and not line.startswith("#"):
                values[match[1] + (match[2] or "")] = float(match[3])
        return values


def sum_metric(metrics: Mapping[str, float], name: str, **labels: str) -> float:
    """The sum of ``name``'s samples whose labels include ``labels``."""
    wanted = [f'{key}="{value}"' for key, value in labels.items()]
    return sum(
        value
        for sample, value in metrics.items()
        if sample.split("{")[0] == name and all(label in sample for label in wanted)
    )


def oss_location(reply: Mapping[str, Any]) -> dict[str, Any]:
    """Where the credentials are for: the reply's ``Oss`` object (never its top level)."""
    location: dict[str, Any] = reply["Oss"]
    loopback_only(location["Endpoint"])
    return location


def loopback_only(url: str) -> str:
    """``url``, if it points at a loopback address: the suite never sends traffic elsewhere."""
    host = urlsplit(url).hostname or ""
    if host != "localhost" and not (_is_ip(host) and ipaddress.ip_address(host).is_loopback):
        pytest.fail(f"refusing to send traffic to {host!r}: tests use loopback addresses only")
    return url


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _policies_dir(root: Path) -> Path:
    """The shipped example policies plus the suite's own, in one directory."""
    target = root / "policies"
    target.mkdir()
    for source in [*sorted((REPO / "policies").glob("*.yaml")), *_own_policies()]:
        shutil.copy(source, target / source.name)
    return target


def _own_policies() -> list[Path]:
    return sorted((Path(__file__).resolve().parent / "policies").glob("*.yaml"))


def _sts_broker() -> str:
    """The ``sts-broker`` console script of the interpreter running the tests."""
    script = Path(sys.executable).with_name("sts-broker")
    if not script.exists():
        pytest.fail(f"{script} is missing: install the project (make .venv/.installed-test)")
    return str(script)


def _read_banner(proc: subprocess.Popen[bytes], log: Path) -> dict[str, str]:
    """Wait (bounded) for dev mode's banner; its broker URL, OSS URL and API key."""
    deadline = time.monotonic() + _START_SECONDS
    while time.monotonic() < deadline:
        text = log.read_text(errors="replace")
        found = {name: pattern.search(text) for name, pattern in _BANNER.items()}
        if all(found.values()):
            return {name: match[1] for name, match in found.items() if match}
        if proc.poll() is not None:
            pytest.fail(f"sts-broker dev exited with {proc.returncode}:\n{text[-4000:]}")
        time.sleep(0.05)
    pytest.fail(f"sts-broker dev printed no banner in {_START_SECONDS:.0f} s")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL if it lingers; always reaped."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def _start_dev(root: Path) -> tuple[subprocess.Popen[bytes], Path]:
    log = root / "dev.log"
    args = [_sts_broker(), "dev", "--port", "0", "--policies-dir", str(_policies_dir(root))]
    args += ["--storage-dir", str(root / "oss")]
    env = {k: v for k, v in os.environ.items() if not k.startswith("ALIBABA_CLOUD_")}
    with log.open("wb") as sink:
        proc = subprocess.Popen(  # noqa: S603 - our own console script
            args, stdin=subprocess.DEVNULL, stdout=sink, stderr=sink, cwd=root, env=env
        )
    return proc, log


@pytest.fixture(scope="session")
def dev(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DevServer]:
    """``sts-broker dev`` on a free port for the whole session."""
    proc, log = _start_dev(tmp_path_factory.mktemp("dev"))
    try:
        server = DevServer(**_read_banner(proc, log))
        assert server.http.get(f"{server.url}/readyz", timeout=10).status_code == 200
        yield server
        server.http.close()
    finally:
        _stop(proc)


@dataclass(frozen=True)
class NodeRunner:
    """``node tests/clients/node/run.js``: a JSON scenario in, JSON results out."""

    node: str
    dev: DevServer

    def __call__(self, steps: list[dict[str, Any]], **options: Any) -> list[dict[str, Any]]:
        scenario = {
            "broker": self.dev.url,
            "apiKey": self.dev.api_key,
            "policy": TEST_POLICY,
            **options,
            "steps": steps,
        }
        done = subprocess.run(  # noqa: S603 - node and our own script
            [self.node, str(NODE_DIR / "run.js")],
            input=json.dumps(scenario).encode(),
            capture_output=True,
            timeout=_NODE_SECONDS,
            check=False,
        )
        stderr = done.stderr.decode(errors="replace")
        assert done.returncode == 0, f"run.js exited {done.returncode}:\n{stderr[-4000:]}"
        results: list[dict[str, Any]] = json.loads(done.stdout)["results"]
        return results


@pytest.fixture(scope="session")
def node_clients() -> str:
    """Node with ``ali-oss`` and ``@alicloud/credentials`` installed from the lock file."""
    node = shutil.which("node")
    if node is None:
        pytest.fail("node is not installed: run `bash tools/install-node-deps.sh` (or make test)")
    script = REPO / "tools" / "install-node-deps.sh"
    done = subprocess.run(  # noqa: S603 - our own script
        [shutil.which("bash") or "/bin/bash", str(script)],
        capture_output=True,
        timeout=300,
        check=False,
    )
    if done.returncode != 0:
        pytest.fail(f"{script} failed:\n{done.stderr.decode(errors='replace')[-4000:]}")
    return node


@pytest.fixture
def run_node(node_clients: str, dev: DevServer) -> NodeRunner:
    return NodeRunner(node_clients, dev)
