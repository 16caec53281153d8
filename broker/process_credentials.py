"""``sts-broker credentials``: fetch credentials from a running broker, print them for other tools.

Three formats, each what another tool reads:

- ``process``: the JSON a *process credentials* command prints, read by the aliyun CLI's
  ``External`` mode and by the official credentials libraries' ``ExternalCredentialsProvider``
  (also through an ``External`` profile in ``~/.aliyun/config.json``);
- ``env``: shell-quoted ``export`` lines for ``eval`` (Terraform's alicloud provider, the
  aliyun CLI and the SDKs' environment-variable providers read them);
- ``json``: the broker's reply unchanged, the body the credentials-URI provider reads.

The API key comes from an environment variable or a file, never from argv, where ``ps``
and shell history would show it; the key and the secrets are never written to stderr.
Standard library only (``urllib``), so ``python -m broker.process_credentials`` (the same
command) starts in a tenth of the time ``sts-broker`` needs to import the whole broker:
the aliyun CLI runs a process_command before every command.
"""

from __future__ import annotations

import argparse
import http.client
import ipaddress
import json
import os
import re
import shlex
import ssl
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NoReturn, TextIO

from broker.names import POLICY_NAME, POLICY_NAME_RULE, STS_TIME_FORMAT

__all__ = [
    "DEFAULT_API_KEY_ENV",
    "EXIT_FAILURE",
    "EXIT_OK",
    "EXIT_REFUSED",
    "EXIT_UNAVAILABLE",
    "EXIT_UNREACHABLE",
    "EXIT_USAGE",
    "FORMATS",
    "BrokerReply",
    "FetchFailed",
    "FetchRequest",
    "add_arguments",
    "base_url",
    "exit_code_for_status",
    "fetch_credentials",
    "main",
    "read_api_key",
    "render",
    "run",
]

EXIT_OK = 0
EXIT_FAILURE = 1
"""Anything else: an unexpected status (3xx, 500-less), a reply that is not credentials."""
EXIT_USAGE = 2
"""Bad arguments, no API key, or a 400/404 reply (a wrong --url path, --min-ttl too long)."""
EXIT_REFUSED = 3
"""401 or 403: the key is not valid, or this caller may not use the policy."""
EXIT_UNREACHABLE = 4
"""No HTTP reply at all: connection refused, DNS, TLS failure or timeout."""
EXIT_UNAVAILABLE = 5
"""429 or 5xx: the broker or STS is throttling or failing; retry later."""

DEFAULT_API_KEY_ENV = "STS_BROKER_API_KEY"
FORMATS = ("process", "env", "json")
_MAX_MESSAGE_CHARS = 200
_MAX_REPLY_BYTES = 1 << 20  # a credentials reply is a few kilobytes
_HEADER_SAFE = re.compile(r"[\x21-\x7e]+")  # what a bearer token may hold: visible ASCII
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")

EPILOG = f"""\
formats:
  process  {{"mode": "StsToken", "access_key_id", "access_key_secret", "sts_token",
           "expiration"}}: an aliyun CLI 'External' profile's process_command, or the
           credentials libraries' ExternalCredentialsProvider
  env      export ALIBABA_CLOUD_ACCESS_KEY_ID=... ALIBABA_CLOUD_ACCESS_KEY_SECRET=...
           ALIBABA_CLOUD_SECURITY_TOKEN=...: eval "$(sts-broker credentials ...)"
  json     the broker's reply as it came (the ALIBABA_CLOUD_CREDENTIALS_URI body)

the API key is read from ${DEFAULT_API_KEY_ENV} (or --api-key-env NAME) or --api-key-file,
never from the command line, where ps and shell history would show it.

exit codes:
  0 ok   1 other failure   2 usage (bad arguments, no API key, a 400/404 reply)
  3 refused (401/403)   4 broker unreachable   5 broker or STS unavailable (429/5xx): retry

docs: docs/integration.md (aliyun CLI, Terraform, the credentials libraries)."""


class FetchFailed(Exception):
    """The command cannot print credentials; ``message`` is safe to show (no key, no secret)."""

    def __init__(self, exit_code: int, message: str) -> None:
        super().__init__(message)
        self.exit_code = exit_code
        self.message = message


@dataclass(frozen=True)
class FetchRequest:
    """One ``GET /v1/credentials/{policy}`` to make."""

    url: str
    policy: str
    api_key: str = field(repr=False)
    min_ttl_seconds: int | None = None
    timeout_seconds: float = 20.0
    ca_file: Path | None = None


