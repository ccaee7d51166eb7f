"""The agent's view of its peers: gossip membership plus each peer's data-plane identity.

This module owns two things:

* the **tags** a weavepy node publishes in its memberlist `Meta` (serf-style, so `serf members`
  shows them), which say how to reach the node's pods: the underlay address its VXLAN packets
  come from, its VTEP MAC, its VXLAN VNI and port, its WireGuard public key and port, its
  capabilities, which peers it wants encrypted, its cluster ID, and its pods' MTU (the largest
  packet it delivers to them, which a peer's status shows as the limit of its connection).
  `encode_tags` keeps them within memberlist's 512 bytes of meta; `decode_identity` turns a
  peer's tags back into a `DataPlaneIdentity` or a `TagProblem`;
* the `ClusterView`: a pure state machine fed `MemberEvent`s (or a full member list) that keeps
  one `PeerView` per known member and answers "which peers are live, and how do I reach them".

The rules it keeps: it never raises on what the network sends (bad tags make a `TagProblem`,
counted by reason, and the peer is kept out of the data plane); it reads no clock (times come
from the events); a member that is not a weavepy node (a plain serf agent) is listed but never
programmed; a peer is *live* while it is alive or suspect (a suspect may still refute, and
tearing down its routes would drop traffic that is probably still flowing).
"""

from __future__ import annotations

import base64
import binascii
import enum
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from ipaddress import IPv4Address, ip_address

from gossip.config import META_MAX_SIZE
from gossip.events import Member, MemberEvent, MemberEventKind, MemberState
from gossip.tags import ROLE_TAG, decode_tags, encode_tags

__all__ = [
    "ROLE",
    "TAG_VERSION",
    "ClusterView",
    "DataPlaneIdentity",
    "PeerState",
    "PeerView",
    "TagProblem",
    "decode_identity",
    "encode_tags_for",
]

ROLE = "weavepy"
TAG_VERSION = "1"

# Tag keys (short: they ride in every alive message).
T_VERSION = "wpv"
T_UNDERLAY = "ip"
T_MAC = "mac"
T_VXLAN = "vx"  # "<vni>:<port>"
T_WG = "wg"  # base64 X25519 public key
T_CAPS = "caps"  # comma-separated: vxlan, wireguard, wgx (the super-packet extension)
T_CLUSTER = "cid"
T_WG_PORT = "wgp"  # the WireGuard UDP port (with the wireguard capability)
T_ENCRYPT = "enc"  # the peers this node wants encrypted: "*" or a comma list of names
T_MTU = "mtu"  # the node's pod MTU (its bridge's): what reaches its pods unfragmented
MIN_MTU, MAX_MTU = 68, 65535  # what an IPv4 link's MTU can be


class PeerState(enum.Enum):
    ALIVE = "alive"
    SUSPECT = "suspect"
    FAILED = "failed"
    LEFT = "left"

    @property
    def live(self) -> bool:
        return self in (PeerState.ALIVE, PeerState.SUSPECT)


_STATE_OF_EVENT = {
    MemberEventKind.JOIN: PeerState.ALIVE,
    MemberEventKind.UPDATE: PeerState.ALIVE,
    MemberEventKind.ALIVE: PeerState.ALIVE,
    MemberEventKind.SUSPECT: PeerState.SUSPECT,
    MemberEventKind.FAILED: PeerState.FAILED,
    MemberEventKind.LEAVE: PeerState.LEFT,
}
_STATE_OF_MEMBER = {
    MemberState.ALIVE: PeerState.ALIVE,
    MemberState.SUSPECT: PeerState.SUSPECT,
    MemberState.DEAD: PeerState.FAILED,
    MemberState.LEFT: PeerState.LEFT,
}


@dataclass(frozen=True)
class DataPlaneIdentity:
    """How to reach a node's pods; what its tags say, parsed and checked."""

    underlay_ip: IPv4Address
    vtep_mac: str
    vxlan_vni: int
    vxlan_port: int
    wg_public_key: bytes | None = None
    capabilities: frozenset[str] = frozenset({"vxlan"})
    cluster_id: str | None = None
    wg_port: int | None = None
    encrypt: str = ""  # the `enc` tag: "*", "n2,n3" or "" (see weavepy.wgpath)
    mtu: int | None = None  # the pod MTU (None from agents that do not announce it)

    def to_tags(self) -> dict[str, str]:
        tags = {
            ROLE_TAG: ROLE,
            T_VERSION: TAG_VERSION,
            T_UNDERLAY: str(self.underlay_ip),
            T_MAC: self.vtep_mac,
            T_VXLAN: f"{self.vxlan_vni}:{self.vxlan_port}",
            T_CAPS: ",".join(sorted(self.capabilities)),
        }
        if self.wg_public_key is not None:
            tags[T_WG] = base64.b64encode(self.wg_public_key).decode()
        if self.cluster_id:
            tags[T_CLUSTER] = self.cluster_id
        if self.wg_port is not None:
            tags[T_WG_PORT] = str(self.wg_port)
        if self.encrypt:
            tags[T_ENCRYPT] = self.encrypt
        if self.mtu is not None:
            tags[T_MTU] = str(self.mtu)
        return tags


