"""Pod IPs: from 127.0.0.0/8 but never 127.0.0.0/24, never reused before the pool wraps."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshlet.errors import ConfigError
from meshlet.runtime.ipam import PodIPAllocator, PoolExhaustedError


def test_default_pool_is_127_1_0_0_16_without_network_address() -> None:
    ipam = PodIPAllocator()
    assert ipam.network == "127.1.0.0/16"
    assert [ipam.allocate() for _ in range(3)] == ["127.1.0.1", "127.1.0.2", "127.1.0.3"]
    assert ipam.size == 65534


def test_the_users_127_0_0_0_24_is_never_handed_out() -> None:
    ipam = PodIPAllocator("127.0.0.0/16")
    first = ipam.allocate()
    assert first == "127.0.1.0"
    ips = {ipam.allocate() for _ in range(ipam.size - 1)}
    assert not any(ipaddress.IPv4Address(ip) in ipaddress.IPv4Network("127.0.0.0/24") for ip in ips)


def test_whole_block_skips_users_range_and_loopback_broadcast() -> None:
    ipam = PodIPAllocator("127.0.0.0/8")
    assert ipam.allocate() == "127.0.1.0"
    assert ipam.size == 2**24 - 256 - 1


@pytest.mark.parametrize(
    "network", ["10.0.0.0/24", "127.0.0.0/24", "127.0.0.1/32", "not a network", "::1/128"]
)
def test_networks_outside_the_pool_are_refused_with_advice(network: str) -> None:
    with pytest.raises(ConfigError) as e:
        PodIPAllocator(network)
    assert "podNetwork" in str(e.value)


def test_a_released_ip_is_not_reused_until_the_rest_of_the_pool_was_used() -> None:
    ipam = PodIPAllocator("127.9.9.0/29")  # 6 hosts: .1 .. .6
    a = ipam.allocate()
    ipam.release(a)
    seen = [ipam.allocate() for _ in range(5)]
    assert a not in seen
    assert ipam.allocate() == a  # only now, after wrapping round


def test_exhaustion_raises_and_release_makes_room() -> None:
    ipam = PodIPAllocator("127.9.9.0/30")  # .1 and .2
    a, b = ipam.allocate(), ipam.allocate()
    with pytest.raises(PoolExhaustedError, match="in use"):
        ipam.allocate()
    ipam.release(b)
    assert ipam.allocate() == b
    assert ipam.in_use(a) and ipam.in_use(b)


def test_releasing_an_unknown_ip_is_ignored() -> None:
    ipam = PodIPAllocator("127.9.9.0/30")
    ipam.release("127.9.9.1")
    assert ipam.allocate() == "127.9.9.1"


def test_the_cursor_survives_a_restart(tmp_path: Path) -> None:
    state = tmp_path / "state" / "ipam"
    first = PodIPAllocator("127.9.9.0/29", state_path=state)
    assert [first.allocate(), first.allocate()] == ["127.9.9.1", "127.9.9.2"]
    again = PodIPAllocator("127.9.9.0/29", state_path=state)
    assert again.allocate() == "127.9.9.3"
    # State from another network is ignored.
    other = PodIPAllocator("127.8.0.0/29", state_path=state)
    assert other.allocate() == "127.8.0.1"


@given(st.lists(st.booleans(), max_size=60))
def test_no_address_is_ever_handed_out_twice_while_in_use(ops: list[bool]) -> None:
    ipam = PodIPAllocator("127.9.9.0/28")
    live: list[str] = []
    for allocate in ops:
        if allocate and len(live) < ipam.size:
            ip = ipam.allocate()
            assert ip not in live
            live.append(ip)
        elif live:
            ipam.release(live.pop(0))
