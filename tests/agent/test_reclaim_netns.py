"""Reclaiming a gone node's address space with real agents (issue 15): when Kubernetes deletes
its Node, automatically after `--reclaim-after`, and when `weavepy reset` gives it back; and
what a node that comes back after its space was reclaimed does.

Two sandboxes, one per class, each torn down when its class ends:

* `TestNodeDeletionAndReset`: six nodes; n1..n5 run agents with `--kube-peers` and a short
  IPAM lease (8 s; `--reclaim-after` stays 24 h, so no removal here is the automatic one).
  **The Kubernetes API is a stand-in** (tests/agent/kube_live_api.py: the replay server of
  tests/deploy/kube_replay.py over a live node table), one per node inside its namespace, so a
  test can show a Node deletion to some agents and not to others.
* `TestAutomaticReclaim`: five agents with `--reclaim-after 12s --ipam-lease 8s` (the lease
  may not exceed reclaim-after) and /29 blocks (five pod addresses each), so pods created
  through the real CNI plugin soon need a second block.

The tests of a class run in order and each leaves its cluster converged for the next.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from pathlib import Path
from typing import Any

import pytest

from tests.agent.kube_live_api import LiveKube
from tests.conftest import require_root
from weavepy.devtools.agentbox import AgentBox
from weavepy.devtools.sandbox import Sandbox, SandboxNode
from weavepy.ipam.invariants import Ownership, check_no_overlap

pytestmark = [pytest.mark.netns, pytest.mark.slow]

LEASE = "8s"


# ------------------------------------------------------------------ reading the agents


def ipam(rig: AgentBox, node: SandboxNode) -> dict[str, Any]:
    """The node's IPAM status (waiting, bounded, for an agent slow to answer on a busy host)."""
    doc: dict[str, Any] = rig.wait(f"the status of {node.name}", lambda: rig.status(node), 30)
    return dict(doc["ipam"])


def tombstone(rig: AgentBox, node: SandboxNode, name: str) -> tuple[int, int, str] | None:
    """(generation, slot, reason) of `name`'s removal in `node`'s saved IPAM state."""
    saved = json.loads((rig.state_dir(node) / "ipam-core.json").read_text())
    for entry in saved["body"]["cluster"]["tombstones"]:
        if entry[0] == name:
            return entry[1], entry[2], entry[3]
    return None


def owner_of(rig: AgentBox, node: SandboxNode, block: str) -> str | None:
    doc = rig.status(node) or {}
    return next((b["owner"] for b in doc.get("blocks", []) if b["block"] == block), None)


def peer_state(rig: AgentBox, node: SandboxNode, name: str) -> str | None:
    doc = rig.status(node) or {}
    return next((p["state"] for p in doc.get("peers", []) if p["name"] == name), None)


def removed_everywhere(rig: AgentBox, nodes: list[SandboxNode], name: str
                       ) -> tuple[int, int, str] | None:
    """The one removal of `name` that every node in `nodes` has applied, once they all have."""
    stones = {tombstone(rig, node, name) for node in nodes}
    if None in stones or len(stones) != 1:
        return None
    return stones.pop()


def block_free(rig: AgentBox, node: SandboxNode, block: str) -> bool:
    """`node` counts `block` free: no owner, nothing quarantined."""
    return ipam(rig, node).get("quarantined_blocks") == 0 and owner_of(rig, node, block) is None


def applied_once(rig: AgentBox, nodes: list[SandboxNode], name: str, generation: int) -> None:
    """No node applied a removal of that generation twice (a node that catches up by adopting
    a later state applies none: it logs nothing), and some node applied it."""
    counts = {node.name: sum(f"member {name} (generation {generation}) removed:" in line
                             for line in rig.log(node).splitlines()) for node in nodes}
    assert max(counts.values()) == 1, counts


