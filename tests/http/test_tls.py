"""TLS on the listener and mTLS callers: identity from the handshake, never from headers."""

from __future__ import annotations

import datetime as dt
import io
import ipaddress
import logging
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import structlog
from aiohttp.test_utils import TestClient
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from broker.config import Settings
from broker.credentials.sts import static_credential
from broker.http.app import ssl_context
from broker.logs import configure_logging
from broker.policies import load_policies
from broker.services import build_services
from tests.conftest import (
    SOURCE_KEY_ID,
    SOURCE_SECRET,
    FakeClock,
    StsHarness,
    make_settings,
    start_test_server,
)


@dataclass
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    rogue_cert: Path
    rogue_key: Path
    ca_key: ec.EllipticCurvePrivateKey
    directory: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _issue(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: tuple[x509.Name, ec.EllipticCurvePrivateKey] | None,
    *,
    ca: bool = False,
    server: bool = False,
    sans: tuple[x509.GeneralName, ...] = (),
) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    issuer_name, issuer_key = issuer if issuer else (_name(subject), key)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if server:
        sans = (*sans, x509.IPAddress(ipaddress.ip_address("127.0.0.1")))
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _write(directory: Path, name: str, cert: x509.Certificate, key: Any) -> tuple[Path, Path]:
    cert_path, key_path = directory / f"{name}.crt", directory / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    directory = tmp_path_factory.mktemp("pki")
    keys = {name: ec.generate_private_key(ec.SECP256R1()) for name in ("ca", "s", "c", "rca", "r")}
    ca = _issue("test-ca", keys["ca"], None, ca=True)
    rogue_ca = _issue("rogue-ca", keys["rca"], None, ca=True)
    ca_path, _ = _write(directory, "ca", ca, keys["ca"])
    server = _write(
        directory,
        "server",
        _issue("127.0.0.1", keys["s"], (ca.subject, keys["ca"]), server=True),
        keys["s"],
    )
    client = _write(
        directory, "client", _issue("svc-cert", keys["c"], (ca.subject, keys["ca"])), keys["c"]
    )
    rogue = _write(
        directory,
        "rogue",
        _issue("svc-cert", keys["r"], (rogue_ca.subject, keys["rca"])),
        keys["r"],
    )
    return Pki(ca_path, *server, *client, *rogue, keys["ca"], directory)


ClientFactory = Callable[..., Awaitable[TestClient[Any, Any]]]


_CERT_CALLER = {"id": "svc-cert", "common_name": "svc-cert", "groups": ["internal"]}


async def _tls_broker(
    aiohttp_client: ClientFactory,
    sts: StsHarness,
    clock: FakeClock,
    pki: Pki,
    *,
    required: bool,
    mtls: tuple[dict[str, Any], ...] = (_CERT_CALLER,),
) -> tuple[TestClient[Any, Any], str]:
    settings: Settings = make_settings(
        sts.url,
        listen={
            "tls": {
                "cert_file": pki.server_cert,
                "key_file": pki.server_key,
                "client_ca_file": pki.ca,
                "require_client_cert": required,
            }
        },
        auth={
            "api_keys": make_settings(sts.url).model_dump()["auth"]["api_keys"],
            "mtls": list(mtls),
        },
    )
    assert settings.listen.tls is not None
    services = build_services(
        settings,
        load_policies(settings.policies_dir),
        credential=static_credential(SOURCE_KEY_ID, SOURCE_SECRET),
        clock=clock,
    )
    server = await start_test_server(services, ssl=ssl_context(settings.listen.tls))
    client = await aiohttp_client(server)
    return client, str(client.make_url("/v1/credentials/service-uploads"))


def _client_context(pki: Pki, cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(pki.ca))
    if cert is not None and key is not None:
        context.load_cert_chain(cert, key)
    return context


async def _get(
    url: str, context: ssl.SSLContext, headers: dict[str, str] | None = None
) -> tuple[int, Any]:
    async with (
        aiohttp.ClientSession() as session,
        session.get(url, ssl=context, headers=headers) as resp,
    ):
        return resp.status, await resp.json()


async def test_client_certificate_identifies_the_caller(
    aiohttp_client: ClientFactory, sts: StsHarness, clock: FakeClock, pki: Pki
) -> None:
    """A client certificate from the configured CA maps its CN to a caller id."""
    _, url = await _tls_broker(aiohttp_client, sts, clock, pki, required=False)
    status, body = await _get(url, _client_context(pki, pki.client_cert, pki.client_key))
    assert status == 200
    assert body["Oss"]["Prefix"] == "services/svc-cert/"
    assert sts.emulator.calls[0].params["RoleSessionName"] == "svc-cert"


async def test_no_certificate_falls_back_to_bearer_and_headers_are_ignored(
    aiohttp_client: ClientFactory, sts: StsHarness, clock: FakeClock, pki: Pki
) -> None:
    """Without a certificate, forwarded-certificate headers are ignored: 401."""
    _, url = await _tls_broker(aiohttp_client, sts, clock, pki, required=False)
    forged = {
        "X-Forwarded-Client-Cert": 'Subject="CN=svc-cert"',
        "X-SSL-Client-S-DN": "CN=svc-cert",
    }
    status, body = await _get(url, _client_context(pki), headers=forged)
    assert status == 401
    assert body["error"]["code"] == "AuthenticationFailed"


