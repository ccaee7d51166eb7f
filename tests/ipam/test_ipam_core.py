"""The IPAM core's behaviour, scenario by scenario, on the simulator's lossy network.

Each test names the invariant or rule it demonstrates. The simulator checks invariants 1-2
and Paxos agreement after every event in all of them.
"""

from __future__ import annotations

import ipaddress
import random

import pytest

from weavepy.ipam.core import IpamCore
from weavepy.ipam.errors import ConfigError, IpamDecodeError
from weavepy.ipam.sim import IpamSim, SimConfig
from weavepy.ipam.status import (
    BlockLost,
    IpamState,
    LeaseChanged,
    RemovedFromCluster,
)

CFG = SimConfig()  # reclaim_after 300 s, lease 60 s, voter_replace_after 40 s


def a_cluster(size: int, seed: int = 1, **config: object) -> IpamSim:
    """n1 founds (launched without peers), n2..nN join; everyone holds one block."""
    sim = IpamSim(seed, SimConfig(**config) if config else None)  # type: ignore[arg-type]
    sim.add_node("n1", bootstrap="found")
    for number in range(2, size + 1):
        sim.add_node(f"n{number}")
    sim.run(10.0)
    for name in sim.nodes:
        sim.request_block(name)
    sim.run(5.0)
    for status in sim.statuses():
        assert status.state is IpamState.READY, (status.node, status.detail)
        assert len(status.owned_blocks) == 1
    return sim


def owned(sim: IpamSim, name: str) -> list[str]:
    status = sim.status(name)
    assert status is not None
    return [str(b) for b in status.owned_blocks]


def held(sim: IpamSim, name: str) -> list[str]:
    status = sim.status(name)
    assert status is not None
    return [str(b) for b in status.held_blocks]


def removals(sim: IpamSim, name: str) -> set[tuple[object, ...]]:
    return {
        key
        for key, decisions in sim.checker.reclaims.removals.items()
        if key[1] == name and decisions
    }


# ------------------------------------------------------------------ bootstrap


def test_founder_and_joiners_form_one_cluster_with_distinct_blocks() -> None:
    sim = a_cluster(5)
    statuses = sim.statuses()
    assert len({s.cluster_id for s in statuses}) == 1
    assert statuses[0].voters == ("n1", "n2", "n3", "n4", "n5")
    blocks = [b for s in statuses for b in s.owned_blocks]
    assert len(set(blocks)) == 5


def test_the_voter_set_is_capped_and_the_rest_are_members() -> None:
    sim = a_cluster(7)
    status = sim.status("n7")
    assert status is not None and len(status.voters) == 5 and status.generation is not None


def test_stateless_nodes_that_only_see_each_other_elect_the_lowest_name() -> None:
    sim = IpamSim(2)
    for name in ("c", "a", "b"):
        sim.add_node(name)  # all launched with peers: none founds on its own
    sim.run(CFG.timings.elect_after + 10.0)
    statuses = sim.statuses()
    assert len({s.cluster_id for s in statuses}) == 1
    assert all(s.state is IpamState.READY for s in statuses)
    founder = [s for s in statuses if s.generation == 1]
    assert [s.node for s in founder] == ["a"]


def test_a_node_launched_with_unreachable_peers_waits_and_says_so() -> None:
    sim = IpamSim(3)
    sim.add_node("lonely")
    sim.run(120.0)
    status = sim.status("lonely")
    assert status is not None and status.state is IpamState.WAITING_FOR_CLUSTER
    assert "launched with peers" in status.detail


def test_the_explicit_flag_founds_after_hearing_from_no_peer() -> None:
    sim = IpamSim(4)
    sim.add_node("lonely", found_alone_after=30.0)
    sim.run(29.0)
    assert sim.status("lonely").cluster_id is None  # type: ignore[union-attr]
    sim.run(2.0)
    assert sim.status("lonely").state is IpamState.READY  # type: ignore[union-attr]


# ------------------------------------------------------------------ invariant 2


