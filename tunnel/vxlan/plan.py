"""tunnel.vxlan.plan: the pure half of the VXLAN reconciler (theory of operation: the package
docstring, tunnel/vxlan/__init__.py).

It owns the inputs (`VxlanConfig`, `Peer`), the observed and desired kernel state, the report,
peer validation, the desired state and `plan(desired, actual)`: the ordered operations that turn
one into the other. The rule it keeps: data in, data out. It imports no pyroute2, socket, trio,
time, threading or subprocess; the kernel shell (kernel.py) does the I/O.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from ipaddress import (
    IPv4Address,
    IPv4Interface,
    IPv4Network,
    ip_address,
    ip_network,
)
from types import MappingProxyType

__all__ = [
    "DEFAULT_DEVICE",
    "DEFAULT_PORT",
    "DEFAULT_VNI",
    "ENCAP_OVERHEAD",
    "AddAddress",
    "AddRoute",
    "Change",
    "CreateDevice",
    "DeleteAddress",
    "DeleteDevice",
    "DeleteFdb",
    "DeleteNeighbour",
    "DeleteRoute",
    "DesiredState",
    "DeviceSpec",
    "DeviceState",
    "KernelState",
    "Neighbour",
    "Op",
    "Peer",
    "PeerProblem",
    "ReconcileReport",
    "ReplaceRoute",
    "RouteState",
    "SetDeviceMtu",
    "SetDeviceUp",
    "SetFdb",
    "SetNeighbour",
    "UnderlayState",
    "ValidPeer",
    "VxlanConfig",
    "desired_state",
    "device_mismatches",
    "normalize_mac",
    "plan",
    "validate_peers",
]

DEFAULT_DEVICE = "weavepy.1"
DEFAULT_VNI = 1
DEFAULT_PORT = 8472
# outer IPv4 20 + UDP 8 + VXLAN 8 + inner Ethernet 14
ENCAP_OVERHEAD = 50

_MAC_RE = re.compile(r"^[0-9a-f]{2}([:-])[0-9a-f]{2}(\1[0-9a-f]{2}){4}$")
_IFNAME_RE = re.compile(r"^[A-Za-z0-9_.\-]{1,15}$")


def normalize_mac(text: object) -> str:
    """`text` as a lower-case colon MAC, or ValueError if it is not a unicast, non-zero MAC."""
    if not isinstance(text, str):
        raise ValueError(f"MAC must be a string, got {type(text).__name__}")
    lowered = text.strip().lower()
    if not _MAC_RE.match(lowered):
        raise ValueError(f"not a MAC address: {text!r}")
    mac = lowered.replace("-", ":")
    if int(mac[:2], 16) & 1:
        raise ValueError(f"multicast MAC cannot be a VTEP: {mac}")
    if mac == "00:00:00:00:00:00":
        raise ValueError("all-zero MAC cannot be a VTEP")
    return mac


# ---------------------------------------------------------------------------------------------
# Inputs


@dataclass(frozen=True)
class VxlanConfig:
    """How this node's VXLAN device looks. Invalid values raise ValueError at construction.

    local_ip is the underlay address on this host's interface (not a NAT'd advertised address).
    underlay_iface None means "the interface that holds local_ip". mtu None means underlay MTU
    minus 50. pod_range, when set, rejects peer blocks outside it.
    """

    vtep_mac: str
    local_ip: IPv4Address
    underlay_iface: str | None = None
    device: str = DEFAULT_DEVICE
    vni: int = DEFAULT_VNI
    port: int = DEFAULT_PORT
    mtu: int | None = None
    pod_range: IPv4Network | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "vtep_mac", normalize_mac(self.vtep_mac))
        if not isinstance(self.local_ip, IPv4Address):
            object.__setattr__(self, "local_ip", IPv4Address(str(self.local_ip)))
        if not _IFNAME_RE.match(self.device):
            raise ValueError(f"bad device name {self.device!r} (1-15 of [A-Za-z0-9_.-])")
        if self.underlay_iface is not None and not _IFNAME_RE.match(self.underlay_iface):
            raise ValueError(f"bad underlay interface name {self.underlay_iface!r}")
        if not 0 <= self.vni < 1 << 24:
            raise ValueError(f"VNI must be in 0..16777215, got {self.vni}")
        if not 1 <= self.port <= 65535:
            raise ValueError(f"UDP port must be in 1..65535, got {self.port}")
        if self.mtu is not None and not 68 <= self.mtu <= 65535:
            raise ValueError(f"MTU must be in 68..65535, got {self.mtu}")


@dataclass(frozen=True)
class Peer:
    """A remote node as the agent knows it. Fields may hold garbage from the network:
    `validate_peers` checks them and rejects the peer with a reason instead of raising."""

    name: str
    underlay_ip: IPv4Address
    vtep_mac: str
    blocks: Sequence[IPv4Network]


@dataclass(frozen=True)
class ValidPeer:
    """A peer parsed and normalised by `validate_peers` (the ones it returns as valid are also
    conflict-free and have at least one block)."""

    name: str
    underlay_ip: IPv4Address
    mac: str
    blocks: tuple[IPv4Network, ...]

    @property
    def anchor(self) -> IPv4Address:
        return self.blocks[0].network_address


# ---------------------------------------------------------------------------------------------
# Observed kernel state (what the IO shell read) and desired state (what the core wants)


@dataclass(frozen=True)
class UnderlayState:
    ifindex: int
    name: str
    mtu: int


@dataclass(frozen=True)
class DeviceState:
    ifindex: int
    kind: str
    vni: int | None
    port: int | None
    local: IPv4Address | None
    link: int | None
    learning: bool
    mac: str
    mtu: int
    up: bool


@dataclass(frozen=True)
class Neighbour:
    mac: str
    permanent: bool


@dataclass(frozen=True)
class RouteState:
    gateway: IPv4Address | None
    onlink: bool


@dataclass(frozen=True)
class KernelState:
    """Our device and the entries on it. Routes are keyed by (destination, priority)."""

    device: DeviceState | None = None
    addresses: frozenset[IPv4Interface] = frozenset()
    neighbours: Mapping[IPv4Address, Neighbour] = field(default_factory=dict)
    fdb: Mapping[str, tuple[IPv4Address | None, ...]] = field(default_factory=dict)
    routes: Mapping[tuple[IPv4Network, int], RouteState] = field(default_factory=dict)


@dataclass(frozen=True)
class DeviceSpec:
    name: str
    vni: int
    port: int
    local: IPv4Address
    underlay_ifindex: int
    mac: str
    mtu: int


@dataclass(frozen=True)
class DesiredState:
    """Entries map to (value, owning peer name) so operations and errors name their peer."""

    device: DeviceSpec
    addresses: frozenset[IPv4Interface]
    neighbours: Mapping[IPv4Address, tuple[str, str]]
    fdb: Mapping[str, tuple[IPv4Address, str]]
    routes: Mapping[IPv4Network, tuple[IPv4Address, str]]


# ---------------------------------------------------------------------------------------------
# Report


@dataclass(frozen=True)
class Change:
    """One thing the reconciler changed in the kernel. action: create/delete/set/add/replace;
    target: device/address/neighbour/fdb/route."""

    action: str
    target: str
    key: str
    peer: str | None = None
    detail: str = ""

    def __str__(self) -> str:
        who = f" (peer {self.peer})" if self.peer else ""
        why = f": {self.detail}" if self.detail else ""
        return f"{self.action} {self.target} {self.key}{who}{why}"


@dataclass(frozen=True)
class PeerProblem:
    """A peer that was rejected (bad input) or whose programming failed (kernel error).

    reason is a short stable code for metrics labels: invalid-name, duplicate-name, invalid-mac,
    duplicate-mac, invalid-underlay-ip, invalid-block, block-outside-range, overlapping-block,
    kernel-error, foreign-route.
    """

    peer: str | None
    reason: str
    detail: str

    def __str__(self) -> str:
        return f"peer {self.peer or '-'}: {self.reason}: {self.detail}"


@dataclass
class ReconcileReport:
    changes: list[Change] = field(default_factory=list)
    rejected: list[PeerProblem] = field(default_factory=list)
    errors: list[PeerProblem] = field(default_factory=list)
    idle_peers: list[str] = field(default_factory=list)
    programmed_peers: int = 0
    device_error: str | None = None
    mtu: int | None = None  # the device MTU this pass aimed for (pods use the same)
    duration_s: float = 0.0

    @property
    def changed(self) -> bool:
        return bool(self.changes)

    @property
    def ok(self) -> bool:
        """True when every valid peer is programmed and the device is right."""
        return self.device_error is None and not self.errors

    def counts(self) -> Counter[str]:
        """Changes counted as "<action>_<target>" (e.g. "add_route"), for metrics."""
        return Counter(f"{c.action}_{c.target}" for c in self.changes)

    def summary(self) -> str:
        parts = [f"{self.programmed_peers} peers programmed"]
        counted = self.counts()
        if counted:
            parts.append(", ".join(f"{k}={v}" for k, v in sorted(counted.items())))
        else:
            parts.append("no changes")
        if self.rejected:
            parts.append(f"{len(self.rejected)} rejected")
        if self.errors:
            parts.append(f"{len(self.errors)} kernel errors")
        if self.device_error:
            parts.append(f"device error: {self.device_error}")
        return f"vxlan reconcile: {'; '.join(parts)} in {self.duration_s * 1000:.1f} ms"


# ---------------------------------------------------------------------------------------------
# Pure core, step 1: validate the peers


def _as_ipv4_address(value: object) -> IPv4Address:
    if isinstance(value, IPv4Address):
        return value
    if isinstance(value, str):
        parsed = ip_address(value.strip())
        if isinstance(parsed, IPv4Address):
            return parsed
    raise ValueError(f"not an IPv4 address: {value!r}")


def _as_ipv4_network(value: object) -> IPv4Network:
    if isinstance(value, IPv4Network):
        return value
    if isinstance(value, str):
        parsed = ip_network(value.strip(), strict=True)
        if isinstance(parsed, IPv4Network):
            return parsed
    raise ValueError(f"not an IPv4 network: {value!r}")


def _check_one_peer(peer: object, config: VxlanConfig) -> ValidPeer | PeerProblem:
    name = getattr(peer, "name", None)
    if not isinstance(name, str) or not name.strip():
        return PeerProblem(None, "invalid-name", f"peer name {name!r}")

    def bad(reason: str, detail: str) -> PeerProblem:
        return PeerProblem(name, reason, detail)

    try:
        mac = normalize_mac(getattr(peer, "vtep_mac", None))
    except ValueError as exc:
        return bad("invalid-mac", str(exc))
    if mac == config.vtep_mac:
        return bad("duplicate-mac", f"{mac} is this node's own VTEP MAC")
    try:
        underlay = _as_ipv4_address(getattr(peer, "underlay_ip", None))
    except ValueError as exc:
        return bad("invalid-underlay-ip", str(exc))
    if (
        underlay.is_unspecified
        or underlay.is_multicast
        or underlay.is_loopback
        or underlay == IPv4Address("255.255.255.255")
    ):
        return bad("invalid-underlay-ip", f"{underlay} cannot be a VXLAN endpoint")
    if underlay == config.local_ip:
        return bad("invalid-underlay-ip", f"{underlay} is this node's own address")
    raw_blocks = getattr(peer, "blocks", None)
    if isinstance(raw_blocks, str | bytes) or not isinstance(raw_blocks, Iterable):
        return bad("invalid-block", f"blocks must be a list, got {type(raw_blocks).__name__}")
    blocks: list[IPv4Network] = []
    for raw in raw_blocks:
        try:
            block = _as_ipv4_network(raw)
        except ValueError as exc:
            return bad("invalid-block", str(exc))
        if (
            block.prefixlen == 0
            or block.is_multicast
            or block.is_loopback
            or block.is_link_local
            or block.network_address.is_unspecified
        ):
            return bad("invalid-block", f"{block} cannot be a pod block")
        if config.pod_range is not None and not block.subnet_of(config.pod_range):
            return bad("block-outside-range", f"{block} is outside {config.pod_range}")
        blocks.append(block)
    return ValidPeer(name, underlay, mac, tuple(blocks))


def _overlaps(owned: Sequence[tuple[IPv4Network, str | None]]) -> dict[str | None, str]:
    """Owners (None = this node) of blocks that overlap any other block, with one example.

    CIDR blocks either nest or are disjoint, so after sorting by (start, size descending) a
    block overlaps an earlier one exactly when that one is still "open" (ends at or after the
    new start); the open ones form a nesting chain at most 32 deep.
    """
    found: dict[str | None, str] = {}
    ordered = sorted(owned, key=lambda item: (int(item[0].network_address), item[0].prefixlen))
    chain: list[tuple[IPv4Network, str | None]] = []
    for block, owner in ordered:
        while chain and int(chain[-1][0].broadcast_address) < int(block.network_address):
            chain.pop()
        for outer, outer_owner in chain:
            found.setdefault(owner, f"{block} overlaps {outer} of {outer_owner or 'this node'}")
            found.setdefault(outer_owner, f"{outer} overlaps {block} of {owner or 'this node'}")
        chain.append((block, owner))
    return found


def validate_peers(
    peers: Iterable[object], local_blocks: Sequence[IPv4Network], config: VxlanConfig
) -> tuple[list[ValidPeer], list[PeerProblem], list[str]]:
    """Split `peers` into (valid peers with blocks, rejected peers, names of peers without blocks).

    Each peer is checked alone first (name, MAC, underlay address, blocks). Then conflicts
    between peers reject every peer involved, since we cannot tell which side is right: the
    same name twice, the same VTEP MAC twice, or overlapping blocks (with each other, with
    themselves or with this node's own blocks).
    """
    rejected: list[PeerProblem] = []
    checked: list[ValidPeer] = []
    for peer in peers:
        result = _check_one_peer(peer, config)
        if isinstance(result, PeerProblem):
            rejected.append(result)
        else:
            checked.append(result)

    name_counts = Counter(p.name for p in checked)
    mac_owners: dict[str, list[str]] = {}
    for p in checked:
        mac_owners.setdefault(p.mac, []).append(p.name)
    conflicts: dict[str, PeerProblem] = {}
    for p in checked:
        if name_counts[p.name] > 1:
            conflicts.setdefault(
                p.name, PeerProblem(p.name, "duplicate-name", "the name is given more than once")
            )
        elif len(mac_owners[p.mac]) > 1:
            others = ", ".join(n for n in mac_owners[p.mac] if n != p.name)
            conflicts.setdefault(
                p.name, PeerProblem(p.name, "duplicate-mac", f"{p.mac} is also used by {others}")
            )
    owned: list[tuple[IPv4Network, str | None]] = [(b, None) for b in local_blocks]
    owned += [(b, p.name) for p in checked if p.name not in conflicts for b in p.blocks]
    for owner, detail in _overlaps(owned).items():
        if owner is not None:
            conflicts.setdefault(owner, PeerProblem(owner, "overlapping-block", detail))

    valid: list[ValidPeer] = []
    idle: list[str] = []
    reported: set[str] = set()
    for p in checked:
        if p.name in conflicts:
            if p.name not in reported:
                rejected.append(conflicts[p.name])
                reported.add(p.name)
        elif not p.blocks:
            idle.append(p.name)
        else:
            valid.append(p)
    return valid, rejected, idle


# ---------------------------------------------------------------------------------------------
# Pure core, step 2: desired state


def desired_state(
    config: VxlanConfig,
    peers: Sequence[ValidPeer],
    local_blocks: Sequence[IPv4Network],
    underlay: UnderlayState,
) -> DesiredState:
    spec = DeviceSpec(
        name=config.device,
        vni=config.vni,
        port=config.port,
        local=config.local_ip,
        underlay_ifindex=underlay.ifindex,
        mac=config.vtep_mac,
        mtu=config.mtu if config.mtu is not None else underlay.mtu - ENCAP_OVERHEAD,
    )
    addresses = (
        frozenset({IPv4Interface((local_blocks[0].network_address, 32))})
        if local_blocks
        else frozenset()
    )
    neighbours: dict[IPv4Address, tuple[str, str]] = {}
    fdb: dict[str, tuple[IPv4Address, str]] = {}
    routes: dict[IPv4Network, tuple[IPv4Address, str]] = {}
    for peer in peers:
        neighbours[peer.anchor] = (peer.mac, peer.name)
        fdb[peer.mac] = (peer.underlay_ip, peer.name)
        for block in peer.blocks:
            routes[block] = (peer.anchor, peer.name)
    return DesiredState(
        device=spec,
        addresses=addresses,
        neighbours=MappingProxyType(neighbours),
        fdb=MappingProxyType(fdb),
        routes=MappingProxyType(routes),
    )


# ---------------------------------------------------------------------------------------------
# Pure core, step 3: the plan (ordered operations)


@dataclass(frozen=True)
class CreateDevice:
    spec: DeviceSpec
    reason: str
    peer: None = None

    def change(self) -> Change:
        s = self.spec
        detail = f"vni {s.vni} port {s.port} local {s.local} mtu {s.mtu} ({self.reason})"
        return Change("create", "device", s.name, None, detail)


@dataclass(frozen=True)
class DeleteDevice:
    name: str
    reason: str
    peer: None = None

    def change(self) -> Change:
        return Change("delete", "device", self.name, None, self.reason)


@dataclass(frozen=True)
class SetDeviceMtu:
    mtu: int
    peer: None = None

    def change(self) -> Change:
        return Change("set", "device", "mtu", None, str(self.mtu))


@dataclass(frozen=True)
class SetDeviceUp:
    peer: None = None

    def change(self) -> Change:
        return Change("set", "device", "up")


@dataclass(frozen=True)
class AddAddress:
    address: IPv4Interface
    peer: None = None

    def change(self) -> Change:
        return Change("add", "address", str(self.address))


@dataclass(frozen=True)
class DeleteAddress:
    address: IPv4Interface
    peer: None = None

    def change(self) -> Change:
        return Change("delete", "address", str(self.address))


@dataclass(frozen=True)
class SetNeighbour:
    ip: IPv4Address
    mac: str
    peer: str | None

    def change(self) -> Change:
        return Change("set", "neighbour", str(self.ip), self.peer, self.mac)


@dataclass(frozen=True)
class DeleteNeighbour:
    ip: IPv4Address
    mac: str
    peer: None = None

    def change(self) -> Change:
        return Change("delete", "neighbour", str(self.ip), None, self.mac)


@dataclass(frozen=True)
class SetFdb:
    mac: str
    dst: IPv4Address
    peer: str | None

    def change(self) -> Change:
        return Change("set", "fdb", self.mac, self.peer, f"dst {self.dst}")


@dataclass(frozen=True)
class DeleteFdb:
    mac: str
    dst: IPv4Address | None
    peer: None = None

    def change(self) -> Change:
        return Change("delete", "fdb", self.mac, None, f"dst {self.dst}")


@dataclass(frozen=True)
class AddRoute:
    network: IPv4Network
    gateway: IPv4Address
    peer: str | None

    def change(self) -> Change:
        return Change("add", "route", str(self.network), self.peer, f"via {self.gateway}")


@dataclass(frozen=True)
class ReplaceRoute:
    network: IPv4Network
    gateway: IPv4Address
    peer: str | None

    def change(self) -> Change:
        return Change("replace", "route", str(self.network), self.peer, f"via {self.gateway}")


@dataclass(frozen=True)
class DeleteRoute:
    network: IPv4Network
    gateway: IPv4Address | None
    priority: int
    peer: None = None

    def change(self) -> Change:
        return Change("delete", "route", str(self.network), None, f"via {self.gateway}")


Op = (
    CreateDevice
    | DeleteDevice
    | SetDeviceMtu
    | SetDeviceUp
    | AddAddress
    | DeleteAddress
    | SetNeighbour
    | DeleteNeighbour
    | SetFdb
    | DeleteFdb
    | AddRoute
    | ReplaceRoute
    | DeleteRoute
)


def device_mismatches(spec: DeviceSpec, device: DeviceState) -> list[str]:
    """Why an existing device cannot be kept (empty: it can). MTU and up/down are fixed live."""
    reasons = []
    if device.kind != "vxlan":
        reasons.append(f"kind {device.kind or 'unknown'} is not vxlan")
    else:
        if device.vni != spec.vni:
            reasons.append(f"vni {device.vni} != {spec.vni}")
        if device.port != spec.port:
            reasons.append(f"port {device.port} != {spec.port}")
        if device.local != spec.local:
            reasons.append(f"local {device.local} != {spec.local}")
        if device.link != spec.underlay_ifindex:
            reasons.append(f"underlay ifindex {device.link} != {spec.underlay_ifindex}")
        if device.learning:
            reasons.append("learning is on")
    if device.mac != spec.mac:
        reasons.append(f"mac {device.mac} != {spec.mac}")
    return reasons


def plan(desired: DesiredState, actual: KernelState) -> list[Op]:
    """The ordered operations that turn `actual` into `desired` (empty when they agree)."""
    ops: list[Op] = []
    device = actual.device
    if device is None:
        ops.append(CreateDevice(desired.device, "missing"))
        actual = KernelState()
    else:
        reasons = device_mismatches(desired.device, device)
        if reasons:
            why = "; ".join(reasons)
            ops.append(DeleteDevice(desired.device.name, why))
            ops.append(CreateDevice(desired.device, f"recreated: {why}"))
            actual = KernelState()
        else:
            if device.mtu != desired.device.mtu:
                ops.append(SetDeviceMtu(desired.device.mtu))
            if not device.up:
                ops.append(SetDeviceUp())

    ops.extend(AddAddress(a) for a in sorted(desired.addresses - actual.addresses))

    for (network, priority), route in actual.routes.items():
        if priority != 0 or network not in desired.routes:
            ops.append(DeleteRoute(network, route.gateway, priority))

    for ip, (mac, owner) in desired.neighbours.items():
        have = actual.neighbours.get(ip)
        if have is None or have.mac != mac or not have.permanent:
            ops.append(SetNeighbour(ip, mac, owner))
    for mac, (dst, owner) in desired.fdb.items():
        if tuple(actual.fdb.get(mac, ())) != (dst,):
            ops.append(SetFdb(mac, dst, owner))

    for network, (gateway, owner) in desired.routes.items():
        have_route = actual.routes.get((network, 0))
        if have_route is None:
            ops.append(AddRoute(network, gateway, owner))
        elif have_route.gateway != gateway or not have_route.onlink:
            ops.append(ReplaceRoute(network, gateway, owner))

    for ip, neighbour in actual.neighbours.items():
        if neighbour.permanent and ip not in desired.neighbours:
            ops.append(DeleteNeighbour(ip, neighbour.mac))
    for mac, dsts in actual.fdb.items():
        if mac not in desired.fdb:
            ops.extend(DeleteFdb(mac, dst) for dst in dsts)
    ops.extend(DeleteAddress(a) for a in sorted(actual.addresses - desired.addresses))
    return ops
