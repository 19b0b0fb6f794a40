"""Which KVS addresses a scheduler tells a client to call directly."""

from __future__ import annotations

import pytest

from cloudburst_grpc.kvs_proxy import addresses_for

ADDRESSES = ["127.0.0.1:7601", "[::1]:7601", "localhost:7601", "10.1.2.3:7601"]


@pytest.mark.parametrize("peer", ["ipv4:127.0.0.1:5000", "ipv6:[::1]:5000"])
def test_a_client_on_loopback_is_told_every_address(peer: str) -> None:
    assert addresses_for(peer, ADDRESSES) == ADDRESSES


@pytest.mark.parametrize("peer", ["ipv4:10.9.9.9:5000", "ipv6:[2001:db8::1]:5000"])
def test_a_remote_client_is_not_told_a_loopback_address(peer: str) -> None:
    # It would dial a KVS of its own machine instead of the cluster's.
    assert addresses_for(peer, ADDRESSES) == ["10.1.2.3:7601"]
