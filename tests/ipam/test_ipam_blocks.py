"""Block arithmetic: the cluster range cut into CIDR blocks, and what each block reserves."""

from __future__ import annotations

import ipaddress
import itertools

import pytest

from weavepy.config import DEFAULT_IPALLOC_RANGE
from weavepy.ipam.blocks import MAX_BLOCKS, BlockError, BlockSpace


def test_splits_the_range_into_equal_blocks_in_order() -> None:
    space = BlockSpace.parse("198.19.0.0/16", 24)
    assert space.count == 256
    assert space.block_size == 256
    assert space.block(0) == ipaddress.ip_network("198.19.0.0/24")
    assert space.block(255) == ipaddress.ip_network("198.19.255.0/24")
    blocks = list(space.blocks())
    assert len(blocks) == 256
    assert all(a.broadcast_address + 1 == b.network_address for a, b in itertools.pairwise(blocks))


def test_production_default_is_4096_blocks() -> None:
    assert BlockSpace.parse(str(DEFAULT_IPALLOC_RANGE), 24).count == 4096


def test_index_of_addresses_and_blocks() -> None:
    space = BlockSpace.parse("198.19.0.0/16", 24)
    assert space.index_of("198.19.7.42") == 7
    assert space.index_of(ipaddress.ip_address("198.19.7.0")) == 7
    assert space.index_of("198.19.7.0/24") == 7
    with pytest.raises(BlockError, match="outside the cluster range"):
        space.index_of("198.18.0.1")
    with pytest.raises(BlockError, match="not a /24 block"):
        space.index_of("198.19.7.0/25")
    with pytest.raises(BlockError, match="neither an address"):
        space.index_of("not-an-ip")


def test_gateway_vtep_and_reserved_addresses() -> None:
    space = BlockSpace.parse("198.19.0.0/16", 24)
    assert space.gateway(3) == ipaddress.ip_address("198.19.3.1")
    assert space.vtep_address(3) == ipaddress.ip_address("198.19.3.0")
    for reserved in ("198.19.3.0", "198.19.3.1", "198.19.3.255"):
        assert space.is_reserved(3, ipaddress.ip_address(reserved))
    assert not space.is_reserved(3, ipaddress.ip_address("198.19.3.2"))
    assert space.contains(3, ipaddress.ip_address("198.19.3.255"))
    assert not space.contains(3, ipaddress.ip_address("198.19.4.0"))


def test_pod_addresses_skip_reserved_ones() -> None:
    space = BlockSpace.parse("198.19.0.0/16", 24)
    pods = list(space.pod_addresses(0))
    assert len(pods) == space.pod_capacity() == 253
    assert pods[0] == ipaddress.ip_address("198.19.0.2")
    assert pods[-1] == ipaddress.ip_address("198.19.0.254")


def test_ipv6_ranges_work_and_keep_their_type() -> None:
    space = BlockSpace.parse("fd00:198:19::/48", 64)
    assert space.count == 65536
    assert space.block(1) == ipaddress.ip_network("fd00:198:19:1::/64")
    assert space.gateway(1) == ipaddress.ip_address("fd00:198:19:1::1")
    low = BlockSpace.parse("::/112", 120)  # an IPv6 range whose integers fit 32 bits
    assert low.block(1).version == 6


@pytest.mark.parametrize(
    ("cluster_range", "prefix", "message"),
    [
        ("198.19.0.1/16", 24, "not a CIDR network"),
        ("198.19.0.0/16", 8, "larger than the cluster range"),
        ("198.19.0.0/16", 31, "no room for pods"),
        ("10.0.0.0/8", 30, f"at most {MAX_BLOCKS}"),
        ("198.19.0.0/16", True, "must be an integer"),
    ],
)
def test_bad_spaces_are_refused_with_a_reason(
    cluster_range: str, prefix: int, message: str
) -> None:
    with pytest.raises(BlockError, match=message):
        BlockSpace.parse(cluster_range, prefix)


def test_bad_block_index_is_refused() -> None:
    space = BlockSpace.parse("198.19.0.0/16", 24)
    for index in (-1, 256, True):
        with pytest.raises(BlockError, match=r"outside 0\.\.255"):
            space.block(index)
