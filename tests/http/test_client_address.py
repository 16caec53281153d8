"""The caller's address: the TCP peer, or behind trusted proxies the client they name."""

from __future__ import annotations

import ipaddress
import json

import aiohttp
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.http.client_address import Network, client_address
from tests.conftest import CALLERS, BrokerFactory

BOUNDED = settings(max_examples=300, deadline=None, database=None)

PROXIES: list[Network] = [ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("fd00::/8")]


@pytest.mark.parametrize(
    ("peer", "forwarded", "expected"),
    [
        ("203.0.113.7", [], "203.0.113.7"),
        ("203.0.113.7", ["198.51.100.1"], "203.0.113.7"),  # not a proxy: header ignored
        ("10.0.0.2", [], "10.0.0.2"),  # a proxy's own request
        ("10.0.0.2", ["198.51.100.1"], "198.51.100.1"),
        ("10.0.0.2", ["1.1.1.1, 198.51.100.1"], "198.51.100.1"),  # right-most untrusted
        ("10.0.0.2", ["1.1.1.1, 198.51.100.1, 10.0.0.9"], "198.51.100.1"),
        ("10.0.0.2", ["1.1.1.1", "198.51.100.1,10.0.0.9"], "198.51.100.1"),  # two headers
        ("10.0.0.2", ["10.1.1.1, 10.0.0.9"], "10.1.1.1"),  # all trusted: the left-most
        ("10.0.0.2", ["garbage, 198.51.100.1"], "198.51.100.1"),  # never read past the client
        ("10.0.0.2", ["198.51.100.1, garbage"], None),  # malformed on the way: unknown
        ("10.0.0.2", ["198.51.100.1:8080"], None),
        ("::ffff:203.0.113.7", [], "203.0.113.7"),  # IPv4-mapped: as IPv4
        ("fd00::1", ["2001:db8::5, fd00::2"], "2001:db8::5"),
        ("fe80::1%eth0", [], "fe80::1"),
        (None, [], None),
        ("not-an-address", [], None),
    ],
)
def test_client_address(peer: str | None, forwarded: list[str], expected: str | None) -> None:
    """X-Forwarded-For counts only from a trusted peer, read from the right past the proxies."""
    assert client_address(peer, forwarded, PROXIES) == expected


@BOUNDED
@given(
    peer=st.ip_addresses(v=4).map(str),
    forwarded=st.lists(st.ip_addresses().map(str), max_size=4).map(", ".join),
)
def test_an_untrusted_peer_is_always_the_answer(peer: str, forwarded: str) -> None:
    """Whatever X-Forwarded-For says, a peer that is not a trusted proxy is the caller."""
    if ipaddress.ip_address(peer) in PROXIES[0]:
        return
    assert client_address(peer, [forwarded], PROXIES) == peer


@BOUNDED
@given(client=st.ip_addresses(), hops=st.lists(st.integers(1, 254), max_size=3))
def test_the_client_behind_any_chain_of_trusted_proxies_is_found(
    client: ipaddress.IPv4Address | ipaddress.IPv6Address, hops: list[int]
) -> None:
    """client, proxy, proxy... from a trusted peer: the client (unless it is a proxy itself)."""
    chain = [str(client), *(f"10.0.0.{hop}" for hop in hops)]
    found = client_address("10.9.9.9", [", ".join(chain)], PROXIES)
    expected = client.ipv4_mapped if getattr(client, "ipv4_mapped", None) else client
    assert found == str(expected)


async def test_x_forwarded_for_is_ignored_unless_the_peer_is_a_trusted_proxy(
    make_broker: BrokerFactory,
) -> None:
    """Without trusted_proxies a forged X-Forwarded-For changes nothing: bound to the peer."""
    broker = await make_broker()
    headers = {**broker.auth("svc-a"), "X-Forwarded-For": "198.51.100.1"}
    async with broker.client.get("/v1/credentials/pinned-reads", headers=headers) as resp:
        assert resp.status == 200
    [call] = broker.sts.emulator.calls
    assert _bound_to(call.params["Policy"]) == "127.0.0.1"


async def test_behind_a_trusted_proxy_the_forwarded_client_is_bound(
    make_broker: BrokerFactory,
) -> None:
    """With the loopback peer trusted, the token is bound to the client X-Forwarded-For names."""
    broker = await make_broker(listen={"trusted_proxies": ["127.0.0.0/8"]})
    for forwarded in ("198.51.100.1", "203.0.113.9, 127.0.0.5"):
        headers = {**broker.auth("svc-a"), "X-Forwarded-For": forwarded}
        async with broker.client.get("/v1/credentials/pinned-reads", headers=headers) as resp:
            assert resp.status == 200
    assert [_bound_to(call.params["Policy"]) for call in broker.sts.emulator.calls] == [
        "198.51.100.1",
        "203.0.113.9",
    ]


async def test_an_unknown_address_is_a_400_for_a_bound_policy_only(
    make_broker: BrokerFactory,
) -> None:
    """A malformed X-Forwarded-For from a trusted proxy: 400 for pinned-reads, 200 elsewhere."""
    broker = await make_broker(listen={"trusted_proxies": ["127.0.0.0/8"]})
    headers = {**broker.auth("svc-a"), "X-Forwarded-For": "198.51.100.1, nonsense"}
    async with broker.client.get("/v1/credentials/pinned-reads", headers=headers) as resp:
        body = await resp.json()
    assert resp.status == 400
    assert body["error"]["code"] == "RequestInvalid"
    assert "trusted_proxies" in body["error"]["message"]
    async with broker.client.get("/v1/credentials/reports-read", headers=headers) as resp:
        assert resp.status == 200
    assert broker.sts.emulator.assume_role_calls() == 1


async def test_each_source_address_gets_its_own_token(make_broker: BrokerFactory) -> None:
    """The address is part of the Policy, so of the cache key: one STS call per address."""
    broker = await make_broker()
    ids = []
    for local in ("127.0.0.1", "127.0.0.2", "127.0.0.1"):
        connector = aiohttp.TCPConnector(local_addr=(local, 0))
        async with (
            aiohttp.ClientSession(connector=connector) as session,
            session.get(
                broker.client.make_url("/v1/credentials/pinned-reads"),
                headers={"Authorization": f"Bearer {CALLERS['svc-a'][0]}"},
            ) as resp,
        ):
            assert resp.status == 200
            ids.append((await resp.json())["AccessKeyId"])
    assert ids[0] == ids[2] != ids[1]
    assert [_bound_to(call.params["Policy"]) for call in broker.sts.emulator.calls] == [
        "127.0.0.1",
        "127.0.0.2",
    ]


def _bound_to(policy: str) -> str:
    [address] = {
        address
        for statement in json.loads(policy)["Statement"]
        for address in statement["Condition"]["IpAddress"]["acs:SourceIp"]
    }
    return str(address)