def test_a_restarted_node_keeps_its_blocks_and_renews_before_using_them() -> None:
    sim = a_cluster(3)
    pod = sim.add_pod("n2")
    assert pod is not None
    before = held(sim, "n2")
    sim.kill("n2")
    sim.run(30.0)
    sim.restart("n2")  # the simulator checks invariant 2 (blocks and pods) right here
    status = sim.status("n2")
    assert status is not None and held(sim, "n2") == before
    assert status.owned_blocks == ()  # no lease survives a restart
    assert status.state in (IpamState.MINORITY_PARTITION, IpamState.WAITING_FOR_QUORUM)
    sim.run(5.0)
    assert owned(sim, "n2") == before
    node = sim.nodes["n2"]
    assert node.allocator is not None
    assert node.allocator.get(pod.container_id, pod.ifname) == pod


def test_a_reboot_shorter_than_reclaim_after_never_loses_space() -> None:
    sim = a_cluster(3)
    before = held(sim, "n3")
    sim.kill("n3")
    sim.run(CFG.reclaim_after - 20.0)
    sim.restart("n3")
    sim.run(10.0)
    assert owned(sim, "n3") == before
    assert not removals(sim, "n3")


# ------------------------------------------------------------------ invariant 3


def test_a_minority_keeps_its_own_blocks_for_the_lease_but_gets_no_new_ones() -> None:
    sim = a_cluster(5)
    sim.partition([["n1", "n2", "n3"], ["n4", "n5"]])
    sim.run(5.0)
    minority = sim.status("n4")
    assert minority is not None and minority.state is IpamState.MINORITY_PARTITION
    assert "2 of 5 voters reachable" in minority.detail and minority.owned_blocks
    sim.request_block("n4")
    sim.request_block("n1")
    sim.run(20.0)
    assert len(owned(sim, "n4")) == 1  # asked, but a minority decides nothing
    assert len(owned(sim, "n1")) == 2  # the majority carries on
    sim.run(CFG.lease)
    assert owned(sim, "n4") == [] and len(held(sim, "n4")) == 1  # lease over: stops using it
    sim.heal()
    sim.run(10.0)
    assert len(owned(sim, "n4")) == 2  # back with the majority: lease renewed, claim decided
    sim.check_status_invariants()


def test_one_way_cuts_never_break_ownership() -> None:
    sim = a_cluster(3, seed=5)
    sim.block_link("n1", "n2")
    sim.block_link("n3", "n1")
    for name in sim.nodes:
        sim.request_block(name, 2)
    sim.run(60.0)
    sim.heal()
    sim.run(30.0)
    assert sum(len(owned(sim, n)) for n in sim.nodes) == 3 * 3


# ------------------------------------------------------------------ invariant 4


def test_a_dead_node_is_reclaimed_once_and_only_after_reclaim_after() -> None:
    sim = a_cluster(4)
    lost = held(sim, "n4")
    sim.destroy("n4")
    sim.run(CFG.reclaim_after - 10.0)
    assert not removals(sim, "n4")
    assert sim.status("n1").unreachable_owners == ("n4",)  # type: ignore[union-attr]
    sim.run(40.0)
    assert len(removals(sim, "n4")) == 1
    (decisions,) = [d for k, d in sim.checker.reclaims.removals.items() if k[1] == "n4"]
    assert len({(era, slot) for era, slot, _ in decisions}) == 1
    assert {reason for _, _, reason in decisions} == {"reclaim"}
    status = sim.status("n1")
    assert status is not None and "n4" not in {m.name for m in status.members}
    assert "n4" not in status.voters
    sim.request_block("n1", 1)
    sim.run(5.0)
    assert lost[0] in owned(sim, "n1")  # the freed block is the lowest free one again


def test_a_node_reclaimed_while_cut_off_drops_its_blocks_and_rejoins_as_new() -> None:
    sim = a_cluster(4)
    old = sim.status("n4")
    assert old is not None
    sim.partition([["n1", "n2", "n3"], ["n4"]])
    sim.run(CFG.lease)
    assert owned(sim, "n4") == []  # its lease ran out long before anyone may reclaim
    sim.run(CFG.reclaim_after + 10.0)
    assert len(removals(sim, "n4")) == 1
    sim.heal()
    sim.run(10.0)
    new = sim.status("n4")
    assert new is not None and new.generation is not None and old.generation is not None
    assert new.generation > old.generation
    assert new.state is IpamState.READY


