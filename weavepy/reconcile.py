"""The reconciler: desired data plane = f(live peers, their blocks, chosen path), kept true.

This module owns the step from "what the agent knows" to "what the kernel should hold":

* `desired_data_plane` (pure) takes the cluster view's peers, the IPAM block table and this
  node's own identity, and returns the peers to program through `tunnel.vxlan` (with their
  blocks in claim order), this node's own blocks, and every peer left out with the reason
  (another cluster, a VXLAN VNI/port that differs from ours, no usable path);
* `Reconciler` (trio) runs that function and applies the result with the VXLAN backend, then
  makes the pod bridge carry the gateway of each owned block, then keeps weavepy's host rules
  (`HostRulesKeeper`: egress masquerade, forward accepts, the API guard; weavepy.hostrules)
  with the peer nodes of the pass. It runs when poked (a member event, a block change, the
  device deleted or set down), at least every `interval`, and coalesces bursts of pokes into
  one pass: a poke after a quiet spell runs a pass within 5 ms, the next at least `PASS_GAP`
  (1 s) after that pass started, unless this node's own blocks changed (its pods wait).

The rules it keeps:

* Data flows one way: it reads the view and the block table, it never writes them.
* Applying is idempotent (the backend diffs desired against the kernel), so a pass with nothing
  to do changes nothing.
* Host rules run in a worker thread and never stop a pass or the agent: what fails is in
  their status (`host_rules.errors`) and tried again on the next pass; rules someone removed
  or flushed are put back, logged and counted (`restorations`).
* **Routes follow block ownership, not momentary liveness.** A peer gossip declares failed
  keeps its routes (VXLAN and WireGuard alike, as last announced) while the block table still
  names it as the owner of its blocks, for at most `grace` after the failure (`--route-grace`):
  an agent restart, a rolling update or a reboot that outlasts failure detection changes no
  route on the peers, as flannel's subnet lease does. The routes go when the grace ends, when
  the blocks are reclaimed or removed (`--reclaim-after`, `weavepy rmpeer`, a deleted Node),
  or at once when the peer leaves (`weavepy stop`). A kept peer never displaces a live one:
  one that shares a live peer's underlay address, VTEP MAC or WireGuard key, or whose blocks
  overlap a live peer's or ours, is dropped. A peer that comes back is programmed from its
  new tags, so a new underlay address or VTEP MAC replaces the neighbour and FDB entry under a
  route that stays.
* **No flapping across a restart.** The peers programmed by the last pass are saved in the run
  directory (tmpfs: it dies with the kernel state it describes). A freshly started agent knows
  nobody yet, so until its view has settled it keeps programming those saved peers unless the
  view says otherwise (the peer is now dead, or has new data). A restart thus leaves working
  routes alone, and a peer that died meanwhile is removed once the view has settled.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from pathlib import Path
from typing import Any

import trio

from tunnel.vxlan import Peer, ReconcileReport, VxlanBackend, watch_device
from weavepy.cluster import DataPlaneIdentity, PeerState, PeerView
from weavepy.fileio import atomic_write
from weavepy.hostrules import HostRules, HostRulesError, HostRulesSpec, HostRulesState
from weavepy.wgpath import (
    CAP_EXTENSION,
    CAP_WIREGUARD,
    EncryptedPath,
    ExternalPeer,
    WgPeer,
    encryption_wanted,
)

__all__ = [
    "PROGRAMMED_FILE",
    "DesiredDataPlane",
    "HostRulesKeeper",
    "Reconciler",
    "choose_path",
    "desired_data_plane",
    "fallback_reason",
    "load_programmed",
    "peer_node_addresses",
    "save_programmed",
    "with_retained",
]

log = logging.getLogger(__name__)

PROGRAMMED_FILE = "vxlan-peers.json"
DEBOUNCE = 0.005  # seconds: pokes within this window share one pass
PASS_GAP = 1.0  # seconds at least from one poked pass's start to the next (a join wave of N
#               members pokes every node N times; each pass reads the whole kernel state)
WG_ERROR_RETRY = 2.0  # seconds: the next pass after one with WireGuard route errors


def choose_path(local: DataPlaneIdentity, peer: DataPlaneIdentity, *, local_name: str = "",
                peer_name: str = "") -> str | None:
    """The data path to `peer`, or None if we share none.

    "wireguard" when either node wants the connection encrypted (`weavepy.wgpath`'s symmetric
    rule on the `enc` tags) and both announced the capability, a key and a port; else kernel
    "vxlan" when both speak it (see `fallback_reason` for why an encrypted wish fell back)."""
    if (encryption_wanted(local_name, local.encrypt, peer_name, peer.encrypt)
            and _speaks_wireguard(local) and _speaks_wireguard(peer)):
        return "wireguard"
    if "vxlan" in local.capabilities and "vxlan" in peer.capabilities:
        return "vxlan"
    return None


def _speaks_wireguard(ident: DataPlaneIdentity) -> bool:
    return (CAP_WIREGUARD in ident.capabilities and ident.wg_public_key is not None
            and ident.wg_port is not None)


def fallback_reason(local: DataPlaneIdentity, peer: DataPlaneIdentity, path: str, *,
                    local_name: str = "", peer_name: str = "") -> str | None:
    """Why the path to `peer` is not the encrypted one although encryption is wanted (pure);
    None when there is nothing to explain."""
    if path == "wireguard":
        return None
    if not encryption_wanted(local_name, local.encrypt, peer_name, peer.encrypt):
        return None
    if not _speaks_wireguard(local):
        return "encryption wanted, but this node has no WireGuard data path"
    if peer.wg_public_key is None:
        return "encryption wanted, but the peer did not announce a WireGuard key"
    if CAP_WIREGUARD not in peer.capabilities or peer.wg_port is None:
        return "encryption wanted, but the peer has no WireGuard data path"
    return None


@dataclass(frozen=True)
class DesiredDataPlane:
    """What the kernel should hold: VXLAN peers, WireGuard peers, our blocks, who is left out
    and why."""

    peers: tuple[Peer, ...]
    local_blocks: tuple[IPv4Network, ...]
    excluded: Mapping[str, str] = field(default_factory=dict)
    paths: Mapping[str, str] = field(default_factory=dict)
    fallbacks: Mapping[str, str] = field(default_factory=dict)  # name -> why not encrypted
    wg_peers: tuple[WgPeer, ...] = ()
    kept: Mapping[str, float] = field(default_factory=dict)  # failed peer -> end of its grace

    @property
    def next_expiry(self) -> float | None:
        """When the first kept peer's grace ends (the reconciler runs a pass then)."""
        return min(self.kept.values(), default=None)


