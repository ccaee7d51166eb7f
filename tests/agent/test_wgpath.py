"""The encrypted path's pure parts: who wants encryption, the path choice and its fallback
reasons, tags within memberlist's meta limit, external peers, wg-quick output, route plans."""

from __future__ import annotations

import base64
import dataclasses
import json
import socket
from ipaddress import IPv4Address, IPv4Network

import pytest

from gossip.config import META_MAX_SIZE
from gossip.events import MemberEvent, MemberEventKind
from weavepy.cluster import ClusterView, DataPlaneIdentity, decode_identity, encode_tags_for
from weavepy.config import ConfigError, load_config
from weavepy.reconcile import desired_data_plane
from weavepy.wgpath import (
    ConfigNode,
    encrypt_tag,
    encryption_wanted,
    parse_external_peer,
    plan_routes,
    render_wg_quick,
)

N = IPv4Network
KEY = {i: bytes([i]) * 32 for i in range(1, 10)}
ALL_CAPS = frozenset({"vxlan", "wireguard", "wgx"})


def ident(octet: int, *, caps: frozenset[str] = ALL_CAPS, enc: str = "",
          key: bool = True, port: int | None = 51820) -> DataPlaneIdentity:
    return DataPlaneIdentity(IPv4Address(f"198.18.0.{octet}"), f"02:00:00:00:00:{octet:02x}", 1,
                             8472, KEY[octet % 9 + 1] if key else None, caps, "c" * 32,
                             port, enc)


def view_of(**members: DataPlaneIdentity) -> ClusterView:
    view = ClusterView("n1")
    for name, identity in members.items():
        view.apply(MemberEvent(MemberEventKind.JOIN, name, socket.inet_aton("198.18.0.2"), 6783,
                               encode_tags_for(identity), 1, 0.0))
    return view


BLOCKS = {"n1": [N("198.19.0.0/24")], "n2": [N("198.19.1.0/24")], "n3": [N("198.19.2.0/24")],
          "n4": [N("198.19.3.0/24")]}


def test_the_encryption_wish_is_symmetric() -> None:
    assert encrypt_tag(True, ["n2"]) == "*"
    assert encrypt_tag(False, ["n3", "n2", "n3"]) == "n2,n3"
    assert encrypt_tag(False, []) == ""
    for local, peer, expected in [("", "", False), ("*", "", True), ("", "*", True),
                                  ("n2", "", True), ("", "n1", True), ("n3", "n4", False)]:
        assert encryption_wanted("n1", local, "n2", peer) is expected
        assert encryption_wanted("n2", peer, "n1", local) is expected


def test_paths_follow_the_wish_and_fall_back_with_a_reason() -> None:
    view = view_of(n2=ident(12), n3=ident(13, key=False, caps=frozenset({"vxlan"})),
                   n4=ident(14, caps=frozenset({"vxlan"})))
    plain = desired_data_plane(view.peers(), BLOCKS, "n1", ident(11))
    assert plain.paths == {"n2": "vxlan", "n3": "vxlan", "n4": "vxlan"}
    assert plain.fallbacks == {} and plain.wg_peers == ()

    desired = desired_data_plane(view.peers(), BLOCKS, "n1", ident(11, enc="*"))
    assert desired.paths == {"n2": "wireguard", "n3": "vxlan", "n4": "vxlan"}
    assert [p.name for p in desired.peers] == ["n3", "n4"]  # VXLAN lets go of n2's blocks
    (wg,) = desired.wg_peers
    assert (wg.name, wg.endpoint, wg.allowed_ips) == ("n2", ("198.18.0.12", 51820),
                                                      (N("198.19.1.0/24"),))
    assert wg.extension_ok and wg.public_key == KEY[12 % 9 + 1]
    assert desired.fallbacks == {
        "n3": "encryption wanted, but the peer did not announce a WireGuard key",
        "n4": "encryption wanted, but the peer has no WireGuard data path"}


def test_a_peer_s_wish_is_honoured_and_the_extension_needs_both_sides() -> None:
    view = view_of(n2=ident(12, enc="n1", caps=frozenset({"vxlan", "wireguard"})),
                   n3=ident(13, enc="n9"))
    desired = desired_data_plane(view.peers(), BLOCKS, "n1", ident(11))
    assert desired.paths == {"n2": "wireguard", "n3": "vxlan"}
    assert desired.wg_peers[0].extension_ok is False  # n2 did not announce wgx