def test_a_removed_node_says_so_loudly() -> None:
    sim = a_cluster(3)
    sim.partition([["n1", "n2"], ["n3"]])
    sim.run(CFG.reclaim_after + CFG.lease + 10.0)
    events = []
    node = sim.nodes["n3"]
    original = sim._on_event

    def spy(target, event):  # type: ignore[no-untyped-def]
        if target is node:
            events.append(event)
        original(target, event)

    sim._on_event = spy  # type: ignore[method-assign]
    sim.heal()
    sim.run(10.0)
    removed = [e for e in events if isinstance(e, RemovedFromCluster)]
    assert len(removed) == 1 and "rejoins as a new member" in removed[0].message
    assert [e.block for e in events if isinstance(e, BlockLost)]
    assert any(isinstance(e, LeaseChanged) and e.valid for e in events)


def test_rmpeer_refuses_a_live_node_and_unknown_names() -> None:
    sim = a_cluster(3)
    assert "alive in this node's view" in sim.rmpeer("n1", "n2")
    assert "not a member" in sim.rmpeer("n1", "ghost")
    assert "cannot rmpeer itself" in sim.rmpeer("n1", "n1")


def test_rmpeer_of_a_fresh_corpse_removes_at_once_and_frees_after_the_lease() -> None:
    sim = a_cluster(4)
    sim.kill("n4")
    sim.run(5.0)
    message = sim.rmpeer("n1", "n4")
    assert "quarantined" in message
    sim.run(3.0)
    status = sim.status("n1")
    assert status is not None and "n4" not in {m.name for m in status.members}
    assert status.quarantined_blocks == 1  # its lease may still run: nobody may take it yet
    sim.run(CFG.lease + 5.0)
    assert sim.status("n1").quarantined_blocks == 0  # type: ignore[union-attr]
    assert len(removals(sim, "n4")) == 1
    sim.restart("n4")  # the old node comes back: it learns, drops, rejoins
    sim.run(10.0)
    assert sim.status("n4").state is IpamState.READY  # type: ignore[union-attr]


def test_rmpeer_of_a_long_dead_node_frees_at_once() -> None:
    sim = a_cluster(4)
    sim.kill("n4")
    sim.run(CFG.lease + 5.0)
    sim.rmpeer("n1", "n4")
    sim.run(3.0)
    assert sim.status("n1").quarantined_blocks == 0  # type: ignore[union-attr]


def test_forced_rmpeer_with_a_quorum_frees_at_once() -> None:
    sim = a_cluster(4)
    sim.kill("n4")
    sim.run(3.0)
    assert sim.force_allowed("n1", "n4")
    assert "freed at once" in sim.rmpeer("n1", "n4", force=True)
    sim.run(3.0)
    status = sim.status("n1")
    assert status is not None and status.quarantined_blocks == 0 and status.era == (0, "", 0)


def test_forced_rmpeer_without_a_quorum_starts_a_new_era_that_everyone_adopts() -> None:
    sim = a_cluster(4, max_voters=3)  # three voters, one plain member
    voters = sim.status("n1").voters  # type: ignore[union-attr]
    gone = [v for v in voters if v != "n1"]
    (member,) = {"n2", "n3", "n4"} - set(gone)
    for name in gone:
        sim.destroy(name)
    sim.run(5.0)
    assert sim.status("n1").state is IpamState.MINORITY_PARTITION  # type: ignore[union-attr]
    assert sim.force_allowed("n1", gone[0])
    message = sim.rmpeer("n1", gone[0], force=True)
    assert message.startswith("FORCED") and "era 1" in message and "fenced" in message
    sim.run(5.0)
    fenced = sim.status("n1")
    assert fenced is not None and fenced.free_blocks == 0  # nothing is handed out for a lease
    sim.request_block("n1")
    assert sim.status("n1").state is IpamState.OWNED_BY_UNREACHABLE_PEERS  # type: ignore[union-attr]
    assert "fenced" in sim.status("n1").detail  # type: ignore[union-attr]
    assert f"removal of {gone[1]}" in sim.rmpeer("n1", gone[1])  # a normal rmpeer works now
    sim.run(CFG.lease + 10.0)
    for name in ("n1", member):
        status = sim.status(name)
        assert status is not None and status.state is IpamState.READY
        assert status.era is not None and status.era[0] == 1
        assert {m.name for m in status.members} == {"n1", member}
    assert sim.status("n1").free_blocks == 256 - 3  # type: ignore[union-attr]
    assert sim.status("n1").quarantined_blocks == 0  # type: ignore[union-attr]


