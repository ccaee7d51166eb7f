"""The weavepy node agent: one trio process per node, and the composition root that builds its
parts and ties them together. Each part's logic lives in its own module; this one decides
only what is built from what, and which tasks run.

Theory of operation
===================

Data flows one way::

    gossip (GossipService) --member events--> ClusterView --+
         |  user messages / push-pull state                  |
         v                                                   v
    IPAM (persisted) --block table--> Reconciler --> tunnel.vxlan + pod bridge
         |   IpamLink (weavepy's IPAM) or KubeIpam (the nodes' podCIDRs: --ipam kubernetes)
         +--> pod allocator --> CNI server (weavepy-cni clients)
    API (127.0.0.1) reads status; with the API token it asks for connect / forget / rmpeer / stop

`prepare()` does everything that can fail because of the host or the user before any task
starts, and raises `AgentError` with one readable line: not root, a bad or renamed state
directory, a corrupt identity or IPAM file, an unreadable keyring, no usable underlay, a
cluster range that overlaps the host's routes, an API port already taken, an API token file
that holds no token. It creates the API token on the first launch (weavepy.apitoken), and
switches on `net.bridge.bridge-nf-call-iptables` wherever br_netfilter exists (on plain hosts
too, not only through the DaemonSet's init container): traffic between two pods of one node
is bridged, and only then does it pass the netfilter IP hooks that kube-proxy's Services and
NetworkPolicy rules live on. Where it is absent or cannot be set, the agent still starts and
its status says so (`dataplane.bridge_netfilter`).

`Agent.run()` then runs, as children of one nursery: the gossip service, the membership task
(events -> view -> reconciler and IPAM), the IPAM task (weavepy.ipam_mode picks it once:
weavepy's own, or the nodes' podCIDRs with `--ipam kubernetes`), the join loop and the end of
start-up retention (weavepy.joiner), the reconciler (which also keeps the host rules of
weavepy.hostrules: egress masquerade, forward accepts, the API guard), the CNI server, the
API over the node's answers (weavepy.api over weavepy.control), the metrics endpoint
(`--metrics-addr`), the VXLAN counter sampler (weavepy.hostnet), the signal task and, with
`--kube-peers`, the Kubernetes Node watch (peers, and the podCIDRs of `--ipam kubernetes`)
and the task that sets the node's NetworkUnavailable condition to False once the node is
first ready (weavepy.kube's `KubeLink`).

A restart re-derives everything from the state directory (identity, IPAM, the peers of
weavepy.peerstore), the run directory (peers programmed last time) and the kernel; the
reconciler keeps working routes until the view has settled, so nothing flaps.

Stopping: persist, close the CNI socket, and exit 0. `POST /stop` (`weavepy stop`) first leaves
the gossip cluster, so peers see `left` and remove their routes to us at once. SIGTERM and
SIGINT (kubelet during a DaemonSet rollout, `systemctl restart`) stop without leaving: a restart
that comes back within the failure-detection time (about 5 s on lan) changes nothing at the
peers, and a node that stays down is declared failed and its routes removed as after a crash.
Kernel state stays either way: pods keep their addresses and local traffic keeps flowing.
`weavepy reset` (weavepy.reset) is the only thing that removes kernel objects and state.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import os
import random
import signal
import time
from collections.abc import Collection
from dataclasses import dataclass
from ipaddress import IPv4Address
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from gossip.config import GossipConfig
from gossip.events import MemberEventKind, MemberState
from gossip.keyring import Keyring
from gossip.tags import encode_tags
from gossip.transport import GossipService
from tunnel.vxlan import ENCAP_OVERHEAD, VxlanBackend, VxlanConfig
from weavepy import __version__
from weavepy.apitoken import TokenError
from weavepy.apitoken import load_or_create as load_or_create_token
from weavepy.cluster import ClusterView, DataPlaneIdentity
from weavepy.cni.podnet import ensure_bridge
from weavepy.config import AgentConfig, parse_peer
from weavepy.control import NodeControl
from weavepy.hostnet import (
    HostNetError,
    LinkCounterSampler,
    Underlay,
    find_underlay,
    range_conflicts,
)
from weavepy.hostrules import HostRulesError, HostRulesSpec, enable_bridge_netfilter
from weavepy.identity import Identity, IdentityError, load_or_create
from weavepy.ipam_link import IpamLinkError
from weavepy.ipam_mode import NodeIpam, node_observers, open_ipam
from weavepy.joiner import Joiner
from weavepy.metrics import AgentMetrics
from weavepy.peerstore import load_external_peers
from weavepy.policy.applier import PolicyApplier
from weavepy.policy.compiler import DEFAULT_TABLE, CompileOptions
from weavepy.policy.droplog import DropLog
from weavepy.policy.dropreader import DropReader
from weavepy.policy.enforcer import POLICY_CACHE_FILE, ApplyRecord, PolicyEnforcer
from weavepy.policy.model import ClusterState, Pod
from weavepy.policy.sources import DirectorySource
from weavepy.reconcile import DesiredDataPlane, HostRulesKeeper, Reconciler, desired_data_plane
from weavepy.targets import normalise_addresses
from weavepy.wgpath import (
    CAP_EXTENSION,
    CAP_WIREGUARD,
    UDP_IPV4_OVERHEAD,
    WG_OVERHEAD,
    EncryptedPath,
    ExternalPeer,
    encrypt_tag,
)

if TYPE_CHECKING:
    from weavepy.kube import KubeLink
    from weavepy.policy.kubesource import KubePolicySource

__all__ = ["Agent", "AgentError", "Prepared", "prepare", "run_agent"]

log = logging.getLogger(__name__)

LEAVE_TIMEOUT = 3.0
# The WireGuard data plane runs in one thread of the agent's process, beside the trio loop
# (tunnel/wireguard/threads.py). Worker processes (one per direction) work from the agent too,
# but measured slower on the shared 2-core sandbox (1.54-1.60 against 1.80-1.99 Gbit/s pod to
# pod), where both nodes share the same cores; on a real host with cores to spare they should
# win. Measure before turning this on (python -m bench wireguard_ab).
AGENT_WORKERS = False
POLICY_READY_WAIT = 5.0  # seconds a CNI ADD waits at a time for the policy source's first state
POLICY_VERIFY_EVERY = 10  # every Nth policy check compares the whole table, not its skeleton
POLICY_CACHE_AFTER = 3.0  # seconds after start before the saved state is used
POLICY_CACHE_PERIOD = 5.0  # the saved state is written at most this often


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
    api_token: str  # what the API asks of requests that change the node (weavepy.apitoken)
    bridge_netfilter: str  # "on", "absent" or "off" (see `_switch_on_bridge_netfilter`)


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
    if mtu + overhead > underlay.mtu:
        log.warning("--mtu %d plus %d bytes of %s overhead exceeds the underlay MTU %d of %s: "
                    "larger packets will be fragmented, dropped or refused with ICMP "
                    "fragmentation needed", mtu, overhead,
                    "WireGuard" if overhead == WG_OVERHEAD else "VXLAN", underlay.mtu,
                    underlay.iface)
    from weavepy.api import check_bindable

    try:
        check_bindable(*config.api_addr)
        if config.metrics_addr is not None:
            check_bindable(*config.metrics_addr)
    except OSError as exc:
        raise AgentError(str(exc)) from None
    try:
        api_token = load_or_create_token(config.state_dir)
    except TokenError as exc:
        raise AgentError(str(exc)) from None
    if config.policy_dir is not None and not config.policy_dir.is_dir():
        raise AgentError(f"--policy-dir {config.policy_dir}: no such directory")
    if config.install_cni:
        _install_cni(config)
    bridge_netfilter = _switch_on_bridge_netfilter()
    log.info("underlay %s %s (mtu %d, chosen by %s); overlay mtu %d; advertising %s:%d",
             underlay.iface, underlay.local_ip, underlay.mtu, underlay.how, mtu, *advertise)
    return Prepared(config, identity, keyring, underlay, advertise, mtu,
                    _gossip_profile(config.profile), api_token, bridge_netfilter)


def _switch_on_bridge_netfilter() -> str:
    """Make bridged pod traffic pass the netfilter IP hooks in this namespace: "on" (it was,
    or is now), "absent" (no br_netfilter here) or "off" (it is off and cannot be switched on,
    e.g. a read-only /proc/sys); the last two are logged as a warning, never fatal."""
    consequence = ("traffic between pods of this node bypasses iptables and nftables, so "
                   "Services with endpoints on this node and NetworkPolicy between its pods "
                   "fail")
    try:
        found = enable_bridge_netfilter()
    except HostRulesError as exc:
        log.warning("%s: %s; run `sysctl -w net.bridge.bridge-nf-call-iptables=1`",
                    exc, consequence)
        return "off"
    if found == "absent":
        log.warning("br_netfilter is not loaded: %s; run `modprobe br_netfilter` and restart "
                    "the agent", consequence)
        return "absent"
    if found == "enabled":
        log.info("switched on net.bridge.bridge-nf-call-iptables")
    return "on"


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
    """One running node agent: its parts, and the tasks that run them (`run`). Its answers to
    the API are `control` (weavepy.control)."""

    def __init__(self, prepared: Prepared) -> None:
        self.prepared = prepared
        self.config = prepared.config
        self.identity = prepared.identity
        self.svc: GossipService | None = None
        self.started_at = time.time()
        self.view = ClusterView(self.config.name)
        self.rng = random.Random()
        self.joiner = Joiner(self.config.name, self.config.gossip_port,
                             normalise_addresses(self.config.peers, self.config.gossip_port),
                             self.config.state_dir, self.rng)
        self.ipam: NodeIpam = open_ipam(self.config, self.identity,
                                        on_table_change=self._table_changed,
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
        self.host_rules = HostRulesKeeper(self.host_rules_spec)
        self.reconciler = Reconciler(
            self.backend, self.desired, run_dir=self.config.run_dir, bridge=self.config.bridge,
            mtu=prepared.mtu, ensure_bridge=ensure_bridge,
            interval=self.config.reconcile_interval, on_pass=self._reconcile_observed,
            encrypted=self.encrypted, host_rules=self.host_rules)
        self.metrics = AgentMetrics()
        self.vxlan_counters = LinkCounterSampler(self.config.vxlan_device)
        self.kube: KubeLink | None = None  # with --kube-peers
        self.policy: PolicyEnforcer | None = None  # NetworkPolicy (see `_build_policy`)
        self.policy_source: DirectorySource | KubePolicySource | None = None
        self.drop_reader: DropReader | None = None  # the policy table's NFLOG group
        self.policy_ready = trio.Event()
        self.trio_token: trio.lowlevel.TrioToken | None = None  # set when `run` starts
        self.policy_stale = False  # enforcing the saved state: the API has not answered yet
        if self.ipam.cluster_id is not None:
            self._cluster_id_learned(self.ipam.cluster_id)
        self.cni_listening = False
        self.cni_requests: dict[str, int] = {}
        self._stop = trio.Event()
        self._leave_on_stop = True
        self.control = NodeControl(self)

    # -- derived values --------------------------------------------------------------------------

    def data_plane_identity(self) -> DataPlaneIdentity:
        return DataPlaneIdentity(
            underlay_ip=IPv4Address(self.prepared.advertise[0]),
            vtep_mac=self.identity.vtep_mac,
            vxlan_vni=self.config.vxlan_vni,
            vxlan_port=self.config.vxlan_port,
            wg_public_key=self.identity.wg_public_key,
            capabilities=frozenset({"vxlan", CAP_WIREGUARD} | (
                set() if self.config.wg_standard_only else {CAP_EXTENSION})),
            cluster_id=self.ipam.cluster_id,
            wg_port=self.config.wg_port,
            encrypt=encrypt_tag(self.config.encrypt_all, self.config.encrypt_peers),
            mtu=self.prepared.mtu,
        )

    def desired(self) -> tuple[DesiredDataPlane, set[str]]:
        """What the data plane should be now, and the names of the peers in the view."""
        desired = desired_data_plane(self.view.peers(), self.ipam.blocks_by_node(),
                                     self.config.name, self.data_plane_identity(),
                                     sorted(self.external.values(), key=lambda p: p.name),
                                     now=trio.current_time(), grace=self.config.route_grace)
        return desired, {p.name for p in self.view.peers()}

    def host_rules_spec(self, peer_nodes: frozenset[IPv4Address]) -> HostRulesSpec:
        """The host rules this node wants (docs/egress.md): masquerade as configured, the
        peer nodes of the reconcile pass, and the guard on the API port (where
        route_localnet=1, a loopback address is reachable from the network)."""
        config = self.config
        return HostRulesSpec(
            config.ipalloc_range, (config.bridge, config.vxlan_device, config.wg_device),
            masquerade=config.masquerade, no_masq_cidrs=config.no_masq_cidrs,
            peer_node_addresses=peer_nodes, api_guard_port=config.api_addr[1])

    # -- callbacks from the IPAM link ------------------------------------------------------------

    def _reconcile_observed(self, seconds: float, ok: bool) -> None:
        self.metrics.observe_reconcile(seconds, ok)

    def _table_changed(self) -> None:
        own = tuple(self.ipam.blocks_by_node().get(self.config.name, ()))
        self.reconciler.poke("block table changed", urgent=own != self.reconciler.local_blocks)

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
        self.trio_token = trio.lowlevel.current_trio_token()
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
                nursery.start_soon(self.joiner.settle, self.reconciler.settle)
                nursery.start_soon(self.joiner.run, svc)
                nursery.start_soon(self.joiner.keep_known, svc)
                nursery.start_soon(self._signals)
                nursery.start_soon(self._enforce_policy)
                await nursery.start(self._serve_cni)
                from weavepy.api import build_app, serve_api

                await nursery.start(serve_api, build_app(self.control, self.prepared.api_token),
                                    *config.api_addr)
                if config.metrics_addr is not None:
                    from weavepy.api import build_metrics_app

                    await nursery.start(serve_api, build_metrics_app(self.control.render_metrics),
                                        *config.metrics_addr)
                nursery.start_soon(self.vxlan_counters.run)
                if self.kube is not None:
                    nursery.start_soon(self.kube.run, self.joiner.targets, config.gossip_port,
                                       self.joiner.peers, self.joiner.wake,
                                       lambda: self.control.readiness()[0],
                                       _NodeReclaimer(self))
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
            self.joiner.members_changed()

    async def _enforce_policy(self) -> None:
        """The policy source's states -> the enforcer -> the kernel, and the periodic check.
        With policy off (or no source), a table left by an earlier run is removed once."""
        enforcer, source = self.policy, self.policy_source
        if enforcer is None or source is None:
            await trio.to_thread.run_sync(_remove_policy_table, policy_mode(self.config)[1])
            return
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._check_policy, enforcer)
            if self.drop_reader is not None:
                nursery.start_soon(self._read_drops, self.drop_reader)
            if isinstance(source, DirectorySource):
                states = source.watch()
            else:
                states = source.watch_state()
                cache = _PolicyCache(self.config.state_dir / POLICY_CACHE_FILE, source)
                nursery.start_soon(self._policy_from_cache, enforcer, cache)
                nursery.start_soon(cache.run)
            async with states as stream:
                async for state in stream:
                    await trio.to_thread.run_sync(enforcer.set_source, state)
                    self.policy_stale = False
                    self.policy_ready.set()
                    if not isinstance(source, DirectorySource):
                        cache.changed.set()

    async def _policy_from_cache(self, enforcer: PolicyEnforcer, cache: _PolicyCache) -> None:
        """The Kubernetes API has not answered soon after start: enforce the state saved
        last time (so pods can start while the API is away), until the API answers."""
        with trio.move_on_after(POLICY_CACHE_AFTER):
            await self.policy_ready.wait()
            return
        state = await trio.to_thread.run_sync(cache.load)
        if state is None or self.policy_ready.is_set():
            return
        log.warning("NetworkPolicy: the Kubernetes API has not answered; enforcing the state "
                    "saved at %s until it does", cache.saved_at or "?")
        self.policy_stale = True
        await trio.to_thread.run_sync(enforcer.set_source, state)
        self.policy_ready.set()

    async def _read_drops(self, reader: DropReader) -> None:
        """Drop logs with pod names; without them (the group is taken, no CAP_NET_ADMIN)
        policy is still enforced and counted, so this never stops the agent."""
        try:
            await reader.run()
        except OSError as exc:
            self.drop_reader = None
            log.warning("NetworkPolicy drop logs are off: cannot listen to NFLOG group %d: "
                        "%s (drops are still counted)", reader.group, exc)

    async def _check_policy(self, enforcer: PolicyEnforcer) -> None:
        passes = 0
        while True:
            await trio.sleep(self.config.reconcile_interval)
            passes += 1
            await trio.to_thread.run_sync(enforcer.check, passes % POLICY_VERIFY_EVERY == 0)

    async def _wait_policy_ready(self) -> None:
        """For a CNI ADD that came before the policy source's first state."""
        with trio.move_on_after(POLICY_READY_WAIT):
            await self.policy_ready.wait()

    def _lookup_pod(self, namespace: str, name: str) -> Pod | None:
        """On the CNI worker thread: read a pod the policy source does not know yet from the
        Kubernetes API (bounded; None if it cannot)."""
        source = self.policy_source
        if self.trio_token is None or source is None or isinstance(source, DirectorySource):
            return None
        found: Pod | None = trio.from_thread.run(source.fetch_pod, namespace, name,
                                                 trio_token=self.trio_token)
        return found

    def _policy_applied(self, record: ApplyRecord) -> None:
        self.metrics.observe_policy_apply(record.kind, record.seconds)

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
        backend = BridgeBackend(CniAllocator(self.ipam, token), bridge=self.config.bridge,
                                settings=PodLinkSettings(mtu=self.prepared.mtu,
                                                         gso_max_size=gso))
        if self.policy is None:
            return backend
        from weavepy.cni.policy_backend import PolicyBackend

        with_policy = PolicyBackend(backend, self.policy, self._wait_policy_ready)
        with_policy.forget_gone()
        return with_policy


