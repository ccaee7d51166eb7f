"""The cluster view: tags in memberlist meta, decoded safely, and member events -> live peers."""

from __future__ import annotations

import socket
from ipaddress import IPv4Address

import pytest

from gossip.config import META_MAX_SIZE
from gossip.events import Member, MemberEvent, MemberEventKind, MemberState
from gossip.tags import decode_tags, encode_tags
from weavepy.cluster import (
    ClusterView,
    DataPlaneIdentity,
    PeerState,
    TagProblem,
    decode_identity,
    encode_tags_for,
)


def identity(octet: int = 12, cluster: str | None = "c" * 32) -> DataPlaneIdentity:
    return DataPlaneIdentity(IPv4Address(f"198.18.0.{octet}"), f"02:00:00:00:00:{octet:02x}",
                             1, 8472, bytes(range(32)), frozenset({"vxlan", "wg"}), cluster)


def event(kind: MemberEventKind, name: str, meta: bytes = b"", t: float = 1.0,
          incarnation: int = 1) -> MemberEvent:
    return MemberEvent(kind, name, socket.inet_aton("198.18.0.12"), 6783, meta, incarnation, t)


def test_tags_round_trip_and_fit_in_memberlist_meta() -> None:
    ident = identity()
    meta = encode_tags_for(ident)
    assert len(meta) <= META_MAX_SIZE
    assert decode_identity(decode_tags(meta)) == ident
    assert decode_tags(meta)["role"] == "weavepy"  # what `serf members` shows
    worst = DataPlaneIdentity(IPv4Address("255.255.255.254"), "02:ff:ff:ff:ff:ff", 16777215,
                              65535, bytes(32), frozenset({"vxlan", "wg"}), "f" * 64,
                              mtu=65535)
    assert len(encode_tags_for(worst)) < META_MAX_SIZE // 2
    with_ipam = {**worst.to_tags(), "ipam": "f" * 64 + "/" + "9" * 19}  # the agent adds it
    assert len(encode_tags(with_ipam)) < META_MAX_SIZE - 150  # room for later data paths
    assert decode_identity(decode_tags(encode_tags(with_ipam))) == worst


@pytest.mark.parametrize(("change", "reason"), [
    ({"role": "serf"}, "not-weavepy"),
    ({"wpv": "2"}, "bad-version"),
    ({"ip": "not-an-ip"}, "bad-underlay-ip"),
    ({"ip": "0.0.0.0"}, "bad-underlay-ip"),
    ({"ip": "fd00::1"}, "bad-underlay-ip"),
    ({"mac": "01:00:00:00:00:01"}, "bad-mac"),
    ({"mac": "zz"}, "bad-mac"),
    ({"vx": "1"}, "bad-vxlan"),
    ({"vx": "99999999:8472"}, "bad-vxlan"),
    ({"wg": "!!!"}, "bad-wg-key"),
    ({"wg": "AAAA"}, "bad-wg-key"),
    ({"mtu": "1400.5"}, "bad-mtu"),
    ({"mtu": "67"}, "bad-mtu"),
    ({"mtu": "65536"}, "bad-mtu"),
])
def test_bad_tags_become_problems(change: dict[str, str], reason: str) -> None:
    tags = {**identity().to_tags(), **change}
    problem = decode_identity(tags)
    assert isinstance(problem, TagProblem) and problem.reason == reason


def test_view_follows_member_events() -> None:
    view = ClusterView("n1")
    meta = encode_tags_for(identity())
    assert not view.apply(event(MemberEventKind.JOIN, "n1", meta))  # ourselves: ignored
    assert view.apply(event(MemberEventKind.JOIN, "n2", meta, 1.0))
    assert [p.name for p in view.live_peers()] == ["n2"]
    assert not view.apply(event(MemberEventKind.SUSPECT, "n2", b"", 2.0))  # still live
    peer = view.get("n2")
    assert peer is not None and peer.identity == identity() and peer.since == 2.0
    assert not view.apply(event(MemberEventKind.ALIVE, "n2", meta, 3.0, 2))
    assert view.apply(event(MemberEventKind.FAILED, "n2", b"", 4.0))
    assert view.live_peers() == []
    assert view.get("n2").identity == identity()  # type: ignore[union-attr]
    assert view.apply(event(MemberEventKind.JOIN, "n2", meta, 5.0, 3))
    moved = encode_tags_for(identity(13))
    assert view.apply(event(MemberEventKind.UPDATE, "n2", moved, 6.0, 4))
    assert view.apply(event(MemberEventKind.LEAVE, "n2", b"", 7.0, 5))
    assert view.counts() == {"alive": 1, "left": 1}


def test_serf_members_are_listed_but_never_live_data_plane() -> None:
    view = ClusterView("n1")
    assert not view.apply(event(MemberEventKind.JOIN, "serf-1", encode_tags({"role": "web"})))
    assert view.live_peers() == []
    assert view.live_names() == {"n1", "serf-1"}
    assert view.tag_problems == {"not-weavepy": 1}


def test_sync_rebuilds_from_a_member_list() -> None:
    view = ClusterView("n1")
    view.apply(event(MemberEventKind.JOIN, "gone", encode_tags_for(identity(14))))
    members = [Member("n2", socket.inet_aton("198.18.0.12"), 6783,
                      encode_tags_for(identity()), MemberState.ALIVE, 1, b"")]
    assert view.sync(members, 10.0)
    # a peer the list no longer has (reaped) is failed, not forgotten: its identity keeps its
    # routes while it owns blocks (weavepy.reconcile)
    assert [(p.name, p.state, p.since) for p in view.peers()] == [
        ("gone", PeerState.FAILED, 10.0), ("n2", PeerState.ALIVE, 10.0)]
    assert view.get("gone").identity == identity(14)  # type: ignore[union-attr]
    assert not view.sync(members, 11.0)
