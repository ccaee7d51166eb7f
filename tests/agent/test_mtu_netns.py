"""MTU that holds on real underlays: 1450 and 9000 bytes, over VXLAN and over WireGuard.

For each underlay MTU one sandbox of three agents, every link of it (hub bridge, ports, each
node's eth0) at that MTU, and one pod per node through the weavepy-cni plugin:

* n1 asks for encryption towards n3 (`--encrypt-peers n3`), so n1 <-> n3 is the WireGuard path
  (TUN MTU underlay - 80) and n1's pods get underlay - 80;
* n2 and n3 ask for nothing: their pods get underlay - 50, and n2 <-> n3, n2 <-> n1 are VXLAN.

Checked with real packets: the MTU each node's status shows (pod MTU, and per connection) is the
one that works: a ping with DF set and exactly that size crosses pod to pod, one byte more does
not; TCP transfers cross every path both ways, byte for byte; and where a pod's own MTU is
larger than the path's (n3's pods towards n1's over WireGuard, n2's towards n1's over VXLAN),
the oversized DF packet is answered with ICMP "fragmentation needed" carrying the path MTU, which
the pod's kernel caches (`ip route get`), instead of a silent drop.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import socket
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from ipaddress import IPv4Address, IPv4Network
from typing import Any

import pytest

from tests.conftest import require_binary, require_root
from weavepy.devtools.agentbox import AgentBox
from weavepy.devtools.sandbox import Sandbox, SandboxNode

pytestmark = [pytest.mark.netns, pytest.mark.slow]

SINK_PORT = 7031
TRANSFER_BYTES = 4 << 20
VXLAN_OVERHEAD = 50
WG_OVERHEAD = 80
IP_ICMP_HEADERS = 28

SINK_SERVER = r"""
import hashlib, socket, sys
tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
tcp.bind(("0.0.0.0", int(sys.argv[1])))
tcp.listen(16)
print("listening", flush=True)
while True:
    conn, _ = tcp.accept()
    with conn:
        conn.settimeout(20)
        digest, count = hashlib.sha256(), 0
        try:
            while chunk := conn.recv(1 << 16):
                digest.update(chunk)
                count += len(chunk)
            conn.sendall(f"{count} {digest.hexdigest()}".encode())
        except OSError:
            pass
