"""The weavepy node agent: one trio process per node that ties every part together.

Theory of operation
===================

Data flows one way::

    gossip (GossipService) --member events--> ClusterView --+
         |  user messages / push-pull state                  |
         v                                                   v
    IpamLink (IpamCore, persisted) --block table--> Reconciler --> tunnel.vxlan + pod bridge
         |
         +--> pod allocator --> CNI server (weavepy-cni clients)
    API (127.0.0.1) reads status and asks for connect / forget / rmpeer / stop

`prepare()` does everything that can fail because of the host or the user before any task
starts, and raises `AgentError` with one readable line: not root, a bad or renamed state
directory, a corrupt identity or IPAM file, an unreadable keyring, no usable underlay, a
cluster range that overlaps the host's routes, an API port already taken.

`Agent.run()` then runs, as children of one nursery: the gossip service, the membership task
(events -> view -> reconciler and IPAM), the IPAM link, the join-target task, the reconciler,
the CNI server, the API, the metrics endpoint (`--metrics-addr`), the tunnel-counter sampler,
the signal task and, with `--kube-peers`, the Kubernetes peer watch and the task that sets
the node's NetworkUnavailable condition to False once the node is first ready.

A restart re-derives everything from the state directory (identity, IPAM), the run
directory (peers programmed last time) and the kernel; the reconciler keeps working routes
until the view has settled, so nothing flaps.

Stopping: persist, close the CNI socket, and exit 0. `POST /stop` (`weavepy stop`) first leaves
the gossip cluster, so peers see `left` and remove their routes to us at once. SIGTERM and
SIGINT (kubelet during a DaemonSet rollout, `systemctl restart`) stop without leaving: a restart
that comes back within the failure-detection time (about 5 s on lan) changes nothing at the
peers, and a node that stays down is declared failed and its routes removed as after a crash.
Kernel state stays either way: pods keep their addresses and local traffic keeps flowing.
`reset` (see `reset_node`) is the only thing that removes kernel objects and state.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import json
import logging
import os
import random
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

import trio

from gossip.config import GossipConfig
from gossip.events import MemberEventKind, MemberState
from gossip.keyring import Keyring
from gossip.tags import encode_tags
from gossip.transport import GossipService, JoinError
from tunnel.vxlan import VxlanBackend, VxlanConfig
from weavepy import __version__
from weavepy.cluster import ClusterView, DataPlaneIdentity
from weavepy.config import AgentConfig, parse_peer
from weavepy.hostnet import HostNetError, Underlay, find_underlay, range_conflicts
from weavepy.identity import Identity, IdentityError, load_or_create, write_private_file
from weavepy.ipam_link import IpamLink, IpamLinkError
from weavepy.metrics import AgentMetrics
from weavepy.reconcile import DesiredDataPlane, Reconciler, desired_data_plane
from weavepy.statusview import REPORT_VERSION, connection_entries, ipam_advice
from weavepy.targets import TargetSchedule
from weavepy.wgpath import (
    CAP_EXTENSION,
    CAP_WIREGUARD,
    UDP_IPV4_OVERHEAD,
    WG_OVERHEAD,
    ConfigNode,
    EncryptedPath,
    ExternalPeer,
    encrypt_tag,
    parse_external_peer,
    render_wg_quick,
)

__all__ = ["Agent", "AgentError", "Prepared", "follow_kube_peers", "mark_network_available",
           "prepare", "reset_node", "run_agent"]

log = logging.getLogger(__name__)

ENCAP_OVERHEAD = 50
LEAVE_TIMEOUT = 3.0
SETTLE_AFTER_JOIN = 2.0  # seconds after the first successful join before retained peers go
SETTLE_MAX = 15.0  # ... and at most this long after start, joined or not
CONNECT_TIMEOUT = 10.0
RMPEER_TIMEOUT = 15.0
KNOWN_PEERS_FILE = "known-peers.json"
EXTERNAL_PEERS_FILE = "external-peers.json"  # external peers declared through the API
# The WireGuard data plane runs inside the agent's trio process (one core). Worker processes
# (one per direction) work from the agent too, but measured slower on the shared 2-core sandbox
# (1.54-1.60 against 1.80-1.99 Gbit/s pod to pod), where both nodes share the same cores; on a
# real host with cores to spare they should win. Measure before turning this on.
AGENT_WORKERS = False
TRAFFIC_SAMPLE_INTERVAL = 2.0  # seconds between reads of the VXLAN device's counters
NETWORK_AVAILABLE_BACKOFF = (1.0, 60.0)  # first and largest retry delay for the node condition


class AgentError(Exception):
    """The agent cannot start or went down; the message is one readable line."""


@dataclass(frozen=True)
class Prepared:
    """What `prepare` found out about the host and the node."""

    config: AgentConfig
    identity: Identity
    keyring: Keyring | None
    underlay: Underlay
    advertise: tuple[str, int]
    mtu: int
    gossip: GossipConfig


def _gossip_profile(name: str) -> GossipConfig:
    return {"lan": GossipConfig.lan, "wan": GossipConfig.wan, "local": GossipConfig.local}[name]()


def _load_keyring(config: AgentConfig) -> Keyring | None:
    if config.keyring_file is not None:
        try:
            return Keyring.from_file(config.keyring_file)
        except OSError as exc:
            raise AgentError(f"--keyring-file {config.keyring_file}: cannot read it: "
                             f"{exc.strerror or exc}") from None
        except ValueError as exc:
            raise AgentError(f"--keyring-file: {exc}") from None
    if config.encrypt is not None:
        return Keyring([config.encrypt])
    return None


def prepare(config: AgentConfig) -> Prepared:
    """Check the host and load the node's state; raise AgentError with one line if unusable."""
    if os.geteuid() != 0:
        raise AgentError("weavepy launch needs root (CAP_NET_ADMIN) to program the kernel")
    for directory in (config.state_dir, config.run_dir):
        try:
            directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as exc:
            raise AgentError(f"cannot create {directory}: {exc.strerror or exc}") from None
    try:
        identity, created = load_or_create(config.state_dir, config.name)
    except IdentityError as exc:
        raise AgentError(str(exc)) from None
    if created:
        log.info("new node identity %s (VTEP MAC %s) in %s", identity.name, identity.vtep_mac,
                 config.state_dir)
    keyring = _load_keyring(config)
    if keyring is None:
        log.warning("*** gossip is NOT encrypted: anyone who can reach port %d can join this "
                    "cluster and claim address space. Set --keyring-file or $WEAVEPY_ENCRYPT "
                    "(make a key with `weavepy keygen`). ***", config.gossip_port)
    own_devices = [config.vxlan_device, config.bridge]
    try:
        underlay = find_underlay(config.iface, config.peers, own_devices)
        range_conflicts(config.ipalloc_range, own_devices)
    except HostNetError as exc:
        raise AgentError(str(exc)) from None
    if underlay.local_ip in config.ipalloc_range:
        raise AgentError(f"the underlay address {underlay.local_ip} lies inside the cluster "
                         f"range {config.ipalloc_range}; pick another --ipalloc-range")
    if config.advertise_addr is not None:
        advertise = parse_peer(config.advertise_addr, config.gossip_port)
    else:
        advertise = (str(underlay.local_ip), config.gossip_port)
    overhead = WG_OVERHEAD if encryption_configured(config) else ENCAP_OVERHEAD
    mtu = config.mtu if config.mtu is not None else underlay.mtu - overhead
    if mtu + ENCAP_OVERHEAD > underlay.mtu:
        log.warning("--mtu %d plus %d bytes of VXLAN overhead exceeds the underlay MTU %d of "
                    "%s: large packets will be fragmented or dropped", mtu, ENCAP_OVERHEAD,
                    underlay.mtu, underlay.iface)
    from weavepy.api import check_bindable

    try:
        check_bindable(*config.api_addr)
        if config.metrics_addr is not None:
            check_bindable(*config.metrics_addr)
    except OSError as exc:
        raise AgentError(str(exc)) from None
    if config.install_cni:
        _install_cni(config)
    log.info("underlay %s %s (mtu %d, chosen by %s); overlay mtu %d; advertising %s:%d",
             underlay.iface, underlay.local_ip, underlay.mtu, underlay.how, mtu, *advertise)
    return Prepared(config, identity, keyring, underlay, advertise, mtu,
                    _gossip_profile(config.profile))


