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


def test_a_failed_peer_keeps_its_routes_while_it_owns_blocks_for_the_grace() -> None:
    """Routes follow block ownership: a failed peer (declared at t=1.0 by `view_of`) stays
    programmed with its last identity until its grace ends or its blocks are gone; a peer that
    left, or one without blocks, is dropped at once; grace 0 is the old rule."""
    view = view_of(("n2", identity(12), MemberEventKind.JOIN),
                   ("n4", identity(14), MemberEventKind.FAILED),
                   ("n5", identity(15), MemberEventKind.LEAVE),
                   ("n6", identity(16), MemberEventKind.FAILED))
    blocks = {"n1": [N("198.19.0.0/24")], "n2": [N("198.19.2.0/24")],
              "n4": [N("198.19.4.0/24")], "n5": [N("198.19.5.0/24")]}
    desired = desired_data_plane(view.peers(), blocks, "n1", identity(11), now=30.0, grace=60.0)
    assert [(p.name, p.underlay_ip, p.blocks) for p in desired.peers] == [
        ("n2", IPv4Address("198.18.0.12"), (N("198.19.2.0/24"),)),
        ("n4", IPv4Address("198.18.0.14"), (N("198.19.4.0/24"),))]
    assert desired.kept == {"n4": 61.0} and desired.next_expiry == 61.0
    assert desired.paths["n4"] == "vxlan"
    assert IPv4Address("198.18.0.14") in peer_node_addresses(desired)
    over = desired_data_plane(view.peers(), blocks, "n1", identity(11), now=61.0, grace=60.0)
    assert [p.name for p in over.peers] == ["n2"] and over.kept == {}
    assert over.next_expiry is None
    reclaimed = {k: v for k, v in blocks.items() if k != "n4"}
    gone = desired_data_plane(view.peers(), reclaimed, "n1", identity(11), now=30.0, grace=60.0)
    assert [p.name for p in gone.peers] == ["n2"] and gone.kept == {}
    off = desired_data_plane(view.peers(), blocks, "n1", identity(11), now=1.0, grace=0.0)
    assert [p.name for p in off.peers] == ["n2"]


def test_a_kept_peer_never_displaces_a_live_one() -> None:
    """A failed peer whose underlay address, VTEP MAC or block is now a live node's is not
    kept (it would have both rejected as duplicates, or route a newer owner's pods to it)."""
    same_ip = DataPlaneIdentity(IPv4Address("198.18.0.14"), "02:00:00:00:00:99", 1, 8472,
                                bytes(range(32)), frozenset({"vxlan"}), "c" * 32)
    same_mac = DataPlaneIdentity(IPv4Address("198.18.0.98"), "02:00:00:00:00:0f", 1, 8472,
                                 bytes(range(32)), frozenset({"vxlan"}), "c" * 32)
    view = view_of(("n3", identity(13), MemberEventKind.FAILED),
                   ("n4", identity(14), MemberEventKind.FAILED),
                   ("n5", identity(15), MemberEventKind.FAILED),
                   ("m4", same_ip, MemberEventKind.JOIN), ("m5", same_mac, MemberEventKind.JOIN),
                   ("m3", identity(23), MemberEventKind.JOIN))
    blocks = {"n3": [N("198.19.3.0/24")], "n4": [N("198.19.4.0/24")],
              "n5": [N("198.19.5.0/24")], "m3": [N("198.19.3.128/25")],
              "m4": [N("198.19.40.0/24")], "m5": [N("198.19.50.0/24")]}
    desired = desired_data_plane(view.peers(), blocks, "n1", identity(11), now=5.0, grace=60.0)
    assert sorted(p.name for p in desired.peers) == ["m3", "m4", "m5"]
    assert desired.kept == {}
    assert "underlay address 198.18.0.14" in desired.excluded["n4"]
    assert "VTEP MAC 02:00:00:00:00:0f" in desired.excluded["n5"]
    assert "overlaps" in desired.excluded["n3"]


def test_a_kept_peer_that_comes_back_is_programmed_from_its_new_tags() -> None:
    """Back with a new underlay address and VTEP MAC: the desired peer carries them, so the
    VXLAN plan replaces neighbour and FDB under the same route (tests/tunnel/test_vxlan_plan.py,
    the moved and rebooted peers); its WireGuard peer, kept as well, gets the new endpoint."""
    view = view_of(("n4", identity(14), MemberEventKind.FAILED))
    blocks = {"n4": [N("198.19.4.0/24")]}
    enc = DataPlaneIdentity(IPv4Address("198.18.0.11"), "02:00:00:00:00:0b", 1, 8472,
                            bytes(range(32)), frozenset({"vxlan", "wireguard"}), "c" * 32,
                            wg_port=51820, encrypt="*")
    peer_enc = DataPlaneIdentity(IPv4Address("198.18.0.14"), "02:00:00:00:00:0e", 1, 8472,
                                 bytes(range(1, 33)), frozenset({"vxlan", "wireguard"}),
                                 "c" * 32, wg_port=51820, encrypt="*")
    kept = desired_data_plane(view_of(("n4", peer_enc, MemberEventKind.FAILED)).peers(),
                              blocks, "n1", enc, now=10.0, grace=60.0)
    assert [(p.name, p.endpoint, p.allowed_ips) for p in kept.wg_peers] == [
        ("n4", ("198.18.0.14", 51820), (N("198.19.4.0/24"),))]
    assert kept.kept == {"n4": 61.0} and kept.paths == {"n4": "wireguard"}
    back = DataPlaneIdentity(IPv4Address("198.18.0.44"), "02:00:00:00:00:44", 1, 8472,
                             bytes(range(32)), frozenset({"vxlan"}), "c" * 32)
    view.apply(MemberEvent(MemberEventKind.ALIVE, "n4", socket.inet_aton("198.18.0.44"), 6783,
                           encode_tags_for(back), 3, 20.0))
    desired = desired_data_plane(view.peers(), blocks, "n1", identity(11), now=20.0,
                                 grace=60.0)
    assert [(p.name, p.underlay_ip, p.vtep_mac) for p in desired.peers] == [
        ("n4", IPv4Address("198.18.0.44"), "02:00:00:00:00:44")]
    assert desired.kept == {}
