"""Per-subject memory of JWT authentication: 10,000 distinct subjects, and what the broker keeps.

Run as ``python bench/jwt_subjects.py [--subjects 10000]``; prints one JSON
object.  An ES256 key of this run signs one token per subject; its JWKS is
served over HTTP on 127.0.0.1 (``auth.jwt.jwks_url``), and the broker's own
``build_services`` wires the verifier from a real config file (with
``quotas.caller_requests_per_second: 1``, so every caller's bucket is still
refilling, and kept, at the end).
Each token is authenticated as a request would be (``Authenticator``, then
the caller's request quota), and RSS is read before and after.

Which memo grows with the subjects is found, not assumed: every dict,
OrderedDict, cachetools cache or ``functools.lru_cache`` reachable from the
services (a few attributes deep) or living in a ``broker.*`` module is
measured before and after, and each one that grew is reported with its
bound (``maxsize``, or a sibling ``_max_*`` attribute) or "unbounded".
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jwt
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import ECAlgorithm

from broker.auth import quota_key
from broker.config import load_settings
from broker.credentials.sts import static_credential
from broker.policies import load_policies
from broker.services import Services, build_services

__all__ = ["main", "measure"]

POLICIES_DIR = Path(__file__).resolve().parent.parent / "policies"
ISSUER, AUDIENCE, KID = "https://idp.bench.test", "bench-app", "bench-es256"
_DEPTH = 4
_SIZE_WORDS = {"entries", "callers", "keys", "size", "subjects", "tokens"}
_GROWTH = 100  # a container that grew by this much over the run grows per subject


def _rss_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS in /proc/self/status")


async def _serve_jwks(key: ec.EllipticCurvePrivateKey) -> tuple[web.AppRunner, str]:
    """The identity provider's JWKS on 127.0.0.1; the runner and its URL."""
    jwk = ECAlgorithm.to_jwk(key.public_key(), as_dict=True)
    body = {"keys": [{**jwk, "kid": KID, "use": "sig", "alg": "ES256"}]}

    async def jwks(_request: web.Request) -> web.Response:
        return web.json_response(body)

    app = web.Application()
    app.router.add_get("/jwks", jwks)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    port = runner.addresses[0][1]
    return runner, f"http://127.0.0.1:{port}/jwks"


def _services(workdir: Path, jwks_url: str) -> Services:
    config = workdir / "broker.yaml"
    config.write_text(
        f"policies_dir: {POLICIES_DIR}\n"
        "sts: {endpoint: 'http://127.0.0.1:9'}\n"
        "quotas: {caller_requests_per_second: 1, caller_burst: 10}\n"
        f"auth:\n  jwt:\n    issuer: '{ISSUER}'\n    audience: {AUDIENCE}\n"
        f"    jwks_url: '{jwks_url}'\n    groups: [browser]\n",
        encoding="utf-8",
    )
    settings = load_settings(config)
    credential = static_credential("LTAI-bench-jwt", "bench-jwt-secret")
    return build_services(settings, load_policies(settings.policies_dir), credential=credential)


def _tokens(key: ec.EllipticCurvePrivateKey, count: int) -> list[str]:
    now = int(time.time())
    claims = {"iss": ISSUER, "aud": AUDIENCE, "iat": now, "exp": now + 3600}
    return [
        jwt.encode({**claims, "sub": f"user-{index:06d}"}, key, "ES256", headers={"kid": KID})
        for index in range(count)
    ]


def _attributes(owner: object) -> dict[str, object]:
    """An object's attributes, from ``__dict__`` and every ``__slots__`` of its classes."""
    found = dict(getattr(owner, "__dict__", {}))
    for cls in type(owner).__mro__:
        for name in getattr(cls, "__slots__", ()):
            if hasattr(owner, name):
                found[name] = getattr(owner, name)
    return found


def _bound(owner: object, container: object) -> str:
    """The container's maxsize, or its owner's ``_max_*`` attribute, or ``unbounded``."""
    maxsize = getattr(container, "maxsize", None)
    if maxsize is not None:
        return f"maxsize {maxsize:g}"
    limits = {
        name: value
        for name, value in _attributes(owner).items()
        if name.startswith("_max")
        and _SIZE_WORDS & set(name.split("_"))
        and isinstance(value, int | float)
    }
    return ", ".join(f"{name} {value:g}" for name, value in limits.items()) or "unbounded"


def _is_sized_container(value: object) -> bool:
    return isinstance(value, dict) or (hasattr(value, "maxsize") and hasattr(value, "__len__"))


def _walk(root: object, path: str, depth: int, seen: set[int]) -> Iterator[tuple[str, object, Any]]:
    """(path, owner, container) for every sized container reachable by attributes."""
    if depth == 0 or id(root) in seen:
        return
    seen.add(id(root))
    for name, value in _attributes(root).items():
        here = f"{path}.{name}"
        if _is_sized_container(value):
            yield here, root, value
        elif type(value).__module__.startswith(("broker.", "cachetools")):
            yield from _walk(value, here, depth - 1, seen)


def _lru_caches() -> Iterator[tuple[str, Any]]:
    for module_name, module in list(sys.modules.items()):
        if module_name.startswith("broker.") and module is not None:
            for name, value in vars(module).items():
                if hasattr(value, "cache_info"):
                    yield f"{module_name}.{name}", value


def _sizes(services: Services) -> dict[str, tuple[int, str]]:
    sizes = {
        path: (len(container), _bound(owner, container))
        for path, owner, container in _walk(services, "services", _DEPTH, set())
    }
    for path, function in _lru_caches():
        info = function.cache_info()
        sizes[path] = (info.currsize, f"maxsize {info.maxsize}")
    return sizes


async def _authenticate_all(services: Services, tokens: list[str]) -> int:
    subjects = set()
    for token in tokens:
        principal = await services.authenticator.authenticate(token)
        services.quotas.check(quota_key(principal))
        subjects.add(principal.subject)
    return len(subjects)


async def measure(count: int) -> dict[str, Any]:
    """Authenticate ``count`` distinct subjects; RSS and every memo that grew, before/after."""
    key = ec.generate_private_key(ec.SECP256R1())
    tokens = _tokens(key, count)
    runner, url = await _serve_jwks(key)
    try:
        with tempfile.TemporaryDirectory(prefix="bench-jwt-") as workdir:
            services = _services(Path(workdir), url)
            await _authenticate_all(services, tokens[:1])  # JWKS loaded, modules warm
            gc.collect()
            before, rss_before = _sizes(services), _rss_kb()
            started = time.perf_counter()
            subjects = await _authenticate_all(services, tokens)
            seconds = time.perf_counter() - started
            gc.collect()
            after, rss_after = _sizes(services), _rss_kb()
    finally:
        await runner.cleanup()
    grew = {
        path: {"before": before.get(path, (0, ""))[0], "entries": size, "bound": bound}
        for path, (size, bound) in after.items()
        if size - before.get(path, (0, ""))[0] >= _GROWTH
    }
    return {
        "subjects": subjects,
        "verify_us": seconds / count * 1e6,
        "rss_before_mb": rss_before / 1024,
        "rss_after_mb": rss_after / 1024,
        "delta_mb": (rss_after - rss_before) / 1024,
        "memos_grown": grew,
        "containers_watched": len(after),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subjects", type=int, default=10_000)
    print(json.dumps(asyncio.run(measure(parser.parse_args().subjects))))


if __name__ == "__main__":
    main()
