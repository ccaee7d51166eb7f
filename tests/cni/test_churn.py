"""Pod churn: 200 pods added and deleted through the installed plugin, four runtimes' worth at
once, each runtime deleting a pod only after adding its next one.

Against both servers a runtime can reach: the standalone CNI server with one static block, and
a real agent (`weavepy launch` in a sandbox node) whose CNI server allocates from its IPAM.
The churn leaks no pod address, no veth, no file and no file descriptor, and no address is
ever held by two pods at once: an address counts as held from the moment its ADD returned
until its DEL is issued, a window inside the real allocation, so any overlap seen here is a
real double allocation.
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from ipaddress import IPv4Interface, IPv4Network
from pathlib import Path
from typing import Any

import pytest

from weavepy.devtools.agentbox import AgentBox

pytestmark = [pytest.mark.netns, pytest.mark.slow, pytest.mark.timeout(300)]

CYCLES = 200
WORKERS = 4


class Holdings:
    """The addresses pods hold right now, across the workers; every overlap is kept."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._held: dict[str, str] = {}
        self.overlaps: list[tuple[str, str, str]] = []  # (address, holder, newcomer)

    def took(self, address: str, container_id: str) -> None:
        with self._lock:
            holder = self._held.get(address)
            if holder is not None:
                self.overlaps.append((address, holder, container_id))
            self._held[address] = container_id

    def giving_back(self, address: str, container_id: str) -> None:
        with self._lock:
            if self._held.get(address) == container_id:
                del self._held[address]


def _plugin(plugin: str, command: str, conf: str, container_id: str, netns: str) -> str:
    env = dict(os.environ, CNI_COMMAND=command, CNI_CONTAINERID=container_id, CNI_NETNS=netns,
               CNI_IFNAME="eth0", CNI_PATH=str(Path(plugin).parent),
               CNI_ARGS=f"IgnoreUnknown=1;K8S_POD_NAMESPACE=churn;K8S_POD_NAME={container_id}")
    proc = subprocess.run([plugin], input=conf, env=env, capture_output=True, text=True,
                          timeout=60)
    if proc.returncode != 0:
        raise AssertionError(f"{command} {container_id} failed: {proc.stdout} {proc.stderr}")
    return proc.stdout


def _worker(plugin: str, conf: str, netns_names: list[str], cycles: int, worker: int,
            holdings: Holdings) -> list[str]:
    """ADD/DEL `cycles` pods, alternating between two pod namespaces, each pod deleted only
    after the next one was added (so every worker always holds an address). Every 10th DEL
    comes after the runtime removed the namespace, with an empty CNI_NETNS (containerd's
    second DEL), and every 4th is repeated."""
    addresses = []
    held: tuple[str, str, str] | None = None  # (container id, netns name, address)
    for cycle in range(cycles + 1):
        if cycle < cycles:
            container_id = f"churn{worker}x{cycle}"
            netns_name = netns_names[cycle % 2]
            result = json.loads(_plugin(plugin, "ADD", conf, container_id,
                                        f"/run/netns/{netns_name}"))
            address = result["ips"][0]["address"]
            holdings.took(address, container_id)
            addresses.append(address)
        if held is not None:
            old_id, old_netns, old_address = held
            holdings.giving_back(old_address, old_id)  # from here on the DEL may free it
            if (cycle - 1) % 10 == 9:
                subprocess.run(["ip", "netns", "del", old_netns], check=True, timeout=30)
                _plugin(plugin, "DEL", conf, old_id, "")
                subprocess.run(["ip", "netns", "add", old_netns], check=True, timeout=30)
            else:
                _plugin(plugin, "DEL", conf, old_id, f"/run/netns/{old_netns}")
                if (cycle - 1) % 4 == 0:
                    _plugin(plugin, "DEL", conf, old_id, f"/run/netns/{old_netns}")  # idempotent
        held = (container_id, netns_name, address) if cycle < cycles else None
    return addresses


