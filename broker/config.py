"""The configuration file → validated ``Settings``; the one reader of that file.

The ``auth`` section's models live in ``broker.auth_settings`` and are
re-exported here, so ``from broker.config import AuthSettings`` keeps working.

Secrets may live in the environment instead of the file: the file then names
the variable.  The environment is read in three places, each for what it owns:

* here: each ``auth.api_keys[].key_sha256_env`` (checked by ``load_settings``,
  read by ``api_key_hashes``);
* ``broker.credentials``: ``cache.redis.encryption_keys_env`` and
  ``cache.redis.password_env``, once at start;
* the official ``alibabacloud-credentials`` chain: the broker's own identity
  (``ALIBABA_CLOUD_*``; its order is written down in
  ``broker.credentials.sts.default_credential``).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

import pydantic
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    IPvAnyNetwork,
    field_validator,
    model_validator,
)

from broker.auth_settings import (
    HEX_SHA256,
    ApiKeyAllowSettings,
    ApiKeySettings,
    ApiRoute,
    AuthSettings,
    JwtSettings,
    MtlsCallerSettings,
    RevokedSettings,
)
from broker.errors import ConfigError
from broker.yamldoc import YamlDocument, format_validation_error, load_yaml, unknown_key_problem

__all__ = [
    "AUDIT_STREAMS",
    "AdminSettings",
    "ApiKeyAllowSettings",
    "ApiKeySettings",
    "ApiRoute",
    "AuditSettings",
    "AuthSettings",
    "CacheSettings",
    "CorsSettings",
    "FailureGateSettings",
    "JwtSettings",
    "ListenSettings",
    "LoggingSettings",
    "MtlsCallerSettings",
    "OssSettings",
    "QuotaSettings",
    "RedisSettings",
    "RetrySettings",
    "RevokedSettings",
    "Settings",
    "StsSettings",
    "TlsSettings",
    "api_key_hashes",
    "load_settings",
]

_HOST_PORT = re.compile(r"^[A-Za-z0-9.-]+(:[0-9]{1,5})?$")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TlsSettings(_Section):
    """TLS on the listener; with ``client_ca_file``, client certificates (mTLS) too.

    A client certificate verified against ``client_ca_file`` identifies the
    caller through ``auth.mtls``; identity headers from the network (such as
    X-Forwarded-Client-Cert) are never trusted.
    """

    cert_file: Path
    key_file: Path
    client_ca_file: Path | None = None
    require_client_cert: bool = False

    @model_validator(mode="after")
    def _ca_for_required(self) -> TlsSettings:
        if self.require_client_cert and self.client_ca_file is None:
            raise ValueError("require_client_cert needs client_ca_file")
        return self


class ListenSettings(_Section):
    """Where the broker listens, how much it reads from one request and how long it waits.

    The timeouts reap slow or idle clients (see broker/http/connections.py).
    """

    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)
    max_body_bytes: int = Field(default=64 * 1024, ge=1024, le=16 * 1024 * 1024)
    max_header_bytes: int = Field(default=8190, ge=1024, le=65536)
    header_timeout_seconds: float = Field(default=10.0, gt=0, le=300)
    body_timeout_seconds: float = Field(default=30.0, gt=0, le=600)
    keepalive_timeout_seconds: float = Field(default=75.0, gt=0, le=3600)
    shutdown_delay_seconds: float = Field(default=0.0, ge=0, le=60)
    shutdown_timeout_seconds: float = Field(default=15.0, gt=0, le=300)
    event_loop: Literal["auto", "asyncio", "uvloop"] = "auto"
    """``auto``: uvloop when installed (the ``fast`` extra), else asyncio's (broker.event_loop)."""
    tls: TlsSettings | None = None
    trusted_proxies: tuple[IPvAnyNetwork, ...] = ()
    """Networks of the reverse proxies in front of the broker: only from these is
    ``X-Forwarded-For`` believed, and the caller's address is its right-most
    entry outside them (for policies with ``source_ip: caller``)."""


def _check_endpoint(value: str) -> str:
    """A bare host[:port], or an http(s):// URL without path, query or fragment."""
    if "://" in value:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("must be a host name or an http(s):// URL with a host")
        if parts.path not in ("", "/") or parts.query or parts.fragment:
            raise ValueError("a URL endpoint may not have a path, query or fragment")
        return value.rstrip("/")
    if not _HOST_PORT.match(value):
        raise ValueError("must be a host name such as oss-cn-hangzhou.aliyuncs.com")
    return value