def desired_data_plane(
    view: Sequence[PeerView],
    blocks_by_node: Mapping[str, Sequence[IPv4Network]],
    self_name: str,
    local: DataPlaneIdentity,
    external: Sequence[ExternalPeer] = (),
    *,
    now: float = 0.0,
    grace: float = 0.0,
) -> DesiredDataPlane:
    """The desired data plane for this node (pure).

    `view` is every known member (live or not); `blocks_by_node` maps node names to their
    blocks, first claimed first (the VXLAN scheme anchors a peer on its first block);
    `external` are declared stock-WireGuard hosts (always over WireGuard). A failed member
    that still owns blocks is kept until `grace` seconds after its failure (`now` and the
    view's `since` share one clock), unless it conflicts with a live peer (module docstring).
    """
    peers: list[Peer] = []
    wg_peers: list[WgPeer] = []
    excluded: dict[str, str] = {}
    paths: dict[str, str] = {}
    fallbacks: dict[str, str] = {}
    kept: dict[str, float] = {}
    for member in view:
        if member.name == self_name:
            continue
        keep_until: float | None = None  # a failed peer's end of grace
        if not member.live:
            keep_until = member.since + grace
            if (member.state is not PeerState.FAILED or grace <= 0 or keep_until <= now
                    or not blocks_by_node.get(member.name)):
                continue
        ident = member.identity
        if ident is None:
            if member.problem is not None and member.problem.reason != "not-weavepy":
                excluded[member.name] = f"bad tags: {member.problem}"
            continue
        if local.cluster_id and ident.cluster_id and ident.cluster_id != local.cluster_id:
            excluded[member.name] = (f"belongs to cluster {ident.cluster_id}, "
                                     f"we are {local.cluster_id}")
            continue
        path = choose_path(local, ident, local_name=self_name, peer_name=member.name)
        if path == "wireguard" and ident.wg_public_key is not None and ident.wg_port:
            paths[member.name] = path
            if keep_until is not None:
                kept[member.name] = keep_until
            wg_peers.append(WgPeer(
                member.name, ident.wg_public_key, (str(ident.underlay_ip), ident.wg_port),
                tuple(blocks_by_node.get(member.name, ())),
                extension_ok=CAP_EXTENSION in ident.capabilities and CAP_EXTENSION in
                local.capabilities))
            continue
        if (ident.vxlan_vni, ident.vxlan_port) != (local.vxlan_vni, local.vxlan_port):
            excluded[member.name] = (f"VXLAN vni {ident.vxlan_vni} port {ident.vxlan_port} "
                                     f"differs from ours ({local.vxlan_vni}:{local.vxlan_port})")
            continue
        if path is None:
            excluded[member.name] = f"no common data path (it has {sorted(ident.capabilities)})"
            continue
        paths[member.name] = path
        if keep_until is not None:
            kept[member.name] = keep_until
        reason = fallback_reason(local, ident, path, local_name=self_name,
                                 peer_name=member.name)
        if reason is not None:
            fallbacks[member.name] = reason
        peers.append(Peer(member.name, ident.underlay_ip, ident.vtep_mac,
                          tuple(blocks_by_node.get(member.name, ()))))
    local_blocks = tuple(blocks_by_node.get(self_name, ()))
    if kept:
        peers, wg_peers = _without_conflicting_kept(peers, wg_peers, kept, local_blocks,
                                                    excluded, paths, fallbacks)
    members = {m.name for m in view} | {self_name}
    for host in external:
        if host.name in members:
            excluded[host.name] = "an external peer may not share a cluster member's name"
            continue
        paths[host.name] = "wireguard"
        wg_peers.append(host.wg_peer())
    return DesiredDataPlane(tuple(peers), local_blocks, excluded, paths, fallbacks,
                            tuple(wg_peers), kept)