@dataclass(frozen=True)
class BrokerReply:
    """A successful credentials reply: its raw text and the fields every format needs."""

    text: str = field(repr=False)
    access_key_id: str
    access_key_secret: str = field(repr=False)
    security_token: str = field(repr=False)
    expiration: datetime


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``credentials`` subcommand's options (kept here, beside what uses them)."""
    parser.epilog = EPILOG
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--policy", required=True, help="the policy to fetch credentials for")
    parser.add_argument(
        "--url",
        default="http://127.0.0.1:8080",
        help="the broker's base URL (default: %(default)s); https:// unless on loopback",
    )
    parser.add_argument(
        "--format", choices=FORMATS, default="process", help="what to print (default: %(default)s)"
    )
    parser.add_argument(
        "--min-ttl",
        type=int,
        metavar="SECONDS",
        help="fetch fresh credentials if the cached ones have less validity left",
    )
    _add_key_arguments(parser)
    _add_connection_arguments(parser)


def _add_key_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--api-key-env",
        default=DEFAULT_API_KEY_ENV,
        metavar="NAME",
        help="the environment variable holding the API key or JWT (default: %(default)s)",
    )
    parser.add_argument(
        "--api-key-file",
        type=Path,
        metavar="FILE",
        help="read the API key or JWT from this file instead (first line)",
    )


def _add_connection_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--timeout",
        type=float,
        default=20.0,
        metavar="SECONDS",
        help="give up on the broker after this long (default: %(default)s)",
    )
    parser.add_argument(
        "--ca-file", type=Path, metavar="FILE", help="CA bundle that signed the broker's TLS cert"
    )
    parser.add_argument(
        "--allow-http",
        action="store_true",
        help="allow http:// to a host that is not loopback (sends the key in clear text)",
    )


def main(
    argv: Sequence[str] | None = None, *, stdout: TextIO | None = None, stderr: TextIO | None = None
) -> int:
    """``python -m broker.process_credentials``: ``sts-broker credentials`` without the broker."""
    parser = argparse.ArgumentParser(
        prog="sts-broker credentials",
        description="Fetch credentials from a running broker, printed for other tools.",
    )
    add_arguments(parser)
    return run(parser.parse_args(argv), os.environ, stdout=stdout, stderr=stderr)


def run(
    args: argparse.Namespace,
    environ: Mapping[str, str],
    *,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
) -> int:
    """Fetch and print as ``args`` say; the exit code.  Errors are one line on ``stderr``."""
    try:
        request = FetchRequest(
            url=base_url(args.url, allow_http=args.allow_http),
            policy=_policy_name(args.policy),
            api_key=read_api_key(environ, args.api_key_env, args.api_key_file),
            min_ttl_seconds=_min_ttl(args.min_ttl),
            timeout_seconds=_timeout(args.timeout),
            ca_file=args.ca_file,
        )
        output = render(fetch_credentials(request), args.format)
    except FetchFailed as err:
        print(f"sts-broker credentials: {err.message}", file=stderr or sys.stderr)
        return err.exit_code
    out = stdout or sys.stdout
    out.write(output)
    out.flush()
    return EXIT_OK


def read_api_key(environ: Mapping[str, str], env_name: str, key_file: Path | None) -> str:
    """The bearer token: the first line of ``key_file`` if given, else ``environ[env_name]``."""
    if key_file is not None:
        key, where = _first_line(key_file), f"--api-key-file {key_file}"
    else:
        key, where = environ.get(env_name, "").strip(), f"${env_name}"
    if not key:
        hint = f"set {env_name} or give --api-key-file" if key_file is None else "it is empty"
        raise FetchFailed(EXIT_USAGE, f"no API key in {where}: {hint}")
    if not _HEADER_SAFE.fullmatch(key):
        raise FetchFailed(EXIT_USAGE, f"the API key in {where} holds characters a header cannot")
    return key


def _first_line(path: Path) -> str:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        reason = err.strerror if isinstance(err, OSError) else "not UTF-8 text"
        raise FetchFailed(EXIT_USAGE, f"cannot read --api-key-file {path}: {reason}") from err
    return lines[0].strip() if lines else ""


def _policy_name(name: str) -> str:
    if not POLICY_NAME.fullmatch(name):
        raise FetchFailed(EXIT_USAGE, f"--policy: {POLICY_NAME_RULE}")
    return name


def _min_ttl(seconds: int | None) -> int | None:
    if seconds is not None and seconds < 0:
        raise FetchFailed(EXIT_USAGE, "--min-ttl must be 0 or more seconds")
    return seconds


def _timeout(seconds: float) -> float:
    if not 0 < seconds <= 600:
        raise FetchFailed(EXIT_USAGE, "--timeout must be more than 0 and at most 600 seconds")
    return seconds


