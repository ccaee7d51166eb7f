"""The simulator's scale mode (bench/ipam_sim.py): a cluster booting together, cheaper checks."""

from __future__ import annotations

import pytest

from weavepy.ipam.sim import IpamSim, SimConfig
from weavepy.ipam.status import IpamState


def booted_together(size: int, **config: object) -> IpamSim:
    sim = IpamSim(7, SimConfig(**config))  # type: ignore[arg-type]
    sim.add_node("n1", bootstrap="found")
    sim.run(3.0)
    sim.add_nodes(f"n{i}" for i in range(2, size + 1))
    sim.run(30.0)
    return sim


@pytest.mark.parametrize("full_checks", [True, False])
def test_nodes_started_together_all_join_and_claim_distinct_blocks(full_checks: bool) -> None:
    sim = booted_together(12, full_checks=full_checks)
    assert all(s.state is IpamState.READY for s in sim.statuses())
    for name in sim.nodes:
        sim.request_block(name)
    sim.run(30.0)
    blocks = [b for s in sim.statuses() for b in s.owned_blocks]
    assert len(blocks) == 12 and len(set(blocks)) == 12
    sim.check_status_invariants()


def test_connected_to_follows_kills_and_restarts_without_partitions() -> None:
    sim = booted_together(4, full_checks=False)
    assert sim.connected_to("n1") == {"n1", "n2", "n3", "n4"}
    sim.kill("n3")
    assert sim.connected_to("n1") == {"n1", "n2", "n4"}
    assert sim.connected_to("n3") == frozenset()
    sim.restart("n3")
    assert sim.connected_to("n2") == {"n1", "n2", "n3", "n4"}


def test_partitions_need_full_checks() -> None:
    sim = booted_together(3, full_checks=False)
    with pytest.raises(ValueError, match="full_checks"):
        sim.partition([["n1"], ["n2", "n3"]])
    with pytest.raises(ValueError, match="full_checks"):
        sim.block_link("n1", "n2")


def test_scale_runs_write_a_killed_nodes_disk_so_it_restarts_with_its_blocks() -> None:
    """Scale runs write a node's snapshot only when its disk is read (at a kill): the
    restarted node must find what its core last persisted."""
    sim = booted_together(4, full_checks=False)
    sim.request_block("n3")
    sim.run(5.0)
    blocks = sim.usable_blocks("n3")
    assert blocks
    sim.kill("n3")
    disk = sim.nodes["n3"].disk_core
    assert disk is not None and disk["generation"] is not None
    sim.restart("n3")
    status = sim.status("n3")
    assert status is not None and status.generation == disk["generation"]
    assert [sim.nodes["n3"].core.space.block(i) for i in blocks] == list(  # type: ignore[union-attr]
        status.held_blocks)