def _churn(plugin: str, conf: str, namespaces: list[list[str]], cycles: int
           ) -> tuple[list[list[str]], list[tuple[str, str, str]]]:
    """(Runs inside a node.) The workers, one per pair of pod namespaces, at once: the
    addresses each got, and every address two pods held at the same time."""
    holdings = Holdings()
    with ThreadPoolExecutor(max_workers=len(namespaces)) as pool:
        futures = [pool.submit(_worker, plugin, conf, ns, cycles, i, holdings)
                   for i, ns in enumerate(namespaces)]
        return [f.result() for f in futures], holdings.overlaps


def _open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _links(node: Any) -> list[str]:
    return sorted(link["ifname"] for link in json.loads(node.run(["ip", "-j", "link",
                                                                   "show"]).stdout))


def test_churn_against_the_static_server_leaks_nothing_and_never_shares(cni_cluster) -> None:
    cluster = cni_cluster(nodes=1)
    cni = cluster.nodes[0]
    namespaces = [[Path(cluster.new_pod(f"churn{i}{side}").netns).name for side in "ab"]
                  for i in range(WORKERS)]
    conf = json.dumps(cni.plugin_conf())
    plugin = str(cni.plugin_dir / "weavepy-cni")
    state_files = sorted(p.name for p in cni.state_dir.iterdir())
    # one warm-up cycle so lazily opened sockets count in the baseline
    cni.node.call(_churn, plugin, conf, namespaces[:1], 1, timeout=60)
    fds_before = _open_fds(cni.proc.pid)

    per_worker, overlaps = cni.node.call(_churn, plugin, conf, namespaces, CYCLES // WORKERS,
                                         timeout=200)

    assert overlaps == []
    assert sum(len(a) for a in per_worker) == CYCLES
    assert all(a.startswith("198.19.1.") for addrs in per_worker for a in addrs)
    assert cni.allocations() == []
    assert cni.host_veths() == []
    assert sorted(p.name for p in cni.state_dir.iterdir()) == (
        state_files or [f"pods-{cni.block.network_address}-24.json"])
    assert sorted(p.name for p in cni.socket_path.parent.glob(".*")) == []  # no temp sockets
    assert _open_fds(cni.proc.pid) == fds_before
    assert _links(cni.node) == ["eth0", "lo", "wpbr0"]
    assert cni.proc.alive()


def _pods_in_use(rig: AgentBox, node: Any) -> int | None:
    doc = rig.status(node)
    return None if doc is None else sum(p["used"] for p in doc["ipam"]["pods"].values())


def test_churn_against_the_agents_ipam_leaks_nothing_and_never_shares(
        agent_box: Callable[..., AgentBox], plugin_dir: Path) -> None:
    rig = agent_box(nodes=1)
    node = rig.box.nodes[0]
    rig.launch(node)
    rig.wait(f"a block for {node.name}", lambda: rig.blocks_of([node]), timeout=30)
    blocks = rig.blocks_of([node])[node.name]
    namespaces = [[rig.box.add_netns(f"churn{i}{side}").netns for side in "ab"]
                  for i in range(WORKERS)]
    conf = json.dumps({"cniVersion": "1.0.0", "name": "weavepy", "type": "weavepy-cni",
                       "socketPath": str(rig.run_dir(node) / "cni.sock")})
    plugin = str(plugin_dir / "weavepy-cni")
    agent = rig.agents[node.name]
    links_before = _links(node)
    node.call(_churn, plugin, conf, namespaces[:1], 1, timeout=60)  # warm-up, as above
    fds_before = _open_fds(agent.pid)

    per_worker, overlaps = node.call(_churn, plugin, conf, namespaces, CYCLES // WORKERS,
                                     timeout=250)

    assert overlaps == []
    assert sum(len(a) for a in per_worker) == CYCLES
    held = [IPv4Network(b) for b in blocks]
    assert all(any(IPv4Interface(a).ip in b for b in held) for addrs in per_worker
               for a in addrs)
    assert _pods_in_use(rig, node) == 0
    assert _links(node) == links_before  # no pod veth left behind
    # the agent's other tasks open and close a few descriptors of their own (netlink reads,
    # worker threads); a descriptor leaked per request would be hundreds
    assert _open_fds(agent.pid) < fds_before + 10
    assert agent.alive()