def base_url(url: str, *, allow_http: bool) -> str:
    """``url`` checked: http(s), a host, no credentials, query or fragment; no trailing ``/``."""
    try:
        parts = urllib.parse.urlsplit(url)
        host = parts.hostname
        _ = parts.port  # raises on a bad port
    except ValueError as err:
        raise FetchFailed(EXIT_USAGE, "--url is not a valid URL") from err
    if parts.scheme not in ("http", "https") or not host:
        raise FetchFailed(EXIT_USAGE, "--url must be an http:// or https:// URL with a host")
    if parts.username is not None or parts.query or parts.fragment:
        # ps shows argv: a key in the URL would leak there, so refuse even a harmless query.
        raise FetchFailed(EXIT_USAGE, "--url may not carry user info, a query or a fragment")
    if parts.scheme == "http" and not allow_http and not _is_loopback(host):
        message = "--url: http:// to a host that is not loopback would send the API key"
        raise FetchFailed(EXIT_USAGE, f"{message} in clear text; use https:// (or --allow-http)")
    return url.rstrip("/")


def _is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def fetch_credentials(request: FetchRequest) -> BrokerReply:
    """``GET /v1/credentials/{policy}`` from the broker; the reply, or ``FetchFailed``."""
    url = f"{request.url}/v1/credentials/{request.policy}"
    if request.min_ttl_seconds is not None:
        url += "?" + urllib.parse.urlencode({"min_ttl_seconds": request.min_ttl_seconds})
    http_request = urllib.request.Request(  # noqa: S310 - the scheme is checked in _base_url
        url,
        headers={"Authorization": f"Bearer {request.api_key}", "Accept": "application/json"},
    )
    try:
        with _opener(request.ca_file).open(http_request, timeout=request.timeout_seconds) as reply:
            body = _read_bounded(reply)
    except urllib.error.HTTPError as err:
        try:
            _fail_on_status(err.code, _read_bounded(err), request.api_key)
        finally:
            err.close()
    except (OSError, ValueError, http.client.HTTPException) as err:
        # URLError, timeouts, TLS, refused or reset connections, a reply that is not HTTP
        raise FetchFailed(EXIT_UNREACHABLE, _unreachable(request.url, err)) from None
    return _parse_reply(body)


def _read_bounded(reply: Any) -> bytes:
    """The body, or ``FetchFailed`` past ``_MAX_REPLY_BYTES`` (never buffer a runaway reply)."""
    body: bytes = reply.read(_MAX_REPLY_BYTES + 1)
    if len(body) > _MAX_REPLY_BYTES:
        raise FetchFailed(EXIT_FAILURE, f"the reply is larger than {_MAX_REPLY_BYTES} bytes")
    return body


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """Never follow a redirect: urllib would send the Authorization header to the new place."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


def _opener(ca_file: Path | None) -> urllib.request.OpenerDirector:
    """Straight to the broker: no proxies from the environment, no redirects."""
    try:
        context = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
    except (OSError, ssl.SSLError) as err:
        raise FetchFailed(EXIT_USAGE, f"--ca-file {ca_file}: cannot load it") from err
    return urllib.request.build_opener(
        urllib.request.ProxyHandler({}),
        _NoRedirect(),
        urllib.request.HTTPSHandler(context=context),
    )


def _unreachable(base_url: str, err: BaseException) -> str:
    reason = err.reason if isinstance(err, urllib.error.URLError) else err
    if isinstance(reason, TimeoutError):
        return f"the broker at {base_url} did not answer in time"
    if isinstance(reason, ssl.SSLError):
        return f"TLS with the broker at {base_url} failed: {reason.reason or 'handshake'}"
    text = getattr(reason, "strerror", None) or type(reason).__name__
    return f"cannot reach the broker at {base_url}: {text}"


def exit_code_for_status(status: int) -> int:
    """The exit code for an HTTP error status from the broker."""
    if status in (401, 403):
        return EXIT_REFUSED
    if status == 429 or status >= 500:
        return EXIT_UNAVAILABLE
    if 400 <= status < 500:
        return EXIT_USAGE
    return EXIT_FAILURE


_STATUS_WORDS = {EXIT_REFUSED: "refused", EXIT_UNAVAILABLE: "unavailable, retry later"}


def _fail_on_status(status: int, body: bytes, api_key: str) -> NoReturn:
    """Raise the ``FetchFailed`` for an error reply, quoting its code and message safely."""
    code = exit_code_for_status(status)
    what = _STATUS_WORDS.get(code, "failed")
    if 300 <= status < 400:
        what = "redirected (give the final URL in --url)"
    error = _error_object(body)
    if error is None:
        raise FetchFailed(code, f"{what}: HTTP {status} (not a broker reply)")
    detail = f"HTTP {status} {_safe(error.get('code'), api_key)}"
    request_id = _safe(error.get("request_id"), api_key)
    if request_id:
        detail += f", request id {request_id}"
    raise FetchFailed(code, f"{what} ({detail}): {_safe(error.get('message'), api_key)}")


def _error_object(body: bytes) -> dict[str, Any] | None:
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    error = data.get("error") if isinstance(data, dict) else None
    return error if isinstance(error, dict) else None


def _safe(value: object, api_key: str) -> str:
    """Text from the broker made fit for one terminal line: no controls, short, no key."""
    if not isinstance(value, str):
        return ""
    text = _CONTROL.sub("?", value).replace(api_key, "[api key]")
    return text if len(text) <= _MAX_MESSAGE_CHARS else text[: _MAX_MESSAGE_CHARS - 3] + "..."


def _parse_reply(body: bytes) -> BrokerReply:
    """The credentials in a 200 reply; anything short of complete credentials fails loudly."""
    try:
        text = body.decode("utf-8")
        data = json.loads(text)
    except (ValueError, UnicodeDecodeError):
        raise FetchFailed(EXIT_FAILURE, "the broker's reply is not JSON") from None
    if not isinstance(data, dict) or data.get("Code") != "Success":
        raise FetchFailed(EXIT_FAILURE, "the broker's reply is not a credentials reply")
    fields = ("AccessKeyId", "AccessKeySecret", "SecurityToken", "Expiration")
    values = [data.get(name) for name in fields]
    missing = [name for name, value in zip(fields, values, strict=True) if not _text(value)]
    if missing:
        raise FetchFailed(EXIT_FAILURE, f"the broker's reply lacks {', '.join(missing)}")
    key_id, secret, token, expiration = (str(value) for value in values)
    return BrokerReply(text, key_id, secret, token, _expiration(expiration))


def _text(value: object) -> bool:
    return isinstance(value, str) and bool(value) and _CONTROL.search(value) is None


def _expiration(value: str) -> datetime:
    """STS's ``Expiration``, parsed; never guessed (the process format repeats it)."""
    try:
        return datetime.strptime(value, STS_TIME_FORMAT).replace(tzinfo=UTC)
    except ValueError:
        message = "the broker's Expiration is not in STS's format (YYYY-MM-DDThh:mm:ssZ)"
        raise FetchFailed(EXIT_FAILURE, message) from None


