"""The encrypted data path inside the agent: who is reached over WireGuard, and keeping it so.

This module owns the agent's side of `tunnel.wireguard`:

* the **policy** (pure): which peers want the encrypted path. A node announces its wish in the
  gossip tag `enc` (`*` for every peer, or a comma list of node names); two weavepy nodes use
  WireGuard when either one wants it for the other and both announced a WireGuard key and the
  `wireguard` capability (`encryption_wanted`). Peers that also announced `wgx` get the
  super-packet extension; nobody else ever receives it.
* **external peers** (`ExternalPeer`): plain hosts with stock WireGuard that an operator
  declares (name, public key, optional endpoint, allowed IPs), and the wg-quick configuration
  that lets such a host join (`render_wg_quick`, like Kilo's `kgctl showconf`);
* **routes through the TUN device** (`plan_routes` pure, `apply_routes` the netlink shell):
  one main-table route per encrypted peer block, `dev <tun> src <our gateway>`;
* `EncryptedPath` (trio): starts the `WireGuardInterface` the first time a peer needs it,
  mirrors the desired peers into it (`set_peer`/`remove_peer`), retries handshakes of peers
  without a session every `retry_interval`, and says per peer how the connection stands.

The rules it keeps: a peer is configured with `extension_ok` only if it announced `wgx`;
the data plane (`tunnel.wireguard.device`, and numpy with it) is imported only when the
interface first starts, so an agent without encryption never loads it;
routes through the TUN device are only ever those of configured peers' allowed IPs, and a
route on another device is never touched; the interface is started once and lives as long as
the agent (the TUN device, and with it every encrypted route, goes when the agent stops: the
userspace path cannot outlive its process).
"""

from __future__ import annotations

import base64
import binascii
import errno
import logging
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Network, ip_network
from typing import TYPE_CHECKING, Any

import trio

from gossip.hostport import HostPortError, parse_host_port
from tunnel.wireguard.core import HandshakeCompleted, HandshakeGaveUp, PeerConfig
from tunnel.wireguard.keys import PrivateKey, PublicKey
from tunnel.wireguard.plane import HandshakeNeeded

if TYPE_CHECKING:  # the data plane (and numpy with it) loads when the interface first starts
    from tunnel.wireguard.device import WireGuardInterface

__all__ = [
    "CAP_EXTENSION",
    "CAP_WIREGUARD",
    "DEFAULT_WG_PORT",
    "UDP_IPV4_OVERHEAD",
    "WG_OVERHEAD",
    "EncryptedPath",
    "ExternalPeer",
    "WgPeer",
    "apply_routes",
    "encrypt_tag",
    "encryption_wanted",
    "parse_external_peer",
    "plan_routes",
    "render_wg_quick",
]

log = logging.getLogger(__name__)

CAP_WIREGUARD = "wireguard"  # speaks standard WireGuard on the announced key and port
CAP_EXTENSION = "wgx"  # also the weavepy super-packet extension (docs/wireguard.md)
DEFAULT_WG_PORT = 51820
WG_OVERHEAD = 80  # IPv6-safe WireGuard overhead, as flannel and wg-quick subtract
UDP_IPV4_OVERHEAD = 28  # the largest datagram is underlay MTU - IPv4 - UDP headers
RETRY_INTERVAL = 10.0  # seconds between handshake retries of peers without a session
FAILED_AFTER = 15.0  # seconds without a session (after setup or expiry) before "failed"
HANDSHAKE_FRESH = 180.0  # REJECT_AFTER_TIME: a session older than this no longer carries data
EXTERNAL_KEEPALIVE = 25  # PersistentKeepalive in the external host's config (NAT friendly)


# ---------------------------------------------------------------------------------------------
# Policy (pure)


def encrypt_tag(encrypt_all: bool, peers: Sequence[str]) -> str:
    """The `enc` tag value for this node's wish: "*", "n2,n3", or "" (no wish)."""
    if encrypt_all:
        return "*"
    return ",".join(sorted(set(peers)))


def _wants(tag: str, other: str) -> bool:
    names = {n.strip() for n in tag.split(",")}
    return "*" in names or other in names


