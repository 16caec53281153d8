"""The address a request came from: the TCP peer, or behind trusted proxies the client they name.

``X-Forwarded-For`` is believed only from a peer in ``listen.trusted_proxies``:
anyone else could write any address into it.  Each proxy appends the address
it saw, so the list is read from the right, past every trusted proxy; the
first address that is not one is the client (the right-most untrusted entry,
as MDN's X-Forwarded-For page advises, and as nginx's ``real_ip_recursive``
does).  A list that is all trusted proxies names its left-most entry; a
malformed entry on the way stops the walk with no address (never a guess).
IPv4-mapped IPv6 peers (``::ffff:127.0.0.1``) are written as IPv4.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Iterable, Sequence

__all__ = ["Network", "client_address"]

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def client_address(
    peer: str | None, forwarded_for: Iterable[str], trusted: Sequence[Network]
) -> str | None:
    """The client's address as text, or None when it cannot be known."""
    if not trusted:  # the peer is the client: its canonical text, parsed once per address
        return _peer_text(peer)
    address = _parse(peer)
    if address is None or not _is_trusted(address, trusted):
        return None if address is None else str(address)
    entries = [entry.strip() for header in forwarded_for for entry in header.split(",")]
    if not entries:
        return str(address)
    for entry in reversed(entries):
        hop = _parse(entry)
        if hop is None:
            return None
        if not _is_trusted(hop, trusted):
            return str(hop)
    return str(_parse(entries[0]))


@functools.lru_cache(maxsize=4096)
def _peer_text(peer: str | None) -> str | None:
    address = _parse(peer)
    return None if address is None else str(address)


@functools.lru_cache(maxsize=4096)
def _parse(text: str | None) -> Address | None:
    try:
        address = ipaddress.ip_address(text or "")
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return address.ipv4_mapped
        if address.scope_id is not None:  # fe80::1%eth0: the zone means nothing to RAM
            return ipaddress.IPv6Address(str(address).partition("%")[0])
    return address


def _is_trusted(address: Address, trusted: Sequence[Network]) -> bool:
    return any(address.version == network.version and address in network for network in trusted)