def encryption_configured(config: AgentConfig) -> bool:
    """This node asks for the encrypted path to some peer (then pods get the WireGuard MTU
    and the fast path's gso_max_size)."""
    return bool(config.encrypt_all or config.encrypt_peers or config.external_peers)


def _install_cni(config: AgentConfig) -> None:
    from weavepy.cni.install import InstallError, install_cni
    from weavepy.config import DEFAULT_CNI_CONF_DIR

    conf_dir = config.cni_conf_dir or DEFAULT_CNI_CONF_DIR
    try:
        installed = install_cni(config.cni_bin_dir, conf_dir, socket_path=str(config.cni_socket))
    except (InstallError, OSError) as exc:
        raise AgentError(f"--install-cni: {exc}") from None
    log.info("installed the CNI plugin %s and %s", installed.plugin, installed.conflist)


class Agent:
    """One running node agent; implements `weavepy.api.AgentControl`."""

    def __init__(self, prepared: Prepared) -> None:
        self.prepared = prepared
        self.config = prepared.config
        self.identity = prepared.identity
        self.svc: GossipService | None = None
        self.started_at = time.time()
        self.view = ClusterView(self.config.name)
        self.rng = random.Random()
        self.targets = TargetSchedule(self.rng)
        self.ipam = IpamLink(self.config, self.identity, on_table_change=self._table_changed,
                             on_cluster_id=self._cluster_id_learned,
                             on_tag_change=self._publish_tags)
        self.backend = VxlanBackend(VxlanConfig(
            vtep_mac=self.identity.vtep_mac,
            local_ip=prepared.underlay.local_ip,
            underlay_iface=prepared.underlay.iface,
            device=self.config.vxlan_device,
            vni=self.config.vxlan_vni,
            port=self.config.vxlan_port,
            mtu=prepared.mtu,
            pod_range=self.config.ipalloc_range,
        ))
        underlay_mtu = prepared.underlay.mtu
        self.encrypted = EncryptedPath(
            device=self.config.wg_device, private_key=self.identity.wg_private_key,
            listen_port=self.config.wg_port, mtu=underlay_mtu - WG_OVERHEAD,
            max_datagram=underlay_mtu - UDP_IPV4_OVERHEAD, workers=AGENT_WORKERS,
            on_ready=lambda: self.reconciler.poke("WireGuard interface changed"))
        self.external: dict[str, ExternalPeer] = {p.name: p for p in self.config.external_peers}
        self.external.update(load_external_peers(self.config.state_dir))
        self.reconciler = Reconciler(
            self.backend, self._desired, run_dir=self.config.run_dir, bridge=self.config.bridge,
            mtu=prepared.mtu, ensure_bridge=_ensure_bridge,
            interval=self.config.reconcile_interval, on_pass=self._reconcile_observed,
            encrypted=self.encrypted)
        self.metrics = AgentMetrics()
        self.traffic: dict[str, dict[str, int]] = {}
        self.kube: Any = None  # weavepy.kube.KubePeerSource with --kube-peers
        self.network_available_set = False
        if self.ipam.cluster_id is not None:
            self._cluster_id_learned(self.ipam.cluster_id)
        self.cni_listening = False
        self.cni_requests: dict[str, int] = {}
        self._stop = trio.Event()
        self._leave_on_stop = True
        self._targets_changed = trio.Event()
        self._first_join: float | None = None
        self._known_saved: list[str] | None = None
        self.known_peers = load_known_peers(self.config.state_dir)

    # -- derived values --------------------------------------------------------------------------

    def data_plane_identity(self) -> DataPlaneIdentity:
        return DataPlaneIdentity(
            underlay_ip=IPv4Address(self.prepared.advertise[0]),
            vtep_mac=self.identity.vtep_mac,
            vxlan_vni=self.config.vxlan_vni,
            vxlan_port=self.config.vxlan_port,
            wg_public_key=self.identity.wg_public_key,
            capabilities=frozenset({"vxlan", CAP_WIREGUARD, CAP_EXTENSION}),
            cluster_id=self.ipam.cluster_id,
            wg_port=self.config.wg_port,
            encrypt=encrypt_tag(self.config.encrypt_all, self.config.encrypt_peers),
        )

    def _desired(self) -> tuple[DesiredDataPlane, set[str]]:
        desired = desired_data_plane(self.view.peers(), self.ipam.blocks_by_node(),
                                     self.config.name, self.data_plane_identity(),
                                     sorted(self.external.values(), key=lambda p: p.name))
        return desired, {p.name for p in self.view.peers()}

    # -- callbacks from the IPAM link ------------------------------------------------------------

    def _reconcile_observed(self, seconds: float, ok: bool) -> None:
        self.metrics.observe_reconcile(seconds, ok)

    def _table_changed(self) -> None:
        self.reconciler.poke("block table changed")

    def _cluster_id_learned(self, cluster_id: str) -> None:
        if self.identity.cluster_id != cluster_id:
            self.identity = self.identity.with_cluster_id(cluster_id)
            try:
                self.identity.save(self.config.state_dir)
            except OSError as exc:
                log.error("cannot save the cluster ID in %s: %s", self.config.state_dir, exc)
        self._publish_tags()

    def tags(self) -> dict[str, str]:
        """Our gossip tags: the data-plane identity and the IPAM standing."""
        return {**self.data_plane_identity().to_tags(), **self.ipam.tags()}

    def _publish_tags(self) -> None:
        if self.svc is not None:
            self.svc.update_tags(self.tags())

    # -- running ---------------------------------------------------------------------------------

    async def run(self) -> None:
        config = self.config
        tags = self.tags()
        try:
            encode_tags(tags)  # fails now, not in the middle of the cluster, if too large
        except ValueError as exc:
            raise AgentError(f"this node's gossip tags do not fit in memberlist's meta ({exc})"
                             + ("; name fewer --encrypt-peers, or use --encrypt"
                                if config.encrypt_peers else "")) from None
        try:
            service = GossipService(
                self.prepared.gossip, config.name, ("0.0.0.0", config.gossip_port),
                self.prepared.advertise, keyring=self.prepared.keyring,
                delegate=self.ipam.delegate, tags=tags, rng=self.rng)
            async with service as svc, trio.open_nursery() as nursery:
                self.svc = svc
                self.ipam.attach(svc)
                log.info("weavepy %s: node %s gossiping on %s:%d", __version__, config.name,
                         *svc.address)
                await nursery.start(self.ipam.run)
                nursery.start_soon(self._membership, svc)
                nursery.start_soon(self.encrypted.run)
                await nursery.start(self.reconciler.run)
                nursery.start_soon(self._settle)
                nursery.start_soon(self._join_loop, svc)
                nursery.start_soon(self._signals)
                await nursery.start(self._serve_cni)
                from weavepy.api import build_app, serve_api

                await nursery.start(serve_api, build_app(self), *config.api_addr)
                if config.metrics_addr is not None:
                    from weavepy.api import build_metrics_app

                    await nursery.start(serve_api, build_metrics_app(self.render_metrics),
                                        *config.metrics_addr)
                nursery.start_soon(self._sample_traffic)
                if self.kube is not None:
                    nursery.start_soon(self._kube_peers, self.kube)
                    nursery.start_soon(self._mark_network_available, self.kube)
                await self._stop.wait()
                if self._leave_on_stop:
                    log.info("stopping: leaving the cluster (kernel state stays)")
                    with trio.move_on_after(LEAVE_TIMEOUT + 2):
                        await svc.leave(LEAVE_TIMEOUT)
                else:
                    log.info("stopping without leaving the cluster (a restart keeps the "
                             "peers' routes; `weavepy stop` leaves); kernel state stays")
                await self.ipam.flush()
                nursery.cancel_scope.cancel()
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise AgentError(f"cannot bind the gossip port {config.gossip_port}: "
                                 f"already in use (another agent or serf?)") from None
            raise
        log.info("stopped")

    def request_stop(self, leave: bool = True) -> None:
        """Stop; with `leave`, tell the cluster first (the first request decides)."""
        if not self._stop.is_set():
            self._leave_on_stop = leave
        self._stop.set()

    def render_metrics(self) -> bytes:
        """The Prometheus exposition, gauges refreshed from the status now."""
        self.metrics.update_from_status(self.status())
        return self.metrics.render()

    async def _sample_traffic(self) -> None:
        """Keep `traffic` (the VXLAN device's IFLA_STATS64 counters) fresh for status and
        metrics; a missing device (before the first pass) reads as no sample."""
        while True:
            try:
                sample = await trio.to_thread.run_sync(
                    read_link_counters, self.config.vxlan_device)
            except OSError as exc:
                log.debug("cannot read %s counters: %s", self.config.vxlan_device, exc)
                sample = None
            if sample is not None:
                self.traffic = {"vxlan": sample}
            await trio.sleep(TRAFFIC_SAMPLE_INTERVAL)

    async def _kube_peers(self, source: Any) -> None:
        await follow_kube_peers(source, self.targets, self.config.gossip_port,
                                self._normalise(list(self.config.peers)),
                                self._targets_changed.set)

    async def _mark_network_available(self, source: Any) -> None:
        await mark_network_available(source, lambda: self.readiness()[0])
        self.network_available_set = True

    async def _signals(self) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                log.info("got %s", signal.Signals(signum).name)
                self.request_stop(leave=False)

    def _resync(self, svc: GossipService) -> bool:
        """Re-read the whole member list into the view and IPAM's liveness."""
        changed = self.view.sync(svc.members(), trio.current_time())
        for member in svc.members():
            if member.state in (MemberState.ALIVE, MemberState.SUSPECT):
                self.ipam.member_alive(member.name, member.tags)
            else:
                self.ipam.member_dead(member.name)
        return changed

    async def _membership(self, svc: GossipService) -> None:
        """Member events -> cluster view -> reconciler, and liveness -> IPAM."""
        self._resync(svc)
        dropped_seen = 0
        async for event in svc.events():
            if self.view.apply(event):
                self.reconciler.poke(f"{event.name} {event.kind.value}")
            if event.name != self.config.name:
                if event.kind in (MemberEventKind.JOIN, MemberEventKind.ALIVE,
                                  MemberEventKind.UPDATE):
                    self.ipam.member_alive(event.name, event.tags)
                elif event.kind in (MemberEventKind.FAILED, MemberEventKind.LEAVE):
                    self.ipam.member_dead(event.name)
                level = logging.DEBUG if event.kind is MemberEventKind.UPDATE else logging.INFO
                log.log(level, "member %s: %s", event.name, event.kind.value)
            dropped = svc.stats.transport["events_dropped"]
            if dropped != dropped_seen:  # we lost events: re-read the whole membership
                dropped_seen = dropped
                log.warning("member events were dropped; re-reading the member list")
                if self._resync(svc):
                    self.reconciler.poke("member resync")
            self._save_known(svc)

    def _save_known(self, svc: GossipService) -> None:
        """Remember the live members' addresses (rejoined at the next start, as serf's
        snapshot does), so a node launched without peers finds its cluster again at once."""
        known = sorted(self._live_addresses(svc))
        if not known or known == self._known_saved:
            return
        try:
            write_private_file(self.config.state_dir / KNOWN_PEERS_FILE,
                               json.dumps({"version": 1, "peers": known}).encode())
            self._known_saved = known
        except OSError as exc:
            log.warning("cannot save known peers in %s: %s", self.config.state_dir, exc)

    async def _settle(self) -> None:
        """End start-up retention once the view is complete (joined, or nobody to join)."""
        with trio.move_on_after(SETTLE_MAX):
            while True:
                if not (self.config.peers or self.targets.addresses() or self.known_peers):
                    await trio.sleep(SETTLE_AFTER_JOIN)
                    break
                if self._first_join is not None:
                    await trio.sleep_until(self._first_join + SETTLE_AFTER_JOIN)
                    break
                await trio.sleep(0.1)
        self.reconciler.settle()

    def _live_addresses(self, svc: GossipService) -> set[str]:
        found: set[str] = set()
        for member in svc.members():
            if member.state in (MemberState.ALIVE, MemberState.SUSPECT) and \
                    member.name != self.config.name:
                with contextlib.suppress(ValueError):
                    found.add(f"{IPv4Address(member.addr)}:{member.port}")
        return found

    def _normalise(self, peers: list[str]) -> list[str]:
        out = []
        for peer in peers:
            host, port = parse_peer(peer, self.config.gossip_port)
            out.append(f"{host}:{port}")
        return out

    async def _join_loop(self, svc: GossipService) -> None:
        """Join the targets (retrying with backoff) and reconnect to failed members."""
        self.targets.add(self._normalise(list(self.config.peers)), trio.current_time())
        async with trio.open_nursery() as attempts:
            if self.known_peers:  # members of the last run: one attempt, all at once
                attempts.start_soon(self._rejoin_known, svc)
            while True:
                now = trio.current_time()
                self.targets.observe(self._live_addresses(svc), now)
                for address in self.targets.due(now):
                    attempts.start_soon(self._attempt, svc, address)
                if self.targets.reconnect_due(now):
                    failed = [m for m in svc.members() if m.state == MemberState.DEAD]
                    if failed:
                        member = self.rng.choice(failed)
                        address = f"{IPv4Address(member.addr)}:{member.port}"
                        attempts.start_soon(self._attempt, svc, address, True)
                with trio.move_on_at(min(self.targets.next_deadline(), now + 1.0)):
                    await self._targets_changed.wait()
                self._targets_changed = trio.Event()

    async def _rejoin_known(self, svc: GossipService) -> None:
        seeds = [parse_peer(p, self.config.gossip_port) for p in self.known_peers]
        with trio.move_on_after(CONNECT_TIMEOUT + 2):
            try:
                answered = await svc.join(seeds)
            except (JoinError, OSError) as exc:
                log.info("none of the last run's %d members answered (%s)", len(seeds), exc)
                return
            log.info("rejoined through %d of the last run's %d members", answered, len(seeds))
            if self._first_join is None:
                self._first_join = trio.current_time()

    async def _attempt(self, svc: GossipService, address: str, reconnect: bool = False) -> None:
        host, port = parse_peer(address, self.config.gossip_port)
        ok, error = False, None
        try:
            with trio.fail_after(CONNECT_TIMEOUT + 2):
                await svc.join([(host, port)])
            ok = True
        except JoinError as exc:
            error = "; ".join(r.error for r in exc.results) or str(exc)
        except (OSError, trio.TooSlowError) as exc:
            error = str(exc) or type(exc).__name__
        now = trio.current_time()
        if not reconnect:
            self.targets.attempted(address, ok, error, now)
        if ok:
            if self._first_join is None:
                self._first_join = now
            log.info("joined the cluster through %s", address)
        elif reconnect:
            log.debug("reconnect to failed member at %s: %s", address, error)
        else:
            hint = ""
            if error and ("decrypt" in error or "EOF" in error or "closed" in error):
                hint = " (a different gossip key on either side?)"
            log.warning("cannot join %s: %s%s; retrying", address, error, hint)
        self._targets_changed.set()

    async def _serve_cni(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                         ) -> None:
        from weavepy.cni.server import CniServer

        def observe(command: str, code: int, seconds: float) -> None:
            key = f"{command.lower()}_{'ok' if code == 0 else 'error'}"
            self.cni_requests[key] = self.cni_requests.get(key, 0) + 1

        def observe_both(command: str, code: int, seconds: float) -> None:
            observe(command, code, seconds)
            self.metrics.observe_cni_request(command, code, seconds)

        server = CniServer(self._cni_backend,
                           self.config.cni_socket, on_request=observe_both)
        started = _Started(task_status, self)
        try:
            await server.serve(task_status=started)
        except (OSError, RuntimeError) as exc:
            if started.done:
                raise
            raise AgentError(f"cannot serve CNI on {self.config.cni_socket}: {exc}") from None
        finally:
            self.cni_listening = False

    def _cni_backend(self) -> Any:
        """The CNI server's backend (built on its worker thread): pod veths get the overlay
        MTU and, when this node encrypts, the WireGuard fast path's gso_max_size (a larger
        one makes the kernel segment forwarded traffic before the TUN device)."""
        from tunnel.tun import FAST_PATH_GSO_MAX_SIZE
        from weavepy.cni.backend import BridgeBackend, PodLinkSettings
        from weavepy.ipam_link import CniAllocator

        token = self.ipam.trio_token
        if token is None:
            raise RuntimeError("the IPAM link is not running")
        gso = FAST_PATH_GSO_MAX_SIZE if encryption_configured(self.config) else None
        return BridgeBackend(CniAllocator(self.ipam, token), bridge=self.config.bridge,
                             settings=PodLinkSettings(mtu=self.prepared.mtu, gso_max_size=gso))

    # -- AgentControl ----------------------------------------------------------------------------

    def readiness(self) -> tuple[bool, list[str]]:
        reasons = []
        ipam = self.ipam.status()
        if ipam is None or not ipam.owned_blocks:
            reasons.append(f"no usable block yet (IPAM {ipam.state.value if ipam else 'n/a'}: "
                           f"{ipam.detail if ipam else 'starting'})")
        last = self.reconciler.last
        if last is None:
            reasons.append("routes not programmed yet")
        elif not last.ok:
            reasons.append("the last reconcile pass had errors")
        if not self.cni_listening:
            reasons.append("the CNI socket is not listening")
        conflist = self.conflist_path()
        if conflist is not None and not conflist.exists():
            reasons.append(f"the CNI config {conflist} is not installed (the init container "
                           f"or `weavepy install-cni` writes it)")
        return not reasons, reasons

    def conflist_path(self) -> Path | None:
        """The conflist /readyz waits for, or None when this node does not check it."""
        from weavepy.cni.install import CONFLIST_NAME

        conf_dir = self.config.cni_conf_check_dir
        return conf_dir / CONFLIST_NAME if conf_dir is not None else None

    def discovery(self) -> dict[str, Any]:
        """How this node finds peers: the configured list, or the Kubernetes API."""
        if self.kube is not None:
            return {**self.kube.status(), "network_available_set": self.network_available_set}
        return {"source": "peers", "peers": len(self.targets.addresses())}

    def status(self) -> dict[str, Any]:
        svc = self.svc
        desired, _ = self._desired()
        programmed = set(self.reconciler.programmed) | self.reconciler.encrypted_programmed
        blocks = self.ipam.blocks_by_node()
        peers = []
        for peer in self.view.peers():
            entry = peer.to_json()
            entry["blocks"] = [str(b) for b in blocks.get(peer.name, ())]
            entry["path"] = desired.paths.get(peer.name)
            entry["programmed"] = peer.name in programmed
            entry["excluded"] = desired.excluded.get(peer.name)
            peers.append(entry)
        ready, reasons = self.readiness()
        last = self.reconciler.last
        gossip: dict[str, Any] = {}
        if svc is not None:
            stats = svc.stats
            gossip = {
                "address": "{}:{}".format(*svc.advertise_address),
                "members": dict(self.view.counts()),
                "health_score": svc.node.health_score,
                "drops": dict(stats.drops()),
                "packets_in": stats.node.packets_in,
                "packets_out": stats.node.packets_out,
                "bytes_in": stats.node.bytes_in,
                "bytes_out": stats.node.bytes_out,
                "probe_failures": stats.node.probe_failures,
                "suspicions": stats.node.suspicions,
                "tag_problems": dict(self.view.tag_problems),
            }
        ipam = self.ipam.status_json()
        ipam["fix"] = ipam_advice(ipam, self.config.name)
        conflist = self.conflist_path()
        return {
            "report_version": REPORT_VERSION,
            "version": __version__,
            "name": self.config.name,
            "cluster_id": self.ipam.cluster_id,
            "uptime_s": round(time.time() - self.started_at, 1),
            "encryption": self.prepared.keyring is not None,
            "ready": ready,
            "not_ready_reasons": reasons,
            "discovery": self.discovery(),
            "gossip": gossip,
            "targets": self.targets.to_json(),
            "peers": peers,
            "blocks": [{"block": str(b), "owner": owner} for owner, owned in sorted(blocks.items())
                       for b in owned],
            "connections": connection_entries(
                peers + self._external_entries(programmed), desired.fallbacks,
                self.prepared.mtu, self._encrypted_states(desired), self.encrypted.mtu),
            "ipam": ipam,
            "dataplane": {
                "path": "vxlan",
                "device": self.config.vxlan_device,
                "vni": self.config.vxlan_vni,
                "port": self.config.vxlan_port,
                "mtu": self.prepared.mtu,
                "bridge": self.config.bridge,
                "local_blocks": [str(b) for b in self.reconciler.local_blocks],
                "underlay": {"iface": self.prepared.underlay.iface,
                             "address": str(self.prepared.underlay.local_ip),
                             "mtu": self.prepared.underlay.mtu},
                "settled": self.reconciler.settled,
                "passes": self.reconciler.passes,
                "pass_errors": self.reconciler.errors,
                "last_pass": last.to_json() if last else None,
                "programmed_peers": sorted(programmed),
                "traffic": {path: dict(counters) for path, counters in self.traffic.items()},
                "encrypt": encrypt_tag(self.config.encrypt_all, self.config.encrypt_peers),
                "wireguard": self.encrypted.status(),
                "external_peers": [p.to_json() for _, p in sorted(self.external.items())],
            },
            "cni": {"socket": str(self.config.cni_socket), "listening": self.cni_listening,
                    "requests": dict(self.cni_requests),
                    "conflist": str(conflist) if conflist is not None else None,
                    "conflist_installed": conflist.exists() if conflist is not None else None},
            "config": self.config.to_public_dict(),
        }

    def _encrypted_states(self, desired: DesiredDataPlane) -> dict[str, tuple[str, str | None]]:
        return {peer.name: self.encrypted.connection(peer.name) for peer in desired.wg_peers}

    def _external_entries(self, programmed: set[str]) -> list[dict[str, Any]]:
        """External hosts as peer-like entries for the connection list."""
        return [{"name": name, "state": "alive", "path": "wireguard", "external": True,
                 "programmed": name in programmed, "blocks": [str(n) for n in host.allowed_ips]}
                for name, host in sorted(self.external.items())]

    def wg_config(self, name: str) -> str:
        """The wg-quick configuration for external peer `name` (see weavepy.wgpath)."""
        from weavepy.api import ApiError

        host = self.external.get(name)
        if host is None:
            known = ", ".join(sorted(self.external)) or "none are declared"
            raise ApiError(404, f"no external peer named {name!r} ({known}); declare it with "
                           f"`weavepy external add` or in the config file")
        blocks = self.ipam.blocks_by_node()
        nodes = [ConfigNode(self.config.name, self.identity.wg_public_key,
                            (self.prepared.advertise[0], self.config.wg_port),
                            tuple(blocks.get(self.config.name, ())))]
        for peer in self.view.live_peers():
            ident = peer.identity
            if (ident is None or ident.wg_public_key is None or ident.wg_port is None
                    or CAP_WIREGUARD not in ident.capabilities):
                continue
            nodes.append(ConfigNode(peer.name, ident.wg_public_key,
                                    (str(ident.underlay_ip), ident.wg_port),
                                    tuple(blocks.get(peer.name, ()))))
        return render_wg_quick(host, nodes, self.encrypted.mtu, self.config.name)

    def add_external(self, raw: object) -> dict[str, Any]:
        """Declare (or replace) an external peer; kept in the state directory."""
        from weavepy.api import ApiError

        try:
            host = parse_external_peer(raw)
        except ValueError as exc:
            raise ApiError(400, str(exc)) from None
        if host.name == self.config.name or self.view.get(host.name) is not None:
            raise ApiError(409, f"{host.name} is a cluster member's name; pick another")
        pod_range = self.config.ipalloc_range
        inside = [str(n) for n in host.allowed_ips if n.overlaps(pod_range)]
        if inside:
            raise ApiError(400, f"{', '.join(inside)} overlaps the cluster range {pod_range} "
                           f"(pods get those addresses); give the host an address outside it")
        self.external[host.name] = host
        self._save_external()
        self.reconciler.poke(f"external peer {host.name} declared")
        return {"external_peers": [p.to_json() for _, p in sorted(self.external.items())]}

    def remove_external(self, name: str) -> dict[str, Any]:
        from weavepy.api import ApiError

        if name not in self.external:
            raise ApiError(404, f"no external peer named {name!r}")
        del self.external[name]
        self._save_external()
        self.reconciler.poke(f"external peer {name} removed")
        return {"external_peers": [p.to_json() for _, p in sorted(self.external.items())]}

    def _save_external(self) -> None:
        declared = {p.name for p in self.config.external_peers}
        doc = [p.to_json() for name, p in sorted(self.external.items()) if name not in declared]
        try:
            write_private_file(self.config.state_dir / EXTERNAL_PEERS_FILE,
                               json.dumps({"version": 1, "peers": doc}).encode())
        except OSError as exc:
            log.warning("cannot save external peers in %s: %s", self.config.state_dir, exc)

    async def connect(self, peers: list[str], replace: bool) -> dict[str, Any]:
        from weavepy.api import ApiError

        try:
            normalised = self._normalise(peers)
        except ValueError as exc:
            raise ApiError(400, f"bad peer address: {exc}") from None
        now = trio.current_time()
        if replace:
            self.targets.replace(normalised, now)
            added = normalised
        else:
            added = self.targets.add(normalised, now)
        self._targets_changed.set()
        return {"targets": self.targets.addresses(), "added": added}

    def forget(self, peers: list[str]) -> dict[str, Any]:
        from weavepy.api import ApiError

        try:
            normalised = self._normalise(peers)
        except ValueError as exc:
            raise ApiError(400, f"bad peer address: {exc}") from None
        removed = self.targets.remove(normalised)
        unknown = [p for p in normalised if p not in removed]
        return {"targets": self.targets.addresses(), "forgotten": removed, "unknown": unknown}

    async def reload_keyring(self) -> dict[str, Any]:
        """Read --keyring-file again and make the running gossip keyring exactly what it says
        (the first key encrypts, all decrypt): one step of a key rotation, no restart."""
        from weavepy.api import ApiError

        path, keyring = self.config.keyring_file, self.prepared.keyring
        if path is None or keyring is None:
            raise ApiError(409, "this agent has no --keyring-file to reload (a key from "
                                "$WEAVEPY_ENCRYPT changes only with a restart)")
        try:
            keys = (await trio.to_thread.run_sync(Keyring.from_file, path)).keys
        except (OSError, ValueError) as exc:
            raise ApiError(400, f"--keyring-file {path}: {exc}; the keyring in use is "
                                f"unchanged") from None
        keyring.replace(keys)
        primary = hashlib.sha256(keys[0]).hexdigest()[:16]
        log.info("gossip keyring reloaded from %s: %d key(s), primary sha256 %s...", path,
                 len(keys), primary)
        return {"keys": len(keys), "primary_sha256": primary}

    async def rmpeer(self, name: str, force: bool) -> dict[str, Any]:
        from weavepy.api import ApiError

        if name == self.config.name:
            raise ApiError(409, "a node cannot rmpeer itself; run `weavepy reset` on it instead")
        member = self.view.get(name)
        if member is not None and member.live and not force:
            raise ApiError(409, f"{name} is {member.state.value}; rmpeer is for nodes that are "
                           f"gone (stop it first, or add --force if you are sure)")
        try:
            with trio.fail_after(RMPEER_TIMEOUT):
                return await self.ipam.rmpeer(name, force)
        except IpamLinkError as exc:
            raise ApiError(exc.status, str(exc)) from None
        except trio.TooSlowError:
            raise ApiError(503, f"no decision on removing {name} within {RMPEER_TIMEOUT:.0f} s "
                           f"(IPAM {self.ipam.state_name()}); a majority of voters must be "
                           f"reachable, or use --force") from None