def _without_conflicting_kept(
    peers: list[Peer], wg_peers: list[WgPeer], kept: dict[str, float],
    local_blocks: Sequence[IPv4Network], excluded: dict[str, str], paths: dict[str, str],
    fallbacks: dict[str, str],
) -> tuple[list[Peer], list[WgPeer]]:
    """The peers and WireGuard peers without the kept (failed) ones that would displace a live
    peer or this node: the same underlay address, VTEP MAC or WireGuard key, or an overlapping
    block. Those are dropped from `kept` and `paths` too, and named in `excluded` (pure)."""
    live = [p for p in peers if p.name not in kept]
    live_wg = [p for p in wg_peers if p.name not in kept]
    addresses = {p.underlay_ip for p in live} | {IPv4Address(p.endpoint[0]) for p in live_wg
                                                  if p.endpoint is not None}
    macs = {p.vtep_mac for p in live}
    keys = {p.public_key for p in live_wg}
    taken = [*local_blocks, *(b for p in live for b in p.blocks),
             *(b for p in live_wg for b in p.allowed_ips)]

    def conflict(address: IPv4Address | None, mac: str | None, key: bytes | None,
                 blocks: Sequence[IPv4Network]) -> str | None:
        if address is not None and address in addresses:
            return f"failed; its underlay address {address} is now a live peer's"
        if mac is not None and mac in macs:
            return f"failed; its VTEP MAC {mac} is now a live peer's"
        if key is not None and key in keys:
            return "failed; its WireGuard key is now a live peer's"
        clash = next((b for b in blocks for t in taken if b.overlaps(t)), None)
        if clash is not None:
            return f"failed; its block {clash} overlaps a live node's"
        return None

    dropped: dict[str, str] = {}
    for peer in peers:
        if peer.name in kept:
            why = conflict(peer.underlay_ip, peer.vtep_mac, None, peer.blocks)
            if why is not None:
                dropped[peer.name] = why
    for wg in wg_peers:
        if wg.name in kept:
            endpoint = IPv4Address(wg.endpoint[0]) if wg.endpoint is not None else None
            why = conflict(endpoint, None, wg.public_key, wg.allowed_ips)
            if why is not None:
                dropped[wg.name] = why
    for name, why in dropped.items():
        kept.pop(name)
        paths.pop(name, None)
        fallbacks.pop(name, None)
        excluded[name] = why
    return ([p for p in peers if p.name not in dropped],
            [p for p in wg_peers if p.name not in dropped])