def test_external_peers_are_wireguard_only_and_never_shadow_a_member() -> None:
    host = parse_external_peer({"name": "laptop", "public_key": base64.b64encode(KEY[5]).decode(),
                                "allowed_ips": "198.19.255.1/32", "endpoint": "198.18.0.50:51820"})
    clash = dataclasses.replace(host, name="n2")
    view = view_of(n2=ident(12))
    desired = desired_data_plane(view.peers(), BLOCKS, "n1", ident(11), [host, clash])
    assert desired.paths["laptop"] == "wireguard"
    assert [(p.name, p.external, p.extension_ok) for p in desired.wg_peers] == [
        ("laptop", True, False)]
    assert "n2" in desired.excluded and desired.paths["n2"] == "vxlan"


@pytest.mark.parametrize("raw, problem", [
    ({"name": "h", "public_key": "short", "allowed_ips": ["198.19.255.1/32"]}, "32-byte"),
    ({"name": "h", "public_key": base64.b64encode(KEY[1]).decode(), "allowed_ips": []},
     "non-empty"),
    ({"name": "h", "public_key": base64.b64encode(KEY[1]).decode(),
      "allowed_ips": ["198.19.255.1/24"]}, "host bits"),
    ({"name": "h", "public_key": base64.b64encode(KEY[1]).decode(),
      "allowed_ips": ["198.19.255.1/32"], "endpoint": "nowhere"}, "IPv4:PORT"),
    ({"name": "bad name", "public_key": "", "allowed_ips": []}, "letters"),
    ({"name": "h", "surprise": 1}, "unknown"),
    ("h", "mapping"),
])
def test_bad_external_peers_are_one_readable_line(raw: object, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        parse_external_peer(raw)


def test_settings_for_encryption_and_external_peers() -> None:
    declared = [{"name": "h", "public_key": base64.b64encode(KEY[1]).decode(),
                 "allowed_ips": ["198.19.255.1/32"]}]
    config = load_config({"encrypt_all": True, "encrypt_peers": "n2, n3"},
                         {"WEAVEPY_EXTERNAL_PEERS": json.dumps(declared)})
    assert config.encrypt_all and config.encrypt_peers == ("n2", "n3")
    assert config.external_peers[0].name == "h" and config.wg_port == 51820
    assert config.to_public_dict()["external_peers"][0]["allowed_ips"] == ["198.19.255.1/32"]
    with pytest.raises(ConfigError, match="--wg-port"):
        load_config({"wg_port": 8472})
    with pytest.raises(ConfigError, match="JSON"):
        load_config({}, {"WEAVEPY_EXTERNAL_PEERS": "[nope"})


def test_worst_case_tags_fit_in_the_meta_and_round_trip() -> None:
    wish = ",".join(f"node-{i:02d}" for i in range(12))
    big = dataclasses.replace(ident(12, enc=wish), cluster_id="f" * 32)
    assert len(encode_tags_for(big)) <= META_MAX_SIZE
    view = view_of(n2=big)
    peer = view.get("n2")
    assert peer is not None and peer.identity == big
    assert decode_identity({**big.to_tags(), "wgp": "99999"}).reason == "bad-wg-port"  # type: ignore[union-attr]


def test_wg_quick_config_lists_every_node_with_blocks() -> None:
    host = parse_external_peer({"name": "laptop", "public_key": base64.b64encode(KEY[5]).decode(),
                                "allowed_ips": ["198.19.255.1/32"],
                                "endpoint": "198.18.0.50:51999"})
    nodes = [ConfigNode("n2", KEY[2], ("198.18.0.12", 51820), (N("198.19.1.0/24"),)),
             ConfigNode("n1", KEY[1], ("198.18.0.11", 51820),
                        (N("198.19.0.0/24"), N("198.19.9.0/24"))),
             ConfigNode("n3", KEY[3], ("198.18.0.13", 51820), ())]
    text = render_wg_quick(host, nodes, 1420, "n1")
    assert "Address = 198.19.255.1/32" in text and "ListenPort = 51999" in text
    assert "MTU = 1420" in text
    sections = text.split("[Peer]")[1:]
    assert len(sections) == 2  # n3 has no blocks yet
    assert f"PublicKey = {base64.b64encode(KEY[1]).decode()}" in sections[0]
    assert "AllowedIPs = 198.19.0.0/24, 198.19.9.0/24" in sections[0]
    assert "Endpoint = 198.18.0.12:51820" in sections[1]


def test_route_plan_deletes_strangers_and_fixes_sources() -> None:
    desired = {N("198.19.1.0/24"): "198.19.0.1", N("198.19.2.0/24"): "198.19.0.1"}
    actual = {N("198.19.1.0/24"): None, N("198.19.7.0/24"): "198.19.0.1"}
    delete, put = plan_routes(desired, actual)
    assert delete == [N("198.19.7.0/24")]
    assert put == [(N("198.19.1.0/24"), "198.19.0.1"), (N("198.19.2.0/24"), "198.19.0.1")]
    assert plan_routes(desired, desired) == ([], [])
