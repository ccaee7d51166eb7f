"""Pods reach the world (issue 13), with real agents and real packets in a 3-node sandbox.

Agents run on n1 and n2 with one pod each; n3 is a host outside the cluster on the same
underlay, with no route to the pod range. The agents place and keep the host rules themselves
(`--reconcile-interval 2s`, so that a host turning strict or a flushed table is noticed
soon); the tests only change the host around them (strict forward chains, rp_filter, a
flush) and relaunch the agents with other flags. Every node, pod and the outside host runs a
small server that answers with, and logs, the source address it saw over TCP, UDP and ICMP:
so "the outside host sees the node's address" and "the receiving pod sees the pod's address"
are read where the packets arrive (the server in a pod binds in the pod's namespace, so what
it logs is what arrived on the pod's eth0: nothing rewrites addresses inside a pod).
"""

from __future__ import annotations

import http.client
import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from glob import glob
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.agent.traffic import tcp_echo, udp_echo
from tests.conftest import require_binary, require_root
from tests.hostrules.hostsetup import STRICT_KINDS, make_strict, relax
from weavepy.devtools.agentbox import AgentBox
from weavepy.devtools.sandbox import ManagedProcess, Sandbox, SandboxNode, call_in_netns

pytestmark = [pytest.mark.netns, pytest.mark.slow]

PORT = 7100
METRICS_PORT = 6782
AGENT_FLAGS = ("--reconcile-interval", "2s")
WHERE = {"iptables-legacy": "iptables-legacy filter FORWARD",
         "iptables-nft": "iptables-nft filter FORWARD", "nft": "nft inet filter forward"}