class _PolicyCache:
    """The Kubernetes policy source's objects (what policy reads of them), saved in the state
    directory at most every POLICY_CACHE_PERIOD s after a change, and read back at a start
    the API does not answer."""

    def __init__(self, path: Path, source: KubePolicySource) -> None:
        self.path = path
        self.source = source
        self.changed = trio.Event()
        self.saved_at: str | None = None

    async def run(self) -> None:
        while True:
            await self.changed.wait()
            self.changed = trio.Event()
            dumped = self.source.store.dump()
            await trio.to_thread.run_sync(self._save, dumped)
            await trio.sleep(POLICY_CACHE_PERIOD)

    def _save(self, dumped: dict[str, Any]) -> None:
        from weavepy.fileio import atomic_write

        saved_at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        try:
            atomic_write(self.path, json.dumps({"saved_at": saved_at, "objects": dumped},
                                               separators=(",", ":")).encode())
        except OSError as exc:
            log.warning("cannot save the NetworkPolicy state in %s: %s", self.path, exc)

    def load(self) -> ClusterState | None:
        from weavepy.policy.sources import PolicyStore

        try:
            doc = json.loads(self.path.read_text())
            objects = doc["objects"]
            self.saved_at = str(doc.get("saved_at"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("the saved NetworkPolicy state %s is unreadable (%s); waiting for the "
                        "Kubernetes API", self.path, exc)
            return None
        store = PolicyStore()
        store.load(objects if isinstance(objects, dict) else {})
        return store.snapshot()


@dataclasses.dataclass
class _NodeReclaimer:
    """Node deletions from weavepy.kube into the IPAM link (`weavepy.kube.NodeReclaimer`)."""

    agent: Agent

    def members(self) -> dict[str, str | None]:
        found: dict[str, str | None] = dict.fromkeys(self.agent.ipam.member_names())
        for peer in self.agent.view.peers():
            if peer.identity is not None:
                found[peer.name] = str(peer.identity.underlay_ip)
        return found

    def node_deleted(self, member: str, node: str) -> None:
        self.agent.ipam.node_deleted(member, node)

    def nodes_listed(self, members: Collection[str]) -> None:
        self.agent.ipam.nodes_listed(members)


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


def run_agent(config: AgentConfig) -> None:
    """Prepare and run the agent until it stops; AgentError (one line) if it cannot."""
    prepared = prepare(config)
    try:
        agent = Agent(prepared)
    except IpamLinkError as exc:
        raise AgentError(str(exc)) from None
    if config.kube_peers:
        from weavepy.kube import KubeError, KubeLink, KubePeerSource

        exclude = [str(prepared.underlay.local_ip)]
        observers = node_observers(agent.ipam)  # --ipam kubernetes: the podCIDRs
        try:
            agent.kube = KubeLink(
                KubePeerSource.from_kubeconfig(config.kubeconfig, config.name,
                                               exclude_addresses=exclude, observers=observers)
                if config.kubeconfig is not None
                else KubePeerSource.in_cluster(config.name, exclude_addresses=exclude,
                                               observers=observers))
        except KubeError as exc:
            raise AgentError(str(exc)) from None
    _build_policy(agent)
    try:
        trio.run(agent.run)
    except BaseExceptionGroup as group:  # a task failed; surface our own one-line errors
        ours, _ = group.split(AgentError)
        if ours is None:
            raise
        raise _first_leaf(ours) from None


def policy_mode(config: AgentConfig) -> tuple[str, str]:
    """Where this node's NetworkPolicy comes from ("directory", "kubernetes" or "off"), and
    why, in words for the status and the log."""
    if not config.policy:
        return "off", "turned off (--no-policy)"
    if config.policy_dir is not None:
        return "directory", f"the directory {config.policy_dir} (--policy-dir)"
    if config.kube_peers:
        return "kubernetes", "the Kubernetes API (--kube-peers)"
    return "off", "no source: set --policy-dir, or --kube-peers to follow the Kubernetes API"


def _build_policy(agent: Agent) -> None:
    """The enforcer and its source, when policy is on; AgentError if they cannot be built."""
    config = agent.config
    mode, described = policy_mode(config)
    if mode == "off":
        return
    from weavepy.nft import Nft, NftError

    try:
        nft = Nft()
    except NftError as exc:
        raise AgentError(f"NetworkPolicy: {exc} (or turn policy off with --no-policy)"
                         ) from None
    if config.policy_dir is not None:
        agent.policy_source = DirectorySource(config.policy_dir)
    lookup = None
    if mode == "kubernetes":
        from weavepy.policy.kubesource import KubePolicySource

        assert agent.kube is not None
        agent.policy_source = KubePolicySource(agent.kube.source.client)
        lookup = agent._lookup_pod
    options = CompileOptions(audit=config.policy_audit)
    agent.policy = PolicyEnforcer(config.name, PolicyApplier(nft), options,
                                  run_dir=config.run_dir, on_apply=agent._policy_applied,
                                  lookup=lookup)
    agent.drop_reader = DropReader(DropLog(), options.log_group,
                                   snapshot=agent.policy.snapshot)
    log.info("NetworkPolicy: enforced from %s%s", described,
             " in audit mode (logged and counted, never dropped)" if config.policy_audit
             else "")


def _remove_policy_table(why: str) -> None:
    """Policy is off: remove the table an earlier run left, so that no stale policy stays
    in force (the agent runs in the node's namespace)."""
    from weavepy.nft import Nft, NftError

    try:
        nft = Nft()
        if nft.list_table("inet", DEFAULT_TABLE) is None:
            return
        PolicyApplier(nft).remove(DEFAULT_TABLE)
    except NftError as exc:
        if "python3-nftables" in str(exc):  # no binding: no earlier run could have placed it
            return
        log.warning("NetworkPolicy is off (%s), but the policy table %s left by an earlier "
                    "run could not be removed: %s", why, DEFAULT_TABLE, exc)
        return
    log.warning("NetworkPolicy is off (%s): removed the policy table %s left by an earlier "
                "run; pods are no longer isolated", why, DEFAULT_TABLE)


def _first_leaf(group: BaseException) -> BaseException:
    while isinstance(group, BaseExceptionGroup):
        group = group.exceptions[0]
    return group