def encryption_wanted(local_name: str, local_tag: str, peer_name: str, peer_tag: str) -> bool:
    """True if either node wants the encrypted path to the other; symmetric, so both ends of
    a connection always reach the same answer from the same tags."""
    return _wants(local_tag, peer_name) or _wants(peer_tag, local_name)


@dataclass(frozen=True)
class WgPeer:
    """One WireGuard peer the agent should configure: a weavepy node or an external host."""

    name: str
    public_key: bytes
    endpoint: tuple[str, int] | None
    allowed_ips: tuple[IPv4Network, ...]
    extension_ok: bool = False
    external: bool = False

    def peer_config(self) -> PeerConfig:
        return PeerConfig(public_key=PublicKey(self.public_key),
                          allowed_ips=tuple(str(n) for n in self.allowed_ips),
                          endpoint=self.endpoint, extension_ok=self.extension_ok)


# ---------------------------------------------------------------------------------------------
# External peers


@dataclass(frozen=True)
class ExternalPeer:
    """A host with stock WireGuard that joins the pod network (declared by an operator)."""

    name: str
    public_key: bytes
    allowed_ips: tuple[IPv4Network, ...]
    endpoint: tuple[str, int] | None = None

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "public_key": base64.b64encode(self.public_key).decode(),
                "allowed_ips": [str(n) for n in self.allowed_ips],
                "endpoint": f"{self.endpoint[0]}:{self.endpoint[1]}" if self.endpoint else None}

    def wg_peer(self) -> WgPeer:
        return WgPeer(self.name, self.public_key, self.endpoint, self.allowed_ips,
                      extension_ok=False, external=True)


def parse_external_peer(raw: object) -> ExternalPeer:
    """An external peer from a mapping {name, public_key, allowed_ips, endpoint?}; ValueError
    with one readable sentence if anything is wrong."""
    if not isinstance(raw, Mapping):
        raise ValueError(f"an external peer must be a mapping, got {type(raw).__name__}")
    unknown = set(raw) - {"name", "public_key", "allowed_ips", "endpoint"}
    if unknown:
        raise ValueError(f"unknown external peer fields {sorted(map(str, unknown))}")
    name = raw.get("name")
    if not isinstance(name, str) or not name or len(name) > 63 or not all(
            c.isalnum() or c in "-_." for c in name):
        raise ValueError(f"external peer name {name!r} must be 1-63 letters, digits, - _ .")
    key_text = raw.get("public_key")
    try:
        key = base64.b64decode(str(key_text), validate=True)
    except binascii.Error:
        key = b""
    if len(key) != 32:
        raise ValueError(f"external peer {name}: public_key {key_text!r} is not a base64 "
                         f"32-byte WireGuard key (`wg pubkey` prints one)")
    allowed = raw.get("allowed_ips")
    if isinstance(allowed, str):
        allowed = [a for a in allowed.replace(" ", "").split(",") if a]
    if not isinstance(allowed, list) or not allowed:
        raise ValueError(f"external peer {name}: allowed_ips must be a non-empty list of "
                         f"IPv4 CIDRs")
    networks: list[IPv4Network] = []
    for item in allowed:
        try:
            network = ip_network(str(item), strict=True)
        except ValueError:
            raise ValueError(f"external peer {name}: {item!r} is not an IPv4 CIDR with its "
                             f"host bits clear") from None
        if not isinstance(network, IPv4Network):
            raise ValueError(f"external peer {name}: {item} is not IPv4")
        networks.append(network)
    endpoint_text = raw.get("endpoint")
    endpoint: tuple[str, int] | None = None
    if endpoint_text not in (None, ""):
        try:
            endpoint = parse_host_port(str(endpoint_text), hosts="ipv4")
        except HostPortError as exc:
            raise ValueError(f"external peer {name}: endpoint {endpoint_text!r} must be "
                             f"IPv4:PORT ({exc.problem})") from None
    return ExternalPeer(name, key, tuple(networks), endpoint)