def _endpoint_parts(value: str) -> tuple[str, str]:
    """``(scheme, host[:port])``; a bare host means HTTPS."""
    if "://" in value:
        parts = urlsplit(value)
        return parts.scheme, parts.netloc
    return "https", value


class RetrySettings(_Section):
    """Retries of retryable STS failures: exponential backoff, full jitter, one deadline."""

    max_attempts: int = Field(default=3, ge=1, le=10)
    base_delay_seconds: float = Field(default=0.1, gt=0, le=10)
    max_delay_seconds: float = Field(default=2.0, gt=0, le=60)
    deadline_seconds: float = Field(default=8.0, gt=0, le=120)


class FailureGateSettings(_Section):
    """After ``threshold`` non-retryable errors for one scope, stop calling STS for a while."""

    threshold: int = Field(default=3, ge=1, le=100)
    open_seconds: float = Field(default=30.0, gt=0, le=3600)


class StsSettings(_Section):
    """How to reach STS.  ``endpoint`` is a host, or a full URL for emulators."""

    endpoint: str = "sts.cn-hangzhou.aliyuncs.com"
    region: str = Field(default="cn-hangzhou", pattern=r"^[a-z0-9-]+$")
    timeout_seconds: float = Field(default=5.0, gt=0, le=60)
    retry: RetrySettings = RetrySettings()
    failure_gate: FailureGateSettings = FailureGateSettings()

    @field_validator("endpoint")
    @classmethod
    def _check_endpoint(cls, value: str) -> str:
        return _check_endpoint(value)

    @property
    def protocol(self) -> str:
        """``http`` or ``https``: HTTPS unless a full ``http://`` URL was given."""
        return _endpoint_parts(self.endpoint)[0]

    @property
    def host(self) -> str:
        """``host[:port]`` as the STS SDK wants it."""
        return _endpoint_parts(self.endpoint)[1]


class OssSettings(_Section):
    """Where signed URLs and forms point.  Unset: each policy's own OSS endpoint, HTTPS.

    Set ``endpoint`` to a CDN or custom domain (with ``addressing: cname``), or
    to an emulator (``http://127.0.0.1:9100``, ``addressing: path``).
    """

    endpoint: str | None = None
    addressing: Literal["virtual", "path", "cname"] = "virtual"

    @field_validator("endpoint")
    @classmethod
    def _check_endpoint(cls, value: str | None) -> str | None:
        return None if value is None else _check_endpoint(value)

    def scheme_and_host(self, policy_endpoint: str) -> tuple[str, str]:
        """``(scheme, host)`` for a policy whose own endpoint is ``policy_endpoint``."""
        return _endpoint_parts(self.endpoint or policy_endpoint)


class QuotaSettings(_Section):
    """The AssumeRole budget, each caller's share of the STS calls, an optional request rate.

    ``caller_sts_*`` counts the STS calls a caller causes (misses and
    ``min_ttl_seconds`` refreshes that start a fetch; ``broker.quotas``); the
    default, 240 a minute (4/s), is a fifth of the default 20/s budget, so no
    one caller can take more than a fifth of it, and a burst of 10 (half the
    budget's burst) lets a caller start up cold with up to 10 scopes at once.
    ``caller_requests_*`` counts every request; null or 0 (the default) is off.
    """

    caller_requests_per_second: float | None = Field(default=None, ge=0, le=100_000)
    caller_burst: float | None = Field(default=None, ge=1, le=1_000_000)
    caller_sts_calls_per_minute: float | None = Field(default=240.0, ge=0, le=6_000)
    caller_sts_burst: float = Field(default=10.0, ge=1, le=100)
    sts_calls_per_second: float = Field(default=20.0, gt=0, le=100)
    sts_burst: float = Field(default=20.0, ge=1, le=100)
    sts_max_wait_seconds: float = Field(default=2.0, ge=0, le=30)


