"""Weave's IPALLOC_INIT as founding rules of the IPAM core, on the simulator's network.

consensus=N: stateless nodes found only once N // 2 + 1 of them hear each other; seed=...: only
the lowest-named seed founds, at once; observer: never founds (and the agent never asks it for
space). The simulator checks invariants 1-2 and Paxos agreement after every event.
"""

from __future__ import annotations

from weavepy.config import IpallocInit
from weavepy.ipam.sim import IpamSim, SimConfig
from weavepy.ipam.status import IpamState
from weavepy.ipam_link import founding

CFG = SimConfig()
ELECT = CFG.timings.elect_after


def test_consensus_waits_for_a_quorum_of_the_stated_count() -> None:
    sim = IpamSim(11)
    rule = founding(IpallocInit("consensus", count=5))
    assert rule == {"found_quorum": 3}
    sim.add_node("a", **rule)
    sim.add_node("b", **rule)
    sim.run(ELECT + 60.0)
    for status in sim.statuses():  # two of five: no quorum, nobody founds
        assert status.state is IpamState.WAITING_FOR_CLUSTER
        assert "founds once 3 stateless nodes hear each other" in status.detail
    sim.add_node("c", **rule)
    sim.run(ELECT + 20.0)
    statuses = sim.statuses()
    assert len({s.cluster_id for s in statuses}) == 1
    assert all(s.state is IpamState.READY for s in statuses)
    assert [s.node for s in statuses if s.generation == 1] == ["a"]


def test_consensus_stops_a_node_launched_without_peers_from_founding_alone() -> None:
    sim = IpamSim(12)
    sim.add_node("a", bootstrap="found", found_alone_after=5.0, **founding(
        IpallocInit("consensus", count=3)))
    sim.run(120.0)
    status = sim.status("a")
    assert status is not None and status.state is IpamState.WAITING_FOR_CLUSTER


def test_only_the_lowest_seed_founds_and_at_once() -> None:
    sim = IpamSim(13)
    rule = founding(IpallocInit("seed", seeds=("s2", "s1", "s3")))
    for name in ("s3", "s2", "x9"):  # s1, the one that founds, is not up yet
        sim.add_node(name, bootstrap="found", **rule)
    sim.run(ELECT + 60.0)
    for status in sim.statuses():
        assert status.state is IpamState.WAITING_FOR_CLUSTER
        assert "s1 founds" in status.detail
    sim.add_node("s1", bootstrap="join", **rule)
    sim.run(1.0)  # at once: no election wait
    first = sim.status("s1")
    assert first is not None and first.generation == 1 and first.cluster_id is not None
    sim.run(30.0)
    statuses = sim.statuses()
    assert len({s.cluster_id for s in statuses}) == 1
    assert all(s.state is IpamState.READY for s in statuses)


def test_an_observer_never_founds_but_joins_a_cluster() -> None:
    sim = IpamSim(14)
    sim.add_node("o", bootstrap="found", **founding(IpallocInit("observer")))
    sim.run(ELECT + 60.0)
    status = sim.status("o")
    assert status is not None and status.state is IpamState.WAITING_FOR_CLUSTER
    assert "observer" in status.detail
    sim.add_node("n1", bootstrap="found")
    sim.run(30.0)
    statuses = sim.statuses()
    assert len({s.cluster_id for s in statuses}) == 1
    observer = sim.status("o")
    assert observer is not None and observer.generation is not None  # a member
    assert observer.owned_blocks == ()