def encode_tags_for(identity: DataPlaneIdentity) -> bytes:
    """The node meta for `identity`; ValueError if it would exceed memberlist's 512 bytes."""
    return encode_tags(identity.to_tags(), META_MAX_SIZE)


@dataclass(frozen=True)
class TagProblem:
    """Why a member's tags do not describe a usable weavepy data plane.

    reason is a short stable label (for counters): not-weavepy, bad-version, bad-underlay-ip,
    bad-mac, bad-vxlan, bad-wg-key, bad-wg-port, bad-mtu.
    """

    reason: str
    detail: str

    def __str__(self) -> str:
        return f"{self.reason}: {self.detail}"


def _mac(text: str) -> str | None:
    parts = text.lower().split(":")
    if len(parts) != 6 or not all(len(p) == 2 for p in parts):
        return None
    try:
        octets = [int(p, 16) for p in parts]
    except ValueError:
        return None
    if octets[0] & 1 or not any(octets):
        return None
    return ":".join(parts)


def decode_identity(tags: Mapping[str, str]) -> DataPlaneIdentity | TagProblem:
    """A peer's data-plane identity from its tags, or the first problem found. Never raises."""
    if tags.get(ROLE_TAG) != ROLE:
        return TagProblem("not-weavepy", f"role is {tags.get(ROLE_TAG, '')!r}")
    version = tags.get(T_VERSION, "")
    if version != TAG_VERSION:
        return TagProblem("bad-version", f"tag version {version!r}, we speak {TAG_VERSION}")
    try:
        underlay = ip_address(tags.get(T_UNDERLAY, ""))
    except ValueError:
        return TagProblem("bad-underlay-ip", f"{tags.get(T_UNDERLAY)!r} is not an IP address")
    if not isinstance(underlay, IPv4Address) or underlay.is_unspecified or underlay.is_multicast:
        return TagProblem("bad-underlay-ip", f"{underlay} cannot be a VXLAN endpoint")
    mac = _mac(tags.get(T_MAC, ""))
    if mac is None:
        return TagProblem("bad-mac", f"{tags.get(T_MAC)!r} is not a unicast MAC")
    vni_text, _, port_text = tags.get(T_VXLAN, "").partition(":")
    if not (vni_text.isdigit() and port_text.isdigit()):
        return TagProblem("bad-vxlan", f"{tags.get(T_VXLAN)!r} is not <vni>:<port>")
    vni, port = int(vni_text), int(port_text)
    if not (0 <= vni < 1 << 24 and 0 < port < 65536):
        return TagProblem("bad-vxlan", f"vni {vni} or port {port} out of range")
    wg_key: bytes | None = None
    if T_WG in tags:
        try:
            wg_key = base64.b64decode(tags[T_WG], validate=True)
        except binascii.Error:
            wg_key = b""
        if len(wg_key) != 32:
            return TagProblem("bad-wg-key", f"{tags[T_WG]!r} is not a base64 32-byte key")
    caps = frozenset(c for c in tags.get(T_CAPS, "vxlan").split(",") if c)
    wg_port: int | None = None
    if T_WG_PORT in tags:
        port_text = tags[T_WG_PORT]
        if not port_text.isdigit() or not 0 < int(port_text) < 65536:
            return TagProblem("bad-wg-port", f"{port_text!r} is not a UDP port")
        wg_port = int(port_text)
    mtu: int | None = None
    if T_MTU in tags:
        mtu_text = tags[T_MTU]
        if not mtu_text.isdigit() or not MIN_MTU <= int(mtu_text) <= MAX_MTU:
            return TagProblem("bad-mtu", f"{mtu_text!r} is not an MTU")
        mtu = int(mtu_text)
    return DataPlaneIdentity(
        underlay_ip=underlay,
        vtep_mac=mac,
        vxlan_vni=vni,
        vxlan_port=port,
        wg_public_key=wg_key,
        capabilities=caps,
        cluster_id=tags.get(T_CLUSTER) or None,
        wg_port=wg_port,
        encrypt=tags.get(T_ENCRYPT, ""),
        mtu=mtu,
    )


