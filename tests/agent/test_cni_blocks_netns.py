"""Concurrent CNI ADDs against a real agent's IPAM while its blocks run out.

Three agents with /29 blocks (five pod addresses each) in the range 198.19.0.0/24. On n1:

- twelve ADDs at once need two more blocks than n1 starts with: every ADD succeeds, the blocks
  are claimed, and no address is handed out twice or lies outside n1's own blocks;
- with every block of n1 full and n1 cut off from the others (so no new block can be decided),
  two ADDs wait for a block; a DEL issued meanwhile completes while both still wait (it is
  not queued behind them); once the partition heals, a new block is claimed and both ADDs get
  addresses nobody else holds.

The assertions are about order and outcome, never about how long anything took.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

import pytest

from weavepy.devtools.agentbox import AgentBox

pytestmark = [pytest.mark.netns, pytest.mark.slow]

POD_RANGE = "198.19.0.0/24"
BLOCK_PREFIX = 29
PER_BLOCK = 5  # a /29 less its network address, gateway and broadcast


class Cni:
    """CNI commands against one node's agent through the installed plugin; completions are
    recorded in the order they happen."""

    def __init__(self, rig: AgentBox, node: Any, plugin: Path) -> None:
        self.rig, self.node, self.plugin = rig, node, plugin
        self.conf = json.dumps({"cniVersion": "1.0.0", "name": "weavepy", "type": "weavepy-cni",
                                "socketPath": str(rig.run_dir(node) / "cni.sock")})
        self.completed: list[tuple[str, str, int]] = []  # (command, pod, exit status)
        self._lock = threading.Lock()

    def pod(self, name: str) -> str:
        return self.rig.box.add_netns(name).netns

    def run(self, command: str, netns: str) -> tuple[int, dict[str, Any]]:
        env = [f"CNI_COMMAND={command}", f"CNI_CONTAINERID={netns}",
               f"CNI_NETNS=/run/netns/{netns}", "CNI_IFNAME=eth0",
               f"CNI_PATH={self.plugin.parent}"]
        result = self.node.run(["env", *env, str(self.plugin)], input=self.conf, check=False,
                               timeout=60)
        with self._lock:
            self.completed.append((command, netns, result.returncode))
        return result.returncode, json.loads(result.stdout) if result.stdout.strip() else {}

    def add(self, netns: str) -> str:
        code, answer = self.run("ADD", netns)
        assert code == 0, f"ADD {netns}: {answer}"
        return str(answer["ips"][0]["address"].split("/")[0])

    def add_all(self, pods: list[str]) -> dict[str, str]:
        """ADD every pod at once; each must succeed. {pod: address}."""
        found: dict[str, str] = {}
        errors: list[str] = []

        def one(netns: str) -> None:
            try:
                found[netns] = self.add(netns)
            except AssertionError as exc:
                errors.append(str(exc))

        threads = [threading.Thread(target=one, args=(p,)) for p in pods]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert not errors, errors
        return found

    def start(self, command: str, netns: str) -> threading.Thread:
        thread = threading.Thread(target=self.run, args=(command, netns))
        thread.start()
        return thread


def _ipam(rig: AgentBox, node: Any) -> dict[str, Any]:
    doc = rig.status(node)
    assert doc is not None, rig.logs_tail()
    ipam: dict[str, Any] = doc["ipam"]
    return ipam


def _held(rig: AgentBox, node: Any) -> list[IPv4Network]:
    return [IPv4Network(b) for b in _ipam(rig, node)["held_blocks"]]


def _unique_and_inside(addresses: dict[str, str], blocks: list[IPv4Network]) -> None:
    values = list(addresses.values())
    assert len(set(values)) == len(values), f"an address was handed out twice: {addresses}"
    outside = [a for a in values if not any(IPv4Address(a) in b for b in blocks)]
    assert not outside, f"addresses outside the node's blocks {blocks}: {outside}"


@pytest.mark.timeout(300)
def test_concurrent_adds_claim_blocks_and_a_del_never_waits_behind_them(
        sandbox_factory: Callable[..., Any]) -> None:
    from weavepy.cni.install import install_cni

    box = sandbox_factory(nodes=3)
    rig = AgentBox(box, pod_range=POD_RANGE, block_prefix=BLOCK_PREFIX)
    rig.launch_all()
    rig.wait_mesh(timeout=60)
    n1, n2, n3 = box.nodes
    plugin = install_cni(rig.root / "cni-bin", rig.root / "cni-conf").plugin
    cni = Cni(rig, n1, plugin)
    blocks_at_start = _held(rig, n1)

    # twelve ADDs at once: more than the blocks n1 holds can give
    wanted = len(blocks_at_start) * PER_BLOCK + PER_BLOCK + 2
    live = cni.add_all([cni.pod(f"a{i}") for i in range(wanted)])
    held = _held(rig, n1)
    assert len(held) >= len(blocks_at_start) + 2, held
    _unique_and_inside(live, held)
    others = [IPv4Network(b) for node in (n2, n3) for b in _ipam(rig, node)["held_blocks"]]
    assert not set(held) & set(others), (held, others)

    # fill every block of n1, then cut n1 off: no new block can be decided
    free = sum(p["capacity"] - p["used"] for p in _ipam(rig, n1)["pods"].values())
    live.update(cni.add_all([cni.pod(f"b{i}") for i in range(free)]))
    assert all(p["used"] == p["capacity"] for p in _ipam(rig, n1)["pods"].values())
    held = _held(rig, n1)
    _unique_and_inside(live, held)
    box.partition([n1], [n2, n3])
    waiting = [cni.pod("w1"), cni.pod("w2")]
    adds = [cni.start("ADD", netns) for netns in waiting]
    rig.wait("n1's ADDs to ask for a block", lambda: _ipam(rig, n1)[
        "pending_block_requests"] >= 1, timeout=30)
    assert all(thread.is_alive() for thread in adds), cni.completed

    # a DEL now is answered while both ADDs still wait
    leaving = sorted(live)[0]
    code, answer = cni.run("DEL", leaving)
    assert code == 0, answer
    assert [c for c in cni.completed if c[1] in waiting] == [], (
        f"the DEL was answered only after a waiting ADD: {cni.completed}")
    del live[leaving]

    # heal: a block is claimed and the waiting pods get addresses (an ADD that gave up with
    # "try again later" meanwhile is retried with the same container, as kubelet does)
    box.heal()
    for thread in adds:
        thread.join()
    for netns in waiting:
        outcome = [c for c in cni.completed if c[1] == netns][-1]
        if outcome[2] != 0:
            rig.wait(f"ADD {netns} to succeed after the heal",
                     lambda netns=netns: cni.run("ADD", netns)[0] == 0, timeout=60,
                     interval=1.0)
        live[netns] = cni.add(netns)  # idempotent: the address it already got
    held_after = _held(rig, n1)
    assert len(held_after) > len(held), (held, held_after)
    _unique_and_inside(live, held_after)
    in_use = sum(p["used"] for p in _ipam(rig, n1)["pods"].values())
    assert in_use == len(live), (in_use, live)