class RedisSettings(_Section):
    """The shared cache on Redis (``cache.backend: redis``); see broker/credentials/shared_store.py.

    Credentials are stored AES-GCM encrypted with the keys in
    ``encryption_keys_file`` or the environment variable ``encryption_keys_env``
    (exactly one), a JSON document ``{"active": ID, "keys": {ID: base64 of 32 bytes}}``.
    A Redis password comes from ``password_env``, never from the YAML.
    """

    url: str = "redis://127.0.0.1:6379/0"
    password_env: str | None = Field(default=None, pattern=r"^[A-Z_][A-Z0-9_]*$")
    key_prefix: str = Field(default="oss-sts-broker:", min_length=1, max_length=128)
    encryption_keys_file: Path | None = None
    encryption_keys_env: str | None = Field(default=None, pattern=r"^[A-Z_][A-Z0-9_]*$")
    lock_ttl_seconds: float = Field(default=10.0, gt=0, le=300)
    # Longer than one STS fetch (sts.retry.deadline_seconds + quotas.sts_max_wait_seconds):
    # a waiter that gives up while the lock holder still fetches makes a second AssumeRole.
    wait_seconds: float = Field(default=15.0, gt=0, le=60)
    operation_timeout_seconds: float = Field(default=1.0, gt=0, le=10)
    share_sts_budget: bool = True

    @field_validator("url")
    @classmethod
    def _check_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("redis", "rediss", "unix"):
            raise ValueError("must be a redis://, rediss:// or unix:// URL")
        if parts.password:
            raise ValueError("may not hold a password: name its variable in password_env")
        return value

    @model_validator(mode="after")
    def _one_key_source(self) -> RedisSettings:
        if (self.encryption_keys_file is None) == (self.encryption_keys_env is None):
            raise ValueError(
                "give exactly one of encryption_keys_file or encryption_keys_env "
                "(credentials in Redis are always encrypted)"
            )
        return self


class CacheSettings(_Section):
    """Credential cache: never serve inside the margin, refresh hot entries early.

    ``backend: memory`` keeps each process's cache to itself; ``backend: redis``
    puts a shared, encrypted cache on Redis behind it (settings in ``redis``).
    """

    refresh_margin_seconds: int = Field(default=60, ge=0, le=3600)
    max_entries: int = Field(default=100_000, ge=1, le=10_000_000)
    refresh_fraction: float = Field(default=0.5, ge=0.1, le=0.9)
    backend: Literal["memory", "redis"] = "memory"
    redis: RedisSettings | None = None

    @model_validator(mode="after")
    def _redis_for_backend(self) -> CacheSettings:
        if self.backend == "redis" and self.redis is None:
            raise ValueError(
                "backend redis needs a redis section with encryption_keys_file "
                "or encryption_keys_env"
            )
        return self


class AdminSettings(_Section):
    """The local admin channel (`sts-broker cached`, `revoke`); off unless `socket_dir` is set.

    Each broker process listens on ``socket_dir/broker-PID.sock`` (mode 0600,
    in a directory made 0700), so every one of ``serve --workers N`` is reached.
    Only the broker's own user (and root) can connect; the peer's uid is checked too.
    """

    socket_dir: Path | None = None