def render(reply: BrokerReply, output_format: str) -> str:
    """``reply`` as ``output_format`` (one of ``FORMATS``) prints it, ending in a newline."""
    if output_format == "process":
        return _process_json(reply)
    if output_format == "env":
        return _env_exports(reply)
    if output_format == "json":
        return reply.text if reply.text.endswith("\n") else reply.text + "\n"
    raise ValueError(f"unknown format {output_format!r}")


def _process_json(reply: BrokerReply) -> str:
    """What a process_command prints, field for field as its readers parse it.

    alibabacloud_credentials/provider/external.py (``_parse_and_build_credentials``)
    reads ``access_key_id``, ``access_key_secret``, ``sts_token`` (required when
    ``mode`` is ``StsToken``) and ``expiration`` in ``%Y-%m-%dT%H:%M:%SZ``; it
    refreshes 180 s before that.  The aliyun CLI (github.com/aliyun/aliyun-cli,
    config/profile.go, ``case External``) unmarshals stdout into its profile and
    uses ``mode: StsToken`` with the same three key names; it reads stdout only,
    so nothing else may be printed there.
    """
    document = {
        "mode": "StsToken",
        "access_key_id": reply.access_key_id,
        "access_key_secret": reply.access_key_secret,
        "sts_token": reply.security_token,
        "expiration": reply.expiration.strftime(STS_TIME_FORMAT),
    }
    return json.dumps(document) + "\n"


def _env_exports(reply: BrokerReply) -> str:
    """``export`` lines, each value shell-quoted, for ``eval "$(...)"``.

    Terraform's alicloud provider reads these three names (aliyun/terraform-provider-alicloud,
    alicloud/provider.go: access_key, secret_key and security_token default to
    ALIBABA_CLOUD_ACCESS_KEY_ID, ALIBABA_CLOUD_ACCESS_KEY_SECRET, ALIBABA_CLOUD_SECURITY_TOKEN),
    as do the aliyun CLI and the credentials libraries' environment provider.
    """
    names = {
        "ALIBABA_CLOUD_ACCESS_KEY_ID": reply.access_key_id,
        "ALIBABA_CLOUD_ACCESS_KEY_SECRET": reply.access_key_secret,
        "ALIBABA_CLOUD_SECURITY_TOKEN": reply.security_token,
    }
    return "".join(f"export {name}={shlex.quote(value)}\n" for name, value in names.items())


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
