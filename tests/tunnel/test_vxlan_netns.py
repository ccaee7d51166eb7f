"""tunnel.vxlan against the real kernel, inside sandbox namespaces, with real packets.

Every node gets a "pod" bridge with gateway 198.19.<i>.1/24 (the agent will do this later) and
is reconciled with the others as peers. Sockets for traffic and captures are opened inside the
sandbox namespaces (pyroute2 enters the namespace in a short-lived child and hands the socket
back), so this process never sends a packet in the machine's own namespace.
"""

from __future__ import annotations

import functools
import socket
import struct
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, replace
from ipaddress import IPv4Address, IPv4Network
from typing import Any

import pytest
import trio
from pyroute2 import netns as pyroute2_netns

from tunnel.netlink import (
    RTMGRP_IPV4_IFADDR,
    RTMGRP_IPV4_ROUTE,
    RTMGRP_LINK,
    RTMGRP_NEIGH,
    RtnlEvent,
    open_monitor_socket,
    parse_events,
)
from tunnel.vxlan import DeviceEvent, Peer, ReconcileReport, VxlanBackend, VxlanConfig, watch_device

pytestmark = [pytest.mark.netns, pytest.mark.timeout(120)]

ECHO_PORT = 7007
ALL_GROUPS = RTMGRP_LINK | RTMGRP_NEIGH | RTMGRP_IPV4_ROUTE | RTMGRP_IPV4_IFADDR
ETH_P_ALL = 0x0003


def vtep_mac(index: int) -> str:
    return f"02:77:00:00:00:{index:02x}"


def block(index: int) -> IPv4Network:
    return IPv4Network(f"198.19.{index}.0/24")


def gateway(index: int) -> str:
    return f"198.19.{index}.1"


@dataclass
class Cluster:
    box: Any
    backends: list[VxlanBackend]
    device: str
    bridge: str

    def peer(self, index: int) -> Peer:
        node = self.box.nodes[index - 1]
        return Peer(node.name, IPv4Address(node.underlay_ip), vtep_mac(index), [block(index)])

    def peers_of(self, index: int) -> list[Peer]:
        return [self.peer(n.index) for n in self.box.nodes if n.index != index]

    def reconcile(self, index: int, peers: list[Peer] | None = None) -> ReconcileReport:
        backend = self.backends[index - 1]
        return backend.reconcile(self.peers_of(index) if peers is None else peers, [block(index)])

    def reconcile_all(self) -> list[ReconcileReport]:
        return [self.reconcile(n.index) for n in self.box.nodes]

    def node(self, index: int) -> Any:
        return self.box.nodes[index - 1]


def make_cluster(sandbox_factory: Any, nodes: int, *, vni: int = 1, port: int = 8472) -> Cluster:
    box = sandbox_factory(nodes=nodes)
    device, bridge = f"{box.prefix}.vx", f"{box.prefix}-pod"
    backends = []
    for node in box.nodes:
        node.run(["ip", "link", "add", bridge, "type", "bridge"])
        node.run(["ip", "addr", "add", f"{gateway(node.index)}/24", "dev", bridge])
        node.run(["ip", "link", "set", bridge, "up"])
        config = VxlanConfig(
            vtep_mac=vtep_mac(node.index),
            local_ip=IPv4Address(node.underlay_ip),
            underlay_iface=node.iface,
            device=device,
            vni=vni,
            port=port,
            pod_range=IPv4Network("198.19.0.0/16"),
        )
        backends.append(VxlanBackend(config, netns=node.netns))
    return Cluster(box, backends, device, bridge)


# ---------------------------------------------------------------------------------------------
# traffic and observation helpers


def socket_in(netns: str, family: int, kind: int, proto: int = 0) -> socket.socket:
    sock: socket.socket = pyroute2_netns.create_socket(netns, family, kind, proto, flags=0)
    return sock


