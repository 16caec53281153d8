"""API-key callers already admitted: the same header from the same address, decided once.

Authenticating an API-key request is a function of its ``Authorization``
header, its client address (and ``X-Forwarded-For`` behind a trusted proxy)
and of the configuration: the keys, the deny list, the trusted proxies.  The
first request of such a caller goes the whole way (``routes._authenticate``);
its outcome, the caller with its address, is kept here, and the next request
with the same header from the same address is admitted by one sha256 and one
dict lookup.

* Nothing secret is kept: entries are keyed by the sha256 digest of the
  header, as the API keys themselves are configured.
* An entry holds only while the settings, the authenticator and its deny list
  are the very objects it was decided under: a reload or a revocation swaps
  them whole (``broker.reload``, ``broker.revocation``), which retires every
  entry at once.  A key that left the file, or a revoked caller, is then
  refused by the whole way again.
* Only API-key callers with one ``Authorization`` header and no query string
  are kept: a JWT is verified on every request (it expires), a certificate
  is the connection's, and a query may carry another token.
* At most ``MAX_ENTRIES`` entries; past that the memo starts over.
"""

from __future__ import annotations

import hashlib

from aiohttp import web

from broker.models import Principal
from broker.services import Services

__all__ = ["MAX_ENTRIES", "Admissions"]

MAX_ENTRIES = 4096

_Key = tuple[bytes, str | None, tuple[str, ...] | None]
_Generation = tuple[object, object, object]


class Admissions:
    """``(header digest, address) → caller``, valid for one configuration generation."""

    __slots__ = ("_entries",)

    def __init__(self) -> None:
        self._entries: dict[_Key, tuple[_Generation, Principal, str]] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def admitted(
        self, request: web.Request, services: Services, header: str
    ) -> tuple[Principal | None, str]:
        """The caller (and quota bucket) a previous request with this header and address was."""
        found = self._entries.get(_key(request, services, header))
        if found is not None and found[0] == _generation(services):
            return found[1], found[2]
        return None, ""

    def keep(
        self,
        request: web.Request,
        services: Services,
        header: str,
        principal: Principal,
        quota: str,
    ) -> None:
        """Remember that ``header`` from here is ``principal`` (API-key callers only)."""
        if principal.auth_method != "api_key":
            return
        if len(self._entries) >= MAX_ENTRIES:
            self._entries.clear()
        self._entries[_key(request, services, header)] = (_generation(services), principal, quota)


def _key(request: web.Request, services: Services, header: str) -> _Key:
    digest = hashlib.sha256(header.encode("utf-8", "surrogatepass")).digest()
    if services.settings.listen.trusted_proxies:
        return digest, request.remote, tuple(request.headers.getall("X-Forwarded-For", ()))
    return digest, request.remote, None


def _generation(services: Services) -> _Generation:
    """The objects a decision depends on; each is replaced whole when it changes."""
    authenticator = services.authenticator
    return services.settings, authenticator, authenticator.revoked
