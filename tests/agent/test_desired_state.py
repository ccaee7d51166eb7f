"""Pure parts of the control loop: desired data plane, start-up retention, join schedule,
and the host-route overlap rule."""

from __future__ import annotations

import random
import socket
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

from gossip.events import MemberEvent, MemberEventKind
from tests.agent.test_cluster_view import identity
from tunnel.vxlan import Peer
from weavepy.cluster import ClusterView, DataPlaneIdentity, encode_tags_for
from weavepy.hostnet import HostRoute, overlapping_routes
from weavepy.reconcile import (
    DesiredDataPlane,
    desired_data_plane,
    load_programmed,
    peer_node_addresses,
    save_programmed,
    with_retained,
)
from weavepy.targets import TargetSchedule, TargetState
from weavepy.wgpath import ExternalPeer, WgPeer

N = IPv4Network


def view_of(*members: tuple[str, DataPlaneIdentity, MemberEventKind]) -> ClusterView:
    view = ClusterView("n1")
    for name, ident, kind in members:
        meta = encode_tags_for(ident)
        view.apply(MemberEvent(MemberEventKind.JOIN, name, socket.inet_aton("198.18.0.2"), 6783,
                               meta, 1, 0.0))
        if kind is not MemberEventKind.JOIN:
            view.apply(MemberEvent(kind, name, b"\0\0\0\0", 6783, b"", 2, 1.0))
    return view


def test_desired_programs_live_peers_with_their_blocks_in_order() -> None:
    view = view_of(("n2", identity(12), MemberEventKind.JOIN),
                   ("n3", identity(13), MemberEventKind.SUSPECT),
                   ("n4", identity(14), MemberEventKind.FAILED))
    blocks = {"n1": [N("198.19.0.0/24")], "n2": [N("198.19.5.0/24"), N("198.19.1.0/24")],
              "n3": [N("198.19.2.0/24")], "n4": [N("198.19.3.0/24")]}
    desired = desired_data_plane(view.peers(), blocks, "n1", identity(11))
    assert [p.name for p in desired.peers] == ["n2", "n3"]
    assert desired.peers[0].blocks == (N("198.19.5.0/24"), N("198.19.1.0/24"))
    assert desired.local_blocks == (N("198.19.0.0/24"),)
    assert desired.paths == {"n2": "vxlan", "n3": "vxlan"}
    assert desired.excluded == {}


def test_desired_excludes_other_clusters_and_mismatched_vxlan() -> None:
    other_cluster = identity(12, cluster="d" * 32)
    other_port = DataPlaneIdentity(IPv4Address("198.18.0.13"), "02:00:00:00:00:13", 1, 4789,
                                   None, frozenset({"vxlan"}), "c" * 32)
    wg_only = DataPlaneIdentity(IPv4Address("198.18.0.14"), "02:00:00:00:00:14", 1, 8472,
                                bytes(32), frozenset({"wg"}), None)
    view = view_of(("n2", other_cluster, MemberEventKind.JOIN),
                   ("n3", other_port, MemberEventKind.JOIN),
                   ("n4", wg_only, MemberEventKind.JOIN))
    desired = desired_data_plane(view.peers(), {}, "n1", identity(11))
    assert desired.peers == ()
    assert "cluster" in desired.excluded["n2"]
    assert "4789" in desired.excluded["n3"]
    assert "no common data path" in desired.excluded["n4"]


def test_retention_keeps_unknown_peers_only_until_settled(tmp_path: Path) -> None:
    before = [Peer("n2", IPv4Address("198.18.0.12"), "02:00:00:00:00:12", (N("198.19.1.0/24"),)),
              Peer("n3", IPv4Address("198.18.0.13"), "02:00:00:00:00:13", (N("198.19.2.0/24"),))]
    save_programmed(tmp_path, before)
    assert load_programmed(tmp_path) == before
    view = view_of(("n3", identity(13), MemberEventKind.FAILED))
    desired = desired_data_plane(view.peers(), {"n3": [N("198.19.2.0/24")]}, "n1", identity(11))
    kept = with_retained(desired, load_programmed(tmp_path), {p.name for p in view.peers()})
    assert [p.name for p in kept.peers] == ["n2"]  # n3 is known dead: not retained
    (tmp_path / "vxlan-peers.json").write_text("{broken")
    assert load_programmed(tmp_path) == []


def test_join_schedule_backs_off_and_notices_live_members() -> None:
    schedule = TargetSchedule(random.Random(1), reconnect_interval=5.0)
    assert schedule.add(["198.18.0.11:6783"], 0.0) == ["198.18.0.11:6783"]
    assert schedule.due(0.0) == ["198.18.0.11:6783"]
    assert schedule.due(0.0) == []  # in flight
    schedule.attempted("198.18.0.11:6783", False, "refused", 0.0)
    delays = []
    now = 0.0
    for _ in range(8):
        now = schedule.next_retry()
        assert schedule.due(now) == ["198.18.0.11:6783"]
        schedule.attempted("198.18.0.11:6783", False, "refused", now)
        delays.append(schedule.next_retry() - now)
    assert delays[0] < delays[3] <= 30 * 1.2 and max(delays) <= 36
    schedule.observe({"198.18.0.11:6783"}, now)
    assert schedule.to_json()[0]["state"] == TargetState.CONNECTED.value
    schedule.observe(set(), now + 1)  # the member behind it is gone: try again at once
    assert schedule.due(now + 1) == ["198.18.0.11:6783"]
    assert schedule.remove(["198.18.0.11:6783", "x:1"]) == ["198.18.0.11:6783"]
    assert schedule.reconnect_due(100.0) and not schedule.reconnect_due(100.1)


def test_overlap_with_host_routes() -> None:
    cluster = N("198.19.0.0/16")
    routes = [HostRoute(N("0.0.0.0/0"), "eth0", "route"),
              HostRoute(N("198.18.0.0/24"), "eth0", "route"),
              HostRoute(N("198.19.1.0/24"), "weavepy.1", "route"),
              HostRoute(N("198.19.0.0/24"), "weavepy0", "address"),
              HostRoute(N("198.0.0.0/8"), "eth1", "route"),
              HostRoute(N("198.19.9.0/24"), "docker0", "address")]
    clashes = overlapping_routes(cluster, routes, ["weavepy.1", "weavepy0"])
    assert [(c.network, c.device) for c in clashes] == [(N("198.0.0.0/8"), "eth1"),
                                                        (N("198.19.9.0/24"), "docker0")]


def test_peer_nodes_for_the_host_rules_are_every_routed_node_and_external_endpoint() -> None:
    """The nodes pods reach as their node (docs/egress.md, reverse-path filtering): VXLAN and
    WireGuard peers by underlay address, external WireGuard hosts by endpoint, if known."""
    desired = DesiredDataPlane(
        peers=(Peer("n2", IPv4Address("198.18.0.12"), "02:00:00:00:00:12",
                    (N("198.19.1.0/24"),)),),
        local_blocks=(N("198.19.0.0/24"),),
        wg_peers=(WgPeer("n3", bytes(32), ("198.18.0.13", 51820), (N("198.19.2.0/24"),)),
                  ExternalPeer("laptop", bytes(32), (N("198.18.9.0/32"),),
                               ("198.18.0.50", 51820)).wg_peer(),
                  ExternalPeer("roaming", bytes(32), (N("198.18.9.1/32"),)).wg_peer()))
    assert peer_node_addresses(desired) == {
        IPv4Address("198.18.0.12"), IPv4Address("198.18.0.13"), IPv4Address("198.18.0.50")}
    assert peer_node_addresses(DesiredDataPlane((), ())) == frozenset()