@contextmanager
def echo_servers(cluster: Cluster, seconds: float = 30) -> Iterator[None]:
    """A TCP and a UDP echo server on each node's bridge gateway, for at most `seconds`."""
    stop = threading.Event()
    sockets: list[socket.socket] = []
    threads = []
    for node in cluster.box.nodes:
        tcp = socket_in(node.netns, socket.AF_INET, socket.SOCK_STREAM)
        tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        tcp.bind((gateway(node.index), ECHO_PORT))
        tcp.listen(16)
        udp = socket_in(node.netns, socket.AF_INET, socket.SOCK_DGRAM)
        udp.bind((gateway(node.index), ECHO_PORT))
        for sock in (tcp, udp):
            sock.settimeout(0.2)
        sockets += [tcp, udp]
        threads += [
            threading.Thread(target=_serve_tcp, args=(tcp, stop), daemon=True),
            threading.Thread(target=_serve_udp, args=(udp, stop), daemon=True),
        ]
    deadline = threading.Timer(seconds, stop.set)
    deadline.start()
    for thread in threads:
        thread.start()
    try:
        yield
    finally:
        stop.set()
        deadline.cancel()
        for thread in threads:
            thread.join(timeout=5)
        for sock in sockets:
            sock.close()


def _serve_tcp(listener: socket.socket, stop: threading.Event) -> None:
    while not stop.is_set():
        try:
            conn, _ = listener.accept()
        except TimeoutError:
            continue
        with conn:
            conn.settimeout(2)
            with suppress(OSError):
                conn.sendall(b"echo:" + conn.recv(256))


def _serve_udp(sock: socket.socket, stop: threading.Event) -> None:
    while not stop.is_set():
        try:
            data, peer = sock.recvfrom(256)
        except TimeoutError:
            continue
        sock.sendto(b"echo:" + data, peer)


