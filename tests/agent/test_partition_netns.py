"""Partitions: a minority side cannot claim, the majority can, and after healing the cluster
converges with no overlapping address space, by IPAM status and by kernel state.

Seven sandbox nodes: n1..n5 form the cluster (all five become voters), then the underlay is
split into A = {n1, n2, n6} and B = {n3, n4, n5, n7} (silent drops, both ways). n6 is launched
into A and n7 into B while split.
"""

from __future__ import annotations

from ipaddress import IPv4Interface, IPv4Network
from typing import Any

import pytest

from weavepy.devtools.agentbox import AgentBox
from weavepy.ipam.invariants import Ownership, check_no_overlap

pytestmark = [pytest.mark.netns, pytest.mark.slow]


def _ipam(rig: AgentBox, node: Any) -> dict[str, Any]:
    doc = rig.status(node)
    return doc["ipam"] if doc else {}


def _ownership_from_status(rig: AgentBox, nodes: list[Any]) -> list[Ownership]:
    views = []
    for node in nodes:
        doc = rig.status(node)
        assert doc is not None, f"{node.name} does not answer"
        views.append(Ownership(node.name, doc["cluster_id"], frozenset(
            IPv4Network(b) for b in doc["ipam"]["owned_blocks"])))
    return views


def _ownership_from_kernel(rig: AgentBox, nodes: list[Any], cluster_id: str) -> list[Ownership]:
    """What each node's kernel claims: the networks of its pod-bridge gateways."""
    return [Ownership(node.name, cluster_id, frozenset(
        IPv4Interface(a).network for a in rig.dataplane(node).bridge_addresses))
        for node in nodes]


@pytest.mark.timeout(150)
def test_minority_cannot_claim_and_the_healed_cluster_has_no_overlap(agent_box: Any) -> None:
    rig: AgentBox = agent_box(7)
    n = rig.box.nodes
    founders = n[:5]
    rig.launch_all(founders)
    rig.wait_mesh(founders, timeout=60)
    rig.wait("all five to be voters", lambda: len(_ipam(rig, n[0]).get("voters", [])) == 5,
             timeout=30)

    side_a, side_b = [n[0], n[1], n[5]], [n[2], n[3], n[4], n[6]]
    rig.box.partition(side_a, side_b)
    rig.wait("n1 to report a minority partition",
             lambda: _ipam(rig, n[0]).get("state") == "minority_partition", timeout=60)
    assert "voters reachable" in _ipam(rig, n[0])["detail"]
    rig.launch(n[5], [n[0]])  # a new node in the minority
    rig.launch(n[6], [n[2]])  # a new node in the majority
    # the majority admits and routes it; it keeps the routes to the minority's blocks, which
    # the minority still owns (--route-grace)
    rig.wait_mesh([n[2], n[3], n[4], n[6]], timeout=60, kept=("n1", "n2"))
    stuck = _ipam(rig, n[5])
    assert not stuck["held_blocks"], f"the minority handed out space: {stuck}"
    assert stuck["state"] in ("waiting_for_cluster", "joining", "minority_partition",
                              "waiting_for_quorum"), stuck
    a_side = _ipam(rig, n[0])
    assert a_side["state"] == "minority_partition"
    assert len(a_side["held_blocks"]) == 1, "the minority keeps what it owned"

    rig.box.heal()
    blocks = rig.wait_mesh(n, timeout=90)
    assert len({b for owned in blocks.values() for b in owned}) == 7
    statuses = _ownership_from_status(rig, n)
    cluster_ids = {v.cluster_id for v in statuses}
    assert len(cluster_ids) == 1, f"the sides did not merge: {cluster_ids}"
    check_no_overlap(statuses)
    check_no_overlap(_ownership_from_kernel(rig, n, cluster_ids.pop() or ""))
    for node in n:  # every node agrees on the whole table
        table = {(b["block"], b["owner"]) for b in (rig.status(node) or {}).get("blocks", [])}
        assert table == {(b, owner) for owner, owned in blocks.items() for b in owned}