def no_overlap(rig: AgentBox, nodes: list[SandboxNode]) -> None:
    """Invariant 1 by IPAM status and by kernel state (the pod-bridge gateways)."""
    views, kernel = [], []
    for node in nodes:
        doc = rig.status(node)
        assert doc is not None, f"{node.name} does not answer"
        views.append(Ownership(node.name, doc["cluster_id"], frozenset(
            IPv4Network(b) for b in doc["ipam"]["owned_blocks"])))
        kernel.append(Ownership(node.name, doc["cluster_id"], frozenset(
            IPv4Interface(a).network for a in rig.dataplane(node).bridge_addresses)))
    check_no_overlap(views)
    check_no_overlap(kernel)


def reset(rig: AgentBox, node: SandboxNode, *flags: str) -> subprocess.CompletedProcess[str]:
    """`weavepy reset` inside the node, as its operator runs it."""
    return rig.cli(node, "reset", *flags, "--name", node.name,
                   "--state-dir", str(rig.state_dir(node)), "--run-dir", str(rig.run_dir(node)),
                   timeout=90)


# ------------------------------------------------------------------ the Kubernetes stand-in


def kube_flags(kubeconfig: Path) -> list[str]:
    """The agent flags that point it at its node's API stand-in."""
    return ["--kube-peers", "--kubeconfig", str(kubeconfig)]


# ------------------------------------------------------------------ Node deletion, and reset


@pytest.fixture(scope="class")
def kube_rig() -> Iterator[tuple[AgentBox, LiveKube]]:
    require_root()
    box = Sandbox.create(nodes=6)
    try:
        rig = AgentBox(box, pod_range=str(box.pod_range), extra_args=["--ipam-lease", LEASE])
        kube = LiveKube(rig.root / "kube")
        for node in box.nodes[:5]:
            kube.put(node.name, node.underlay_ip)
        configs = {node.name: kube.serve(node) for node in box.nodes}
        founder = box.nodes[0]  # launched without --peers: it founds the cluster
        rig.launch(founder, extra=kube_flags(configs[founder.name]))
        rig.wait_api(founder)
        for node in box.nodes[1:5]:
            rig.launch(node, [founder], extra=kube_flags(configs[node.name]))
        rig.wait_mesh(box.nodes[:5], timeout=60)
        rig.wait("five voters", lambda: len(ipam(rig, founder).get("voters", [])) == 5, 30)
        yield rig, kube
    finally:
        box.destroy()


