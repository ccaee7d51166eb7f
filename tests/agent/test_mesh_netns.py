"""A 5-node weavepy cluster in sandbox namespaces, with real packets (issue 4's core tests).

One module-wide sandbox of 6 nodes: n1..n5 form the cluster, n6 joins later. The tests run in
order and each leaves the cluster converged: reachability over TCP and UDP with a capture that
proves VXLAN, SIGKILL (a node down past failure detection keeps its entries everywhere while
it owns its block: `--route-grace`), restart (same blocks, same pod address, no route flaps on
the restarted node, its pod reachable again), a SIGTERM restart (no route flaps at the peers),
a SIGTERM stop longer than failure detection (no route flaps at the peers either), and a new
node joining.
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


def _ping(node: SandboxNode, address: str) -> bool:
    return node.run(["ping", "-c", "1", "-W", "1", address], check=False,
                    timeout=10).returncode == 0


def _watch_entries_while_down(rig: AgentBox, victim: SandboxNode, survivors: list[SandboxNode],
                              block: str, vtep: str, pod: str) -> None:
    """Sample every survivor's route, neighbour and FDB entry for the down `victim` until all
    of them have declared it failed, and 3 s longer: none may disappear (the victim still
    owns its block). Its pod, whose kernel state outlives the agent, answers meanwhile."""
    full = [f"route {block}", f"neighbour {block.split('/')[0]}", f"fdb {vtep}"]
    deadline = time.monotonic() + 60
    failed_at: float | None = None
    while failed_at is None or time.monotonic() < failed_at + 3:
        assert time.monotonic() < deadline, f"the survivors never saw {victim.name} failed"
        for node in survivors:
            assert _entries_for(rig, node, block, vtep) == full, \
                f"{node.name} dropped entries of the down {victim.name}"
        if failed_at is None and all(
                _peer(rig, node, victim.name).get("state") == "failed" for node in survivors):
            failed_at = time.monotonic()
        time.sleep(0.2)
    assert _ping(survivors[0], pod), f"{victim.name}'s pod unreachable while its agent is down"
    entry = _peer(rig, survivors[0], victim.name)
    assert entry["state"] == "failed" and entry["programmed"], entry
    assert entry["routes_kept_s"] > 0, entry


def _peer(rig: AgentBox, node: SandboxNode, name: str) -> dict[str, Any]:
    doc = rig.status(node) or {}
    return next((p for p in doc.get("peers", []) if p["name"] == name), {})


@pytest.mark.timeout(120)
def test_sigkill_keeps_the_dead_nodes_entries_while_it_owns_its_block(rig: AgentBox) -> None:
    """Routes follow block ownership: a node killed and kept down past failure detection keeps
    every survivor's route, neighbour and FDB entry (--route-grace, 15 min by default), and its
    pod stays reachable; `ip monitor route` on the survivors sees no deletion."""
    nodes = rig.box.nodes[:5]
    victim, survivors = nodes[4], nodes[:4]
    status = rig.status(victim)
    assert status is not None
    block = status["dataplane"]["local_blocks"][0]
    vtep = _peer(rig, nodes[0], victim.name)["vtep_mac"]
    rc, result = _cni_add(rig, victim, "podk")
    assert rc == 0, result
    pod = result["ips"][0]["address"].split("/")[0]
    rig.pod_before_kill = result["ips"][0]["address"]  # type: ignore[attr-defined]
    monitors = [node.start(f"monitor-kill-{node.name}", ["ip", "-ts", "monitor", "route"])
                for node in survivors]
    time.sleep(0.3)
    assert _ping(survivors[0], pod)
    rig.kill(victim)
    _watch_entries_while_down(rig, victim, survivors, block, vtep, pod)
    for monitor in monitors:
        monitor.stop()
        deleted = [line for line in monitor.log_text().splitlines() if "Deleted" in line]
        assert not deleted, f"a survivor deleted a route: {deleted}"
    doc = rig.status(survivors[0])
    assert doc is not None
    # With the default --reclaim-after (24 h) a dead node keeps its block: reclaim is a day
    # away (tests/agent/test_reclaim_netns.py runs agents with a short one and sees it happen,
    # and the routes go with the block).
    assert doc["config"]["reclaim_after"] == 24 * 3600
    assert doc["config"]["route_grace"] == 15 * 60
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
    pod = result["ips"][0]["address"].split("/")[0]
    for node in nodes[:4]:
        rig.wait(f"{node.name} to reach {victim.name}'s pod again", partial(_ping, node, pod),
                 timeout=10)
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


@pytest.mark.timeout(120)
def test_a_sigterm_stop_longer_than_failure_detection_keeps_the_peers_routes(
        rig: AgentBox) -> None:
    """SIGTERM, then down until every peer has declared the node failed: no peer drops an
    entry (its block is still its own), and after the restart the node holds the same block
    and the peers reach its pod at the same address."""
    nodes = rig.box.nodes[:5]
    victim, survivors = nodes[3], [*nodes[:3], nodes[4]]
    blocks = rig.wait_mesh(nodes, timeout=60)
    block = blocks[victim.name][0]
    vtep = _peer(rig, nodes[0], victim.name)["vtep_mac"]
    rc, result = _cni_add(rig, victim, "podt")
    assert rc == 0, result
    pod = result["ips"][0]["address"]
    monitors = [node.start(f"monitor-term-{node.name}", ["ip", "-ts", "monitor", "route"])
                for node in survivors]
    time.sleep(0.3)
    assert rig.stop(victim) == 0
    _watch_entries_while_down(rig, victim, survivors, block, vtep, pod.split("/")[0])
    rig.launch(victim)
    assert rig.wait_mesh(nodes, timeout=60)[victim.name] == blocks[victim.name]
    rc, again = _cni_add(rig, victim, "podt")
    assert rc == 0 and again["ips"][0]["address"] == pod, again
    for node in survivors:
        rig.wait(f"{node.name} to reach {victim.name}'s pod again",
                 partial(_ping, node, pod.split("/")[0]), timeout=10)
    for monitor in monitors:
        monitor.stop()
        deleted = [line for line in monitor.log_text().splitlines() if "Deleted" in line]
        assert not deleted, f"a peer deleted a route: {deleted}"


@pytest.mark.timeout(90)
def test_new_node_joins_and_gets_routes_everywhere(rig: AgentBox) -> None:
    nodes = rig.box.nodes
    newcomer = nodes[5]
    started = time.monotonic()
    rig.launch(newcomer, [nodes[2]])
    blocks = rig.wait_mesh(nodes, timeout=60)
    print(f"n6 launch to routes everywhere: {time.monotonic() - started:.1f} s")
    assert len({b for owned in blocks.values() for b in owned}) == 6
