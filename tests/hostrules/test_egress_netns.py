"""Pods reach the world (issue 13), with real packets in a 3-node sandbox.

Agents run on n1 and n2 with one pod each; n3 is a host outside the cluster on the same
underlay, with no route to the pod range. The host rules are applied in each agent node's
namespace through the `HostRules` shell (the agent does not call it yet), and removed after
each test. Every node, pod and the outside host runs a small server that answers with, and
logs, the source address it saw over TCP, UDP and ICMP: so "the outside host sees the node's
address" and "the receiving pod sees the pod's address" are read where the packets arrive.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from glob import glob
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

import pytest

from tests.agent.traffic import tcp_echo, udp_echo
from tests.conftest import require_binary, require_root
from tests.hostrules.hostsetup import STRICT_KINDS, make_strict, relax, rulesets
from weavepy.devtools.agentbox import BRIDGE, DEVICE, WG_DEVICE, AgentBox
from weavepy.devtools.sandbox import ManagedProcess, Sandbox, SandboxNode, call_in_netns
from weavepy.hostrules import HostRules, HostRulesSpec, HostRulesState

pytestmark = [pytest.mark.netns, pytest.mark.slow]

PORT = 7100
WHOAMI_SERVER = r"""
import socket, sys, threading, time
host, port = sys.argv[1], int(sys.argv[2])
deadline = time.monotonic() + 900  # bounded: the sandbox stops it sooner
def saw(proto, peer):
    print(proto, peer, flush=True)
udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
udp.bind((host, port))
tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
tcp.bind((host, port))
tcp.listen(16)
tcp.settimeout(1)
icmp = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
def serve_udp():
    while True:
        data, peer = udp.recvfrom(2048)
        saw("udp", peer[0])
        try:
            udp.sendto(f"udp:{peer[0]}".encode(), peer)
        except OSError:  # no route back to a source that was not masqueraded
            pass
def watch_icmp():
    while True:
        data, peer = icmp.recvfrom(2048)
        if data[(data[0] & 15) * 4] == 8:  # an echo request
            saw("icmp", peer[0])
threading.Thread(target=serve_udp, daemon=True).start()
threading.Thread(target=watch_icmp, daemon=True).start()
print("listening", flush=True)
while time.monotonic() < deadline:
    try:
        conn, peer = tcp.accept()
    except TimeoutError:
        continue
    with conn:
        saw("tcp", peer[0])
        conn.settimeout(5)
        conn.recv(2048)
        conn.sendall(f"tcp:{peer[0]}".encode())