class TestNodeDeletionAndReset:
    @pytest.mark.timeout(120)
    def test_deleting_a_dead_nodes_node_reclaims_its_block_once_and_it_is_reused(
            self, kube_rig: tuple[AgentBox, LiveKube]) -> None:
        rig, kube = kube_rig
        n = rig.box.nodes
        survivors, victim, newcomer = list(n[:4]), n[4], n[5]
        (block,) = rig.blocks_of([victim])[victim.name]
        rig.kill(victim)
        rig.wait("the survivors to see n5 failed", lambda: all(
            peer_state(rig, s, victim.name) == "failed" for s in survivors), 30)
        assert all(tombstone(rig, s, victim.name) is None for s in survivors)

        kube.delete(victim.name)  # every agent's API says so
        removal = rig.wait("n5's removal everywhere",
                           lambda: removed_everywhere(rig, survivors, victim.name), 30)
        generation, _, reason = removal
        assert reason == "node-deleted"
        applied_once(rig, survivors, victim.name, generation)
        assert "Kubernetes deleted node n5" in rig.log(n[0])

        # its block is quarantined while its lease may still run, then free, and reused: the
        # next node to join claims the lowest free block, which is n5's
        rig.wait("n5's block free", lambda: block_free(rig, n[0], block), 30)
        # its routes went with its block (the grace keeps them only while it owns the block)
        rig.wait("the survivors to drop the route to n5's reclaimed block", lambda: all(
            block not in rig.dataplane(s).routes for s in survivors), 30)
        kube.put(newcomer.name, newcomer.underlay_ip)
        rig.launch(newcomer, [n[0]], extra=kube_flags(kube.kubeconfig(newcomer)))
        blocks = rig.wait_mesh([*survivors, newcomer], timeout=60)
        assert blocks[newcomer.name] == [block]
        assert removed_everywhere(rig, survivors, victim.name) == removal  # still only once

    @pytest.mark.timeout(180)
    def test_a_minority_that_sees_a_node_deleted_removes_nothing(
            self, kube_rig: tuple[AgentBox, LiveKube]) -> None:
        rig, kube = kube_rig
        n = rig.box.nodes
        n1, n2, n3, n4, n6 = n[0], n[1], n[2], n[3], n[5]
        rig.wait("n6 to become the fifth voter",
                 lambda: sorted(ipam(rig, n1).get("voters", [])) == ["n1", "n2", "n3", "n4",
                                                                     "n6"], 30)
        (block,) = rig.blocks_of([n4])[n4.name]
        rig.kill(n4)
        minority, majority = [n1], [n2, n3, n6]  # 1 and 3 of the 5 voters
        rig.box.partition(minority, majority)
        rig.wait("n1 in a minority, n4 failed everywhere", lambda: ipam(rig, n1).get("state")
                 == "minority_partition" and all(peer_state(rig, s, "n4") == "failed"
                                                 for s in minority + majority),
                 # n1, cut off from everyone, raises its Lifeguard awareness, which stretches
                 # its probes and its suspicion timeout: under a loaded suite this took >45 s
                 90)

        kube.delete(n4.name, seen_by=minority)  # the majority's API has not told it (yet)
        rig.wait("n1 to say the removal waits", lambda: "removal of n4 (node deleted) waits "
                 "for a majority" in ipam(rig, n1).get("detail", ""), 15)
        assert "voters are reachable from here, so the removal waits until a majority is" \
            in rig.log(n1)
        member = next(m for m in ipam(rig, n1)["members"] if m["name"] == "n4")
        assert member["node_deleted"] and member["blocks"] == [block]
        rounds_end = time.monotonic() + 8  # several Paxos round timeouts (3 s) pass
        while time.monotonic() < rounds_end:
            for node in minority + majority:
                assert tombstone(rig, node, "n4") is None, f"{node.name} removed n4"
                assert owner_of(rig, node, block) == "n4"
            time.sleep(0.5)

        rig.box.heal()  # n1 still holds the deletion: the voters decide it once it can
        removal = rig.wait("n4's removal once the majority is reachable",
                           lambda: removed_everywhere(rig, minority + majority, "n4"), 60)
        assert removal[2] == "node-deleted"
        applied_once(rig, minority + majority, "n4", removal[0])
        rig.wait_mesh([n1, n2, n3, n6], timeout=60)

    @pytest.mark.timeout(120)
    def test_reset_with_a_quorum_gives_the_blocks_back(
            self, kube_rig: tuple[AgentBox, LiveKube]) -> None:
        rig, _ = kube_rig
        n = rig.box.nodes
        n1, n2, n3, n6 = n[0], n[1], n[2], n[5]
        (block,) = rig.blocks_of([n6])[n6.name]
        free_before = ipam(rig, n1)["free_blocks"]
        agent = rig.agents[n6.name]

        done = reset(rig, n6)
        assert done.returncode == 0, done.stderr
        assert f"n6 left IPAM cluster {ipam(rig, n1)['cluster_id']}; the voters freed " \
               f"{block}" in done.stdout, done.stdout
        assert "stopped the running agent" in done.stdout
        assert "rmpeer" not in done.stdout, done.stdout
        assert agent.wait(timeout=15) == 0
        assert not (rig.state_dir(n6) / "ipam-core.json").exists()
        for node in (n1, n2, n3):
            stone = tombstone(rig, node, "n6")
            assert stone is not None and stone[2] == "left", stone
            doc = ipam(rig, node)
            assert "n6" not in [m["name"] for m in doc["members"]]
            assert "n6" not in doc["voters"]
            assert owner_of(rig, node, block) is None
            assert doc["free_blocks"] == free_before + 1

    @pytest.mark.timeout(120)
    def test_reset_in_a_minority_is_refused_and_names_the_rmpeer_to_run(
            self, kube_rig: tuple[AgentBox, LiveKube]) -> None:
        rig, _ = kube_rig
        n = rig.box.nodes
        n1, n2, n3 = n[0], n[1], n[2]
        (block,) = rig.blocks_of([n3])[n3.name]
        generation = ipam(rig, n3)["generation"]
        cluster = ipam(rig, n1)["cluster_id"]
        rig.box.partition([n3], [n1, n2])
        rig.wait("n3 in a minority",
                 lambda: ipam(rig, n3).get("state") == "minority_partition", 45)

        done = reset(rig, n3)
        assert done.returncode == 0, done.stderr
        lines = done.stdout.splitlines()
        assert lines[0].startswith("could not give the address space back: only 1 of 3 voters "
                                   "are reachable from n3, not a majority"), done.stdout
        assert (f"n3 (generation {generation}) still holds blocks {block} in IPAM cluster "
                f"{cluster}, as its last saved state says; to give them back, run on a live "
                f"node of that cluster: weavepy rmpeer n3") in lines, done.stdout
        assert rig.agents[n3.name].wait(timeout=15) == 0
        for node in (n1, n2):  # the majority still counts the block as n3's
            assert tombstone(rig, node, "n3") is None
            assert owner_of(rig, node, block) == "n3"

        rig.box.heal()
        left = next(line for line in lines if line.startswith("n3 (generation"))
        command = left.rsplit(": ", 1)[1].split()  # weavepy rmpeer n3, as printed
        assert command[:2] == ["weavepy", "rmpeer"]
        rig.wait("n1 to see n3 gone", lambda: peer_state(rig, n1, "n3") in ("failed", "left"),
                 30)
        removed = rig.cli(n1, *command[1:])
        assert removed.returncode == 0, removed.stderr
        rig.wait("n3's removal", lambda: removed_everywhere(rig, [n1, n2], "n3"), 30)

    @pytest.mark.timeout(60)
    def test_reset_offline_or_forced_names_the_rmpeer_to_run(
            self, kube_rig: tuple[AgentBox, LiveKube]) -> None:
        rig, _ = kube_rig
        n1, n2 = rig.box.nodes[0], rig.box.nodes[1]
        cluster = ipam(rig, n1)["cluster_id"]
        held = {node.name: (ipam(rig, node)["generation"], rig.blocks_of([node])[node.name][0])
                for node in (n1, n2)}

        stopped = rig.cli(n2, "stop")  # offline: no agent to ask the cluster
        assert stopped.returncode == 0, stopped.stderr
        offline = reset(rig, n2)
        assert offline.returncode == 0, offline.stderr
        assert "could not give" not in offline.stdout
        generation, block = held["n2"]
        assert (f"n2 (generation {generation}) still holds blocks {block} in IPAM cluster "
                f"{cluster}") in offline.stdout and "weavepy rmpeer n2" in offline.stdout

        forced = reset(rig, n1, "--force")  # running, but told not to ask the cluster
        assert forced.returncode == 0, forced.stderr
        assert "stopped the running agent" in forced.stdout
        generation, block = held["n1"]
        assert (f"n1 (generation {generation}) still holds blocks {block}") in forced.stdout
        assert "weavepy rmpeer n1" in forced.stdout and "could not give" not in forced.stdout