def with_retained(desired: DesiredDataPlane, retained: Sequence[Peer],
                  known: set[str]) -> DesiredDataPlane:
    """`desired` plus the retained peers the view knows nothing about yet (start-up only)."""
    extra = [p for p in retained if p.name not in known and p.name not in desired.excluded]
    if not extra:
        return desired
    return DesiredDataPlane((*desired.peers, *extra), desired.local_blocks, desired.excluded,
                            {**desired.paths, **{p.name: "vxlan (retained)" for p in extra}},
                            desired.fallbacks, desired.wg_peers, desired.kept)


def peer_node_addresses(desired: DesiredDataPlane) -> frozenset[IPv4Address]:
    """The hosts that route the pod range back through the overlay, so that a pod must reach
    them as its node (the host rules' peer set, docs/egress.md): the underlay address of every
    node this pass programs, over either path, and the endpoint of every external WireGuard
    peer that has one (pure)."""
    found = {peer.underlay_ip for peer in desired.peers}
    found |= {IPv4Address(peer.endpoint[0]) for peer in desired.wg_peers
              if peer.endpoint is not None}
    return frozenset(found)


class HostRulesKeeper:
    """weavepy's host rules, kept on every reconcile pass (see the module docstring).

    `spec(peer_node_addresses)` builds the wanted rules; `ensure` applies them through
    `weavepy.hostrules.HostRules` in a worker thread and never raises: a failure, missing
    nftables support included, is in the state's `errors`. `to_json()` is the status
    document's `host_rules` section."""

    def __init__(self, spec: Callable[[frozenset[IPv4Address]], HostRulesSpec]) -> None:
        self._spec = spec
        self._rules: HostRules | None = None
        self._last_error: str | None = None
        self.wanted: HostRulesSpec | None = None
        self.state: HostRulesState | None = None
        self.last_check: float | None = None

    async def ensure(self, peers: frozenset[IPv4Address]) -> HostRulesState:
        self.state = await trio.to_thread.run_sync(self._ensure, peers)
        self.last_check = time.time()
        return self.state

    def _ensure(self, peers: frozenset[IPv4Address]) -> HostRulesState:
        """One pass in the worker thread; `HostRules` is made on the first (or after it
        could not be)."""
        try:
            self.wanted = self._spec(peers)
            if self._rules is None:
                self._rules = HostRules()
            state = self._rules.ensure(self.wanted)
        except Exception as exc:  # report it, retry next pass (the shell reports host errors)
            error = (str(exc) if isinstance(exc, HostRulesError)
                     else f"{type(exc).__name__}: {exc}")
            if error != self._last_error:
                log.error("host rules: %s", error)
            self._last_error = error
            last = self.state
            return HostRulesState(
                present=False, changes=(), restored=(),
                restorations=last.restorations if last else 0,
                masqueraded_packets=last.masqueraded_packets if last else 0,
                masqueraded_bytes=last.masqueraded_bytes if last else 0,
                accepts_in=(), errors=(error,))
        self._last_error = None
        return state

    def to_json(self) -> dict[str, Any]:
        state, wanted = self.state, self.wanted
        return {
            "present": state.present if state else False,
            "last_check": self.last_check,
            "masquerade": wanted.masquerade if wanted else None,
            "no_masq_cidrs": [str(n) for n in wanted.no_masq_cidrs] if wanted else [],
            "peer_nodes": sorted((str(a) for a in wanted.peer_node_addresses),
                                 key=IPv4Address) if wanted else [],
            "api_guard_port": wanted.api_guard_port if wanted else None,
            "accepts_in": list(state.accepts_in) if state else [],
            "restorations": state.restorations if state else 0,
            "last_restored": list(state.restored) if state else [],
            "masqueraded_packets": state.masqueraded_packets if state else 0,
            "masqueraded_bytes": state.masqueraded_bytes if state else 0,
            "errors": list(state.errors) if state else [],
        }


