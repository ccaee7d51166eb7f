"""The encrypted path in a sandbox cluster: `launch --encrypt`, pods through the real
weavepy-cni plugin, and a capture on the underlay that never sees the pods' plaintext.

Two agents run with `--encrypt`; each gets one pod through `weavepy-cni` (CNI ADD against the
agent's socket). The pods talk TCP and UDP across nodes while the hub (the underlay switch)
captures every frame; a recognisable marker in the payload must reach the other pod and must
never appear on the wire, and the traffic must be WireGuard UDP to the announced port (no
VXLAN). The status says path wireguard, encrypted, MTU underlay - 80, established; the pod
veth has the fast path's gso_max_size.
"""

from __future__ import annotations

import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable
from functools import partial
from ipaddress import IPv4Network
from typing import Any

import pytest

from tests.agent.traffic import echo_server_argv, tcp_echo, udp_echo
from tests.conftest import require_binary
from tunnel.tun import FAST_PATH_GSO_MAX_SIZE
from weavepy.devtools.agentbox import AgentBox
from weavepy.devtools.sandbox import call_in_netns

pytestmark = [pytest.mark.netns, pytest.mark.slow]

ECHO_PORT = 7011
WG_PORT = 51820
MARKER = b"WEAVEPY-PLAINTEXT-MARKER-7f3a9c"


def capture_underlay(seconds: float, limit: int = 20000) -> dict[str, Any]:
    """AF_PACKET capture of every frame on every hub port for `seconds` (run in the hub):
    how many frames carried MARKER, and the UDP destination ports seen."""
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.ntohs(0x0003))
    sock.settimeout(0.2)
    frames = marked = 0
    ports: dict[int, int] = {}
    deadline = time.monotonic() + seconds
    try:
        while time.monotonic() < deadline and frames < limit:
            try:
                data = sock.recv(65535)
            except TimeoutError:
                continue
            frames += 1
            if MARKER in data:
                marked += 1
            if len(data) >= 14 + 20 + 8 and data[12:14] == b"\x08\x00" and data[23] == 17:
                ihl = (data[14] & 0x0F) * 4
                port = struct.unpack("!H", data[14 + ihl + 2:14 + ihl + 4])[0]
                ports[port] = ports.get(port, 0) + 1
    finally:
        sock.close()
    return {"frames": frames, "marked": marked, "udp_ports": ports}


def _pod_traffic(src: str, dst: str) -> tuple[bytes, bytes]:
    payload = MARKER * 40  # 1240 bytes: one full-size segment, well under the echo's 2048
    return (tcp_echo(src, dst, ECHO_PORT, payload, timeout=5.0),
            udp_echo(src, dst, ECHO_PORT, MARKER, tries=5))


def _gso_max_size(ifname: str) -> int:
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        link = ipr.get_links(ipr.link_lookup(ifname=ifname)[0])[0]
        return int(link.get_attr("IFLA_GSO_MAX_SIZE"))


def _connections_established(rig: AgentBox, node: Any) -> list[dict[str, Any]] | None:
    doc = rig.status(node)
    if not doc:
        return None
    conns = doc["connections"]
    if conns and all(c["state"] == "established" and c["path"] == "wireguard" for c in conns):
        return list(conns)
    return None


@pytest.mark.timeout(180)
def test_encrypted_cluster_pods_talk_and_the_underlay_never_sees_plaintext(
        agent_box: Callable[..., AgentBox]) -> None:
    require_binary("ip", "iproute2")
    rig = agent_box(nodes=2, extra_args=["--encrypt"])
    box = rig.box
    rig.launch_all()
    first, second = box.nodes
    for node in box.nodes:
        conns = rig.wait(f"an established WireGuard connection on {node.name}",
                         partial(_connections_established, rig, node), timeout=60)
        assert conns[0]["encrypted"] is True
        assert conns[0]["mtu"] == 1500 - 80 and conns[0]["reason"] is None
    doc = rig.status(first)
    assert doc is not None
    assert doc["dataplane"]["wireguard"]["running"] is True
    assert doc["dataplane"]["mtu"] == 1500 - 80  # pods get the WireGuard MTU
    peer_tags = doc["peers"][0]["tags"]
    assert peer_tags["wg"] and peer_tags["wgp"] == str(WG_PORT)
    assert {"wireguard", "wgx"} <= set(peer_tags["caps"].split(","))
    assert peer_tags["enc"] == "*"

    from weavepy.cni.install import install_cni

    installed = install_cni(rig.root / "cni-bin", rig.root / "cni-conf")
    pods: list[tuple[str, str]] = []
    for node in box.nodes:
        netns = f"{box.prefix}-pod{node.index}"
        subprocess.run(["ip", "netns", "add", netns], check=True, timeout=10)
        pods.append((netns, rig.cni_add(node, installed.plugin, netns)))
    (pod1, ip1), (pod2, ip2) = pods
    assert call_in_netns(pod1, _gso_max_size, "eth0") == FAST_PATH_GSO_MAX_SIZE
    box.nodes[1].start("pod-echo", ["ip", "netns", "exec", pod2,
                                    *echo_server_argv("0.0.0.0", ECHO_PORT)])

    captured: dict[str, Any] = {}

    def capture() -> None:
        captured.update(call_in_netns(box.hub_netns, capture_underlay, 8.0, timeout=30))

    capturer = threading.Thread(target=capture)
    capturer.start()
    time.sleep(1.0)  # the capture socket is open
    answers: tuple[bytes, bytes] = (b"", b"")
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        answers = call_in_netns(pod1, _pod_traffic, ip1, ip2, timeout=30)
        if all(answers):
            break
        time.sleep(0.3)
    capturer.join(timeout=40)
    assert answers[0] == b"tcp:" + MARKER * 40, f"TCP pod to pod failed: {answers}\n" \
        f"{rig.logs_tail()}"
    assert answers[1] == b"udp:" + MARKER
    assert captured["frames"] > 0
    assert captured["marked"] == 0, "the pods' plaintext appeared on the underlay"
    assert captured["udp_ports"].get(WG_PORT, 0) > 0, captured
    assert 8472 not in captured["udp_ports"], "pod traffic went over VXLAN"
    # the connection stays encrypted and established on both sides
    assert rig.status(second) is not None
    assert _connections_established(rig, second)