# ------------------------------------------------------------------ node deleted by Kubernetes


def decided_removals(sim: IpamSim, name: str) -> list[tuple[object, ...]]:
    """Every (era, slot, reason) at which a generation of `name` was removed."""
    return [d for k, ds in sim.checker.reclaims.removals.items() if k[1] == name for d in ds]


def test_a_deleted_dead_node_is_removed_at_once_and_its_block_freed_after_the_lease() -> None:
    sim = a_cluster(5)
    lost = held(sim, "n4")
    sim.kill("n4")
    sim.run(5.0)  # gossip has declared it dead
    sim.node_deleted("n4")
    sim.run(5.0)
    assert {reason for _, _, reason in decided_removals(sim, "n4")} == {"node-deleted"}
    assert len({(era, slot) for era, slot, _ in decided_removals(sim, "n4")}) == 1
    status = sim.status("n1")
    assert status is not None and "n4" not in {m.name for m in status.members}
    assert status.quarantined_blocks == 1  # dead for less than a lease: its lease may run
    sim.run(CFG.lease + 5.0)
    assert sim.status("n1").quarantined_blocks == 0  # type: ignore[union-attr]
    sim.request_block("n1", 1)
    sim.run(5.0)
    assert lost[0] in owned(sim, "n1")  # reused, long before reclaim_after
    assert sim.now < CFG.reclaim_after
    assert len({(era, slot) for era, slot, _ in decided_removals(sim, "n4")}) == 1


def test_a_deleted_node_that_is_alive_keeps_its_space_until_it_dies() -> None:
    sim = a_cluster(4)
    sim.node_deleted("n4")
    sim.run(30.0)
    assert not decided_removals(sim, "n4")
    member = next(m for m in sim.status("n1").members if m.name == "n4")  # type: ignore[union-attr]
    assert member.node_deleted and member.blocks
    sim.destroy("n4")
    sim.run(CFG.lease + 10.0)
    assert [reason for _, _, reason in decided_removals(sim, "n4")] == ["node-deleted"]


def test_a_node_listed_again_is_no_longer_removed_early() -> None:
    sim = a_cluster(4)
    sim.node_deleted("n4")
    sim.node_restored("n4")  # kubelet registered it again
    sim.kill("n4")
    sim.run(CFG.lease + 10.0)
    assert not decided_removals(sim, "n4")


def test_a_minority_that_sees_a_node_deleted_removes_nothing_until_a_majority_is_back() -> None:
    sim = a_cluster(5)
    sim.kill("n5")
    sim.partition([["n1", "n2"], ["n3", "n4"]])
    sim.run(10.0)
    sim.node_deleted("n5", seen_by=["n1", "n2"])
    sim.run(60.0)
    assert not decided_removals(sim, "n5")
    status = sim.status("n1")
    assert status is not None and status.state is IpamState.MINORITY_PARTITION
    assert "removal of n5 (node deleted) waits for a majority" in status.detail
    sim.heal()
    sim.run(40.0)
    assert [reason for _, _, reason in decided_removals(sim, "n5")] == ["node-deleted"]


# ------------------------------------------------------------------ voters