async def follow_kube_peers(source: Any, targets: TargetSchedule, gossip_port: int,
                            static_peers: list[str], changed: Callable[[], None]) -> None:
    """Peers from the Kubernetes API (`source`: a weavepy.kube.KubePeerSource, closed at the
    end): each new node set replaces the join targets, plus `static_peers`; `changed()` then
    wakes the join loop. The watch retries API failures itself and never ends."""
    async with source, source.watch_peers() as sets:
        async for peers in sets:
            addresses = [f"{p.address}:{gossip_port}" for p in sorted(peers, key=lambda p: p.node)]
            targets.replace(addresses + [p for p in static_peers if p not in addresses],
                            trio.current_time())
            changed()
            log.info("Kubernetes API: %d peers", len(addresses))


async def mark_network_available(source: Any, is_ready: Callable[[], bool], *,
                                 backoff: tuple[float, float] = NETWORK_AVAILABLE_BACKOFF,
                                 poll: float = 0.5) -> None:
    """Wait until `is_ready()`, then set the node's NetworkUnavailable=False, retrying with
    exponential backoff until the API accepts it."""
    from weavepy.kube import KubeError

    while not is_ready():
        await trio.sleep(poll)
    delay, most = backoff
    while True:
        try:
            await source.set_network_available()
            return
        except KubeError as exc:
            log.warning("%s; retrying in %.1f s", exc, delay)
        await trio.sleep(delay)
        delay = min(most, delay * 2)