def _peer_to_json(peer: Peer) -> dict[str, Any]:
    return {"name": peer.name, "underlay_ip": str(peer.underlay_ip), "vtep_mac": peer.vtep_mac,
            "blocks": [str(b) for b in peer.blocks]}


def save_programmed(run_dir: Path, peers: Sequence[Peer]) -> None:
    data = json.dumps({"version": 1, "peers": [_peer_to_json(p) for p in peers]}, indent=1)
    # Not durable: the file lives in the run directory (tmpfs) and only has to outlive an agent
    # restart, not a reboot; no fsync on the reconciler's pass.
    atomic_write(run_dir / PROGRAMMED_FILE, data.encode(), durable=False)


def load_programmed(run_dir: Path) -> list[Peer]:
    """The peers the previous agent programmed; [] if none or unreadable (logged)."""
    path = run_dir / PROGRAMMED_FILE
    try:
        doc = json.loads(path.read_bytes())
        return [Peer(str(p["name"]), IPv4Address(p["underlay_ip"]), str(p["vtep_mac"]),
                     tuple(IPv4Network(b) for b in p["blocks"])) for p in doc["peers"]]
    except FileNotFoundError:
        return []
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("ignoring %s (%s): routes to peers not yet heard from may be re-added "
                    "a moment later", path, exc)
        return []


@dataclass
class PassRecord:
    """The outcome of one reconcile pass, as `status` shows it."""

    started: float
    reason: str
    report: ReconcileReport
    bridge_error: str | None = None
    retained: int = 0
    wireguard_errors: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return self.report.ok and self.bridge_error is None and not self.wireguard_errors

    def to_json(self) -> dict[str, Any]:
        r = self.report
        return {
            "at": self.started,
            "reason": self.reason,
            "ok": self.ok,
            "duration_ms": round(r.duration_s * 1000, 2),
            "programmed_peers": r.programmed_peers,
            "changes": [str(c) for c in r.changes],
            "rejected": [str(p) for p in r.rejected],
            "errors": [str(p) for p in r.errors],
            "device_error": r.device_error,
            "bridge_error": self.bridge_error,
            "retained_peers": self.retained,
            "wireguard_errors": list(self.wireguard_errors),
        }


BridgeApplier = Callable[[str, list[IPv4Interface], int], object]


