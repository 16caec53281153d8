"""OSS signature V4: presigned URLs and header signatures, as pure functions.

Nothing here reads the clock or does I/O: every function takes the signing
time as an argument.  ``presign`` produces URLs byte-identical to
``alibabacloud_oss_v2`` ``Client.presign()`` (pinned by ``tests/signing/test_v4.py``
against the SDK as an oracle), in a fraction of its time.

The V4 algorithm, as the official SDK implements it (``signer/v4.py``)::

    CanonicalRequest = Method \\n CanonicalURI \\n CanonicalQuery \\n
                       CanonicalHeaders \\n AdditionalHeaders \\n "UNSIGNED-PAYLOAD"
    StringToSign     = "OSS4-HMAC-SHA256" \\n Timestamp \\n Scope \\n hex(SHA256(CanonicalRequest))
    SigningKey       = HMAC chain: "aliyun_v4" + secret -> date -> region -> product
                       -> "aliyun_v4_request"
    Signature        = hex(HMAC-SHA256(SigningKey, StringToSign))

What is signed, exactly as the SDK does it:

* Canonical URI: ``/bucket/key`` percent-encoded with only ``/`` (and the
  unreserved ``A-Za-z0-9-_.~``) kept, whatever the addressing style: a cname
  or path-style URL signs the same URI as a virtual-hosted one.  The URL path
  uses the same encoding (UTF-8, ``+`` -> ``%2B``, space -> ``%20``).
* Canonical query: every query pair (sub-resources and the ``x-oss-*``
  signature parameters, but not ``x-oss-signature``), percent-encoded with
  nothing kept, sorted; an empty value is written as the bare key.
* Canonical headers: ``content-type``, ``content-md5`` and every ``x-oss-*``
  header present (empty values too), lower-cased, values untrimmed; plus any
  *additional* header named by the caller and present with a value.  The SDK's
  ``Client`` never names additional headers, so ``host`` is not signed.

Memos: no secret is a memo key.  What one token signs with (signing key
states, encoded credential and token) is kept per credentials object, day and
region until the first signature after the token expires
(``broker.signing.key_states``); which headers are signed, in which order, is
kept per set of header names.  ``presign_plan`` does, once, all of a URL's
work that depends on neither its key, nor its token, nor the time: a caller
may keep the plan (it holds no secret) and sign many keys with it
(``presign_planned``).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from functools import lru_cache
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from broker.models import Credentials
from broker.signing.encoding import quote as _quote
from broker.signing.encoding import quote_path as _quote_path
from broker.signing.encoding import quote_repeated as _quote_all
from broker.signing.endpoints import OssEndpoint, object_url_base
from broker.signing.key_states import MAX_KEY_STATES, KeyState, key_state, signing_key

if TYPE_CHECKING:
    from hashlib import _Hash

__all__ = [
    "ALGORITHM",
    "MAX_EXPIRES_SECONDS",
    "MAX_KEY_STATES",
    "KeyState",
    "PresignInput",
    "PresignPlan",
    "PresignedUrl",
    "as_utc",
    "authorization_v4",
    "key_state",
    "presign",
    "presign_plan",
    "presign_planned",
    "signing_key",
    "x_oss_date",
]

ALGORITHM = "OSS4-HMAC-SHA256"
MAX_EXPIRES_SECONDS = 7 * 24 * 3600
"""OSS refuses V4 URLs and POST policies valid for more than 7 days after x-oss-date."""

_EMPTY: Mapping[str, Any] = MappingProxyType({})
_METHODS = frozenset({"GET", "PUT", "POST", "DELETE", "HEAD"})
_UNSIGNED = "UNSIGNED-PAYLOAD"
# The reserved query keys the signer itself writes; a caller may not pass them.
_SIGNATURE_PARAMS = frozenset(
    {"x-oss-signature-version", "x-oss-date", "x-oss-expires", "x-oss-credential"}
    | {"x-oss-security-token", "x-oss-additional-headers", "x-oss-signature"}
)
# The SDK's bucket-name rule (validation.is_valid_bucket_name).
_BUCKET_RE = re.compile(r"[a-z0-9][a-z0-9-]{1,61}[a-z0-9]")
_DEFAULT_SIGNED = frozenset({"content-type", "content-md5"})


@dataclass(frozen=True, slots=True)
class PresignInput:
    """One request to presign.

    ``headers`` are the headers the uploader must send (Content-Type,
    Content-MD5, ``x-oss-*``, ``x-oss-meta-*``...); ``query`` holds
    sub-resources (``uploads``, ``partNumber``, ``uploadId``), ``None`` or
    ``""`` for a bare key.  ``additional_headers`` names further headers in
    ``headers`` to sign (the SDK's ``Client`` never uses it).
    """

    method: str
    bucket: str
    key: str
    region: str
    endpoint: OssEndpoint
    expires_seconds: int
    headers: Mapping[str, str] = field(default_factory=lambda: _EMPTY)
    query: Mapping[str, str | None] = field(default_factory=lambda: _EMPTY)
    product: str = "oss"
    additional_headers: Collection[str] = ()


@dataclass(frozen=True, slots=True)
class PresignedUrl:
    """A presigned URL and what its user must know to use it.

    ``signed_headers`` must be sent unchanged with the request; ``expiration``
    is when OSS stops accepting it (``x-oss-date`` + ``x-oss-expires``).
    """

    url: str
    method: str
    signed_headers: dict[str, str]
    expiration: datetime


def presign(
    credentials: Credentials,
    request: PresignInput,
    signing_time: datetime,
    *,
    expires_seconds: int | None = None,
) -> PresignedUrl:
    """Sign ``request`` into a query-string (presigned) URL, byte-identical to the SDK's.

    ``expires_seconds``, when given, replaces ``request.expires_seconds`` (the
    lifetime is often known only once a token is chosen).  The same URL as
    ``presign_planned`` with ``presign_plan(request)`` (pinned by the tests),
    without building a plan to keep.
    """
    when = as_utc(signing_time)
    expires = request.expires_seconds if expires_seconds is None else expires_seconds
    _check_expires(expires)
    method, bucket = request.method, request.bucket
    if method not in _METHODS:
        raise ValueError(f"unsupported method {method!r}")
    if not _is_valid_bucket(bucket):
        raise ValueError(f"invalid bucket name {bucket!r}")
    if not 0 < len(request.key) <= 1024:
        raise ValueError("an object key must have 1 to 1024 characters")
    stamp = x_oss_date(when)
    state = key_state(credentials, stamp[:8], request.region, request.product, when)
    signed, canonical_headers, additional = _signed_headers(
        request.headers, request.additional_headers
    )
    signer = _signer_strings(
        stamp, expires, state.credential, state.token, _quote_all(additional) if additional else ""
    )
    url_query, canonical_query = _query_strings(request.query, signer)
    path = _quote_path(request.key)
    canonical = (
        f"{method}\n/{bucket}/{path}\n{canonical_query}\n"
        f"{canonical_headers}\n{additional}\n{_UNSIGNED}"
    )
    signature = _signature(state.pads, stamp, state.scope, canonical)
    base = object_url_base(request.endpoint, bucket)
    url = f"{base}{path}?{url_query}&x-oss-signature={signature}"
    expiration = when + _lifetime(expires, when.microsecond)  # x-oss-date is to the second
    return PresignedUrl(url=url, method=method, signed_headers=signed, expiration=expiration)


@dataclass(frozen=True, slots=True)
class PresignPlan:
    """What a presigned URL signs besides its key, token, time and lifetime (``presign_plan``).

    ``query_url`` and ``query_sorted``: the encoded sub-resources in the given
    and in sorted order ("" without any); ``merge``: one of them sorts among
    the signer's own keys, so the canonical query is sorted per signature.
    """

    method: str
    bucket: str
    region: str
    product: str
    url_base: str
    signed_headers: Mapping[str, str]
    canonical_headers: str
    additional: str
    additional_query: str
    query_pairs: tuple[tuple[str, str], ...]
    query_url: str
    query_sorted: str
    merge: bool


def presign_plan(request: PresignInput) -> PresignPlan:
    """Everything ``request`` signs that is neither its key nor its lifetime, checked.

    Holds no secret: a plan may be kept and signed with (``presign_planned``)
    for any key, token and time.
    """
    method, bucket = request.method, request.bucket
    if method not in _METHODS:
        raise ValueError(f"unsupported method {method!r}")
    if not _is_valid_bucket(bucket):
        raise ValueError(f"invalid bucket name {bucket!r}")
    signed, canonical_headers, additional = _signed_headers(
        request.headers, request.additional_headers
    )
    pairs = _encode_query(request.query)
    ordered = sorted(pairs)
    return PresignPlan(
        method,
        bucket,
        request.region,
        request.product,
        object_url_base(request.endpoint, bucket),
        MappingProxyType(signed),
        canonical_headers,
        additional,
        _quote_all(additional) if additional else "",
        tuple(pairs),
        _join_query(pairs),
        _join_query(ordered),
        bool(ordered) and ordered[-1][0] >= "x-oss-additional-headers",  # the signer's least
    )


def presign_planned(
    plan: PresignPlan, credentials: Credentials, key: str, signing_time: datetime, expires: int
) -> PresignedUrl:
    """``key`` presigned as ``plan`` says, with ``credentials``, at ``signing_time``."""
    when = as_utc(signing_time)
    _check_expires(expires)
    if not 0 < len(key) <= 1024:
        raise ValueError("an object key must have 1 to 1024 characters")
    stamp = x_oss_date(when)
    state = key_state(credentials, stamp[:8], plan.region, plan.product, when)
    signer = _signer_strings(stamp, expires, state.credential, state.token, plan.additional_query)
    url_query, canonical_query = _planned_query_strings(plan, signer)
    path = _quote_path(key)
    canonical = (
        f"{plan.method}\n/{plan.bucket}/{path}\n{canonical_query}\n"
        f"{plan.canonical_headers}\n{plan.additional}\n{_UNSIGNED}"
    )
    signature = _signature(state.pads, stamp, state.scope, canonical)
    url = f"{plan.url_base}{path}?{url_query}&x-oss-signature={signature}"
    expiration = when + _lifetime(expires, when.microsecond)  # x-oss-date is to the second
    signed = dict(plan.signed_headers)
    return PresignedUrl(url=url, method=plan.method, signed_headers=signed, expiration=expiration)


def _check_expires(expires: int) -> None:
    if not 0 < expires <= MAX_EXPIRES_SECONDS:
        raise ValueError(f"expires_seconds must be in 1..{MAX_EXPIRES_SECONDS}, not {expires}")


def authorization_v4(
    credentials: Credentials,
    *,
    method: str,
    bucket: str | None,
    key: str | None,
    region: str,
    signing_time: datetime,
    headers: Mapping[str, str] = _EMPTY,
    query: Mapping[str, str | None] = _EMPTY,
    product: str = "oss",
    additional_headers: Collection[str] = (),
) -> dict[str, str]:
    """The headers V4 header signing adds to a request, ``Authorization`` last.

    Same output as the SDK's ``SignerV4`` in header mode: ``x-oss-date``,
    ``Date``, ``x-oss-security-token`` (with a token), ``x-oss-content-sha256``
    and ``Authorization``; ``headers`` are the request's own headers.
    """
    when = as_utc(signing_time)
    stamp = x_oss_date(when)
    added = {"x-oss-date": stamp, "Date": format_datetime(when, usegmt=True)}
    if credentials.security_token:
        added["x-oss-security-token"] = credentials.security_token
    added["x-oss-content-sha256"] = _UNSIGNED
    replaced = {name.lower() for name in added}
    merged = {k: v for k, v in headers.items() if k.lower() not in replaced} | added
    _, canonical_headers, additional = _signed_headers(merged, additional_headers)

    uri = "/" + (f"{bucket}/" if bucket is not None else "") + (key or "")
    scope = f"{stamp[:8]}/{region}/{product}/aliyun_v4_request"
    canonical = (
        f"{method}\n{_quote_path(uri)}\n{_join_query(sorted(_encode_query(query)))}\n"
        f"{canonical_headers}\n{additional}\n{_UNSIGNED}"
    )
    state = key_state(credentials, stamp[:8], region, product, when)
    signature = _signature(state.pads, stamp, scope, canonical)
    auth = f"{ALGORITHM} Credential={credentials.access_key_id}/{scope}"
    if additional:
        auth += f",AdditionalHeaders={additional}"
    added["Authorization"] = f"{auth},Signature={signature}"
    return added


def as_utc(moment: datetime) -> datetime:
    """``moment`` in UTC; a naive datetime is refused."""
    if moment.tzinfo is None:
        raise ValueError("signing and expiration times must be timezone-aware")
    return moment if moment.tzinfo is UTC else moment.astimezone(UTC)


def x_oss_date(when: datetime) -> str:
    """``YYYYMMDDTHHMMSSZ``, the x-oss-date format (%-formatting is the fastest way)."""
    w = when
    return "%04d%02d%02dT%02d%02d%02dZ" % (w.year, w.month, w.day, w.hour, w.minute, w.second)  # noqa: UP031


def _lifetime(seconds: int, microseconds: int) -> timedelta:
    """``seconds`` counted from the start of the signing second (what x-oss-date says)."""
    return timedelta(seconds=seconds, microseconds=-microseconds)


@lru_cache(maxsize=1024)
def _is_valid_bucket(bucket: str) -> bool:
    return _BUCKET_RE.fullmatch(bucket) is not None


def _encode_query(query: Mapping[str, str | None]) -> list[tuple[str, str]]:
    pairs = []
    for name, value in query.items():
        if name in _SIGNATURE_PARAMS:
            raise ValueError(f"query parameter {name!r} is written by the signer")
        pairs.append((_quote_all(name), _quote(value) if value else ""))
    return pairs


_SignerArgs = tuple[str, int, str, str, str]
_SignerStrings = tuple[str, str, _SignerArgs]


def _signer_strings(
    stamp: str, expires: int, credential: str, token: str, additional: str
) -> _SignerStrings:
    """The signer's own query pairs in the URL's order and in sorted order (and its args).

    Values come in already encoded; their sorted order is fixed, so they are
    written directly.
    """
    token_pair = f"&x-oss-security-token={token}" if token else ""
    additional_pair = f"&x-oss-additional-headers={additional}" if additional else ""
    signer_query = (
        f"x-oss-signature-version={ALGORITHM}&x-oss-date={stamp}&x-oss-expires={expires}"
        f"&x-oss-credential={credential}{token_pair}{additional_pair}"
    )
    signer_canonical = (
        f"{additional_pair[1:]}{'&' if additional else ''}x-oss-credential={credential}"
        f"&x-oss-date={stamp}&x-oss-expires={expires}{token_pair}"
        f"&x-oss-signature-version={ALGORITHM}"
    )
    return signer_query, signer_canonical, (stamp, expires, credential, token, additional)


def _merged(pairs: list[tuple[str, str]], args: _SignerArgs) -> str:
    """The canonical query of sub-resources sorting among the signer's keys (x-oss-process...)."""
    stamp, expires, credential, token, additional = args
    pairs += [
        ("x-oss-signature-version", ALGORITHM),
        ("x-oss-date", stamp),
        ("x-oss-expires", str(expires)),
        ("x-oss-credential", credential),
    ]
    if token:
        pairs.append(("x-oss-security-token", token))
    if additional:
        pairs.append(("x-oss-additional-headers", additional))
    return _join_query(sorted(pairs))


def _query_strings(query: Mapping[str, str | None], signer: _SignerStrings) -> tuple[str, str]:
    """(URL query in the SDK's order, sorted canonical query), both without x-oss-signature.

    The sub-resources precede the signer's own pairs in the URL; only they
    are sorted, unless one sorts among the signer's keys.
    """
    signer_query, signer_canonical, args = signer
    if not query:
        return signer_query, signer_canonical
    pairs = _encode_query(query)
    url_query = f"{_join_query(pairs)}&{signer_query}"
    pairs.sort()
    if pairs[-1][0] < "x-oss-additional-headers":  # the least of the signer's keys
        return url_query, f"{_join_query(pairs)}&{signer_canonical}"
    return url_query, _merged(pairs, args)


def _planned_query_strings(plan: PresignPlan, signer: _SignerStrings) -> tuple[str, str]:
    """``_query_strings`` with the sub-resources encoded, joined and sorted in ``plan``."""
    signer_query, signer_canonical, args = signer
    if not plan.query_pairs:
        return signer_query, signer_canonical
    url_query = f"{plan.query_url}&{signer_query}"
    if not plan.merge:
        return url_query, f"{plan.query_sorted}&{signer_canonical}"
    return url_query, _merged(list(plan.query_pairs), args)


def _join_query(pairs: list[tuple[str, str]]) -> str:
    return "&".join([f"{name}={value}" if value else name for name, value in pairs])


def _signed_headers(
    headers: Mapping[str, str], additional_names: Collection[str]
) -> tuple[dict[str, str], str, str]:
    """(signed headers as given, canonical header block, ``;``-joined additional names).

    Which headers are signed, in which order, depends on their names only (and
    on which additional ones are empty): that plan is memoised per names.
    """
    if not headers:
        return {}, "", ""
    names, values = tuple(headers), tuple(headers.values())
    wanted = additional_names if isinstance(additional_names, tuple) else tuple(additional_names)
    order, additional, optional = _header_plan(names, wanted, ())
    if optional and not all(values[i] for i in optional):
        empty = tuple(i for i in optional if not values[i])
        order, additional, _ = _header_plan(names, wanted, empty)
    block = "".join([f"{lower}:{values[i]}\n" for i, lower, _ in order])
    return {name: values[i] for i, _, name in order}, block, additional


_HeaderPlan = tuple[tuple[tuple[int, str, str], ...], str, tuple[int, ...]]


@lru_cache(maxsize=1024)
def _header_plan(
    names: tuple[str, ...], additional_names: tuple[str, ...], empty: tuple[int, ...]
) -> _HeaderPlan:
    """The signed headers' (index, lower-cased name, name) sorted, the additional names, and
    the indices of the additional headers that are signed only when they have a value.

    ``empty``: the indices of headers whose value is empty.
    """
    lowered = [name.lower() for name in names]
    seen: set[str] = set()
    for name, lower in zip(names, lowered, strict=True):
        if lower in seen:
            raise ValueError(f"header {name!r} is given twice")
        seen.add(lower)
    extra = {name.lower() for name in additional_names} - _DEFAULT_SIGNED
    extra = {name for name in extra if not name.startswith("x-oss-")}
    optional = tuple(i for i, lower in enumerate(lowered) if lower in extra)
    extra &= {lower for i, lower in enumerate(lowered) if i not in empty}
    signed = sorted(
        (lower, i, names[i])
        for i, lower in enumerate(lowered)
        if lower.startswith("x-oss-") or lower in _DEFAULT_SIGNED or lower in extra
    )
    order = tuple((i, lower, name) for lower, i, name in signed)
    return order, ";".join(sorted(extra)), optional


def _signature(pads: tuple[_Hash, _Hash], stamp: str, scope: str, canonical: str) -> str:
    digest = hashlib.sha256(canonical.encode()).hexdigest()
    inner = pads[0].copy()
    inner.update(f"{ALGORITHM}\n{stamp}\n{scope}\n{digest}".encode())
    outer = pads[1].copy()
    outer.update(inner.digest())
    return outer.hexdigest()