"""


def send_and_digest(dst: str, port: int, size: int, seed: int) -> tuple[str, str]:
    """From inside a pod: send `size` seeded random bytes over TCP; (what the receiver counted
    and hashed, what was sent), or ("", sent) on failure."""
    payload = random.Random(seed).randbytes(size)
    sent = f"{size} {hashlib.sha256(payload).hexdigest()}"
    try:
        with socket.create_connection((dst, port), timeout=10) as conn:
            conn.settimeout(30)
            conn.sendall(payload)
            conn.shutdown(socket.SHUT_WR)
            answer = b""
            while chunk := conn.recv(4096):
                answer += chunk
        return answer.decode(), sent
    except OSError as exc:
        return f"error: {exc}", sent


@dataclass
class Rig:
    underlay_mtu: int
    agents: AgentBox
    pods: dict[str, tuple[SandboxNode, str]]  # node name -> (pod namespace handle, address)

    def status(self, node: str) -> dict[str, Any]:
        doc = self.agents.status(self.agents.box.node(node))
        assert doc is not None, f"no status from {node}"
        return doc

    def connection_mtu(self, src: str, dst: str) -> int:
        for conn in self.status(src)["connections"]:
            if conn["peer"] == dst:
                return int(conn["mtu"])
        raise AssertionError(f"{src} shows no connection to {dst}")

    def ping(self, src: str, dst: str, packet: int, count: int = 1) -> tuple[bool, str]:
        """A ping with DF set and IP packets of exactly `packet` bytes from src's pod to dst's."""
        pod, _ = self.pods[src]
        out = pod.run(["ping", "-M", "do", "-c", str(count), "-i", "0.2", "-W", "2", "-s",
                       str(packet - IP_ICMP_HEADERS), self.pods[dst][1]], check=False,
                      timeout=20)
        return out.returncode == 0, out.stdout + out.stderr

    def cached_mtu(self, src: str, dst: str) -> int | None:
        """The path MTU src's pod has learned towards dst's pod (its route cache)."""
        pod, _ = self.pods[src]
        out = pod.run(["ip", "-o", "route", "get", self.pods[dst][1]]).stdout
        found = re.search(r"\bmtu (\d+)", out)
        return int(found.group(1)) if found else None


def _wireguard_up(agents: AgentBox, node: SandboxNode, peer: str) -> bool:
    doc = agents.status(node)
    return any(c["peer"] == peer and c["path"] == "wireguard" and c["state"] == "established"
               for c in (doc or {}).get("connections", []))


def _listening(server: Any) -> bool:
    return "listening" in server.log_text()


@pytest.fixture(scope="module", params=[1450, 9000], ids=lambda mtu: f"underlay{mtu}")
def rig(request: pytest.FixtureRequest) -> Iterator[Rig]:
    require_root()
    require_binary("ping", "iputils-ping")
    underlay_mtu: int = request.param
    box = Sandbox.create(nodes=3, mtu=underlay_mtu)
    try:
        agents = AgentBox(box, pod_range=str(box.pod_range))
        n1, n2, n3 = box.nodes
        agents.launch(n1, extra=["--encrypt-peers", "n3"])
        agents.wait_api(n1)
        agents.launch(n2, [n1])
        agents.launch(n3, [n1])
        agents.wait_mesh(timeout=60)
        for node, peer in ((n1, "n3"), (n3, "n1")):
            agents.wait(f"the WireGuard connection of {node.name}",
                        partial(_wireguard_up, agents, node, peer), timeout=60)
        from weavepy.cni.install import install_cni

        plugin = install_cni(agents.root / "cni-bin", agents.root / "cni-conf").plugin
        pods: dict[str, tuple[SandboxNode, str]] = {}
        for node in box.nodes:
            pod = box.add_netns(f"pod{node.index}")
            pods[node.name] = (pod, agents.cni_add(node, plugin, pod.netns))
            server = node.start("sink", ["ip", "netns", "exec", pod.netns, sys.executable,
                                         "-c", SINK_SERVER, str(SINK_PORT)])
            agents.wait(f"the sink in {node.name}'s pod", partial(_listening, server), 15)
        yield Rig(underlay_mtu, agents, pods)
    finally:
        box.destroy()


def _pod_mtu(pod: SandboxNode) -> int:
    return int(json.loads(pod.run(["ip", "-j", "link", "show", "eth0"]).stdout)[0]["mtu"])


@pytest.mark.timeout(120)
def test_status_shows_the_mtu_of_each_node_and_path(rig: Rig) -> None:
    u = rig.underlay_mtu
    wanted = {"n1": u - WG_OVERHEAD, "n2": u - VXLAN_OVERHEAD, "n3": u - VXLAN_OVERHEAD}
    for name, mtu in wanted.items():
        doc = rig.status(name)
        assert doc["dataplane"]["underlay"]["mtu"] == u
        assert doc["dataplane"]["mtu"] == mtu
        assert _pod_mtu(rig.pods[name][0]) == mtu  # what the CNI side gave the pod
    paths = {(c["peer"], c["path"]) for c in rig.status("n3")["connections"]}
    assert paths == {("n1", "wireguard"), ("n2", "vxlan")}
    assert rig.status("n3")["dataplane"]["wireguard"]["mtu"] == u - WG_OVERHEAD
    # a connection's MTU is what crosses it: the smaller of this side's path and the peer's pods
    assert rig.connection_mtu("n2", "n3") == u - VXLAN_OVERHEAD
    for src, dst in (("n1", "n3"), ("n3", "n1"), ("n1", "n2"), ("n2", "n1")):
        assert rig.connection_mtu(src, dst) == u - WG_OVERHEAD, (src, dst)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("src, dst", [("n2", "n3"), ("n3", "n2"), ("n1", "n3"), ("n1", "n2")],
                         ids=["vxlan", "vxlan-back", "wireguard", "vxlan-from-encrypting"])
def test_full_size_df_packets_cross_and_one_byte_more_does_not(rig: Rig, src: str,
                                                                dst: str) -> None:
    mtu = rig.connection_mtu(src, dst)
    crossed, out = rig.ping(src, dst, mtu, count=3)
    assert crossed, f"a {mtu}-byte DF packet did not cross {src} -> {dst}:\n{out}"
    crossed, out = rig.ping(src, dst, mtu + 1)
    assert not crossed and f"mtu={mtu}" in out, out


@pytest.mark.timeout(120)
@pytest.mark.parametrize("src, dst, answered_by", [("n2", "n1", "n1"), ("n3", "n1", "n3")],
                         ids=["vxlan", "wireguard"])
def test_oversized_df_packets_get_fragmentation_needed_with_the_path_mtu(
        rig: Rig, src: str, dst: str, answered_by: str) -> None:
    """src's pods have underlay - 50, dst's underlay - 80: the first oversized DF packet is
    answered with ICMP "fragmentation needed" (by dst's node over VXLAN, where its bridge is
    smaller; by src's own node over WireGuard, whose kernel checks the TUN's MTU before the
    packet reaches the userspace path), and src's pod learns the MTU."""
    u = rig.underlay_mtu
    pod, _ = rig.pods[src]
    pod.run(["ip", "route", "flush", "cache"])
    assert rig.cached_mtu(src, dst) is None
    path_mtu = u - WG_OVERHEAD
    assert _pod_mtu(pod) == u - VXLAN_OVERHEAD > path_mtu
    crossed, out = rig.ping(src, dst, u - VXLAN_OVERHEAD, count=2)
    assert not crossed, out
    reported = {int(m) for m in re.findall(r"mtu ?= ?(\d+)", out)}
    assert reported == {path_mtu}, out
    senders = {IPv4Address(a) for a in re.findall(r"From (\S+) .*Frag needed", out)}
    blocks = [IPv4Network(b) for b in rig.agents.blocks_of([rig.agents.box.node(answered_by)])
              [answered_by]]
    assert senders and all(any(a in b for b in blocks) for a in senders), (
        f"the ICMP should come from {answered_by} ({blocks}):\n{out}")
    assert rig.cached_mtu(src, dst) == path_mtu, "the pod did not receive the ICMP"
    crossed, out = rig.ping(src, dst, path_mtu, count=2)
    assert crossed, out
    assert rig.connection_mtu(src, dst) == path_mtu  # what status shows is what works


@pytest.mark.timeout(180)
def test_tcp_transfers_cross_every_path_byte_for_byte(rig: Rig) -> None:
    for index, (src, dst) in enumerate((("n2", "n3"), ("n3", "n2"), ("n1", "n3"), ("n3", "n1"),
                                        ("n1", "n2"), ("n2", "n1"))):
        pod, _ = rig.pods[src]
        received, sent = pod.call(send_and_digest, rig.pods[dst][1], SINK_PORT, TRANSFER_BYTES,
                                  index, timeout=60)
        assert received == sent, f"{src} -> {dst}: {received}\n{rig.agents.logs_tail()}"