def load_external_peers(state_dir: Path) -> dict[str, ExternalPeer]:
    """The external peers declared through the API by an earlier run ({} if none)."""
    try:
        doc = json.loads((state_dir / EXTERNAL_PEERS_FILE).read_bytes())
        return {p.name: p for p in (parse_external_peer(raw) for raw in doc["peers"])}
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("ignoring %s: %s", state_dir / EXTERNAL_PEERS_FILE, exc)
        return {}


def load_known_peers(state_dir: Path) -> list[str]:
    """The members' addresses saved by the last run ([] if none or unreadable)."""
    try:
        doc = json.loads((state_dir / KNOWN_PEERS_FILE).read_bytes())
        peers = [str(p) for p in doc["peers"]]
        for peer in peers:
            parse_peer(peer)
        return peers
    except FileNotFoundError:
        return []
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("ignoring %s: %s", state_dir / KNOWN_PEERS_FILE, exc)
        return []


@dataclasses.dataclass
class _Started:
    """Wraps a task_status so the agent learns when the CNI socket is listening."""

    inner: trio.TaskStatus[None]
    agent: Agent
    done: bool = False

    def started(self, value: None = None) -> None:
        self.done = True
        self.agent.cni_listening = True
        self.inner.started()


def read_link_counters(name: str) -> dict[str, int] | None:
    """The link's IFLA_STATS64 rx/tx bytes and packets in this namespace (None: no link)."""
    from tunnel.netlink import open_iproute

    ipr = open_iproute()
    try:
        found = ipr.link_lookup(ifname=name)
        if not found:
            return None
        stats = ipr.get_links(found[0])[0].get_attr("IFLA_STATS64")
    finally:
        ipr.close()
    if stats is None:
        return None
    return {key: int(stats[key]) for key in ("rx_bytes", "tx_bytes", "rx_packets",
                                             "tx_packets")}