def tcp_echo(netns: str, address: str, message: bytes) -> bytes:
    with socket_in(netns, socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        sock.connect((address, ECHO_PORT))
        sock.sendall(message)
        return sock.recv(256)


def udp_echo(netns: str, address: str, message: bytes, attempts: int = 3) -> bytes:
    with socket_in(netns, socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(1)
        for _ in range(attempts):
            sock.sendto(message, (address, ECHO_PORT))
            try:
                return sock.recv(256)
            except TimeoutError:
                continue
    return b""


@dataclass(frozen=True)
class Captured:
    outer_src: str
    outer_dst: str
    udp_dport: int
    vni: int | None
    inner_src: str | None
    inner_dst: str | None
    inner_proto: int | None


def parse_frame(frame: bytes) -> Captured | None:
    """Ethernet/IPv4/UDP, and VXLAN inside it when the UDP payload has the I flag."""
    if len(frame) < 42 or frame[12:14] != b"\x08\x00":
        return None
    ihl = (frame[14] & 0x0F) * 4
    if frame[23] != 17:
        return None
    outer_src, outer_dst = socket.inet_ntoa(frame[26:30]), socket.inet_ntoa(frame[30:34])
    udp = 14 + ihl
    (dport,) = struct.unpack_from("!H", frame, udp + 2)
    vxlan = udp + 8
    if len(frame) < vxlan + 8 + 14 + 20 or not frame[vxlan] & 0x08:
        return Captured(outer_src, outer_dst, dport, None, None, None, None)
    vni = int.from_bytes(frame[vxlan + 4 : vxlan + 7], "big")
    inner = vxlan + 8 + 14
    if frame[vxlan + 8 + 12 : vxlan + 8 + 14] != b"\x08\x00":
        return Captured(outer_src, outer_dst, dport, vni, None, None, None)
    return Captured(
        outer_src,
        outer_dst,
        dport,
        vni,
        socket.inet_ntoa(frame[inner + 12 : inner + 16]),
        socket.inet_ntoa(frame[inner + 16 : inner + 20]),
        frame[inner + 9],
    )


@contextmanager
def capture(netns: str, ifname: str) -> Iterator[list[bytes]]:
    """Frames seen on `ifname` in `netns` while the block runs (at most 2000, bounded)."""
    sock = socket_in(netns, socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    frames: list[bytes] = []
    try:
        sock.bind((ifname, ETH_P_ALL))
        sock.setblocking(False)
        yield frames
        time.sleep(0.2)
        while len(frames) < 2000:
            try:
                frames.append(sock.recv(65535))
            except BlockingIOError:
                break
    finally:
        sock.close()


@contextmanager
def netlink_events(netns: str) -> Iterator[list[RtnlEvent]]:
    """rtnetlink notifications in `netns` caused while the block runs, in kernel order."""
    sock = open_monitor_socket(ALL_GROUPS, netns)
    events: list[RtnlEvent] = []
    try:
        yield events
        time.sleep(0.1)
        while True:
            try:
                events.extend(parse_events(sock.recv(1 << 16)))
            except BlockingIOError:
                break
    finally:
        sock.close()


def device_index(node: Any, device: str) -> int:
    return int(node.run(["cat", f"/sys/class/net/{device}/ifindex"]).stdout)


def routes_on(node: Any, device: str) -> str:
    return str(node.run(["ip", "-d", "route", "show", "dev", device]).stdout)


def entries(node: Any, device: str) -> tuple[list[str], list[str], list[str]]:
    """Routes, neighbours and FDB entries on `device`, one sorted list of lines each."""
    routes = routes_on(node, device)
    neigh = node.run(["ip", "neigh", "show", "dev", device]).stdout
    fdb = node.run(["bridge", "fdb", "show", "dev", device]).stdout
    return sorted(routes.splitlines()), sorted(neigh.splitlines()), sorted(fdb.splitlines())


# ---------------------------------------------------------------------------------------------
# tests


def test_three_nodes_reach_each_others_bridges_over_vxlan(sandbox_factory: Any) -> None:
    vni, port = 4242, 8479  # not the defaults, to prove both are honoured on the wire
    cluster = make_cluster(sandbox_factory, 3, vni=vni, port=port)
    for report in cluster.reconcile_all():
        assert report.ok and report.programmed_peers == 2, report
        assert report.counts()["add_route"] == 2 and report.mtu == 1450
    node1 = cluster.node(1)
    link = node1.run(["ip", "-d", "link", "show", cluster.device]).stdout
    assert f"vxlan id {vni} local {node1.underlay_ip} dev eth0" in link
    assert f"dstport {port} nolearning" in link and "mtu 1450" in link

    hub_port = f"{cluster.box.prefix}-v1"
    with echo_servers(cluster), capture(cluster.box.hub_netns, hub_port) as frames:
        for src in cluster.box.nodes:
            for dst in cluster.box.nodes:
                if src is dst:
                    continue
                message = f"{src.name}->{dst.name}".encode()
                assert tcp_echo(src.netns, gateway(dst.index), message) == b"echo:" + message
                assert udp_echo(src.netns, gateway(dst.index), message) == b"echo:" + message

    seen = [c for c in map(parse_frame, frames) if c is not None]
    tunnelled = [c for c in seen if c.udp_dport == port]
    assert tunnelled, f"no UDP/{port} frames among {len(frames)} captured"
    assert {c.vni for c in tunnelled} == {vni}
    inner = {(c.inner_src, c.inner_dst, c.inner_proto) for c in tunnelled}
    for other in (2, 3):
        for proto in (6, 17):  # TCP and UDP, both directions
            assert ("198.19.1.0", gateway(other), proto) in inner
            assert (gateway(other), "198.19.1.0", proto) in inner
    bare = [c for c in seen if c.vni is None and c.outer_dst.startswith("198.19.")]
    assert not bare, "pod traffic crossed the underlay without encapsulation"


def test_second_reconcile_and_agent_restart_change_nothing(sandbox_factory: Any) -> None:
    cluster = make_cluster(sandbox_factory, 3)
    cluster.reconcile_all()
    node1 = cluster.node(1)
    before = entries(node1, cluster.device)
    with netlink_events(node1.netns) as events:
        again = cluster.reconcile(1)
        restarted = VxlanBackend(cluster.backends[0].config, netns=node1.netns)
        after_restart = restarted.reconcile(cluster.peers_of(1), [block(1)])
    assert not again.changed and again.ok, again.summary()
    assert not after_restart.changed and after_restart.ok, after_restart.summary()
    # Anything on our device or any route counts; ARP state changes on the underlay do not.
    index = device_index(node1, cluster.device)
    touched = [e for e in events if e.ifindex == index or e.kind in {"route", "link", "addr"}]
    assert touched == [], f"a no-op reconcile touched the kernel: {touched}"
    assert entries(node1, cluster.device) == before


def test_deleted_device_is_recreated_with_all_entries(sandbox_factory: Any) -> None:
    cluster = make_cluster(sandbox_factory, 3)
    cluster.reconcile_all()
    node1 = cluster.node(1)
    before = entries(node1, cluster.device)
    node1.run(["ip", "link", "del", cluster.device])
    report = cluster.reconcile(1)
    assert report.ok
    counts = report.counts()
    assert counts["create_device"] == 1 and counts["add_route"] == 2
    assert counts["set_neighbour"] == 2 and counts["set_fdb"] == 2
    assert entries(node1, cluster.device) == before
    with echo_servers(cluster):
        assert udp_echo(node1.netns, gateway(2), b"back") == b"echo:back"


def test_remove_takes_the_device_and_every_entry_away(sandbox_factory: Any) -> None:
    cluster = make_cluster(sandbox_factory, 2)
    cluster.reconcile_all()
    node1 = cluster.node(1)
    removed = cluster.backends[0].remove()
    assert [str(c) for c in removed.changes] == [
        f"delete device {cluster.device}: removed on request"
    ]
    assert cluster.device not in node1.run(["ip", "link"]).stdout
    assert "198.19.2.0" not in node1.run(["ip", "route"]).stdout
    assert not cluster.backends[0].remove().changed


def test_missing_underlay_is_a_device_error_not_an_exception(sandbox_factory: Any) -> None:
    cluster = make_cluster(sandbox_factory, 2)
    config = cluster.backends[0].config
    lost = VxlanBackend(replace(config, underlay_iface="nosuch0"), netns=cluster.node(1).netns)
    report = lost.reconcile(cluster.peers_of(1), [block(1)])
    assert report.device_error == "underlay interface nosuch0 not found"
    assert not report.ok and report.programmed_peers == 0 and not report.changed
    gone = VxlanBackend(config, netns=f"{cluster.box.prefix}-nosuchns")
    assert "cannot open netlink" in (gone.reconcile([], [block(1)]).device_error or "")


@pytest.mark.parametrize(
    "wrong",
    [
        ["id", "99", "dstport", "8472"],
        ["id", "1", "dstport", "4789"],
        ["id", "1", "dstport", "8472", "learning"],
    ],
)
def test_device_with_wrong_parameters_is_recreated(sandbox_factory: Any, wrong: list[str]) -> None:
    cluster = make_cluster(sandbox_factory, 2)
    node1 = cluster.node(1)
    node1.run(
        [
            "ip",
            "link",
            "add",
            cluster.device,
            "type",
            "vxlan",
            *wrong,
            "local",
            node1.underlay_ip,
            "dev",
            "eth0",
        ]
    )
    report = cluster.reconcile(1)
    assert report.ok, report.summary()
    assert report.counts()["delete_device"] == 1 and report.counts()["create_device"] == 1
    link = node1.run(["ip", "-d", "link", "show", cluster.device]).stdout
    assert "vxlan id 1 " in link and "dstport 8472 nolearning" in link
    assert not cluster.reconcile(1).changed


def test_removed_peer_loses_route_first_then_neighbour_and_fdb(sandbox_factory: Any) -> None:
    cluster = make_cluster(sandbox_factory, 3)
    cluster.reconcile_all()
    node1 = cluster.node(1)
    with netlink_events(node1.netns) as events:
        report = cluster.reconcile(1, [cluster.peer(2)])
    assert report.ok and [str(c) for c in report.changes] == [
        "delete route 198.19.3.0/24: via 198.19.3.0",
        f"delete neighbour 198.19.3.0: {vtep_mac(3)}",
        f"delete fdb {vtep_mac(3)}: dst {cluster.node(3).underlay_ip}",
    ]
    index = device_index(node1, cluster.device)
    deletions = [(e.kind, e.key) for e in events if e.action == "del" and e.ifindex == index]
    assert deletions == [
        ("route", "198.19.3.0/24"),
        ("neigh", "198.19.3.0"),
        ("fdb", vtep_mac(3)),
    ], events
    routes, neigh, fdb = map("\n".join, entries(node1, cluster.device))
    assert "198.19.3.0" not in routes + neigh and vtep_mac(3) not in fdb
    assert "198.19.2.0/24 via 198.19.2.0" in routes and vtep_mac(2) in fdb


def test_bad_peers_are_reported_and_skipped_others_programmed(sandbox_factory: Any) -> None:
    cluster = make_cluster(sandbox_factory, 3)
    node1 = cluster.node(1)
    # a foreign route that collides with one peer's block, on the underlay interface
    node1.run(["ip", "route", "add", "198.19.7.0/24", "via", "198.18.0.99", "dev", "eth0"])
    node1.run(["ip", "route", "add", "198.19.8.0/24", "via", "198.18.0.99", "dev", "eth0"])
    bad_mac = Peer("bad-mac", IPv4Address("198.18.0.50"), "02:77:00:00:00", [block(5)])
    overlapping = Peer(
        "overlap", IPv4Address("198.18.0.51"), "02:77:00:00:00:33", [IPv4Network("198.19.2.128/25")]
    )
    collides = Peer("collides", IPv4Address("198.18.0.52"), "02:77:00:00:00:34", [block(7)])
    peers = [bad_mac, cluster.peer(2), overlapping, cluster.peer(3), collides]
    report = cluster.reconcile(1, peers)
    assert {(p.peer, p.reason) for p in report.rejected} == {
        ("bad-mac", "invalid-mac"),
        ("overlap", "overlapping-block"),
        ("n2", "overlapping-block"),
    }
    assert [(p.peer, p.reason) for p in report.errors] == [("collides", "foreign-route")]
    assert report.programmed_peers == 1  # n3 only; n2 is caught in the overlap
    foreign = node1.run(["ip", "route", "show", "dev", "eth0"]).stdout
    assert "198.19.7.0/24 via 198.18.0.99" in foreign and "198.19.8.0/24 via 198.18.0.99" in foreign
    routes = routes_on(node1, cluster.device)
    assert "198.19.3.0/24 via 198.19.3.0" in routes and "198.19.2." not in routes
    # the good peer works; fixing the input programs the rest
    fixed = cluster.reconcile(1)
    assert fixed.ok and "198.19.2.0/24 via 198.19.2.0" in routes_on(node1, cluster.device)
    cluster.reconcile(3)
    with echo_servers(cluster):
        assert tcp_echo(node1.netns, gateway(3), b"ok") == b"echo:ok"


def test_hundreds_of_peers_converge_and_stay_quiet(sandbox_factory: Any) -> None:
    cluster = make_cluster(sandbox_factory, 1)
    peers = [
        Peer(
            f"p{i}",
            IPv4Address(f"198.18.{1 + i // 200}.{1 + i % 200}"),
            f"02:55:00:00:{i >> 8:02x}:{i & 255:02x}",
            [IPv4Network(f"198.19.{16 + i // 4}.{(i % 4) * 64}/26")],
        )
        for i in range(300)
    ]
    first = cluster.reconcile(1, peers)
    assert first.ok and first.programmed_peers == 300 and first.counts()["add_route"] == 300
    second = cluster.reconcile(1, peers)
    assert not second.changed
    third = cluster.reconcile(1, peers[:150])
    assert third.counts()["delete_route"] == 150 and third.counts()["delete_fdb"] == 150


@pytest.mark.timeout(60)
async def test_watcher_reports_device_down_and_deletion(sandbox_factory: Any) -> None:
    cluster = make_cluster(sandbox_factory, 2)
    node1 = cluster.node(1)
    await cluster.backends[0].areconcile(cluster.peers_of(1), [block(1)])
    send, receive = trio.open_memory_channel[DeviceEvent](16)
    async with trio.open_nursery() as nursery:
        await nursery.start(
            functools.partial(watch_device, cluster.device, send, netns=node1.netns)
        )
        node1.run(["ip", "link", "set", cluster.device, "down"])
        with trio.fail_after(5):
            assert (await receive.receive()).reason == "down"
        node1.run(["ip", "link", "del", cluster.device])
        with trio.fail_after(5):
            while (await receive.receive()).reason != "deleted":
                pass
        report = await cluster.backends[0].areconcile(cluster.peers_of(1), [block(1)])
        assert report.counts()["create_device"] == 1 and report.ok
        nursery.cancel_scope.cancel()
