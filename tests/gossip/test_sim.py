"""Whole-cluster behaviour in the virtual-time simulator (real Nodes, virtual network).

Every run is seeded, bounded in virtual time, and small enough to take seconds of wall time.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Iterator

import pytest

from gossip.config import GossipConfig
from gossip.events import MemberEvent, MemberEventKind, MemberState
from gossip.sim import Link, SimNode, Simulation

LAN = GossipConfig.lan()
# memberlist allows PushPullInterval 0 (no periodic anti-entropy); large runs use it, because
# a 1000-entry push/pull costs tens of milliseconds of pure-Python codec time per exchange.
NO_PUSH_PULL = dataclasses.replace(LAN, push_pull_interval=0)


@pytest.fixture(autouse=True)
def _quiet_gossip_logs() -> Iterator[None]:
    """Refutation warnings are expected by the thousand here; keep the output readable."""
    logger = logging.getLogger("gossip")
    level = logger.level
    logger.setLevel(logging.ERROR)
    yield
    logger.setLevel(level)


def failed_about(events: list[tuple[SimNode, MemberEvent]], names: set[str]) -> int:
    return sum(1 for _, e in events if e.kind is MemberEventKind.FAILED and e.name in names)


@pytest.mark.timeout(60)
def test_a_cluster_forms_by_joining_one_seed() -> None:
    sim = Simulation(LAN, seed=1, link=Link(delay=0.001, jitter=0.001))
    sim.add_node("seed")
    for _ in range(63):
        sim.add_node(join=["seed"])
        sim.run_for(0.05)
    assert sim.run_until_true(sim.converged, timeout=30.0, step=0.5)
    for seat in sim.nodes.values():
        assert all(result.ok for result in seat.join_results)
    assert sim.stats.packets_sent > 0


@pytest.mark.timeout(60)
def test_a_thousand_node_cluster_learns_a_new_member_in_log_n_rounds() -> None:
    # The 1000 start converged (seeded, not formed); the newcomer joins by a real push/pull.
    sim = Simulation(NO_PUSH_PULL, seed=2, link=Link(delay=0.001, jitter=0.002))
    sim.add_converged_cluster(1000)
    sim.run_for(2.0)
    newcomer = sim.add_node("newcomer", join=["node-1"])
    start = sim.now
    alive = MemberState.ALIVE

    def everyone_knows() -> bool:
        return all(s.node.member_state("newcomer") is alive for s in sim.nodes.values())

    rounds = 2 * math.ceil(math.log2(1000))
    assert sim.run_until_true(everyone_knows, timeout=rounds * LAN.gossip_interval, step=0.2)
    assert newcomer.node.count_members(alive) == 1001
    assert newcomer.join_results[0].ok
    assert sim.now - start <= rounds * LAN.gossip_interval


@pytest.mark.timeout(60)
def test_a_killed_node_is_declared_dead_by_everyone() -> None:
    sim = Simulation(LAN, seed=3, link=Link(delay=0.001, jitter=0.001))
    sim.add_converged_cluster(20)
    sim.run_for(5.0)
    sim.kill("node-7")
    killed_at = sim.now
    everyone_agrees = sim.run_until_true(
        lambda: sim.views_agree(["node-7"], MemberState.DEAD), timeout=60.0, step=0.2
    )
    assert everyone_agrees
    # LAN, n=20: the minimum suspicion timeout is 4 * log10(20) = 5.2 s, plus the time to
    # probe the victim. Debian serf took 5.4-9.0 s at n=5 and 8.2-9.3 s at n=50.
    assert 5.0 < sim.now - killed_at < 20.0
    others = [s for s in sim.nodes.values() if s.name != "node-7"]
    assert all(s.node.member_state(o.name) is MemberState.ALIVE for s in others for o in others)


@pytest.mark.timeout(60)
def test_a_graceful_leave_is_seen_as_left() -> None:
    sim = Simulation(LAN, seed=4)
    sim.add_converged_cluster(10)
    sim.run_for(2.0)
    sim.leave("node-5")
    assert sim.run_until_true(
        lambda: sim.views_agree(["node-5"], MemberState.LEFT) and not sim.nodes["node-5"].running,
        timeout=10.0,
    )
    kinds = {e.kind for s in sim.nodes.values() for e in s.events if e.name == "node-5"}
    assert MemberEventKind.LEAVE in kinds and MemberEventKind.FAILED not in kinds
    assert not sim.nodes["node-5"].running  # stopped once its leave had gone out


@pytest.mark.timeout(60)
def test_a_restarted_node_rejoins_and_wins_over_its_old_incarnation() -> None:
    sim = Simulation(LAN, seed=5)
    sim.add_converged_cluster(8)
    sim.run_for(2.0)
    # Make the old process's incarnation higher than a fresh one (1): refute something.
    sim.nodes["node-3"].node.update_meta(b"v2", sim.now)
    sim.run_for(2.0)
    sim.kill("node-3")
    sim.run_for(1.0)
    sim.restart("node-3", join=["node-1"])
    assert sim.run_until_true(sim.converged, timeout=30.0)
    assert sim.nodes["node-3"].node.incarnation > 2  # it refuted the state others held


@pytest.mark.timeout(60)
def test_a_partition_heals_and_everyone_is_alive_again() -> None:
    sim = Simulation(LAN, seed=6, link=Link(delay=0.001, jitter=0.001))
    sim.add_converged_cluster(12)
    sim.run_for(2.0)
    left_side = [f"node-{i}" for i in range(1, 7)]
    right_side = [f"node-{i}" for i in range(7, 13)]
    sim.partition(left_side, right_side)
    assert sim.run_until_true(
        lambda: all(
            sim.nodes[a].node.member_state(b) is MemberState.DEAD
            for a in left_side for b in right_side
        ),
        timeout=60.0,
    )
    sim.heal()
    # Gossip to the recently dead carries each side's `dead` rumours across; the accused
    # refute with a higher incarnation, and everyone is alive again.
    assert sim.run_until_true(sim.converged, timeout=30.0, step=0.5)


@pytest.mark.timeout(60)
def test_replays_are_deterministic() -> None:
    def run() -> tuple[int, int, list[tuple[str, str, float]]]:
        sim = Simulation(LAN, seed=7, link=Link(loss=0.05, delay=0.001, jitter=0.002))
        sim.add_converged_cluster(10)
        sim.kill("node-2")
        sim.run_for(20.0)
        events = [(e.kind.value, e.name, e.time) for s in sim.nodes.values() for e in s.events]
        return sim.stats.packets_sent, sim.stats.packets_lost, events

    assert run() == run()


@pytest.mark.timeout(60)
def test_an_encrypted_compressed_cluster_works_the_same() -> None:
    sim = Simulation(LAN, seed=8, encrypt=True, compression=True)
    sim.add_node("seed")
    for _ in range(5):
        sim.add_node(join=["seed"])
    assert sim.run_until_true(sim.converged, timeout=10.0)
    sim.kill("node-4")
    assert sim.run_until_true(
        lambda: sim.views_agree(["node-4"], MemberState.DEAD), timeout=30.0
    )
    assert all(not s.node.stats.drops for s in sim.nodes.values())


def _stalling_run(lifeguard: bool, seed: int) -> tuple[int, int]:
    """10 nodes, 5% loss; node-1's event loop stalls 1.5 s out of every 2 s for a minute.

    Returns (failed events about anyone, suspicions of node-1).
    """
    config = dataclasses.replace(LAN, lifeguard=lifeguard)
    sim = Simulation(config, seed=seed, link=Link(loss=0.05, delay=0.001, jitter=0.002))
    seen: list[tuple[SimNode, MemberEvent]] = []
    sim.event_hooks.append(lambda seat, event: seen.append((seat, event)))
    sim.add_converged_cluster(10)
    sim.make_slow("node-1", stall=1.5, every=2.0, start=5.0)
    sim.run_for(65.0)
    suspected = sum(1 for _, e in seen if e.kind is MemberEventKind.SUSPECT and e.name == "node-1")
    return failed_about(seen, set(sim.nodes)), suspected


@pytest.mark.timeout(60)
def test_a_node_whose_event_loop_stalls_past_the_probe_timeout_is_not_declared_dead() -> None:
    # Stalls of 1.5 s, three times the probe timeout: node-1 is suspected again and again,
    # refutes each time it wakes, and nobody is ever declared dead.
    for seed in (1, 2):
        failed, suspected = _stalling_run(lifeguard=True, seed=seed)
        assert failed == 0
        assert suspected > 10  # the stalls did bite


def _lagging_run(lifeguard: bool, lag: float) -> tuple[int, int, int]:
    """10 nodes, 5% loss; from t=5 s node-1 reads everything `lag` late (its timers are on
    time) for a minute. Returns (failed events about healthy nodes, suspicion events about
    healthy nodes, node-1's failed probes)."""
    config = dataclasses.replace(LAN, lifeguard=lifeguard)
    sim = Simulation(config, seed=9, link=Link(loss=0.05, delay=0.001, jitter=0.002))
    seen: list[tuple[SimNode, MemberEvent]] = []
    sim.event_hooks.append(lambda seat, event: seen.append((seat, event)))
    sim.add_converged_cluster(10)
    sim.at(5.0, lambda s: s.set_inbound_lag("node-1", lag))
    sim.run_for(65.0)
    healthy = set(sim.nodes) - {"node-1"}
    suspected = sum(1 for _, e in seen if e.kind is MemberEventKind.SUSPECT and e.name in healthy)
    return failed_about(seen, healthy), suspected, sim.nodes["node-1"].node.stats.probe_failures


@pytest.mark.timeout(60)
def test_lifeguard_stops_a_slow_node_from_killing_healthy_peers() -> None:
    # node-1 reads its input 5 s late, longer than the 4 s minimum suspicion timeout. Without
    # Lifeguard it fails nearly every probe, suspects a healthy peer each second, and its own
    # 4 s timers run out before it reads their refutations: it declares them dead.
    failed, _, probe_failures = _lagging_run(lifeguard=False, lag=5.0)
    assert failed > 0
    assert probe_failures > 40
    # With Lifeguard the missing nacks raise its health score, its probe deadline stretches
    # past the lag, it stops accusing, and what it still suspects waits the long timeout.
    failed, _, probe_failures = _lagging_run(lifeguard=True, lag=5.0)
    assert failed == 0
    assert probe_failures < 10


@pytest.mark.timeout(60)
def test_lifeguard_cuts_false_suspicions_from_a_slow_node() -> None:
    _, suspected_without, _ = _lagging_run(lifeguard=False, lag=1.0)
    _, suspected_with, _ = _lagging_run(lifeguard=True, lag=1.0)
    assert suspected_without > 3 * suspected_with