async def test_certificate_from_another_ca_is_refused(
    aiohttp_client: ClientFactory, sts: StsHarness, clock: FakeClock, pki: Pki
) -> None:
    """A certificate with the right CN from an unknown CA fails the handshake."""
    _, url = await _tls_broker(aiohttp_client, sts, clock, pki, required=False)
    with pytest.raises(aiohttp.ClientError):
        await _get(url, _client_context(pki, pki.rogue_cert, pki.rogue_key))
    assert sts.emulator.calls == []


async def test_required_client_certificate(
    aiohttp_client: ClientFactory, sts: StsHarness, clock: FakeClock, pki: Pki
) -> None:
    """With require_client_cert, a client without one cannot complete the handshake."""
    _, url = await _tls_broker(aiohttp_client, sts, clock, pki, required=True)
    with pytest.raises(aiohttp.ClientError):
        await _get(url, _client_context(pki))
    status, _ = await _get(url, _client_context(pki, pki.client_cert, pki.client_key))
    assert status == 200


async def test_mtls_path_logs_the_caller_and_no_secret(
    aiohttp_client: ClientFactory, sts: StsHarness, clock: FakeClock, pki: Pki
) -> None:
    """An mTLS request logs its caller id; no key material or issued secret reaches the log."""
    stream = io.StringIO()
    configure_logging("json", "debug", stream=stream)
    try:
        _, url = await _tls_broker(aiohttp_client, sts, clock, pki, required=False)
        status, body = await _get(url, _client_context(pki, pki.client_cert, pki.client_key))
    finally:
        structlog.reset_defaults()
        logging.getLogger().handlers.clear()
    assert status == 200
    text = stream.getvalue()
    assert '"caller":"svc-cert"' in text
    key_body = "".join(pki.client_key.read_text().splitlines()[1:-1])
    for secret in (body["AccessKeySecret"], body["SecurityToken"], key_body[:40]):
        assert secret not in text


# --- which certificate name identifies the caller (SAN URI, SAN DNS, common name) ---

SPIFFE_ID = "spiffe://example.org/ns/prod/sa/reports"
_SPIFFE_URI = x509.UniformResourceIdentifier(SPIFFE_ID)
_SAN_CALLERS = (
    _CERT_CALLER,
    {"id": "svc-spiffe", "uri": SPIFFE_ID, "groups": ["internal"]},
    {"id": "svc-dns", "dns": "reports.internal.example.com", "groups": ["internal"]},
)


def _client_cert(pki: Pki, name: str, *sans: x509.GeneralName) -> tuple[Path, Path]:
    """A client certificate from the test CA with CN svc-cert and ``sans``."""
    key = ec.generate_private_key(ec.SECP256R1())
    issuer = (_name("test-ca"), pki.ca_key)
    return _write(pki.directory, name, _issue("svc-cert", key, issuer, sans=sans), key)


@pytest.mark.parametrize(
    ("sans", "caller"),
    [
        ((_SPIFFE_URI,), "svc-spiffe"),
        ((x509.DNSName("Reports.Internal.Example.com"),), "svc-dns"),
        ((x509.DNSName("reports.internal.example.com"), _SPIFFE_URI), "svc-spiffe"),
        ((), "svc-cert"),
    ],
    ids=["spiffe-uri", "dns-any-case", "uri-over-dns", "common-name-without-sans"],
)
async def test_san_uri_then_dns_then_common_name_identify_the_caller(
    aiohttp_client: ClientFactory,
    sts: StsHarness,
    clock: FakeClock,
    pki: Pki,
    sans: tuple[x509.GeneralName, ...],
    caller: str,
) -> None:
    """Real certificates over TLS: a SAN URI beats a DNS SAN, which beats the CN (svc-cert)."""
    _, url = await _tls_broker(aiohttp_client, sts, clock, pki, required=False, mtls=_SAN_CALLERS)
    cert, key = _client_cert(pki, f"client-{caller}-{len(sans)}", *sans)
    status, body = await _get(url, _client_context(pki, cert, key))
    assert status == 200
    assert body["Oss"]["Prefix"] == f"services/{caller}/"
    assert sts.emulator.calls[0].params["RoleSessionName"] == caller


@pytest.mark.parametrize(
    "san",
    [
        x509.UniformResourceIdentifier("spiffe://example.org/ns/prod/sa/other"),
        x509.DNSName("other.internal.example.com"),
    ],
    ids=["unknown-uri", "unknown-dns"],
)
async def test_an_unknown_san_is_not_bypassed_by_a_known_common_name(
    aiohttp_client: ClientFactory,
    sts: StsHarness,
    clock: FakeClock,
    pki: Pki,
    san: x509.GeneralName,
) -> None:
    """A certificate whose SAN names nobody is refused, though its CN (svc-cert) is configured."""
    _, url = await _tls_broker(aiohttp_client, sts, clock, pki, required=False, mtls=_SAN_CALLERS)
    cert, key = _client_cert(pki, f"client-unknown-{type(san).__name__}", san)
    status, body = await _get(url, _client_context(pki, cert, key))
    assert (status, body["error"]["code"]) == (401, "AuthenticationFailed")
    assert sts.emulator.calls == []