WHOAMI_SERVER = r"""
import socket, sys, threading, time
host, port = sys.argv[1], int(sys.argv[2])
deadline = time.monotonic() + 1800  # bounded: the sandbox stops it sooner
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
    flags: tuple[str, ...] = field(default=())  # the agents' flags beyond AGENT_FLAGS

    @property
    def cluster(self) -> list[SandboxNode]:
        return self.box.nodes[:2]

    @property
    def outside(self) -> SandboxNode:
        return self.box.nodes[2]

    def other(self, node: SandboxNode) -> SandboxNode:
        return next(n for n in self.cluster if n is not node)


@pytest.fixture(scope="module")
def rig() -> Iterator[Rig]:
    require_root()
    for tool, package in (("ping", "iputils-ping"), ("nft", "nftables"),
                          ("iptables-legacy", "iptables"), ("iptables-nft", "iptables")):
        require_binary(tool, package)
    box = Sandbox.create(nodes=3)
    try:
        agents = AgentBox(box, pod_range=str(box.pod_range), extra_args=AGENT_FLAGS)
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


# -- the agents and their host rules ---------------------------------------------------------


def host_rules(rig: Rig, node: SandboxNode) -> dict[str, Any]:
    doc = rig.agents.status(node)
    assert doc is not None, f"the agent in {node.name} does not answer"
    rules: dict[str, Any] = doc["host_rules"]
    return rules


def wait_rules(rig: Rig, what: str, check: Callable[[dict[str, Any]], bool],
               timeout: float = 30) -> dict[str, dict[str, Any]]:
    """Wait until `check` holds for the host rules both agents report; those reports."""
    def probe() -> dict[str, dict[str, Any]] | None:
        found = {node.name: host_rules(rig, node) for node in rig.cluster}
        return found if all(check(rules) for rules in found.values()) else None

    return rig.agents.wait(what, probe, timeout, interval=0.5)


def with_flags(rig: Rig, *flags: str) -> None:
    """Make both agents run with `flags` (beyond AGENT_FLAGS): relaunch them if they run with
    others (SIGTERM: they do not leave; kernel state, pods and state directories stay)."""
    if rig.flags != flags:
        for node in rig.cluster:
            rig.agents.stop(node)
            rig.agents.launch(node, [rig.other(node)], extra=flags)
            rig.agents.wait_api(node)
        rig.flags = flags
        rig.agents.wait_mesh(rig.cluster, timeout=60)
    masquerade = "--no-masquerade" not in flags
    wait_rules(rig, f"host rules in place with masquerade={masquerade}",
               lambda r: r["present"] and r["masquerade"] is masquerade)


def pause_agents(rig: Rig) -> None:
    for node in rig.cluster:
        rig.agents.agents[node.name].pause()


def resume_agents(rig: Rig) -> None:
    for node in rig.cluster:
        rig.agents.agents[node.name].resume()


def _scrape() -> str:
    conn = http.client.HTTPConnection("127.0.0.1", METRICS_PORT, timeout=5)
    try:
        conn.request("GET", "/metrics")
        return conn.getresponse().read().decode()
    finally:
        conn.close()


def metric(node: SandboxNode, name: str) -> float | None:
    for family in text_string_to_metric_families(node.call(_scrape)):
        for sample in family.samples:
            if sample.name == name:
                return float(sample.value)
    return None


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
        other = rig.other(node)
        problems += check_reaches(rig, node, f"pod-{other.name}", rig.pods[other.name][1],
                                  rig.pods[node.name][1])
    return problems


def check_pods_reach_other_nodes_as_their_node(rig: Rig) -> list[str]:
    problems = []
    for node in rig.cluster:
        other = rig.other(node)
        problems += check_reaches(rig, node, other.name, other.underlay_ip, node.underlay_ip)
    return problems


# -- tests: default flags (masquerade on) ---------------------------------------------------


@pytest.mark.timeout(300)
def test_pods_reach_an_outside_host_as_their_node_and_each_other_as_themselves(rig: Rig
                                                                               ) -> None:
    with_flags(rig)
    first = rig.cluster[0]
    before = host_rules(rig, first)
    assert before["peer_nodes"] == [rig.cluster[1].underlay_ip]
    assert before["api_guard_port"] == 6784 and before["errors"] == []
    assert before["accepts_in"] == []  # nothing here drops forwarded traffic
    problems = check_egress_and_pod_to_pod(rig)
    assert not problems, problems
    pod_addresses = {address for _, address in rig.pods.values()}
    assert not pod_addresses & seen_since(rig.servers["n3"], 0, "tcp")
    # what was masqueraded shows in the report and the metrics (TCP, UDP and ICMP packets),
    # as read by the first host-rules pass (every --reconcile-interval) after the traffic
    traffic_ended = time.time()
    wait_rules(rig, "a host-rules pass after the traffic",
               lambda rules: rules["last_check"] > traffic_ended)
    report = rig.agents.cli(first, "report", "--json")
    assert report.returncode == 0, report.stderr
    after = json.loads(report.stdout)["host_rules"]
    assert after["masqueraded_packets"] >= before["masqueraded_packets"] + 6
    assert after["masqueraded_bytes"] > before["masqueraded_bytes"]
    assert (metric(first, "weavepy_masqueraded_packets_total") or 0) >= after[
        "masqueraded_packets"]
    assert (metric(first, "weavepy_masqueraded_bytes_total") or 0) > 0
    assert metric(first, "weavepy_host_rules_present") == 1
    status = rig.agents.cli(first, "status")
    assert "  host rules:   in place, masquerade on, forward accepts: none needed; " in (
        status.stdout), status.stdout


@pytest.mark.timeout(300)
@pytest.mark.parametrize("strict", [*STRICT_KINDS, "all"])
def test_hosts_that_drop_forwarded_traffic_still_carry_pod_traffic(rig: Rig, strict: str
                                                                   ) -> None:
    with_flags(rig)
    kinds: Sequence[str] = STRICT_KINDS if strict == "all" else (strict,)
    first, second = rig.cluster
    pause_agents(rig)  # the drop arrives while the agents cannot react yet
    try:
        for node in rig.cluster:
            node.call(make_strict, kinds)
        # the drop bites: without weavepy's accepts, pods reach neither each other nor the world
        assert answers(rig, first, rig.pods[second.name][1], attempts=1) == (b"", b"")
    finally:
        resume_agents(rig)
    try:
        wanted = sorted(WHERE[k] for k in kinds)
        wait_rules(rig, f"the agents' accepts in {wanted}",
                   lambda r: r["present"] and sorted(r["accepts_in"]) == wanted)
        problems = check_egress_and_pod_to_pod(rig)
        assert not problems, problems
    finally:
        for node in rig.cluster:
            node.call(relax, kinds)
    # the drop is gone: the agents take their accepts out again
    wait_rules(rig, "no accepts", lambda r: r["present"] and r["accepts_in"] == [])


def _set_rp_filter(mode: int) -> None:
    for path in glob("/proc/sys/net/ipv4/conf/*/rp_filter"):
        Path(path).write_text(f"{mode}\n")


@pytest.fixture(params=[1, 2], ids=["rp_filter=1", "rp_filter=2"])
def rp_filter(rig: Rig, request: pytest.FixtureRequest) -> Iterator[int]:
    mode: int = request.param
    for node in rig.box.nodes:
        node.call(_set_rp_filter, mode)
    try:
        yield mode
    finally:
        for node in rig.box.nodes:
            node.call(_set_rp_filter, 0)


@pytest.mark.timeout(300)
def test_pods_reach_everything_under_reverse_path_filtering(rig: Rig, rp_filter: int) -> None:
    with_flags(rig)
    problems = check_egress_and_pod_to_pod(rig) + check_pods_reach_other_nodes_as_their_node(rig)
    assert not problems, problems


@pytest.mark.timeout(240)
def test_a_flushed_table_is_put_back_and_reported(rig: Rig) -> None:
    with_flags(rig)
    first = rig.cluster[0]
    before = host_rules(rig, first)["restorations"]
    log_mark = len(rig.agents.log(first))
    first.run(["nft", "flush", "table", "ip", "weavepy"])

    def put_back() -> dict[str, Any] | None:
        rules = host_rules(rig, first)
        return rules if rules["restorations"] > before and rules["present"] else None

    rules = rig.agents.wait("the agent putting its table back", put_back, timeout=30)
    assert rules["restorations"] == before + 1
    assert "table ip weavepy: chain egress was flushed" in rules["last_restored"]
    assert "host rules restored: table ip weavepy: chain egress was flushed" in (
        rig.agents.log(first)[log_mark:])
    assert metric(first, "weavepy_host_rules_restorations_total") == before + 1
    problems = check_reaches(rig, first, "n3", rig.outside.underlay_ip, first.underlay_ip)
    assert not problems, problems


# -- tests: --no-masquerade -----------------------------------------------------------------


@pytest.mark.timeout(300)
def test_no_masquerade_lets_the_pod_address_out(rig: Rig) -> None:
    with_flags(rig, "--no-masquerade")
    first = rig.cluster[0]
    pod_address = rig.pods[first.name][1]
    outside = rig.servers["n3"]
    start = mark(outside)
    # nothing outside routes the pod range back: the packets arrive, no answer returns
    assert answers(rig, first, rig.outside.underlay_ip, attempts=1) == (b"", b"")
    assert not pings(rig, first, rig.outside.underlay_ip)
    assert seen_since(outside, start, "udp") == {pod_address}
    assert seen_since(outside, start, "icmp") == {pod_address}
    assert seen_since(outside, start, "tcp") == set()  # the SYN-ACK had no route back
    status = rig.agents.cli(first, "status")
    assert "  host rules:   in place, masquerade OFF, " in status.stdout, status.stdout
    problems = []
    for node in rig.cluster:
        other = rig.other(node)
        problems += check_reaches(rig, node, f"pod-{other.name}", rig.pods[other.name][1],
                                  rig.pods[node.name][1])
    assert not problems, problems


def _flush_peer_set() -> None:
    subprocess.run(["nft", "flush", "set", "ip", "weavepy", "peer_nodes"], check=True,
                   timeout=10)


def _peer_set() -> str:
    return subprocess.run(["nft", "list", "set", "ip", "weavepy", "peer_nodes"], check=True,
                          capture_output=True, text=True, timeout=10).stdout


@pytest.mark.timeout(300)
def test_without_masquerade_pods_still_reach_other_nodes_as_their_node(rig: Rig,
                                                                       rp_filter: int) -> None:
    with_flags(rig, "--no-masquerade")
    problems = check_pods_reach_other_nodes_as_their_node(rig)
    assert not problems, problems
    # that is the peer-node rule's doing: without it the answer to the pod's own address
    # comes back over the overlay, which loose filtering lets through and strict drops
    first, second = rig.cluster
    pause_agents(rig)
    try:
        for node in rig.cluster:
            node.call(_flush_peer_set)
        pod_address = rig.pods[first.name][1]
        expected = ((f"tcp:{pod_address}".encode(), f"udp:{pod_address}".encode())
                    if rp_filter == 2 else (b"", b""))
        assert answers(rig, first, second.underlay_ip, attempts=1) == expected
    finally:
        resume_agents(rig)
    # the agents refresh the set (a routine change: the table was not damaged)
    rig.agents.wait("the peer set refreshed", lambda: all(
        rig.other(node).underlay_ip in node.call(_peer_set) for node in rig.cluster), 30)
    problems = check_pods_reach_other_nodes_as_their_node(rig)
    assert not problems, problems


# -- tests: --no-masq-cidrs -----------------------------------------------------------------


@pytest.mark.timeout(300)
def test_operator_exclusions_keep_the_pod_address_but_not_towards_peer_nodes(rig: Rig) -> None:
    underlay = str(rig.box.underlay)
    with_flags(rig, "--no-masq-cidrs", underlay)
    first, second = rig.cluster
    assert host_rules(rig, first)["no_masq_cidrs"] == [underlay]
    pod_address = rig.pods[first.name][1]
    outside = rig.servers["n3"]
    start = mark(outside)
    answers(rig, first, rig.outside.underlay_ip, attempts=1)  # no way back: no answer
    assert seen_since(outside, start, "udp") == {pod_address}
    assert seen_since(outside, start, "tcp") == set()  # the SYN-ACK had no route back
    # a peer node is in the excluded range, and still sees the node's address
    assert answers(rig, first, second.underlay_ip) == (
        f"tcp:{first.underlay_ip}".encode(), f"udp:{first.underlay_ip}".encode())