def test_a_dead_voter_is_replaced_by_a_live_member() -> None:
    sim = a_cluster(6)
    sim.kill("n2")
    sim.run(CFG.timings.voter_replace_after + 10.0)
    status = sim.status("n1")
    assert status is not None and status.voters == ("n1", "n3", "n4", "n5", "n6")
    assert "n2" in {m.name for m in status.members}  # demoted, not removed
    sim.restart("n2")
    sim.run(10.0)
    assert owned(sim, "n2")


def test_a_voter_that_lost_its_disk_does_not_count_until_it_rejoined() -> None:
    sim = a_cluster(3)
    sim.destroy("n3")
    sim.rejoin("n3")
    sim.run(10.0)
    status = sim.status("n1")
    assert status is not None and status.state is IpamState.READY
    rejoined = sim.status("n3")
    assert rejoined is not None and rejoined.generation is not None
    assert "n3" in status.voters and rejoined.generation > 3


def test_leave_gives_the_blocks_back() -> None:
    sim = a_cluster(3)
    node = sim.nodes["n3"]
    assert node.core is not None
    node.core.leave(sim.now)
    assert node.core.usable_blocks(sim.now) == []  # stops at once, before the decision
    sim._after_input(node)
    sim.run(5.0)
    assert sim.status("n1").free_blocks == 256 - 2  # type: ignore[union-attr]
    assert sim.status("n1").quarantined_blocks == 0  # type: ignore[union-attr]
    assert "left" in sim.status("n3").detail  # type: ignore[union-attr]


# ------------------------------------------------------------------ invariant 6


def test_two_clusters_started_apart_refuse_to_merge_and_say_how_to_recover() -> None:
    sim = IpamSim(6)
    sim.add_node("a1", bootstrap="found")
    sim.add_node("a2")
    sim.add_node("b1", bootstrap="found")
    sim.add_node("b2")
    sim.partition([["a1", "a2"], ["b1", "b2"]])
    sim.run(15.0)
    before = {s.node: s.cluster_id for s in sim.statuses()}
    assert before["a1"] == before["a2"] != before["b1"] == before["b2"]
    sim.heal()
    sim.pushpull("a1", "b1")
    sim.run(30.0)
    after = {s.node: s.cluster_id for s in sim.statuses()}
    assert after == before
    report = sim.status("a1").cluster_mismatches  # type: ignore[union-attr]
    assert report and report[0].peer == "b1" and report[0].remote_cluster == before["b1"]
    assert "weavepy reset" in report[0].message and str(before["a1"]) in report[0].message
    assert sim.status("b1").cluster_mismatches  # type: ignore[union-attr]


def test_a_node_configured_with_another_range_refuses_to_join() -> None:
    sim = a_cluster(2)
    sim.config = SimConfig(cluster_range="198.19.0.0/17")
    sim.add_node("odd")
    sim.run(10.0)
    status = sim.status("odd")
    assert status is not None and status.state is IpamState.WAITING_FOR_CLUSTER
    assert status.cluster_mismatches and "198.19.0.0/17" in status.cluster_mismatches[0].message


# ------------------------------------------------------------------ the agent contract


def test_nothing_leaves_before_the_state_that_caused_it_is_persisted() -> None:
    core = IpamCore("n1", "198.19.0.0/16", 24, rng=random.Random(1), bootstrap="found")
    core.handle_timer(0.0)
    assert core.persist_needed
    assert core.messages_to_send() == [] and core.events() == []
    snapshot = core.snapshot()
    core.mark_persisted(snapshot["seq"])
    assert [m.to for m in core.messages_to_send()] == [None]  # the founding state, broadcast
    assert core.events()
    core.request_block(1.0)
    assert core.persist_needed and core.events() == []  # the claim is decided, not yet durable
    core.mark_persisted(core.snapshot()["seq"])
    assert any(
        getattr(e, "block", None) == ipaddress.ip_network("198.19.0.0/24") for e in core.events()
    )


