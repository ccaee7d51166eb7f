"""What a join and a catch-up cost the cluster: a few full states per joiner, not one from
every member, and the decided values a laggard lacks rather than the whole state."""

from __future__ import annotations

import random

from weavepy.ipam import wire
from weavepy.ipam.core import ASK_EVERYONE, HELLO_ANSWERERS, IpamCore, answers_hello
from weavepy.ipam.sim import IpamSim, SimConfig
from weavepy.ipam.state import Renew
from weavepy.ipam.status import IpamState
from weavepy.ipam.wire import Decided, Envelope, Kind, StateRequest

# no loss, and long leases: nothing is decided while the cluster is idle, so a stateless node
# hears of the cluster only from the answers to its hellos (push/pull aside)
QUIET = {"drop": 0.0, "duplicate": 0.0, "lease": 3600.0, "reclaim_after": 86400.0}


def members(sim: IpamSim, size: int) -> None:
    """n1 founds; n2..n<size> join one after the other: `size` members, idle."""
    sim.add_node("n1", bootstrap="found")
    for number in range(2, size + 1):
        sim.add_node(f"n{number}")
        sim.run(2.0)
    sim.run(5.0)
    assert all(sim.state(name) is IpamState.READY for name in sim.nodes)


def test_each_attempt_is_answered_by_about_twice_as_many_members_and_the_last_by_all() -> None:
    names = [f"member-{i}" for i in range(200)]
    for attempt in range(ASK_EVERYONE):
        counts = [
            sum(answers_hello(f"joiner-{j}", m, len(names), attempt) for m in names)
            for j in range(100)
        ]
        expected = HELLO_ANSWERERS * 2**attempt
        assert 0.8 * expected <= sum(counts) / len(counts) <= 1.2 * expected
    for j in range(100):  # each attempt keeps the previous one's answerers
        joiner = f"joiner-{j}"
        for attempt in range(1, ASK_EVERYONE):
            assert {m for m in names if answers_hello(joiner, m, len(names), attempt - 1)} <= {
                m for m in names if answers_hello(joiner, m, len(names), attempt)
            }
    assert all(answers_hello("joiner-0", m, len(names), ASK_EVERYONE) for m in names)


def test_nodes_joining_at_once_get_a_few_states_each_not_one_from_every_member() -> None:
    sim = IpamSim(3, SimConfig(pushpull_interval=1e6, **QUIET))  # type: ignore[arg-type]
    members(sim, 20)
    states_before = sim.messages_by_kind[Kind.STATE]
    joiners = [f"j{i}" for i in range(40)]
    sim.add_nodes(joiners)
    sim.run(60.0)
    assert all(sim.state(name) is IpamState.READY for name in joiners)
    states = sim.messages_by_kind[Kind.STATE] - states_before
    # about HELLO_ANSWERERS each, and a full state for a joiner that adopted one too old to
    # catch up from; every member answering every joiner's first hello would be 800 and more
    assert states <= 2 * HELLO_ANSWERERS * len(joiners), states
    sim.check_status_invariants()


def test_a_joiner_whose_first_answerers_are_dead_asks_more_until_someone_answers() -> None:
    sim = IpamSim(4, SimConfig(pushpull_interval=1e6, **QUIET))  # type: ignore[arg-type]
    members(sim, 12)
    status = sim.status("n1")
    assert status is not None
    voters = set(status.voters)
    # a joiner whose attempts 0 and 1 only members that are not voters would answer
    joiner, answerers = next(
        (j, answering)
        for j in (f"j{i}" for i in range(1000))
        if (answering := {m for m in sim.nodes if answers_hello(j, m, 12, 1)})
        and not answering & voters
    )
    for name in answerers:
        sim.kill(name)
    sim.run(5.0)  # gossip tells everyone
    sim.add_node(joiner)
    interval = sim.config.timings.hello_interval
    sim.run(1.5 * interval)
    core = sim.nodes[joiner].core
    assert core is not None and core.cluster_id is None  # attempts 0 and 1: nobody answered
    sim.run(1.5 * interval + 5.0)  # attempt 2 or 3 reaches a live member; then the join
    assert sim.state(joiner) is IpamState.READY
    sim.check_status_invariants()


def test_a_decided_value_that_overtakes_the_one_before_waits_for_it() -> None:
    sim = IpamSim(5, SimConfig(**QUIET))  # type: ignore[arg-type]
    members(sim, 3)
    disk = sim.nodes["n2"].disk_core
    assert disk is not None
    core = IpamCore("n2", "198.19.0.0/16", 24, rng=random.Random(9), snapshot=disk)
    cluster = core.cluster
    assert cluster is not None
    slot = cluster.slot
    n1_gen = cluster.generation_of("n1")
    assert n1_gen is not None

    def decided(number: int) -> bytes:
        value = (Renew("n1", n1_gen, 1000 + number),)
        return wire.encode(Envelope(cluster.cluster_id, cluster.era, "n1", 77, n1_gen,
                                    number, Decided(number, value)))

    core.on_message("n1", decided(slot + 2), 1.0)
    assert core.cluster is not None and core.cluster.slot == slot
    core.on_message("n1", decided(slot + 1), 1.1)
    assert core.cluster is not None and core.cluster.slot == slot + 2


def test_a_laggard_of_the_same_era_gets_the_values_it_lacks_not_the_whole_state() -> None:
    sim = IpamSim(6, SimConfig(**QUIET))  # type: ignore[arg-type]
    members(sim, 3)
    for name in ("n1", "n2", "n3"):
        sim.request_block(name)
        sim.run(2.0)
    voter = sim.nodes["n1"].core
    assert voter is not None and voter.cluster is not None
    n3 = sim.nodes["n3"].core
    assert n3 is not None
    boot = wire.decode(n3.local_state()).boot
    cluster = voter.cluster
    request = wire.encode(Envelope(cluster.cluster_id, cluster.era, "n3", boot,
                                   n3.generation or 0, cluster.slot - 2,
                                   StateRequest(cluster.slot - 2)))
    voter.on_message("n3", request, sim.now)
    voter.mark_persisted(voter.seq)
    sent = [wire.decode(m.payload).body for m in voter.messages_to_send() if m.to == "n3"]
    assert [type(b) for b in sent] == [Decided, Decided]
    assert [b.slot for b in sent if isinstance(b, Decided)] == [cluster.slot - 1, cluster.slot]
