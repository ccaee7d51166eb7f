"""A 5-node weavepy cluster in sandbox namespaces, with real packets (issue 4's core tests).

One module-wide sandbox of 6 nodes: n1..n5 form the cluster, n6 joins later. The tests run in
order and each leaves the cluster converged: reachability over TCP and UDP with a capture that
proves VXLAN, SIGKILL (entries disappear everywhere), restart (same blocks, same pod address,
no route flaps on the restarted node), a SIGTERM restart (no route flaps at the peers), and a
new node joining.
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
from collections.abc import Iterator
from functools import partial
from typing import Any

import pytest

from tests.agent.traffic import capture_vxlan, echo_server_argv, tcp_echo, udp_echo
from tests.conftest import require_root
from weavepy.devtools.agentbox import AgentBox, gateway_of
from weavepy.devtools.sandbox import Sandbox, SandboxNode, call_in_netns

ECHO_PORT = 7007
pytestmark = [pytest.mark.netns, pytest.mark.slow]


@pytest.fixture(scope="module")
def rig() -> Iterator[AgentBox]:
    require_root()
    box = Sandbox.create(nodes=6)
    try:
        agents = AgentBox(box, pod_range=str(box.pod_range))
        agents.launch_all(box.nodes[:5])
        agents.wait_mesh(box.nodes[:5], timeout=60)
        yield agents
    finally:
        box.destroy()


def _probe_all(src: str, targets: list[str], port: int) -> dict[str, tuple[bytes, bytes]]:
    """From inside a node: TCP and UDP echo to every target gateway, sourced from `src`."""
    return {dst: (tcp_echo(src, dst, port, f"hello {dst}".encode()),
                  udp_echo(src, dst, port, f"hello {dst}".encode())) for dst in targets}


def _listening(server: Any) -> bool:
    return "listening" in server.log_text()


def _no_entries_for(rig: AgentBox, node: SandboxNode, block: str, mac: str) -> bool:
    return not _entries_for(rig, node, block, mac)


def _entries_for(rig: AgentBox, node: SandboxNode, block: str, mac: str) -> list[str]:
    """Which of the route / neighbour / FDB entries for (block, mac) `node` still holds."""
    view = rig.dataplane(node)
    anchor = block.split("/")[0]
    found = []
    if block in view.routes:
        found.append(f"route {block}")
    if anchor in view.neighbours:
        found.append(f"neighbour {anchor}")
    if mac in view.fdb:
        found.append(f"fdb {mac}")
    return found


@pytest.mark.timeout(90)
def test_gateways_reach_each_other_over_tcp_and_udp_through_vxlan(rig: AgentBox) -> None:
    nodes = rig.box.nodes[:5]
    blocks = rig.wait_mesh(nodes)
    gateways = {n.name: gateway_of(blocks[n.name][0]) for n in nodes}
    for node in nodes:
        server = node.start("echo", echo_server_argv(gateways[node.name], ECHO_PORT))
        rig.wait(f"echo server in {node.name}", partial(_listening, server), 10)

    captured: list[Any] = []
    capture = threading.Thread(target=lambda: captured.extend(call_in_netns(
        rig.box.hub_netns, capture_vxlan, 8472, 4.0, timeout=20)))
    capture.start()
    time.sleep(0.5)  # the capture socket is bound well before the first probe
    failures = []
    for node in nodes:
        targets = [gateways[n.name] for n in nodes if n is not node]
        results = node.call(_probe_all, gateways[node.name], targets, ECHO_PORT, timeout=60)
        for dst, (tcp, udp) in results.items():
            if tcp != f"tcp:hello {dst}".encode():
                failures.append(f"TCP {node.name} -> {dst}: {tcp!r}")
            if udp != f"udp:hello {dst}".encode():
                failures.append(f"UDP {node.name} -> {dst}: {udp!r}")
    capture.join(timeout=30)
    assert not failures, failures

    by_ip = {n.underlay_ip: n.name for n in nodes}
    gateway_owner = {gw: name for name, gw in gateways.items()}
    encapsulated = {(f.inner_src, f.inner_dst, f.inner_proto) for f in captured if f.vni == 1}
    for frame in captured:  # each outer header matches the inner one's owners
        if frame.inner_src in gateway_owner and frame.inner_dst in gateway_owner:
            assert by_ip[frame.outer_src] == gateway_owner[frame.inner_src]
            assert by_ip[frame.outer_dst] == gateway_owner[frame.inner_dst]
    for node in nodes:
        for other in nodes:
            if other is node:
                continue
            src, dst = gateways[node.name], gateways[other.name]
            assert (src, dst, 6) in encapsulated, f"no VXLAN TCP frame {src} -> {dst}"
            assert (src, dst, 17) in encapsulated, f"no VXLAN UDP frame {src} -> {dst}"


def _cni_add(rig: AgentBox, node: SandboxNode, container: str) -> tuple[int, dict[str, Any]]:
    from weavepy.cni.install import install_cni

    installed = install_cni(rig.root / "cni-bin", rig.root / "cni-conf")
    netns = f"{rig.box.prefix}-{container}"
    subprocess.run(["ip", "netns", "add", netns], check=False, capture_output=True, timeout=10)
    conf = {"cniVersion": "1.0.0", "name": "weavepy", "type": "weavepy-cni",
            "socketPath": str(rig.run_dir(node) / "cni.sock")}
    result = node.run(["env", "CNI_COMMAND=ADD", f"CNI_CONTAINERID={container}",
                       f"CNI_NETNS=/run/netns/{netns}", "CNI_IFNAME=eth0",
                       f"CNI_PATH={installed.plugin.parent}", str(installed.plugin)],
                      input=json.dumps(conf), check=False, timeout=30)
    return result.returncode, json.loads(result.stdout or "{}")


@pytest.mark.timeout(90)
def test_sigkill_removes_the_dead_nodes_entries_everywhere(rig: AgentBox) -> None:
    nodes = rig.box.nodes[:5]
    victim, survivors = nodes[4], nodes[:4]
    status = rig.status(victim)
    assert status is not None
    block = status["dataplane"]["local_blocks"][0]
    mac = status["peers"][0] and rig.status(nodes[0])
    assert mac is not None
    vtep = next(p["vtep_mac"] for p in mac["peers"] if p["name"] == victim.name)
    rc, result = _cni_add(rig, victim, "podk")
    assert rc == 0, result
    rig.pod_before_kill = result["ips"][0]["address"]  # type: ignore[attr-defined]
    for node in survivors:
        assert _entries_for(rig, node, block, vtep) == [f"route {block}", f"neighbour "
                                                        f"{block.split('/')[0]}", f"fdb {vtep}"]
    killed_at = time.monotonic()
    rig.kill(victim)
    for node in survivors:
        rig.wait(f"{node.name} to drop every entry of the dead {victim.name}",
                 partial(_no_entries_for, rig, node, block, vtep), timeout=45, interval=0.2)
    print(f"entries gone on all survivors {time.monotonic() - killed_at:.1f} s after SIGKILL")
    doc = rig.status(survivors[0])
    assert doc is not None
    dead = next(p for p in doc["peers"] if p["name"] == victim.name)
    assert dead["state"] == "failed" and not dead["programmed"]
    # With the default --reclaim-after (24 h) a dead node keeps its block: reclaim is a day
    # away (tests/agent/test_reclaim_netns.py runs agents with a short one and sees it happen).
    assert doc["config"]["reclaim_after"] == 24 * 3600
    assert block in [b["block"] for b in doc["blocks"] if b["owner"] == victim.name], \
        "with the default --reclaim-after a dead node keeps its block"


@pytest.mark.timeout(90)
def test_restart_keeps_blocks_and_pod_address_and_does_not_flap(rig: AgentBox) -> None:
    nodes = rig.box.nodes[:5]
    victim = nodes[4]
    blocks_before = json.loads((rig.state_dir(victim) / "ipam-core.json").read_text())
    assert blocks_before
    # routes the victim's kernel still holds from before its crash; none may flap
    monitor = victim.start("monitor", ["ip", "-ts", "monitor", "route"])
    time.sleep(0.3)
    before = rig.dataplane(victim).routes
    assert len(before) == 4
    rig.launch(victim)
    blocks = rig.wait_mesh(nodes, timeout=60)
    status = rig.status(victim)
    assert status is not None
    assert status["dataplane"]["settled"] or rig.wait(
        "the view to settle", lambda: (rig.status(victim) or {}).get("dataplane", {})
        .get("settled"), timeout=20)
    rc, result = _cni_add(rig, victim, "podk")
    assert rc == 0, result
    assert result["ips"][0]["address"] == rig.pod_before_kill  # type: ignore[attr-defined]
    held = rig.status(victim)["ipam"]["held_blocks"]  # type: ignore[index]
    assert held == blocks[victim.name]
    monitor.stop()
    deleted = [line for line in monitor.log_text().splitlines()
               if line.split("]", 1)[-1].strip().startswith("Deleted")
               and any(b in line for b in before)]
    assert not deleted, f"routes flapped across the restart: {deleted}"


@pytest.mark.timeout(90)
def test_a_founder_without_peers_rejoins_its_last_members_after_a_crash(rig: AgentBox) -> None:
    nodes = rig.box.nodes[:5]
    founder = nodes[0]  # launched with no peers: only its saved member list brings it back
    monitor = founder.start("monitor-n1", ["ip", "-ts", "monitor", "route"])
    time.sleep(0.3)
    before = rig.dataplane(founder).routes
    rig.kill(founder)
    rig.launch(founder)
    rig.wait("n1 to rejoin through its last members", lambda: "rejoined through" in
             rig.log(founder), timeout=30)
    rig.wait_mesh(nodes, timeout=60)
    monitor.stop()
    deleted = [line for line in monitor.log_text().splitlines()
               if "Deleted" in line and any(b in line for b in before)]
    assert not deleted, f"routes flapped on the restarted founder: {deleted}"


@pytest.mark.timeout(90)
def test_a_sigterm_restart_leaves_the_peers_routes_alone(rig: AgentBox) -> None:
    """SIGTERM (a DaemonSet rollout) stops without leaving: a peer keeps its route to the
    restarting node's block throughout, where `weavepy stop` would have it dropped at once."""
    nodes = rig.box.nodes[:5]
    victim, watcher = nodes[2], nodes[0]
    blocks = rig.wait_mesh(nodes, timeout=60)
    monitor = watcher.start("monitor-sigterm", ["ip", "-ts", "monitor", "route"])
    time.sleep(0.3)
    stopped_at = time.monotonic()
    old = rig.agents[victim.name]
    assert rig.stop(victim) == 0
    assert "stopping without leaving the cluster" in old.log_text()
    rig.launch(victim)
    rig.wait_api(victim)
    print(f"agent answering again {time.monotonic() - stopped_at:.1f} s after SIGTERM")
    assert rig.wait_mesh(nodes, timeout=60)[victim.name] == blocks[victim.name]
    monitor.stop()
    deleted = [line for line in monitor.log_text().splitlines()
               if "Deleted" in line and any(b in line for b in blocks[victim.name])]
    assert not deleted, f"{watcher.name} dropped its route across the restart: {deleted}"


@pytest.mark.timeout(90)
def test_new_node_joins_and_gets_routes_everywhere(rig: AgentBox) -> None:
    nodes = rig.box.nodes
    newcomer = nodes[5]
    started = time.monotonic()
    rig.launch(newcomer, [nodes[2]])
    blocks = rig.wait_mesh(nodes, timeout=60)
    print(f"n6 launch to routes everywhere: {time.monotonic() - started:.1f} s")
    assert len({b for owned in blocks.values() for b in owned}) == 6