@dataclass(frozen=True)
class ConfigNode:
    """One cluster node as an external host's [Peer] section sees it."""

    name: str
    public_key: bytes
    endpoint: tuple[str, int]
    blocks: tuple[IPv4Network, ...]


def render_wg_quick(peer: ExternalPeer, nodes: Sequence[ConfigNode], mtu: int,
                    generated_by: str) -> str:
    """The wg-quick configuration for external host `peer`: its address and one [Peer] per
    cluster node (its key, underlay endpoint and pod blocks). The private key is the host's
    own and is never known to the cluster: the operator fills it in."""
    lines = [
        f"# weavepy: WireGuard configuration for the external host {peer.name!r}",
        f"# generated by node {generated_by}; regenerate it when nodes or their blocks change",
        "# (`weavepy wg-config " + peer.name + "`). For `wg setconf`, drop Address and MTU",
        "# (or use `wg-quick strip`), and add the address and routes with `ip`.",
        "[Interface]",
        "PrivateKey = <the private key of " + base64.b64encode(peer.public_key).decode() + ">",
        f"Address = {', '.join(str(n) for n in peer.allowed_ips)}",
    ]
    if peer.endpoint is not None:
        lines.append(f"ListenPort = {peer.endpoint[1]}")
    lines.append(f"MTU = {mtu}")
    for node in sorted(nodes, key=lambda n: n.name):
        if not node.blocks:
            continue
        lines += [
            "",
            "[Peer]",
            f"# {node.name}",
            f"PublicKey = {base64.b64encode(node.public_key).decode()}",
            f"Endpoint = {node.endpoint[0]}:{node.endpoint[1]}",
            f"AllowedIPs = {', '.join(str(b) for b in node.blocks)}",
            f"PersistentKeepalive = {EXTERNAL_KEEPALIVE}",
        ]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# Routes through the TUN device


RouteTable = Mapping[IPv4Network, str | None]  # prefix -> preferred source address


def plan_routes(desired: RouteTable, actual: RouteTable
                ) -> tuple[list[IPv4Network], list[tuple[IPv4Network, str | None]]]:
    """(routes to delete, routes to add or replace) to turn `actual` into `desired` (pure)."""
    delete = sorted(p for p in actual if p not in desired)
    put = sorted(((p, s) for p, s in desired.items() if actual.get(p, "") != s),
                 key=lambda item: item[0])
    return delete, put


def _read_routes(ipr: Any, index: int) -> dict[IPv4Network, str | None]:
    routes: dict[IPv4Network, str | None] = {}
    for route in ipr.get_routes(family=socket.AF_INET, table=254):
        dst = route.get_attr("RTA_DST")
        if route.get_attr("RTA_OIF") != index or dst is None:
            continue
        source = route.get_attr("RTA_PREFSRC")
        routes[IPv4Network(f"{dst}/{route['dst_len']}")] = str(source) if source else None
    return routes


def apply_routes(device: str, desired: RouteTable, *, delete_only: bool = False
                 ) -> tuple[list[str], list[str]]:
    """Make the main-table routes on `device` equal `desired` (blocking; run in a thread).

    Returns (changes, errors), one readable line each; with `delete_only` it only removes
    routes that are not wanted (so another device's route can take the prefix first)."""
    from tunnel.netlink import open_iproute

    changes: list[str] = []
    errors: list[str] = []
    ipr = open_iproute()
    try:
        found = ipr.link_lookup(ifname=device)
        if not found:
            return [], [] if delete_only or not desired else [f"device {device} is missing"]
        index = found[0]
        delete, put = plan_routes(desired, _read_routes(ipr, index))
        for prefix in delete:
            try:
                ipr.route("del", dst=str(prefix), oif=index, table=254)
                changes.append(f"del route {prefix} dev {device}")
            except Exception as exc:  # a kernel refusal: report, retry next pass
                if getattr(exc, "code", None) not in (errno.ESRCH, errno.ENOENT):
                    errors.append(f"del route {prefix}: {exc}")
        if delete_only:
            return changes, errors
        for prefix, source in put:
            settings: dict[str, Any] = {"dst": str(prefix), "oif": index, "table": 254}
            if source is not None:
                settings["prefsrc"] = source
            try:
                ipr.route("replace", **settings)
                changes.append(f"route {prefix} dev {device}"
                               + (f" src {source}" if source else ""))
            except Exception as exc:
                errors.append(f"route {prefix} dev {device}: {exc}")
    finally:
        ipr.close()
    return changes, errors