class CorsSettings(_Section):
    """Browser origins allowed to call the API."""

    allow_origins: tuple[str, ...] = ()

    @field_validator("allow_origins")
    @classmethod
    def _check_origins(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for origin in value:
            parts = urlsplit(origin)
            if parts.scheme not in ("http", "https") or not parts.netloc or parts.path:
                raise ValueError(f"{origin!r} is not an origin like https://app.example.com")
        return value


class LoggingSettings(_Section):
    """Log format (``auto`` = console on a TTY, JSON otherwise), level, and the write buffer.

    Lines wait in a buffer of at most ``max_buffer_bytes`` for a writer thread;
    while stderr is blocked or slow, lines past it are dropped and counted
    (``broker_log_lines_dropped_total``) rather than stopping the broker.
    """

    format: Literal["auto", "json", "console"] = "auto"
    level: Literal["debug", "info", "warning", "error"] = "info"
    max_buffer_bytes: int = Field(default=1024 * 1024, ge=16 * 1024, le=256 * 1024 * 1024)


AUDIT_STREAMS = ("stdout", "stderr")


class AuditSettings(_Section):
    """Audit records: a JSON line per issuance and per auth refusal; see broker/audit.py.

    ``sink``: ``stdout``, ``stderr`` or a file (relative to this file).  ``mode:
    required`` refuses an issuance (503) whose record was not written in time.
    """

    sink: str = Field(default="stdout", min_length=1, max_length=4096, pattern=r"^[^\x00]+$")
    mode: Literal["best_effort", "required"] = "best_effort"
    max_buffer_bytes: int = Field(default=4 * 1024 * 1024, ge=64 * 1024, le=256 * 1024 * 1024)
    write_timeout_seconds: float = Field(default=2.0, gt=0, le=60)
    fsync: bool = False


class Settings(_Section):
    """The whole validated configuration."""

    listen: ListenSettings = ListenSettings()
    sts: StsSettings = StsSettings()
    oss: OssSettings = OssSettings()
    cache: CacheSettings = CacheSettings()
    quotas: QuotaSettings = QuotaSettings()
    policies_dir: Path = Path("../policies")
    watch_policies: bool = False
    auth: AuthSettings = AuthSettings()
    admin: AdminSettings = AdminSettings()
    cors: CorsSettings = CorsSettings()
    logging: LoggingSettings = LoggingSettings()
    audit: AuditSettings = AuditSettings()
    source: Path | None = Field(default=None, exclude=True)


def load_settings(path: Path, environ: Mapping[str, str] | None = None) -> Settings:
    """Read and validate ``path``; raise ``ConfigError`` listing every problem.

    Paths in the file are resolved relative to it, and ``key_sha256_env``
    references are looked up in ``environ`` (default: the process environment).
    """
    environ = os.environ if environ is None else environ
    doc = load_yaml(path)
    data = doc.data if doc.data is not None else {}
    if not isinstance(data, dict):
        raise ConfigError([f"{path}:1: (top level): must be a mapping of keys"])
    if "source" in data:
        allowed = [name for name, info in Settings.model_fields.items() if not info.exclude]
        problem = unknown_key_problem("source", allowed)
        raise ConfigError([f"{path}:{doc.line_of(('source',))}: source: {problem}"])
    try:
        settings = Settings.model_validate(data)
    except pydantic.ValidationError as err:
        raise ConfigError(format_validation_error(doc, err, Settings)) from err
    problems = _missing_env_keys(settings, environ, doc)
    if problems:
        raise ConfigError(problems)
    return _with_paths_resolved(settings, path)


def _with_paths_resolved(settings: Settings, path: Path) -> Settings:
    """``settings`` read from ``path``, with every file it names resolved against its folder."""
    update: dict[str, object] = {
        "policies_dir": _relative_to(path, settings.policies_dir),
        "source": path,
    }
    tls = settings.listen.tls
    if tls is not None:
        files = {"cert_file": tls.cert_file, "key_file": tls.key_file}
        if tls.client_ca_file is not None:
            files["client_ca_file"] = tls.client_ca_file
        resolved = {name: _relative_to(path, value) for name, value in files.items()}
        update["listen"] = settings.listen.model_copy(
            update={"tls": tls.model_copy(update=resolved)}
        )
    if settings.audit.sink not in AUDIT_STREAMS:
        sink = str(_relative_to(path, Path(settings.audit.sink)))
        update["audit"] = settings.audit.model_copy(update={"sink": sink})
    if settings.admin.socket_dir is not None:
        socket_dir = _relative_to(path, settings.admin.socket_dir)
        update["admin"] = settings.admin.model_copy(update={"socket_dir": socket_dir})
    jwt = settings.auth.jwt
    if jwt is not None and jwt.jwks_file is not None:
        jwt = jwt.model_copy(update={"jwks_file": _relative_to(path, jwt.jwks_file)})
        update["auth"] = settings.auth.model_copy(update={"jwt": jwt})
    return settings.model_copy(update=update)


def _relative_to(config_file: Path, path: Path) -> Path:
    """``path`` as given if absolute, else relative to the config file's folder."""
    return path if path.is_absolute() else (config_file.parent / path).resolve()


def _missing_env_keys(
    settings: Settings, environ: Mapping[str, str], doc: YamlDocument
) -> list[str]:
    problems = []
    for index, key in enumerate(settings.auth.api_keys):
        if key.key_sha256_env is None:
            continue
        value = environ.get(key.key_sha256_env, "")
        if not HEX_SHA256.match(value):
            line = doc.line_of(("auth", "api_keys", index, "key_sha256_env"))
            problems.append(
                f"{doc.path}:{line}: auth.api_keys.{index}.key_sha256_env: environment variable "
                f"{key.key_sha256_env} is not set to 64 lower-case hex characters"
            )
    return problems


def api_key_hashes(settings: Settings, environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """``{caller id: key sha256}``, reading ``key_sha256_env`` from the environment."""
    environ = os.environ if environ is None else environ
    hashes = {}
    for key in settings.auth.api_keys:
        digest = key.key_sha256 if key.key_sha256 is not None else environ[key.key_sha256_env or ""]
        hashes[key.id] = digest
    return hashes