def test_bad_configuration_is_refused_with_a_reason() -> None:
    rng = random.Random(1)
    with pytest.raises(ConfigError, match="at least the lease"):
        IpamCore("n1", "198.19.0.0/16", 24, rng=rng, reclaim_after=10.0, lease=60.0)
    with pytest.raises(ConfigError, match="not a CIDR"):
        IpamCore("n1", "198.19.0.1/16", 24, rng=rng)
    with pytest.raises(ConfigError, match="node name"):
        IpamCore("", "198.19.0.0/16", 24, rng=rng)
    core = IpamCore("n1", "198.19.0.0/16", 24, rng=rng, bootstrap="found")
    core.handle_timer(0.0)
    with pytest.raises(ConfigError, match="belongs to node 'n1'"):
        IpamCore("n2", "198.19.0.0/16", 24, rng=rng, snapshot=core.snapshot())
    with pytest.raises(ConfigError, match=r"configured with 198\.19\.0\.0/17"):
        IpamCore("n1", "198.19.0.0/17", 24, rng=rng, snapshot=core.snapshot())
    with pytest.raises(IpamDecodeError, match="bad_snapshot"):
        IpamCore("n1", "198.19.0.0/16", 24, rng=rng, snapshot={"format": 1, "node": "n1"})


def test_reclaim_can_be_switched_off() -> None:
    sim = a_cluster(3, reclaim_after=None)
    sim.destroy("n3")
    sim.run(2000.0)
    assert not removals(sim, "n3")
    assert sim.status("n1").state is IpamState.READY  # type: ignore[union-attr]



# ------------------------------------------------------------------ late words, other clusters


def test_a_late_hello_of_a_voter_does_not_hide_it_once_it_joined() -> None:
    """Gossip's tag confirms what n2's messages said (cluster, generation 2); the hello n2's
    process sent while it was stateless, delayed past all that, must not make n1 count n2 as
    a node without a cluster (n1 would report a minority with both voters up)."""
    sim = IpamSim(1)
    sim.add_node("n1", bootstrap="found")
    sim.add_node("n2")
    joining = sim.nodes["n2"].core
    assert joining is not None and joining.cluster_id is None
    hello = joining.local_state()  # what n2 says on the wire before it knows a cluster
    sim.run(10.0)
    core, joined = sim.nodes["n1"].core, sim.nodes["n2"].core
    assert core is not None and core.status(sim.now).voters == ("n1", "n2")
    assert joined is not None and joined.generation == 2
    core.on_member_alive("n2", sim.now, joined.meta_tag)  # gossip's latest word on n2, again
    core.on_message("n2", hello, sim.now)
    status = core.status(sim.now)
    assert status.state is IpamState.READY and status.voters_reachable == 2
    sim.check_status_invariants()


def test_a_voter_reset_into_another_cluster_is_not_counted_and_may_be_forced_out() -> None:
    """n1 and n2 (generation 2) vote in one cluster; n2's node is reset and its new process
    joins z1's cluster, where it is generation 2 again. n1 has lost its majority; the
    operator's rule allows `rmpeer --force` of n2 (that generation is gone for good), and the
    simulator must judge so, and must not count the reborn n2 as n1's voter."""
    sim = IpamSim(1)
    sim.add_node("n1", bootstrap="found")
    sim.add_node("n2")
    sim.run(10.0)
    sim.destroy("n2")
    sim.partition([["n1"], ["n2", "z1"]])
    sim.add_node("z1", bootstrap="found")
    sim.partition([["n1"], ["n2", "z1"]])
    sim.rejoin("n2")
    sim.run(10.0)
    sim.heal()
    sim.run(5.0)
    reborn, status = sim.status("n2"), sim.status("n1")
    assert reborn is not None and status is not None
    assert reborn.generation == 2 and reborn.cluster_id != status.cluster_id
    assert status.voters == ("n1", "n2") and [m.generation for m in status.members] == [1, 2]
    assert status.state is IpamState.MINORITY_PARTITION and status.voters_reachable == 1
    sim.check_status_invariants()  # the simulator agrees: z1's generation 2 is not n1's voter
    assert sim.force_allowed("n1", "n2")
    assert sim.settle_and_check_liveness()["forced"] == 1
