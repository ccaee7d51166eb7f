"""Pod addresses: idempotent ADD, DEL, GC, reserved addresses, more blocks, honest refusals.

These use a real IpamCore (a one-node cluster decides alone, so claims land at once); the
lost-quorum case uses the simulator with real peers.
"""

from __future__ import annotations

import ipaddress
import random

import pytest

from weavepy.ipam.allocator import Allocation, PodAllocator, Unavailable
from weavepy.ipam.core import IpamCore
from weavepy.ipam.errors import IpamDecodeError
from weavepy.ipam.sim import IpamSim
from weavepy.ipam.status import IpamState


def solo(cluster_range: str = "198.19.0.0/24", prefix: int = 28) -> IpamCore:
    """A founded one-node cluster: 16 blocks of 16 addresses (13 for pods each)."""
    core = IpamCore("n1", cluster_range, prefix, rng=random.Random(7), bootstrap="found")
    core.handle_timer(0.0)
    return core


def allocate(allocator: PodAllocator, container: str, now: float = 1.0) -> Allocation:
    result = allocator.add(container, "eth0", now)
    assert isinstance(result, Allocation), result
    return result


def test_first_add_asks_for_a_block_then_succeeds() -> None:
    core = solo()
    allocator = PodAllocator(core)
    first = allocator.add("c1", "eth0", 1.0)
    assert isinstance(first, Unavailable)  # no block yet: the request went to the voters...
    assert core.held_blocks() == [0]  # ...and a sole voter decides at once
    got = allocate(allocator, "c1")
    assert got.address == ipaddress.ip_address("198.19.0.2")
    assert got.gateway == ipaddress.ip_address("198.19.0.1")
    assert str(got.interface) == "198.19.0.2/28"
    assert got.block == ipaddress.ip_network("198.19.0.0/28")


def test_add_is_idempotent_per_container_and_interface() -> None:
    core = solo()
    core.request_block(0.0)
    allocator = PodAllocator(core)
    a = allocate(allocator, "c1")
    assert allocate(allocator, "c1") == a
    other_if = allocator.add("c1", "net1", 1.0)
    assert isinstance(other_if, Allocation) and other_if.address != a.address
    assert allocator.get("c1", "eth0") == a


def test_release_is_idempotent_and_next_fit_avoids_instant_reuse() -> None:
    core = solo()
    core.request_block(0.0)
    allocator = PodAllocator(core)
    a = allocate(allocator, "c1")
    assert allocator.release("c1", "eth0") == a
    assert allocator.release("c1", "eth0") is None
    b = allocate(allocator, "c2")
    assert b.address != a.address  # handed out after the last one, not the freed one


def test_reserved_addresses_are_never_handed_out_and_full_blocks_grow() -> None:
    core = solo()
    core.request_block(0.0)
    allocator = PodAllocator(core)
    got = [allocate(allocator, f"c{i}") for i in range(13)]
    network = ipaddress.ip_network("198.19.0.0/28")
    assert {a.address for a in got} == set(network.hosts()) - {network.network_address + 1}
    full = allocator.add("c13", "eth0", 2.0)
    assert isinstance(full, Unavailable)
    assert "full" in full.detail
    assert core.held_blocks() == [0, 1]  # the allocator asked the core for one more
    assert allocate(allocator, "c13").block == ipaddress.ip_network("198.19.0.16/28")
    usage = allocator.usage()
    assert usage[network] == (13, 13)


def test_exhausting_the_cluster_range_reports_out_of_space() -> None:
    core = solo(cluster_range="198.19.0.0/27", prefix=28)  # 2 blocks, 26 pod addresses
    allocator = PodAllocator(core)
    results = [allocator.add(f"c{i}", "eth0", 1.0) for i in range(40)]
    allocations = [r for r in results if isinstance(r, Allocation)]
    assert len(allocations) == 26
    last = results[-1]
    assert isinstance(last, Unavailable) and last.state is IpamState.OUT_OF_SPACE
    assert "all 2 blocks" in last.detail
    assert core.status(1.0).state is IpamState.OUT_OF_SPACE
    allocator.release(allocations[0].container_id, "eth0")
    assert isinstance(allocator.add("c99", "eth0", 1.0), Allocation)
    assert core.status(1.0).state is IpamState.READY  # the wish for a block was withdrawn