def _ensure_bridge(name: str, gateways: list[Any], mtu: int) -> object:
    from weavepy.cni.podnet import ensure_bridge

    return ensure_bridge(name, gateways, mtu)


def run_agent(config: AgentConfig) -> None:
    """Prepare and run the agent until it stops; AgentError (one line) if it cannot."""
    prepared = prepare(config)
    try:
        agent = Agent(prepared)
    except IpamLinkError as exc:
        raise AgentError(str(exc)) from None
    if config.kube_peers:
        from weavepy.kube import KubeError, KubePeerSource

        try:
            agent.kube = KubePeerSource.in_cluster(
                config.name, exclude_addresses=[str(prepared.underlay.local_ip)])
        except KubeError as exc:
            raise AgentError(str(exc)) from None
    try:
        trio.run(agent.run)
    except BaseExceptionGroup as group:  # a task failed; surface our own one-line errors
        ours, _ = group.split(AgentError)
        if ours is None:
            raise
        raise _first_leaf(ours) from None


def _first_leaf(group: BaseException) -> BaseException:
    while isinstance(group, BaseExceptionGroup):
        group = group.exceptions[0]
    return group


# ---------------------------------------------------------------------------------------------
# reset


def _remove_link(ipr: Any, name: str) -> bool:
    from tunnel.netlink import NetlinkError

    try:
        found = ipr.link_lookup(ifname=name)
        if not found:
            return False
        ipr.link("del", index=found[0])
        return True
    except NetlinkError as exc:
        if exc.code == errno.ENODEV:
            return False
        raise