@dataclass(frozen=True)
class PeerView:
    """One member as the agent sees it now."""

    name: str
    gossip_addr: str
    gossip_port: int
    state: PeerState
    incarnation: int
    since: float  # the event time of the last state change
    tags: Mapping[str, str] = field(default_factory=dict)
    identity: DataPlaneIdentity | None = None
    problem: TagProblem | None = None

    @property
    def live(self) -> bool:
        return self.state.live

    def to_json(self) -> dict[str, object]:
        ident = self.identity
        return {
            "name": self.name,
            "state": self.state.value,
            "gossip_addr": f"{self.gossip_addr}:{self.gossip_port}",
            "incarnation": self.incarnation,
            "since": self.since,
            "underlay_ip": str(ident.underlay_ip) if ident else None,
            "vtep_mac": ident.vtep_mac if ident else None,
            "capabilities": sorted(ident.capabilities) if ident else [],
            "cluster_id": ident.cluster_id if ident else None,
            "mtu": ident.mtu if ident else None,
            "problem": str(self.problem) if self.problem else None,
            "tags": dict(self.tags),
        }


def _addr_text(addr: bytes) -> str:
    try:
        return str(ip_address(addr))
    except ValueError:
        return addr.hex()


class ClusterView:
    """Members by name, as the gossip events describe them (sans-IO, no clock).

    `apply` and `sync` return True when the data plane may need to change: a peer became live
    or stopped being live, or a live peer's identity changed.
    """

    def __init__(self, self_name: str) -> None:
        self.self_name = self_name
        self._peers: dict[str, PeerView] = {}
        self.tag_problems: Counter[str] = Counter()

    def apply(self, event: MemberEvent) -> bool:
        """Take one member event into the view."""
        state = _STATE_OF_EVENT[event.kind]
        return self._update(event.name, event.addr, event.port, event.meta, state,
                            event.incarnation, event.time)

    def sync(self, members: Iterable[Member], now: float) -> bool:
        """Re-read a full member list (after a dropped event, or at start). A known peer the
        list no longer has (gossip reaps dead members after a while) is failed, not forgotten:
        its last identity is what keeps its routes while it owns blocks (weavepy.reconcile)."""
        changed = False
        seen: set[str] = set()
        for member in members:
            seen.add(member.name)
            changed |= self._update(member.name, member.addr, member.port, member.meta,
                                    _STATE_OF_MEMBER[member.state], member.incarnation, now)
        for name, old in list(self._peers.items()):
            if name not in seen and old.live:
                self._peers[name] = replace(old, state=PeerState.FAILED, since=now)
                changed = True
        return changed

    def forget(self, name: str) -> bool:
        """Drop a member the gossip layer reaped; True if it was live."""
        gone = self._peers.pop(name, None)
        return gone is not None and gone.live

    def _update(self, name: str, addr: bytes, port: int, meta: bytes, state: PeerState,
                incarnation: int, now: float) -> bool:
        if name == self.self_name:
            return False
        old = self._peers.get(name)
        if old is not None and state in (PeerState.SUSPECT, PeerState.FAILED, PeerState.LEFT):
            # memberlist sends no meta with these; keep what we knew.
            new = replace(old, state=state, incarnation=incarnation,
                          since=old.since if old.state == state else now)
        else:
            tags = decode_tags(meta)
            decoded = decode_identity(tags)
            identity = decoded if isinstance(decoded, DataPlaneIdentity) else None
            problem = decoded if isinstance(decoded, TagProblem) else None
            if problem is not None and (old is None or old.tags != tags):
                self.tag_problems[problem.reason] += 1
            since = old.since if old is not None and old.state == state else now
            new = PeerView(name, _addr_text(addr), port, state, incarnation, since, tags,
                           identity, problem)
        self._peers[name] = new
        if old is None:
            return new.live and new.identity is not None
        was = old.identity if old.live else None
        now_is = new.identity if new.live else None
        return was != now_is

    def get(self, name: str) -> PeerView | None:
        return self._peers.get(name)

    def peers(self) -> list[PeerView]:
        """Every known member except ourselves, by name."""
        return [self._peers[n] for n in sorted(self._peers)]

    def live_peers(self) -> list[PeerView]:
        """Members that are alive or suspect and carry a usable weavepy identity."""
        return [p for p in self.peers() if p.live and p.identity is not None]

    def live_names(self) -> set[str]:
        """Every member that is alive or suspect (weavepy or not), ourselves included."""
        return {self.self_name} | {p.name for p in self._peers.values() if p.live}

    def counts(self) -> Counter[str]:
        """Members by state (ourselves counted alive)."""
        counted = Counter(p.state.value for p in self._peers.values())
        counted[PeerState.ALIVE.value] += 1
        return counted