def _paths(rig: AgentBox, node: Any) -> dict[str, tuple[str, str]] | None:
    doc = rig.status(node)
    if not doc or len(doc["connections"]) < 2:
        return None
    conns = {c["peer"]: (c["path"], c["state"]) for c in doc["connections"]}
    return conns if all(state == "established" for _, state in conns.values()) else None


def _gateway_ping(gateway: str, target: str) -> bool:
    return subprocess.run(["ping", "-c", "2", "-i", "0.2", "-W", "2", "-I", gateway, target],
                          capture_output=True, timeout=15, check=False).returncode == 0


@pytest.mark.timeout(150)
def test_per_peer_selection_is_symmetric_and_vxlan_stays_the_default(
        agent_box: Callable[..., AgentBox]) -> None:
    require_binary("ping", "iputils-ping")
    rig = agent_box(nodes=3)
    n1, n2, n3 = rig.box.nodes
    rig.launch(n1, extra=["--encrypt-peers", "n2"])
    rig.wait_api(n1)
    rig.launch(n2, [n1])
    rig.launch(n3, [n1])
    expected = {
        "n1": {"n2": ("wireguard", "established"), "n3": ("vxlan", "established")},
        "n2": {"n1": ("wireguard", "established"), "n3": ("vxlan", "established")},
        "n3": {"n1": ("vxlan", "established"), "n2": ("vxlan", "established")},
    }
    for node in rig.box.nodes:
        got = rig.wait(f"established connections on {node.name}",
                       partial(lambda n: _paths(rig, n) == expected[n.name] or None, node),
                       timeout=60)
        assert got
    blocks = rig.blocks_of(rig.box.nodes)
    gateways = {name: str(IPv4Network(owned[0]).network_address + 1)
                for name, owned in blocks.items()}
    for src in rig.box.nodes:
        for dst, gateway in gateways.items():
            if dst != src.name:
                assert src.call(_gateway_ping, gateways[src.name], gateway, timeout=20), (
                    f"{src.name} -> {dst}\n{rig.logs_tail()}")
    doc = rig.status(n3)
    assert doc is not None and doc["dataplane"]["wireguard"]["running"] is False
    assert doc["dataplane"]["mtu"] == 1500 - 50  # no encryption asked: the VXLAN MTU


def _connection_to(rig: AgentBox, node: Any, peer: str, state: str) -> dict[str, Any] | None:
    doc = rig.status(node)
    for conn in (doc or {}).get("connections", []):
        if conn["peer"] == peer and conn["state"] == state:
            return dict(conn)
    return None


@pytest.mark.timeout(150)
def test_an_unanswered_handshake_shows_failed_and_the_retry_recovers(
        agent_box: Callable[..., AgentBox]) -> None:
    require_binary("nft", "nftables")
    rig = agent_box(nodes=2, extra_args=["--encrypt"])
    n1, n2 = rig.box.nodes
    # n2 drops all WireGuard packets from the start (gossip still flows)
    n2.run(["nft", "-f", "-"], check=True, input=(
        "table inet wgblock {\n chain input {\n  type filter hook input priority 0;\n"
        f"  udp dport {WG_PORT} drop\n }}\n}}\n"))
    rig.launch_all()
    failed = rig.wait("n1 to report the connection to n2 as failed",
                      partial(_connection_to, rig, n1, "n2", "failed"), timeout=60)
    assert failed["path"] == "wireguard" and failed["encrypted"]
    assert f"no handshake answer from {n2.underlay_ip}:{WG_PORT}" in failed["reason"]
    assert "retrying every 10 s" in failed["reason"]
    n2.run(["nft", "delete", "table", "inet", "wgblock"], check=True)
    established = rig.wait("the retried handshake to succeed",
                           partial(_connection_to, rig, n1, "n2", "established"), timeout=40)
    assert established["reason"] is None