# ---------------------------------------------------------------------------------------------
# The running path


@dataclass
class _PeerHealth:
    configured_at: float  # wall clock: when the peer was (re)configured
    gave_up_at: float | None = None
    retries: int = 0


@dataclass
class EncryptedPath:
    """The agent's WireGuard interface and its routes; see the module docstring."""

    device: str
    private_key: bytes
    listen_port: int
    mtu: int
    max_datagram: int
    workers: bool = False  # see AGENT_WORKERS in weavepy.agent
    retry_interval: float = RETRY_INTERVAL
    on_ready: Callable[[], None] = lambda: None
    interface: WireGuardInterface | None = None
    error: str | None = None
    peers: dict[str, WgPeer] = field(default_factory=dict)
    routed: set[str] = field(default_factory=set)
    health: dict[bytes, _PeerHealth] = field(default_factory=dict)
    last_changes: list[str] = field(default_factory=list)
    last_errors: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._wanted = trio.Event()

    @property
    def running(self) -> bool:
        return self.interface is not None

    def want(self) -> None:
        """A peer needs the encrypted path: start the interface (once)."""
        self._wanted.set()

    async def run(self) -> None:
        """Wait until wanted, then run the interface and retry handshakes, until cancelled.
        If the interface fails (the TUN device deleted, a worker died), the error shows in
        `connection()` and the interface is started again after `retry_interval`."""
        await self._wanted.wait()
        from tunnel.wireguard.device import InterfaceConfig, WireGuardInterface

        while True:
            config = InterfaceConfig(name=self.device, private_key=PrivateKey(self.private_key),
                                     listen_port=self.listen_port, mtu=self.mtu,
                                     max_datagram=self.max_datagram, workers=self.workers)
            interface = WireGuardInterface(config)
            try:
                async with trio.open_nursery() as nursery:
                    await nursery.start(interface.run)
                    self.interface = interface
                    self.error = None
                    log.info("WireGuard interface %s up on UDP %d (mtu %d)", self.device,
                             self.listen_port, self.mtu)
                    self.on_ready()
                    nursery.start_soon(self._retry_loop, interface)
            except* Exception as group:  # any failure of the path must not stop the agent
                self.error = f"WireGuard interface {self.device} failed: {_first(group)!r}"
                log.error("%s; starting it again in %g s", self.error, self.retry_interval,
                          exc_info=_first(group))
            finally:
                self.interface = None
                self.peers.clear()
                self.routed = set()
            self.on_ready()
            await trio.sleep(self.retry_interval)

    async def _retry_loop(self, interface: WireGuardInterface) -> None:
        while True:
            self._drain_events(interface)
            now = time.monotonic()
            wanted = []
            for peer in interface.core.peers:
                if peer.keypairs.current is None and peer.endpoint is not None:
                    self._health(peer.public_key.raw).retries += 1
                    wanted.append(HandshakeNeeded(peer.public_key.raw))
            if wanted:
                interface.handle_reports(list(wanted))
            await trio.sleep(max(0.5, self.retry_interval - (time.monotonic() - now)))

    def _drain_events(self, interface: WireGuardInterface) -> None:
        events, interface.events[:] = list(interface.events), []
        for event in events:
            if isinstance(event, HandshakeGaveUp):
                self._health(event.peer.raw).gave_up_at = time.time()
            elif isinstance(event, HandshakeCompleted):
                self.health[event.peer.raw] = _PeerHealth(time.time())

    def _health(self, key: bytes) -> _PeerHealth:
        return self.health.setdefault(key, _PeerHealth(time.time()))

    def sync_peers(self, wanted: Sequence[WgPeer]) -> None:
        """Configure exactly `wanted` in the interface (no-op until it runs)."""
        interface = self.interface
        if interface is None:
            return
        by_name = {p.name: p for p in wanted}
        for name, old in list(self.peers.items()):
            new = by_name.get(name)
            if new is None or new.public_key != old.public_key:
                interface.remove_peer(PublicKey(old.public_key))
                self.health.pop(old.public_key, None)
                del self.peers[name]
        for name, peer in by_name.items():
            if self.peers.get(name) != peer:
                try:
                    interface.set_peer(peer.peer_config())
                except ValueError as exc:  # our own key, or a weak one: never configured
                    log.warning("WireGuard peer %s not configured: %s", name, exc)
                    continue
                if name not in self.peers or self.peers[name].endpoint != peer.endpoint:
                    self.health[peer.public_key] = _PeerHealth(time.time())
                self.peers[name] = peer
                if peer.endpoint is not None:
                    interface.handle_reports([HandshakeNeeded(peer.public_key)])

    async def apply(self, wanted: Sequence[WgPeer], source: str | None,
                    *, delete_only: bool = False) -> list[str]:
        """Peers into the interface and their allowed IPs as routes on the TUN device;
        returns errors (one line each)."""
        if not delete_only:
            self.sync_peers(wanted)
        if self.interface is None:
            self.routed = set()
            return []
        desired = {net: source for p in wanted if p.name in self.peers for net in p.allowed_ips}
        changes, errors = await trio.to_thread.run_sync(
            lambda: apply_routes(self.device, desired, delete_only=delete_only))
        if changes:
            log.info("WireGuard routes: %s", "; ".join(changes))
        if not delete_only:
            self.routed = {p.name for p in wanted if p.name in self.peers} if not errors else {
                p.name for p in wanted if p.name in self.peers
                and not any(str(n) in e for n in p.allowed_ips for e in errors)}
            self.last_changes, self.last_errors = changes, errors
        return errors

    def connection(self, name: str) -> tuple[str, str | None]:
        """(state, reason) of the encrypted connection to `name`."""
        if self.interface is None:
            return "pending", self.error or "starting the WireGuard interface"
        peer = self.peers.get(name)
        if peer is None:
            return "pending", "waiting for the next reconcile pass"
        core_peer = next((p for p in self.interface.core.peers
                          if p.public_key.raw == peer.public_key), None)
        if core_peer is None:
            return "pending", "not configured yet"
        now = time.time()
        last = core_peer.last_handshake_wall
        if core_peer.keypairs.current is not None and last and now - last < HANDSHAKE_FRESH:
            if name not in self.routed:
                return "pending", "routes not programmed yet"
            return "established", None
        health = self._health(peer.public_key)
        since = max(health.configured_at, last + HANDSHAKE_FRESH if last else 0.0)
        waited = now - since
        if peer.endpoint is None:
            return "pending", "waiting for the peer's first handshake (no endpoint declared)"
        if health.gave_up_at is not None or waited > FAILED_AFTER:
            return "failed", (f"no handshake answer from {_endpoint_text(peer.endpoint)} for "
                              f"{waited:.0f} s; retrying every {self.retry_interval:g} s")
        return "pending", f"handshake with {_endpoint_text(peer.endpoint)} in progress"

    def status(self) -> dict[str, Any]:
        interface = self.interface
        doc: dict[str, Any] = {
            "device": self.device, "listen_port": self.listen_port, "mtu": self.mtu,
            "running": interface is not None, "error": self.error,
            "public_key": PrivateKey(self.private_key).public_key.to_base64(),
            "peers": sorted(self.peers), "routed_peers": sorted(self.routed),
            "last_changes": self.last_changes, "last_errors": self.last_errors,
        }
        if interface is not None:
            wg = interface.status()
            doc["drops"] = wg["drops"]
            doc["stats"] = wg["stats"]
        return doc


def _first(group: BaseException) -> BaseException:
    while isinstance(group, BaseExceptionGroup):
        group = group.exceptions[0]
    return group


def _endpoint_text(endpoint: tuple[str, int] | None) -> str:
    return f"{endpoint[0]}:{endpoint[1]}" if endpoint else "an unknown endpoint"
