"""Services on a weavepy network: ClusterIPs reached from a pod, with a stand-in for kube-proxy.

kube-proxy cannot run here (it needs a Kubernetes API), so each sandbox node gets the rules
kube-proxy's nftables mode writes (tests/agent/kubeproxy.py is the stand-in: table
`ip kube-proxy`, the `service-ips` verdict map, DNAT per endpoint, masquerade by mark 0x4000
for hairpin), installed in both nodes as kube-proxy would on every node. Everything else is
real: two weavepy agents (VXLAN), pods through the weavepy-cni plugin, TCP and UDP.

Three Services, each with TCP and UDP on port 80, with their endpoint
* on the client pod's node (the endpoint's answer is bridged straight back to the client: it
  is un-DNATed only because the agent switched on `bridge-nf-call-iptables`);
* on the other node (across the overlay);
* being the client pod itself (hairpin: the answer leaves through the port it came from, which
  needs the hairpin flag the CNI side sets on every pod port, and kube-proxy's masquerade).

Each case is also run with the agent's part taken away (bridge-nf-call-iptables 0, hairpin off)
and must then fail, so the test shows what the agent provides. A third node's agent runs where
br_netfilter is absent (its `/proc/sys/net/bridge` masked by a tmpfs in the agent's own mount
namespace) and its status says so and warns in one line.

ClusterIPs come from 198.19.200.0/24, outside the cluster range 198.19.0.0/17 of the test.
"""

from __future__ import annotations

import socket
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any

import pytest

from tests.agent.kubeproxy import ServicePort, render
from tests.conftest import require_binary, require_root
from weavepy.cni.podnet import host_veth_name
from weavepy.devtools.agentbox import REPO, AgentBox, gateway_of
from weavepy.devtools.sandbox import Sandbox, SandboxNode

pytestmark = [pytest.mark.netns, pytest.mark.slow]

CLUSTER_RANGE = "198.19.0.0/17"
SERVICE_RANGE = "198.19.200.0/24"
SERVICE_PORT = 80
POD_PORT = 8080
BRIDGE_NF = "/proc/sys/net/bridge/bridge-nf-call-iptables"

WHOAMI_SERVER = r"""
import socket, sys, threading
port = int(sys.argv[1])
udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
udp.bind(("0.0.0.0", port))
tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
tcp.bind(("0.0.0.0", port))
tcp.listen(64)
def serve_udp():
    while True:
        data, peer = udp.recvfrom(2048)
        udp.sendto(sys.argv[2].encode() + b" saw " + peer[0].encode(), peer)
def serve_tcp():
    while True:
        conn, peer = tcp.accept()
        with conn:
            conn.settimeout(5)
            conn.recv(2048)
            conn.sendall(sys.argv[2].encode() + b" saw " + peer[0].encode())
threading.Thread(target=serve_udp, daemon=True).start()
print("listening", flush=True)
serve_tcp()
"""


def ask_tcp(address: str, port: int, timeout: float) -> str:
    """From inside a pod: connect to address:port and return the answer ("" on failure)."""
    try:
        with socket.create_connection((address, port), timeout=timeout) as conn:
            conn.sendall(b"who are you?")
            return conn.recv(2048).decode()
    except OSError:
        return ""