# ------------------------------------------------------------------ automatic reclaim


@pytest.fixture(scope="class")
def auto_rig() -> Iterator[AgentBox]:
    require_root()
    box = Sandbox.create(nodes=5)
    try:
        rig = AgentBox(box, pod_range=str(box.pod_range), block_prefix=29,
                       extra_args=["--reclaim-after", "12s", "--ipam-lease", LEASE])
        rig.launch_all()
        rig.wait_mesh(timeout=60)
        rig.wait("five voters", lambda: len(ipam(rig, box.nodes[0]).get("voters", [])) == 5, 30)
        yield rig
    finally:
        box.destroy()


def pod(rig: AgentBox, node: SandboxNode, name: str) -> str:
    """A pod netns `name` on `node`, given an address by the real CNI plugin."""
    from weavepy.cni.install import install_cni

    installed = install_cni(rig.root / "cni-bin", rig.root / "cni-conf")
    netns = f"{rig.box.prefix}-{name}"
    subprocess.run(["ip", "netns", "add", netns], check=True, capture_output=True, timeout=10)
    return rig.cni_add(node, installed.plugin, netns)


class TestAutomaticReclaim:
    reclaimed_block = ""  # the first test's victim's block, for the second
    @pytest.mark.timeout(150)
    def test_a_dead_node_is_reclaimed_once_by_the_majority_and_its_block_reused(
            self, auto_rig: AgentBox) -> None:
        rig = auto_rig
        n = rig.box.nodes
        victim, survivors = n[2], [n[0], n[1], n[3], n[4]]
        (block,) = rig.blocks_of([victim])[victim.name]
        address = pod(rig, victim, "old")
        assert IPv4Address(address) in IPv4Network(block)
        rig.kill(victim)
        rig.wait("the survivors to see n3 failed", lambda: all(
            peer_state(rig, s, victim.name) == "failed" for s in survivors), 30)
        member = next(m for m in ipam(rig, n[0])["members"] if m["name"] == victim.name)
        assert member["reclaim_in_s"] is not None and member["blocks"] == [block]

        removal = rig.wait("n3's reclaim everywhere",
                           lambda: removed_everywhere(rig, survivors, victim.name), 45)
        generation, _, reason = removal
        assert reason == "reclaim"
        applied_once(rig, survivors, victim.name, generation)
        for node in survivors:
            doc = ipam(rig, node)
            assert victim.name not in doc["voters"]
            assert owner_of(rig, node, block) is None

        # n1's /29 holds five pods; the sixth needs a new block: the lowest free, n3's
        (own,) = rig.blocks_of([n[0]])[n[0].name]
        addresses = [pod(rig, n[0], f"p{i}") for i in range(6)]
        assert all(IPv4Address(a) in IPv4Network(own) for a in addresses[:5]), addresses
        assert IPv4Address(addresses[5]) in IPv4Network(block), addresses
        assert owner_of(rig, n[1], block) == n[0].name
        assert removed_everywhere(rig, survivors, victim.name) == removal  # still only once
        no_overlap(rig, survivors)
        type(self).reclaimed_block = block

    @pytest.mark.timeout(120)
    def test_a_node_back_after_its_space_was_reclaimed_rejoins_as_a_new_member(
            self, auto_rig: AgentBox) -> None:
        rig = auto_rig
        n = rig.box.nodes
        victim = n[2]
        old_generation = tombstone(rig, n[0], victim.name)
        assert old_generation is not None
        lost = type(self).reclaimed_block
        rig.launch(victim, [n[0]])  # same state directory: it still thinks it owns its block
        rig.wait("n3 to learn it was removed",
                 lambda: "was removed from IPAM cluster" in rig.log(victim), 30)
        line = next(x for x in rig.log(victim).splitlines() if "was removed from IPAM" in x)
        assert (f"this node (generation {old_generation[0]}) was removed from IPAM cluster"
                in line and "(reclaim)" in line and "rejoins as a new member" in line), line


        def rejoined() -> dict[str, Any] | None:
            doc = rig.status(victim)
            fresh = doc is not None and doc["ready"] and doc["ipam"]["generation"] not in (
                None, old_generation[0])
            return doc if fresh else None

        doc = rig.wait("n3 ready as a new member", rejoined, 45)
        (fresh,) = doc["ipam"]["held_blocks"]
        assert fresh != lost and doc["ipam"]["generation"] > old_generation[0]
        assert doc["ipam"]["pods"] == {fresh: {"used": 0, "capacity": 5}}  # old pod forgotten
        blocks = rig.wait_mesh(n, timeout=60)
        assert blocks[victim.name] == [fresh]
        no_overlap(rig, list(n))
