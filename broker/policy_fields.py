"""The value types of policy files; each refuses with what is wrong and what is allowed.

Names, buckets, actions, prefix templates, callers, content types; the
network ``Conditions`` a token may be bound to; one ``Grant`` (bucket, prefix
template, actions, conditions).  ``broker.policies`` puts them together into a
``Policy``.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Annotated, Any, Final, Literal

import pydantic
from pydantic import (
    AfterValidator,
    BeforeValidator,
    ConfigDict,
    PlainSerializer,
    PlainValidator,
    StrictBool,
    StrictStr,
)
from pydantic_core import PydanticCustomError

from broker.names import CALLER_ID_CHARS, POLICY_NAME_PATTERN, POLICY_NAME_RULE, is_caller_id
from broker.ram import SECURE_TRANSPORT, SOURCE_IP, SOURCE_VPC, Condition
from broker.templates import parse_template

__all__ = [
    "MAX_GRANTS",
    "MISSING",
    "ONE_GRANT_KEYS",
    "Action",
    "Actions",
    "AsList",
    "Bucket",
    "CallbackUrls",
    "Callers",
    "Conditions",
    "ContentTypes",
    "Endpoint",
    "ExternalId",
    "Grant",
    "Grants",
    "Name",
    "OidcProviderArn",
    "Region",
    "Required",
    "RoleArn",
    "Template",
    "Unique",
    "between",
    "matching",
    "non_empty",
]

MAX_GRANTS: Final = 10
"""The most grants one policy may list (each takes a share of STS's 2,048 characters)."""

Action = Literal["put", "multipart", "get", "list", "delete"]
ONE_GRANT_KEYS: Final = ("bucket", "prefix", "actions")
MISSING: Final = object()
"""Stands in for a one-grant key a file without ``grants`` leaves out (``_required``)."""

# --- field validators (messages are for ops: what is wrong, what is allowed) ---


def matching(pattern: str, allowed: str, *, echo: bool = True) -> AfterValidator:
    compiled = re.compile(pattern)

    def check(value: str) -> str:
        if compiled.fullmatch(value) is None:
            shown = f"{value!r} is not allowed" if echo else "value is not allowed"
            raise ValueError(f"{shown}; {allowed}")
        return value

    return AfterValidator(check)


def between(low: int, high: int, unit: str) -> AfterValidator:
    def check(value: int) -> int:
        if not low <= value <= high:
            raise ValueError(f"{value} is out of range; allowed: {low}..{high} {unit}")
        return value

    return AfterValidator(check)


def _as_list(value: Any) -> Any:
    if not isinstance(value, list | tuple):
        raise ValueError("must be a YAML list, e.g. [a, b]")
    return value


def _unique(values: tuple[str, ...]) -> tuple[str, ...]:
    for index, value in enumerate(values):
        if value in values[:index]:
            raise ValueError(f"{value!r} is listed twice; list each entry once")
    return values


def non_empty(what: str) -> AfterValidator:
    def check(values: tuple[str, ...]) -> tuple[str, ...]:
        if not values:
            raise ValueError(f"must list at least one {what}")
        return values

    return AfterValidator(check)


def _check_caller(value: str) -> str:
    """An entry of ``callers``: a caller id, or ``group:`` and a group name (the same rule)."""
    if not is_caller_id(value.removeprefix("group:")):
        raise ValueError(
            f"{value!r} is not allowed; use an id or group:NAME, "
            f"1-64 of {CALLER_ID_CHARS} starting with a letter or digit, without '..'"
        )
    return value


def _required(value: Any) -> Any:
    """A one-grant key a file without ``grants`` must give."""
    if value is MISSING:
        raise PydanticCustomError(
            "missing", "Field required (give bucket, prefix and actions, or a list of grants)"
        )
    return value


def _check_template(template: str) -> str:
    parse_template(template)  # ValueError says what is unsafe
    return template


def _network(value: object) -> str:
    """An address or network (host bits zero), as RAM's ``IpAddress`` takes it."""
    if not isinstance(value, str):
        raise ValueError("an address or network must be a string such as 203.0.113.0/24")
    try:
        network = ipaddress.ip_network(value)
    except ValueError:
        raise ValueError(
            f"{value!r} is not an IP address or network such as 203.0.113.0/24 "
            "(with the host bits zero)"
        ) from None
    if network.prefixlen == network.max_prefixlen:
        return str(network.network_address)
    return str(network)


def _source_ip(value: object) -> str | tuple[str, ...]:
    """``caller`` (the address each request comes from), or a list of addresses and networks."""
    if value == "caller":
        return "caller"
    if not isinstance(value, list | tuple) or not value:
        raise ValueError(
            "use caller (bind each token to the address that asked for it) "
            "or a non-empty list of addresses and networks, e.g. [203.0.113.0/24]"
        )
    return _unique(tuple(_network(item) for item in value))


def _only_true(value: bool) -> bool:
    if not value:
        raise ValueError("only true is meaningful (HTTPS only); leave the key out otherwise")
    return value


Name = Annotated[StrictStr, matching(POLICY_NAME_PATTERN, POLICY_NAME_RULE)]
RoleArn = Annotated[
    StrictStr,
    matching(r"acs:ram::[0-9]+:role/[A-Za-z0-9.@_-]{1,64}", "use acs:ram::<account>:role/<name>"),
]
OidcProviderArn = Annotated[
    StrictStr,
    matching(
        r"acs:ram::[0-9]+:oidc-provider/[A-Za-z0-9.-]{1,128}",
        "use acs:ram::<account>:oidc-provider/<name>",
    ),
]
Bucket = Annotated[
    StrictStr,
    matching(
        r"[a-z0-9][a-z0-9-]{1,61}[a-z0-9]",
        "OSS bucket names are 3-63 of a-z 0-9 -, no - at either end",
    ),
]
Region = Annotated[StrictStr, matching(r"[a-z0-9-]+", "use a region id such as cn-hangzhou")]
Endpoint = Annotated[
    StrictStr,
    matching(
        r"(https?://)?[a-z0-9]([a-z0-9.-]{0,251}[a-z0-9])?(:[0-9]{1,5})?",
        "use a host such as oss-cn-hangzhou.aliyuncs.com, optionally with http(s):// and :port",
    ),
]
ExternalId = Annotated[
    StrictStr,
    matching(
        r"[A-Za-z0-9=,.@:/_-]{2,1224}", "use 2-1224 of A-Z a-z 0-9 = , . @ : / _ -", echo=False
    ),
]
Caller = Annotated[StrictStr, AfterValidator(_check_caller)]
_MIME_PART = r"[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}"
ContentType = Annotated[
    StrictStr,
    matching(
        f"{_MIME_PART}/{_MIME_PART}", "use a MIME type/subtype such as image/png, no wildcards"
    ),
]
CallbackUrl = Annotated[
    StrictStr, matching(r"https?://[^\s/?#@]+(/[^\s#]*)?", "use an http(s) URL")
]

AsList = BeforeValidator(_as_list)
Unique = AfterValidator(_unique)
Actions = Annotated[
    tuple[Action, ...], AsList, Unique, non_empty("action (put, multipart, get, list, delete)")
]
Callers = Annotated[tuple[Caller, ...], AsList, Unique, non_empty("caller (an id or group:NAME)")]
ContentTypes = Annotated[tuple[ContentType, ...], AsList, Unique]
Template = Annotated[StrictStr, AfterValidator(_check_template)]
_VpcId = Annotated[StrictStr, matching(r"vpc-[a-z0-9]{4,64}", "use a VPC id such as vpc-bp1abc")]
_VpcIds = Annotated[tuple[_VpcId, ...], AsList, Unique, non_empty("VPC id")]
_SourceIp = Annotated[
    str | tuple[str, ...],
    PlainValidator(_source_ip),
    PlainSerializer(lambda value: value if isinstance(value, str) else list(value)),
]
Required = BeforeValidator(_required)
CallbackUrls = Annotated[tuple[CallbackUrl, ...], AsList, Unique]


class Conditions(pydantic.BaseModel):
    """Where a token may be used: RAM's global condition keys, all of which must hold."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    source_ip: _SourceIp | None = None
    """``acs:SourceIp``: ``caller`` (the address that asked for the token) or fixed networks."""
    source_vpc: _VpcIds | None = None
    """``acs:SourceVpc``: only through these VPCs."""
    secure_transport: Annotated[StrictBool, AfterValidator(_only_true)] | None = None
    """``acs:SecureTransport``: HTTPS only."""

    def given(self) -> list[str]:
        """The keys this block sets."""
        return [name for name in type(self).model_fields if getattr(self, name) is not None]

    def ram(self, caller_ip: str | None) -> list[Condition]:
        """As RAM conditions; ``caller_ip`` stands for ``source_ip: caller``.

        Raises ``ValueError`` when ``source_ip`` is ``caller`` and ``caller_ip`` is None.
        """
        found: list[Condition] = []
        if self.source_ip == "caller":
            if caller_ip is None:
                raise ValueError("source_ip: caller needs the caller's address")
            found.append(("IpAddress", SOURCE_IP, (caller_ip,)))
        elif self.source_ip is not None:
            found.append(("IpAddress", SOURCE_IP, tuple(self.source_ip)))
        if self.source_vpc is not None:
            found.append(("StringEquals", SOURCE_VPC, self.source_vpc))
        if self.secure_transport:
            found.append(("Bool", SECURE_TRANSPORT, "true"))
        return found

    @property
    def binds_caller(self) -> bool:
        """Whether tokens are bound to the address that asked for them."""
        return self.source_ip == "caller"


class Grant(pydantic.BaseModel):
    """One bucket, one prefix template, what may be done there, and (optionally) from where."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    bucket: Bucket
    prefix: Template
    actions: Actions
    conditions: Conditions | None = None


def _at_most(count: int, what: str) -> AfterValidator:
    def check(values: tuple[Any, ...]) -> tuple[Any, ...]:
        if len(values) > count:
            raise ValueError(f"lists {len(values)} {what}s; at most {count} are allowed")
        return values

    return AfterValidator(check)


Grants = Annotated[tuple[Grant, ...], AsList, non_empty("grant"), _at_most(MAX_GRANTS, "grant")]