"""


@dataclass
class Rig:
    agents: AgentBox
    box: Sandbox
    pods: dict[str, tuple[str, str]]  # agent node name -> (pod netns, pod address)
    servers: dict[str, ManagedProcess]  # "n1", "n2", "n3", "pod-n1", "pod-n2"

    @property
    def cluster(self) -> list[SandboxNode]:
        return self.box.nodes[:2]

    @property
    def outside(self) -> SandboxNode:
        return self.box.nodes[2]


@pytest.fixture(scope="module")
def rig() -> Iterator[Rig]:
    require_root()
    for tool, package in (("ping", "iputils-ping"), ("nft", "nftables"),
                          ("iptables-legacy", "iptables"), ("iptables-nft", "iptables")):
        require_binary(tool, package)
    box = Sandbox.create(nodes=3)
    try:
        agents = AgentBox(box, pod_range=str(box.pod_range))
        agents.launch_all(box.nodes[:2])
        agents.wait_mesh(box.nodes[:2], timeout=60)
        from weavepy.cni.install import install_cni

        installed = install_cni(agents.root / "cni-bin", agents.root / "cni-conf")
        pods: dict[str, tuple[str, str]] = {}
        servers: dict[str, ManagedProcess] = {}
        argv = [sys.executable, "-c", WHOAMI_SERVER, "0.0.0.0", str(PORT)]
        for node in box.nodes[:2]:
            netns = f"{box.prefix}-pod{node.index}"
            subprocess.run(["ip", "netns", "add", netns], check=True, timeout=10)
            pods[node.name] = (netns, agents.cni_add(node, installed.plugin, netns))
            servers[f"pod-{node.name}"] = box.namespace(netns).start("whoami", argv)
        for node in box.nodes:
            servers[node.name] = node.start("whoami", argv)
        for name, server in servers.items():
            agents.wait(f"the server in {name}", partial(_listening, server), 15)
        yield Rig(agents, box, pods, servers)
    finally:
        box.destroy()


def _listening(server: ManagedProcess) -> bool:
    return "listening" in server.log_text()


# -- the host rules in the agent nodes -------------------------------------------------------


def _ensure(spec: HostRulesSpec) -> HostRulesState:
    return HostRules().ensure(spec)


def _remove() -> tuple[str, ...]:
    return HostRules().remove()


def _spec_for(rig: Rig, node: SandboxNode, peers: bool = True, **kwargs: Any) -> HostRulesSpec:
    addresses = frozenset(IPv4Address(n.underlay_ip) for n in rig.cluster if n is not node)
    return HostRulesSpec(IPv4Network(str(rig.box.pod_range)), (BRIDGE, DEVICE, WG_DEVICE),
                         peer_node_addresses=addresses if peers else frozenset(), **kwargs)


@contextlib.contextmanager
def host_rules(rig: Rig, **kwargs: Any) -> Iterator[dict[str, HostRulesState]]:
    """The host rules on both agent nodes for the body of the `with`, removed afterwards."""
    states: dict[str, HostRulesState] = {}
    try:
        for node in rig.cluster:
            states[node.name] = node.call(_ensure, _spec_for(rig, node, **kwargs))
            assert states[node.name].present, states[node.name].errors
        yield states
    finally:
        for node in rig.cluster:
            node.call(_remove)


# -- traffic --------------------------------------------------------------------------------


def _exchange(src: str, dst: str) -> tuple[bytes, bytes]:
    return tcp_echo(src, dst, PORT, b"who am i"), udp_echo(src, dst, PORT, b"who am i")


def answers(rig: Rig, node: SandboxNode, dst: str, attempts: int = 3) -> tuple[bytes, bytes]:
    """(TCP answer, UDP answer) of the server at `dst` to the pod on `node`; b"" for none."""
    netns, address = rig.pods[node.name]
    found = (b"", b"")
    for _ in range(attempts):
        found = call_in_netns(netns, _exchange, address, dst, timeout=30)
        if all(found):
            break
    return found


def pings(rig: Rig, node: SandboxNode, dst: str) -> bool:
    netns, _ = rig.pods[node.name]
    result = rig.box.namespace(netns).run(["ping", "-c", "2", "-i", "0.3", "-W", "2", dst],
                                          check=False, timeout=30)
    return result.returncode == 0


def seen_since(server: ManagedProcess, mark: int, proto: str) -> set[str]:
    """The sources `server` logged for `proto` after log offset `mark`."""
    lines = server.log_text()[mark:].splitlines()
    return {line.split()[1] for line in lines if line.startswith(proto + " ")}


def mark(server: ManagedProcess) -> int:
    return len(server.log_text())


def check_reaches(rig: Rig, node: SandboxNode, target: str, dst: str, expect_source: str
                  ) -> list[str]:
    """The pod on `node` reaches server `target` at `dst` over TCP, UDP and ICMP, and the
    server sees `expect_source` for all three. Returns what went wrong."""
    server = rig.servers[target]
    start = mark(server)
    problems = []
    tcp, udp = answers(rig, node, dst)
    if tcp != f"tcp:{expect_source}".encode():
        problems.append(f"TCP pod@{node.name} -> {target}: {tcp!r}")
    if udp != f"udp:{expect_source}".encode():
        problems.append(f"UDP pod@{node.name} -> {target}: {udp!r}")
    if not pings(rig, node, dst):
        problems.append(f"ICMP pod@{node.name} -> {target}: no answer")
    icmp_sources = seen_since(server, start, "icmp")
    if icmp_sources != {expect_source}:
        problems.append(f"ICMP pod@{node.name} -> {target} arrived from {icmp_sources}")
    return problems


def check_egress_and_pod_to_pod(rig: Rig) -> list[str]:
    """Both pods reach the outside host as their node, and each other as themselves."""
    problems = []
    for node in rig.cluster:
        problems += check_reaches(rig, node, "n3", rig.outside.underlay_ip, node.underlay_ip)
        other = next(n for n in rig.cluster if n is not node)
        problems += check_reaches(rig, node, f"pod-{other.name}", rig.pods[other.name][1],
                                  rig.pods[node.name][1])
    return problems


# -- tests ------------------------------------------------------------------------------------


def _count_across_a_replaced_table(spec: HostRulesSpec) -> tuple[HostRulesState, ...]:
    rules = HostRules()
    counted = rules.ensure(spec)
    subprocess.run(["nft", "delete", "table", "ip", "weavepy"], check=True, timeout=10)
    return counted, rules.ensure(spec)


@pytest.mark.timeout(240)
def test_pods_reach_an_outside_host_that_sees_their_node_address(rig: Rig) -> None:
    first = rig.cluster[0]
    # without host rules the pod's address leaves the node and nothing routes it back
    assert answers(rig, first, rig.outside.underlay_ip, attempts=1) == (b"", b"")
    with host_rules(rig) as states:
        assert all(s.changes == ("table ip weavepy: missing",) for s in states.values())
        problems = []
        for node in rig.cluster:
            problems += check_reaches(rig, node, "n3", rig.outside.underlay_ip,
                                      node.underlay_ip)
        assert not problems, problems
        pod_addresses = {address for _, address in rig.pods.values()}
        assert not pod_addresses & seen_since(rig.servers["n3"], 0, "tcp")
        counted, replaced = first.call(_count_across_a_replaced_table,
                                       _spec_for(rig, first))
        assert counted.masqueraded_packets >= 6 and counted.masqueraded_bytes > 0
        # the counts survive a table that was deleted and put back
        assert replaced.restored == ("table ip weavepy: missing",)
        assert (replaced.masqueraded_packets, replaced.masqueraded_bytes) == (
            counted.masqueraded_packets, counted.masqueraded_bytes)


@pytest.mark.timeout(180)
def test_pod_to_pod_traffic_across_nodes_keeps_the_pod_address(rig: Rig) -> None:
    with host_rules(rig):
        problems = []
        for node in rig.cluster:
            other = next(n for n in rig.cluster if n is not node)
            problems += check_reaches(rig, node, f"pod-{other.name}", rig.pods[other.name][1],
                                      rig.pods[node.name][1])
        assert not problems, problems


@pytest.mark.timeout(300)
@pytest.mark.parametrize("strict", [*STRICT_KINDS, "all"])
def test_hosts_that_drop_forwarded_traffic_still_carry_pod_traffic(rig: Rig, strict: str
                                                                   ) -> None:
    kinds: Sequence[str] = STRICT_KINDS if strict == "all" else (strict,)
    wheres = {"iptables-legacy": "iptables-legacy filter FORWARD",
              "iptables-nft": "iptables-nft filter FORWARD", "nft": "nft inet filter forward"}
    for node in rig.cluster:
        node.call(make_strict, kinds)
    try:
        first, second = rig.cluster
        # the drop bites: without weavepy's accepts, pods reach neither each other nor the world
        assert answers(rig, first, rig.pods[second.name][1], attempts=1) == (b"", b"")
        before = {node.name: node.call(rulesets, True) for node in rig.cluster}
        with host_rules(rig) as states:
            for state in states.values():
                assert sorted(state.accepts_in) == sorted(wheres[k] for k in kinds)
            problems = check_egress_and_pod_to_pod(rig)
            assert not problems, problems
        after = {node.name: node.call(rulesets, True) for node in rig.cluster}
        assert after == before
    finally:
        for node in rig.cluster:
            node.call(relax, kinds)


def _set_rp_filter(mode: int) -> None:
    for path in glob("/proc/sys/net/ipv4/conf/*/rp_filter"):
        Path(path).write_text(f"{mode}\n")


@pytest.mark.timeout(300)
@pytest.mark.parametrize("mode", [1, 2])
def test_pods_reach_other_nodes_under_reverse_path_filtering(rig: Rig, mode: int) -> None:
    for node in rig.box.nodes:
        node.call(_set_rp_filter, mode)
    try:
        first, second = rig.cluster
        with host_rules(rig):
            problems = check_egress_and_pod_to_pod(rig)
            for node, other in ((first, second), (second, first)):
                problems += check_reaches(rig, node, other.name, other.underlay_ip,
                                          node.underlay_ip)
            assert not problems, problems
        # with masquerading off, a pod still reaches the other node, as its node
        with host_rules(rig, masquerade=False):
            problems = []
            for node, other in ((first, second), (second, first)):
                problems += check_reaches(rig, node, other.name, other.underlay_ip,
                                          node.underlay_ip)
            assert not problems, problems
        # that is the peer-node rule's doing: without it the answer to the pod's own address
        # comes back over the overlay, which loose filtering lets through and strict drops
        with host_rules(rig, masquerade=False, peers=False):
            pod_address = rig.pods[first.name][1]
            expected = ((f"tcp:{pod_address}".encode(), f"udp:{pod_address}".encode())
                        if mode == 2 else (b"", b""))
            assert answers(rig, first, second.underlay_ip, attempts=1) == expected
    finally:
        for node in rig.box.nodes:
            node.call(_set_rp_filter, 0)


@pytest.mark.timeout(180)
def test_operator_exclusions_keep_the_pod_address_but_not_towards_peer_nodes(rig: Rig) -> None:
    first, second = rig.cluster
    pod_address = rig.pods[first.name][1]
    outside = rig.servers["n3"]
    with host_rules(rig, no_masq_cidrs=(IPv4Network(str(rig.box.underlay)),)):
        start = mark(outside)
        answers(rig, first, rig.outside.underlay_ip, attempts=1)  # no way back: no answer
        assert seen_since(outside, start, "udp") == {pod_address}
        assert seen_since(outside, start, "tcp") == set()  # the SYN-ACK had no route back
        # a peer node is in the excluded range, and still sees the node's address
        assert answers(rig, first, second.underlay_ip) == (
            f"tcp:{first.underlay_ip}".encode(), f"udp:{first.underlay_ip}".encode())