def ask_udp(address: str, port: int, timeout: float, tries: int = 2) -> str:
    """From inside a pod: one datagram to address:port; the answer, prefixed with where it came
    from when that is not address:port (an answer the client's socket would not accept)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout)
        for _ in range(tries):
            try:
                sock.sendto(b"who are you?", (address, port))
                data, source = sock.recvfrom(2048)
            except OSError:
                continue
            if source != (address, port):
                return f"from {source[0]}:{source[1]}: {data.decode()}"
            return data.decode()
    return ""


@dataclass
class Rig:
    agents: AgentBox
    pods: dict[str, tuple[SandboxNode, str]]  # label -> (pod namespace handle, address)
    services: dict[str, str]  # case -> ClusterIP

    @property
    def nodes(self) -> list[SandboxNode]:
        return self.agents.box.nodes

    def ask(self, case: str, proto: str, timeout: float = 3.0) -> str:
        client, _ = self.pods["client"]
        ask = ask_tcp if proto == "tcp" else ask_udp
        answer: str = client.call(ask, self.services[case], SERVICE_PORT, timeout,
                                  timeout=timeout * 3 + 10)
        return answer


def _read(path: str) -> str:
    with open(path) as f:
        return f.read().strip()


def _write(path: str, value: str) -> None:
    with open(path, "w") as f:
        f.write(value + "\n")


def _listening(server: Any) -> bool:
    return "listening" in server.log_text()


@pytest.fixture(scope="module")
def rig() -> Iterator[Rig]:
    require_root()
    require_binary("nft", "nftables")
    require_binary("bridge", "iproute2")
    box = Sandbox.create(nodes=3, pod_range=CLUSTER_RANGE)
    try:
        agents = AgentBox(box, pod_range=CLUSTER_RANGE)
        n1, n2, n3 = box.nodes
        n1.call(_write, BRIDGE_NF, "0")  # the agent must switch it on by itself
        agents.launch_all([n1, n2])
        # n3: an agent where br_netfilter is absent (masked in the agent's mount namespace)
        agents.agents[n3.name] = n3.start("agent", [
            "sh", "-c", 'mount -t tmpfs none /proc/sys/net/bridge && exec "$@"', "sh",
            *agents.argv(n3)], cwd=str(REPO))
        agents.wait_mesh([n1, n2])
        from weavepy.cni.install import install_cni

        plugin = install_cni(agents.root / "cni-bin", agents.root / "cni-conf").plugin
        pods: dict[str, tuple[SandboxNode, str]] = {}
        for label, node in (("client", n1), ("neighbour", n1), ("remote", n2)):
            pod = box.add_netns(label)
            pods[label] = (pod, agents.cni_add(node, plugin, pod.netns))
            server = node.start(f"whoami-{label}", ["ip", "netns", "exec", pod.netns,
                                                    *_server_argv(label)])
            agents.wait(f"the server in pod {label}", partial(_listening, server), 15)
        services = {"same node": "198.19.200.10", "other node": "198.19.200.20",
                    "hairpin": "198.19.200.30"}
        endpoints = {"same node": "neighbour", "other node": "remote", "hairpin": "client"}
        ports = [ServicePort("test", case.replace(" ", "-"), f"p{proto}", proto, ip,
                             SERVICE_PORT, ((pods[endpoints[case]][1], POD_PORT),))
                 for case, ip in services.items() for proto in ("tcp", "udp")]
        ruleset = render(ports, CLUSTER_RANGE, SERVICE_RANGE)
        for node in (n1, n2):  # kube-proxy writes the same rules on every node
            node.run(["nft", "-f", "-"], input=ruleset)
        yield Rig(agents, pods, services)
    finally:
        box.destroy()


def _server_argv(label: str) -> list[str]:
    return [sys.executable, "-c", WHOAMI_SERVER, str(POD_PORT), label]


@pytest.mark.timeout(120)
def test_the_agent_switches_bridge_netfilter_on_and_says_where_it_is_absent(rig: Rig) -> None:
    n1, n2, n3 = rig.nodes
    assert n1.call(_read, BRIDGE_NF) == "1", "the agent did not switch bridge-nf-call-iptables on"
    for node in (n1, n2):
        doc = rig.agents.status(node)
        assert doc is not None and doc["dataplane"]["bridge_netfilter"] == "on"
    absent = rig.agents.wait_api(n3)
    assert absent["dataplane"]["bridge_netfilter"] == "absent"
    assert "br_netfilter is not loaded" in rig.agents.log(n3)
    shown = rig.agents.cli(n3, "status")
    assert shown.returncode == 0, shown.stderr
    warnings = [line for line in shown.stdout.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "modprobe br_netfilter" in warnings[0], shown.stdout
    healthy = rig.agents.cli(n1, "status")
    assert "warning" not in healthy.stdout, healthy.stdout


@pytest.mark.timeout(120)
@pytest.mark.parametrize("proto", ["tcp", "udp"])
def test_a_cluster_ip_reaches_its_endpoint_on_the_same_node(rig: Rig, proto: str) -> None:
    client = rig.pods["client"][1]
    assert rig.ask("same node", proto) == f"neighbour saw {client}"
    # Without bridge-nf-call-iptables the endpoint's answer is bridged straight to the client
    # with the endpoint's own address: TCP never connects, UDP comes from the wrong source.
    n1 = rig.nodes[0]
    n1.call(_write, BRIDGE_NF, "0")
    try:
        broken = rig.ask("same node", proto, timeout=1.5)
    finally:
        n1.call(_write, BRIDGE_NF, "1")
    assert broken != f"neighbour saw {client}", broken
    assert rig.ask("same node", proto) == f"neighbour saw {client}"


@pytest.mark.timeout(120)
@pytest.mark.parametrize("proto", ["tcp", "udp"])
def test_a_cluster_ip_reaches_its_endpoint_on_another_node(rig: Rig, proto: str) -> None:
    client = rig.pods["client"][1]
    # pod-to-pod across nodes keeps the client's address (nothing masquerades it)
    assert rig.ask("other node", proto) == f"remote saw {client}"


@pytest.mark.timeout(120)
@pytest.mark.parametrize("proto", ["tcp", "udp"])
def test_a_pod_reaches_itself_through_its_cluster_ip(rig: Rig, proto: str) -> None:
    n1 = rig.nodes[0]
    blocks = rig.agents.blocks_of([n1])
    gateway = gateway_of(blocks[n1.name][0])
    # kube-proxy masquerades hairpin traffic: the pod sees its node's gateway on the bridge
    assert rig.ask("hairpin", proto) == f"client saw {gateway}"
    # the answer leaves through the very port it came in by: without the hairpin flag that the
    # CNI side sets on every pod port, the bridge drops it
    port = host_veth_name(rig.pods["client"][0].netns, "eth0")
    n1.run(["bridge", "link", "set", "dev", port, "hairpin", "off"])
    try:
        broken = rig.ask("hairpin", proto, timeout=1.5)
    finally:
        n1.run(["bridge", "link", "set", "dev", port, "hairpin", "on"])
    assert broken == "", broken
    assert rig.ask("hairpin", proto) == f"client saw {gateway}"