class Reconciler:
    """Keeps the kernel equal to `source()`; see the module docstring.

    `source` returns the desired data plane and the names the view knows (for retention);
    `ensure_bridge(name, gateways, mtu)` is blocking and runs in a worker thread.
    """

    def __init__(
        self,
        backend: VxlanBackend,
        source: Callable[[], tuple[DesiredDataPlane, set[str]]],
        *,
        run_dir: Path,
        bridge: str,
        mtu: int,
        ensure_bridge: BridgeApplier,
        interval: float = 30.0,
        on_pass: Callable[[float, bool], None] | None = None,
        encrypted: EncryptedPath | None = None,
        host_rules: HostRulesKeeper | None = None,
    ) -> None:
        self.backend = backend
        self.source = source
        self.run_dir = run_dir
        self.bridge = bridge
        self.mtu = mtu
        self.ensure_bridge = ensure_bridge
        self.interval = interval
        self.on_pass = on_pass  # (seconds, ok) after every pass, e.g. for metrics
        self.encrypted = encrypted  # the WireGuard path (routes of encrypted peers)
        self.host_rules = host_rules  # masquerade, forward accepts, API guard
        self.retained: list[Peer] = load_programmed(run_dir)
        self.settled = not self.retained
        self.last: PassRecord | None = None
        self.passes = 0
        self.errors = 0
        self.programmed: dict[str, Peer] = {}
        self.encrypted_programmed: set[str] = set()
        self.local_blocks: tuple[IPv4Network, ...] = ()
        self._wakeup = trio.Event()
        self._reasons: list[str] = []
        self._pass_started = -math.inf
        self._urgent = trio.Event()
        self._bridge_made = False
        self._saved: list[dict[str, Any]] | None = None
        self.kept: Mapping[str, float] = {}  # failed peers whose routes are kept, to when
        self.next_expiry: float | None = None

    def poke(self, reason: str, *, urgent: bool = False) -> None:
        """Ask for a pass soon (cheap; many pokes make one pass). An urgent one (this node's
        own blocks changed: its pods wait for the bridge) does not wait for `PASS_GAP`."""
        self._reasons.append(reason)
        self._wakeup.set()
        if urgent:
            self._urgent.set()

    def settle(self) -> None:
        """The view is complete: stop programming retained peers it does not know."""
        if not self.settled:
            self.settled = True
            if self.retained:
                log.info("view settled: no longer keeping %d peers from before the restart "
                         "unless gossip confirms them", len(self.retained))
            self.retained = []
            self.poke("view settled")

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Reconcile forever: now, on every poke, and every `interval`; watch the device."""
        async with trio.open_nursery() as nursery:
            send, receive = trio.open_memory_channel[Any](16)
            await nursery.start(partial(watch_device, netns=self.backend.netns),
                                self.backend.config.device, send)
            nursery.start_soon(self._device_events, receive)
            self.poke("start")
            task_status.started()
            while True:
                await self.run_pass(await self.next_pass())

    async def next_pass(self) -> str:
        """Wait for the next pass (it starts on return) and say why it runs: a poke (after
        `DEBOUNCE`, and no sooner than `PASS_GAP` after the last pass started, so a burst of
        pokes shares a pass), or the periodic interval."""
        # route errors on the TUN device (e.g. a source address not there yet) are retried
        # soon, not after a whole interval
        wait = (min(self.interval, WG_ERROR_RETRY)
                if self.last is not None and self.last.wireguard_errors else self.interval)
        if self.next_expiry is not None:  # a kept peer's grace ends: drop its routes
            wait = min(wait, max(0.0, self.next_expiry - trio.current_time()) + DEBOUNCE)
        with trio.move_on_after(wait):
            await self._wakeup.wait()
        await trio.sleep(DEBOUNCE)
        with trio.move_on_at(self._pass_started + PASS_GAP):
            await self._urgent.wait()
        self._wakeup, self._urgent = trio.Event(), trio.Event()
        self._pass_started = trio.current_time()
        reasons, self._reasons = self._reasons, []
        return ", ".join(dict.fromkeys(reasons)) or "periodic"

    async def _device_events(self, receive: trio.MemoryReceiveChannel[Any]) -> None:
        async for event in receive:
            # "down" also follows our own creation of the device (created, then set up)
            level = logging.WARNING if event.reason != "down" else logging.INFO
            log.log(level, "VXLAN device %s was %s; reconciling now", event.device, event.reason)
            self.poke(f"device {event.reason}")

    async def run_pass(self, reason: str) -> PassRecord:
        started = time.time()
        clock = time.monotonic()
        desired, known = self.source()
        self._note_kept(desired)
        retained = 0
        if not self.settled:
            before = len(desired.peers)
            desired = with_retained(desired, self.retained, known)
            retained = len(desired.peers) - before
        encrypted = self.encrypted
        source = (str(desired.local_blocks[0].network_address + 1) if desired.local_blocks
                  else None)
        wg_errors: list[str] = []
        if encrypted is not None:
            if desired.wg_peers:
                encrypted.want()
            # routes leave the TUN device before VXLAN may take their prefixes, and VXLAN
            # lets go of prefixes before the TUN device takes them (a route we did not make
            # is never replaced)
            wg_errors += await encrypted.apply(desired.wg_peers, source, delete_only=True)
        report = await self.backend.areconcile(desired.peers, desired.local_blocks)
        bridge_error = await self._apply_bridge(desired.local_blocks)
        if encrypted is not None:  # after the bridge: the route source is its gateway
            wg_errors += await encrypted.apply(desired.wg_peers, source)
        record = PassRecord(started, reason, report, bridge_error, retained, tuple(wg_errors))
        self.last = record
        self.passes += 1
        self.local_blocks = desired.local_blocks
        if not record.ok:
            self.errors += 1
        failed = {p.peer for p in report.errors} | {p.peer for p in report.rejected}
        self.programmed = {p.name: p for p in desired.peers
                           if p.name not in failed and p.blocks and report.device_error is None}
        self.encrypted_programmed = ({p.name for p in desired.wg_peers
                                      if p.name in encrypted.routed and p.allowed_ips}
                                     if encrypted is not None else set())
        if report.changed:
            log.info("%s (%s)", report.summary(), reason)
        self._save(list(self.programmed.values()))
        if self.host_rules is not None:
            await self.host_rules.ensure(peer_node_addresses(desired))
        if self.on_pass is not None:
            self.on_pass(time.monotonic() - clock, record.ok)
        return record

    def _note_kept(self, desired: DesiredDataPlane) -> None:
        """Log the failed peers whose routes start or stop being kept; remember the first end
        of a grace (the loop runs a pass then)."""
        now, kept = trio.current_time(), desired.kept
        for name in sorted(kept.keys() - self.kept.keys()):
            log.info("keeping the routes to %s: failed, but it still owns its blocks; for %.0f s "
                     "at most, or until its blocks are reclaimed", name, kept[name] - now)
        for name in sorted(self.kept.keys() - kept.keys()):
            log.info("no longer keeping the routes to %s (back, blocks gone, left, or grace "
                     "over)", name)
        self.kept = dict(kept)
        self.next_expiry = desired.next_expiry

    async def _apply_bridge(self, blocks: Sequence[IPv4Network]) -> str | None:
        if not blocks and not self._bridge_made:
            return None
        gateways = [IPv4Interface((b.network_address + 1, b.prefixlen)) for b in blocks]
        try:
            await trio.to_thread.run_sync(self.ensure_bridge, self.bridge, gateways, self.mtu)
        except Exception as exc:  # a kernel or pyroute2 error: report it, retry next pass
            log.error("pod bridge %s: %s", self.bridge, exc)
            return f"{type(exc).__name__}: {exc}"
        self._bridge_made = True
        return None

    def _save(self, peers: list[Peer]) -> None:
        doc = [_peer_to_json(p) for p in sorted(peers, key=lambda p: p.name)]
        if doc == self._saved:
            return
        try:
            save_programmed(self.run_dir, peers)
            self._saved = doc
        except OSError as exc:
            log.warning("cannot save programmed peers in %s: %s", self.run_dir, exc)