def reset_node(config: AgentConfig) -> list[str]:
    """Remove this node's kernel objects and state (the agent must be stopped). Returns what
    was removed, for the user."""
    from tunnel.netlink import open_iproute
    from weavepy.cni.podnet import PodNetwork

    removed: list[str] = []
    ipr = open_iproute()
    try:
        for name in (config.vxlan_device, config.bridge, config.wg_device):
            if _remove_link(ipr, name):
                removed.append(f"link {name}")
    finally:
        ipr.close()
    podnet = PodNetwork()
    try:
        for veth in podnet.host_veths():
            if podnet.delete_link(veth):
                removed.append(f"pod veth {veth}")
    finally:
        podnet.close()
    for path in _state_files(config):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
            removed.append(str(path))
    return removed


def _state_files(config: AgentConfig) -> Iterator[Path]:
    """weavepy's own files in the state and run directories (nothing else is touched)."""
    from weavepy.identity import IDENTITY_FILE
    from weavepy.ipam_link import CORE_FILE, PODS_FILE
    from weavepy.reconcile import PROGRAMMED_FILE

    for name in (IDENTITY_FILE, CORE_FILE, PODS_FILE, KNOWN_PEERS_FILE, EXTERNAL_PEERS_FILE):
        yield config.state_dir / name
        if config.state_dir.is_dir():
            yield from sorted(config.state_dir.glob(f"{name}.corrupt-*"))
            yield from sorted(config.state_dir.glob(f".{name}.*"))
    yield config.run_dir / PROGRAMMED_FILE