def test_gc_keeps_only_valid_attachments() -> None:
    core = solo()
    core.request_block(0.0)
    allocator = PodAllocator(core)
    for name in ("a", "b", "c"):
        allocate(allocator, name)
    freed = allocator.gc([("b", "eth0"), ("zzz", "eth0")])
    assert sorted(f.container_id for f in freed) == ["a", "c"]
    assert [a.container_id for a in allocator.allocations()] == ["b"]


def test_allocations_survive_a_restart_exactly() -> None:
    core = solo()
    core.request_block(0.0)
    allocator = PodAllocator(core)
    before = [allocate(allocator, f"c{i}") for i in range(5)]
    allocator.release("c2", "eth0")
    snapshot = allocator.snapshot()
    again_core = IpamCore("n1", "198.19.0.0/24", 28, rng=random.Random(8), snapshot=core.snapshot())
    again = PodAllocator(again_core, snapshot=snapshot)
    assert again.allocations() == [a for a in before if a.container_id != "c2"]
    assert again.add("c1", "eth0", 9.0) == before[1]  # idempotent even before the lease is back
    fresh = again.add("c9", "eth0", 9.0)
    assert isinstance(fresh, Unavailable)  # a new address needs the lease renewed first
    again_core.handle_timer(9.0)
    assert isinstance(again.add("c9", "eth0", 9.0), Allocation)


def test_a_corrupt_allocation_snapshot_is_refused() -> None:
    core = solo()
    bad = {
        "format": 1,
        "seq": 1,
        "range": "198.19.0.0/24",
        "block_prefix": 28,
        "allocations": [["c1", "eth0", "198.19.0.1"]],
        "cursors": [],
    }
    with pytest.raises(IpamDecodeError, match="reserved"):
        PodAllocator(core, snapshot=bad)
    with pytest.raises(IpamDecodeError, match="different cluster range"):
        PodAllocator(core, snapshot={**bad, "range": "198.19.1.0/24", "allocations": []})


@pytest.mark.parametrize(
    ("container", "ifname"),
    [("", "eth0"), ("c", ""), ("c", "x" * 16), ("c", "a/b"), ("c" * 257, "eth0")],
)
def test_bad_keys_are_refused(container: str, ifname: str) -> None:
    with pytest.raises(ValueError):
        PodAllocator(solo()).add(container, ifname, 0.0)


def test_a_node_cut_off_from_the_voters_refuses_new_space_and_says_why() -> None:
    sim = IpamSim(seed=3)
    sim.add_node("n1", bootstrap="found")
    for name in ("n2", "n3"):
        sim.add_node(name)
    sim.run(10.0)
    for name in ("n1", "n2", "n3"):
        sim.request_block(name)
    sim.run(5.0)
    assert sim.add_pod("n3") is not None
    sim.partition([["n1", "n2"], ["n3"]])
    sim.run(5.0)
    node = sim.nodes["n3"]
    assert node.allocator is not None
    # own block still usable during the lease, but no second block can be had
    assert isinstance(node.allocator.add("more", "eth0", sim.now), Allocation)
    for i in range(260):
        result = node.allocator.add(f"fill{i}", "eth0", sim.now)
    assert isinstance(result, Unavailable)
    assert result.state is IpamState.MINORITY_PARTITION
    assert "1 of 3 voters reachable" in result.detail
    sim.run(sim.config.lease)
    late = node.allocator.add("late", "eth0", sim.now)
    assert isinstance(late, Unavailable) and "lease ended" in late.detail
