"""Pod churn: 200 ADD/DEL cycles through the installed plugin, four runtimes' worth at once,
leak no pod address, no veth, no file and no file descriptor in the server."""

from __future__ import annotations

import json
import os
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytestmark = [pytest.mark.netns, pytest.mark.slow, pytest.mark.timeout(240)]

CYCLES = 200
WORKERS = 4


def _plugin(plugin: str, command: str, conf: str, container_id: str, netns: str) -> str:
    env = dict(os.environ, CNI_COMMAND=command, CNI_CONTAINERID=container_id, CNI_NETNS=netns,
               CNI_IFNAME="eth0", CNI_PATH=str(Path(plugin).parent),
               CNI_ARGS=f"IgnoreUnknown=1;K8S_POD_NAMESPACE=churn;K8S_POD_NAME={container_id}")
    proc = subprocess.run([plugin], input=conf, env=env, capture_output=True, text=True,
                          timeout=60)
    if proc.returncode != 0:
        raise AssertionError(f"{command} {container_id} failed: {proc.stdout} {proc.stderr}")
    return proc.stdout


def _worker(plugin: str, conf: str, netns_name: str, cycles: int, worker: int) -> list[str]:
    """ADD/DEL `cycles` times in one pod namespace; every 10th DEL comes after the runtime
    removed the namespace, with an empty CNI_NETNS (containerd's second DEL), and every 4th
    is repeated."""
    addresses = []
    netns = f"/run/netns/{netns_name}"
    for cycle in range(cycles):
        container_id = f"churn{worker}x{cycle}"
        result = json.loads(_plugin(plugin, "ADD", conf, container_id, netns))
        addresses.append(result["ips"][0]["address"])
        if cycle % 10 == 9:
            subprocess.run(["ip", "netns", "del", netns_name], check=True, timeout=30)
            _plugin(plugin, "DEL", conf, container_id, "")
            subprocess.run(["ip", "netns", "add", netns_name], check=True, timeout=30)
        else:
            _plugin(plugin, "DEL", conf, container_id, netns)
            if cycle % 4 == 0:
                _plugin(plugin, "DEL", conf, container_id, netns)  # DEL is idempotent
    return addresses


def _churn(plugin: str, conf: str, namespaces: list[str], cycles: int) -> list[list[str]]:
    with ThreadPoolExecutor(max_workers=len(namespaces)) as pool:
        futures = [pool.submit(_worker, plugin, conf, ns, cycles, i)
                   for i, ns in enumerate(namespaces)]
        return [f.result() for f in futures]


def _open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_churn_leaks_nothing(cni_cluster) -> None:
    cluster = cni_cluster(nodes=1)
    cni = cluster.nodes[0]
    namespaces = []
    for i in range(WORKERS):
        pod = cluster.new_pod(f"churn{i}")
        namespaces.append(Path(pod.netns).name)
    conf = json.dumps(cni.plugin_conf())
    plugin = str(cni.plugin_dir / "weavepy-cni")
    state_files = sorted(p.name for p in cni.state_dir.iterdir())
    # one warm-up cycle so lazily opened sockets count in the baseline
    cni.node.call(_churn, plugin, conf, namespaces[:1], 1, timeout=60)
    fds_before = _open_fds(cni.proc.pid)

    per_worker = cni.node.call(_churn, plugin, conf, namespaces, CYCLES // WORKERS,
                               timeout=200)

    assert sum(len(a) for a in per_worker) == CYCLES
    assert all(a.startswith("198.19.1.") for addrs in per_worker for a in addrs)
    assert cni.allocations() == []
    assert cni.host_veths() == []
    assert sorted(p.name for p in cni.state_dir.iterdir()) == (
        state_files or [f"pods-{cni.block.network_address}-24.json"])
    assert sorted(p.name for p in cni.socket_path.parent.glob(".*")) == []  # no temp sockets
    assert _open_fds(cni.proc.pid) == fds_before
    links = json.loads(cni.node.run(["ip", "-j", "link", "show"]).stdout)
    assert sorted(link["ifname"] for link in links) == ["eth0", "lo", "wpbr0"]
    assert cni.proc.alive()
