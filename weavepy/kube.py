"""Peers from the Kubernetes API, Node deletions, and this node's NetworkUnavailable condition.

This module owns weavepy's only conversation with a Kubernetes API server (`--kube-peers`):
which nodes are peers, which weavepy members lost their Node, and telling Kubernetes that the
pod network on this node is up.

Theory of operation
===================

Peers are the other Node objects' addresses: the first IPv4 `InternalIP`, else the first IPv4
`ExternalIP` (what Weave's kube-utils used). Our own node (by name) and nodes that are being
deleted are not peers; a node with no IPv4 address is skipped and counted.

`NodePeerTable` is the whole decision, sans-IO: it is fed a node list (`replace`) and watch
events (`apply`) and answers whether the *peer set* changed. A node's heartbeat updates arrive
as MODIFIED events every few minutes; they change nothing here and wake nobody. It also keeps
every node the API lists (`present`) and the nodes deleted since the last look
(`take_deleted`): a DELETED event, or a node that a fresh list no longer has (a deletion this
agent missed while its watch was down). Nodes deleted while the agent was not running are not
seen: the list at start is the baseline.

Node deletions reclaim space (Weave's kube-utils did this): `route_node_changes` maps each
deleted Node to the weavepy member it was (`member_for_node`: the member of the same name, else
the one member whose underlay address is the Node's peer address) and hands it to the agent's
IPAM (`NodeReclaimer.node_deleted`); the IPAM voters remove it by quorum once it is dead in
their view (docs/ipam.md 2.4). A Node that the API lists again (kubelet registers it anew)
cancels that (`nodes_listed`).

`KubePeerSource` moves bytes: it lists nodes, then watches from the list's resourceVersion,
the pattern of client-go's reflector:

* each watch request asks the server to end it after `watch_timeout` seconds, and the client
  gives up on it `WATCH_GRACE` seconds later (a half-open connection would otherwise hang
  forever: the watch has no read timeout); the next watch resumes from the last
  resourceVersion seen, without a new list;
* `410 Gone` (the version is too old) triggers a fresh list at once;
* any other failure (API unreachable, 5xx, a malformed line) is logged, recorded in `status()`,
  and retried after an exponential backoff with jitter, from a fresh list. Weave crash-looped
  when the API was unreachable at start (weave#3191); here the agent keeps running on its
  other peers and the watch keeps trying.

The client is lightkube's `AsyncClient` (httpx/anyio), which runs under trio: its in-cluster
configuration reads the service account's token, CA and `KUBERNETES_SERVICE_HOST/PORT`, and
re-reads the token on a 401 (the kubelet rotates it). lightkube's own retry sleeps with asyncio,
so this module never asks it to retry (its `on_error` stays "raise") and retries itself.

`set_network_available(name)` patches the node's `NetworkUnavailable` condition to False with
reason `WeavepyIsUp` (a strategic merge patch of `nodes/status`, as Weave and flannel do), so
the node controller lifts the `node.kubernetes.io/network-unavailable` taint.

The agent's side (`KubeLink`, run by the agent with `--kube-peers`) is two tasks:
`follow_kube_peers` makes each new peer set (plus the operator's own `--peers`) the join
targets, wakes the join loop, and routes Node deletions to the IPAM; `mark_network_available`
waits until the node is first ready, then sets the condition, retrying with exponential
backoff until the API accepts it.

The client reads the pod's service account (`in_cluster`), or a kubeconfig file
(`from_kubeconfig`, `--kubeconfig`) on a host that runs the agent outside a pod.

With `--ipam kubernetes` the same list and watch also carry each Node's `spec.podCIDRs`
(`NodeInfo.pod_cidrs`) to the agent's Kubernetes IPAM (weavepy.kube_ipam): every node the
source lists and every watch event goes to its `observers` (`NodeObserver`), so there is one
watch on Nodes whatever reads them.

The client reads the pod's service account (`in_cluster`), or a kubeconfig file
(`from_kubeconfig`, `--kubeconfig`) on a host that runs the agent outside a pod.

The RBAC this needs, and no more: nodes get/list/watch, nodes/status patch (deploy/rbac.yaml).
"""

from __future__ import annotations

import collections
import contextlib
import ipaddress
import logging
import math
import random
from collections.abc import AsyncGenerator, Callable, Collection, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import httpx2
import msgspec
import trio
import yaml
from lightkube import AsyncClient, KubeConfig
from lightkube.core.exceptions import ApiError, ConfigError
from lightkube.resources.core_v1 import Node

from weavepy.targets import TargetSchedule

__all__ = [
    "CONDITION_REASON",
    "SERVICE_ACCOUNT_DIR",
    "Backoff",
    "KubeError",
    "KubeLink",
    "KubeNode",
    "KubePeer",
    "KubePeerSource",
    "NodeChanges",
    "NodeInfo",
    "NodeObserver",
    "NodePeerTable",
    "NodeReclaimer",
    "follow_kube_peers",
    "mark_network_available",
    "member_for_node",
    "route_node_changes",
]

log = logging.getLogger(__name__)

SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
CONDITION_TYPE = "NetworkUnavailable"
CONDITION_REASON = "WeavepyIsUp"
CONDITION_MESSAGE = "weavepy is running on this node"
ADDRESS_PREFERENCE = ("InternalIP", "ExternalIP")
DEFAULT_WATCH_TIMEOUT = 300  # seconds the server keeps one watch open (client-go: 5-10 min)
WATCH_GRACE = 30.0  # how long past that the client waits before it gives the watch up
REQUEST_TIMEOUT = 10.0  # connect/read/write timeout of every request but the watch stream
NETWORK_AVAILABLE_BACKOFF = (1.0, 60.0)  # first and largest retry delay for the node condition


class KubeError(Exception):
    """The Kubernetes API cannot be used as asked; the message is one readable sentence."""


@dataclass(frozen=True, order=True)
class KubePeer:
    """A peer found in the API: its node name and the address to gossip with."""

    node: str
    address: str


@dataclass(frozen=True, order=True)
class KubeNode:
    """A Node the API lists (or listed): its name and peer address (None: no IPv4 address)."""

    name: str
    address: str | None


@dataclass(frozen=True)
class NodeChanges:
    """What a watch reports: the peers now, every node listed now, and the nodes deleted
    since the previous report."""

    peers: frozenset[KubePeer]
    present: frozenset[KubeNode]
    deleted: tuple[KubeNode, ...] = ()


@dataclass(frozen=True)
class NodeInfo:
    """What this module reads from a Node object."""

    name: str
    addresses: tuple[tuple[str, str], ...] = ()  # (type, address) in the API's order
    deleting: bool = False
    resource_version: str | None = None
    pod_cidrs: tuple[str, ...] = ()  # spec.podCIDRs (else spec.podCIDR), as the API spells them

    @classmethod
    def from_dict(cls, obj: Mapping[str, Any]) -> NodeInfo:
        """From a Node as the API sends it (JSON); ValueError if it has no name."""
        metadata = obj.get("metadata")
        if not isinstance(metadata, Mapping) or not isinstance(metadata.get("name"), str):
            raise ValueError("a Node without metadata.name")
        status = obj.get("status")
        raw = status.get("addresses") if isinstance(status, Mapping) else None
        addresses = tuple(
            (str(a.get("type")), str(a.get("address")))
            for a in (raw if isinstance(raw, list) else ())
            if isinstance(a, Mapping) and a.get("type") and a.get("address"))
        version = metadata.get("resourceVersion")
        spec = obj.get("spec")
        return cls(name=metadata["name"], addresses=addresses,
                   deleting=metadata.get("deletionTimestamp") is not None,
                   resource_version=version if isinstance(version, str) else None,
                   pod_cidrs=_pod_cidrs(spec.get("podCIDRs"), spec.get("podCIDR"))
                   if isinstance(spec, Mapping) else ())

    @classmethod
    def from_model(cls, node: Any) -> NodeInfo:
        """From a lightkube `Node` model; ValueError if it has no name."""
        metadata = getattr(node, "metadata", None)
        name = getattr(metadata, "name", None)
        if not isinstance(name, str) or not name:
            raise ValueError("a Node without metadata.name")
        status = getattr(node, "status", None)
        addresses = tuple((str(a.type), str(a.address))
                          for a in (getattr(status, "addresses", None) or ())
                          if getattr(a, "type", None) and getattr(a, "address", None))
        spec = getattr(node, "spec", None)
        return cls(name=name, addresses=addresses,
                   deleting=getattr(metadata, "deletionTimestamp", None) is not None,
                   resource_version=getattr(metadata, "resourceVersion", None),
                   pod_cidrs=_pod_cidrs(getattr(spec, "podCIDRs", None),
                                        getattr(spec, "podCIDR", None)))

    def peer_address(self, preference: Iterable[str] = ADDRESS_PREFERENCE) -> str | None:
        """The first IPv4 address of the first preferred type that has one."""
        for wanted in preference:
            for kind, text in self.addresses:
                if kind != wanted:
                    continue
                try:
                    address = ipaddress.ip_address(text)
                except ValueError:
                    continue
                if isinstance(address, ipaddress.IPv4Address):
                    return str(address)
        return None


def _pod_cidrs(many: object, one: object) -> tuple[str, ...]:
    """`spec.podCIDRs`, else the older single `spec.podCIDR` (strings only)."""
    if isinstance(many, list) and many:
        return tuple(c for c in many if isinstance(c, str))
    return (one,) if isinstance(one, str) and one else ()


class NodeObserver(Protocol):
    """Told every Node the source lists and every watch event (weavepy.kube_ipam)."""

    def replace_nodes(self, nodes: list[NodeInfo]) -> None:
        """A full list: these are all the nodes now."""

    def apply_node(self, event: str, node: NodeInfo) -> None:
        """One watch event (ADDED, MODIFIED, DELETED, BOOKMARK)."""


class NodePeerTable:
    """The peer set as node events arrive (sans-IO: no clock, no sockets).

    `replace` and `apply` return True when the peer set changed. `skipped` counts nodes left
    out, by reason (`no_ipv4_address`, `malformed`)."""

    def __init__(self, own_node: str, *, exclude_addresses: Iterable[str] = (),
                 preference: Iterable[str] = ADDRESS_PREFERENCE) -> None:
        self.own_node = own_node
        self.exclude_addresses = frozenset(exclude_addresses)
        self.preference = tuple(preference)
        self.resource_version: str | None = None
        self.skipped: collections.Counter[str] = collections.Counter()
        self._peers: dict[str, KubePeer] = {}
        self._present: dict[str, KubeNode] | None = None  # None until the first list
        self._deleted: list[KubeNode] = []

    @property
    def peers(self) -> frozenset[KubePeer]:
        return frozenset(self._peers.values())

    @property
    def present(self) -> frozenset[KubeNode]:
        """Every node the API lists now, ours included."""
        return frozenset((self._present or {}).values())

    def take_deleted(self) -> tuple[KubeNode, ...]:
        """The nodes deleted since the last call (each once)."""
        deleted, self._deleted = tuple(self._deleted), []
        return deleted

    def _node(self, node: NodeInfo) -> KubeNode:
        return KubeNode(node.name, node.peer_address(self.preference))

    def _peer(self, node: NodeInfo) -> KubePeer | None:
        if node.name == self.own_node or node.deleting:
            return None
        address = node.peer_address(self.preference)
        if address is None:
            self.skipped["no_ipv4_address"] += 1
            log.debug("node %s has no IPv4 %s address; not a peer", node.name,
                      "/".join(self.preference))
            return None
        if address in self.exclude_addresses:
            return None
        return KubePeer(node.name, address)

    def replace(self, nodes: Iterable[NodeInfo], resource_version: str | None) -> bool:
        """A full list: the peer set becomes exactly these nodes' peers."""
        before = self.peers
        self._peers = {}
        present: dict[str, KubeNode] = {}
        for node in nodes:
            present[node.name] = self._node(node)
            peer = self._peer(node)
            if peer is not None:
                self._peers[node.name] = peer
        if self._present is not None:  # gone since the last list: deleted while we looked away
            self._deleted += [old for name, old in sorted(self._present.items())
                              if name not in present]
        self._present = present
        self.resource_version = resource_version
        return self.peers != before

    def apply(self, event: str, node: NodeInfo) -> bool:
        """One watch event (ADDED, MODIFIED, DELETED; BOOKMARK only moves the version)."""
        if node.resource_version:
            self.resource_version = node.resource_version
        if event == "BOOKMARK":
            return False
        before = self._peers.get(node.name)
        if self._present is None:
            self._present = {}
        present = self._present
        if event == "DELETED":
            self._peers.pop(node.name, None)
            self._deleted.append(present.pop(node.name, self._node(node)))
        elif event in ("ADDED", "MODIFIED"):
            present[node.name] = self._node(node)
            peer = self._peer(node)
            if peer is None:
                self._peers.pop(node.name, None)
            else:
                self._peers[node.name] = peer
        else:
            self.skipped["malformed"] += 1
            log.warning("ignoring a watch event of unknown type %r for node %s", event,
                        node.name)
            return False
        return self._peers.get(node.name) != before

    def forget_version(self) -> None:
        """The version is too old (410 Gone): the next step must be a fresh list."""
        self.resource_version = None


class Backoff:
    """Exponential backoff with full jitter (sans-IO: the caller sleeps)."""

    def __init__(self, initial: float = 1.0, maximum: float = 30.0,
                 rng: random.Random | None = None) -> None:
        self.initial = initial
        self.maximum = maximum
        self.failures = 0
        self._rng = rng or random.Random()

    def next_delay(self) -> float:
        self.failures += 1
        ceiling = min(self.maximum, self.initial * math.pow(2, self.failures - 1))
        return self._rng.uniform(ceiling / 2, ceiling)

    def reset(self) -> None:
        self.failures = 0


class KubePeerSource:
    """Peers from the Kubernetes API, and the node condition; see the module docstring.

    Use `in_cluster()` inside a pod, or pass any lightkube `AsyncClient`. Close it with
    `aclose()` (or `async with`)."""

    def __init__(self, client: AsyncClient, own_node: str, *,
                 exclude_addresses: Iterable[str] = (),
                 watch_timeout: int = DEFAULT_WATCH_TIMEOUT, watch_grace: float = WATCH_GRACE,
                 backoff: Backoff | None = None,
                 observers: Iterable[NodeObserver] = ()) -> None:
        self.client = client
        self.own_node = own_node
        self.observers = tuple(observers)
        self.exclude_addresses = tuple(exclude_addresses)
        self.watch_timeout = watch_timeout
        self.watch_grace = watch_grace
        self.backoff = backoff or Backoff()
        self.last_error: str | None = None
        self.lists = 0
        self.watches = 0
        self.errors = 0
        self.peer_count: int | None = None
        self.skipped: collections.Counter[str] = collections.Counter()

    @classmethod
    def in_cluster(cls, own_node: str, *, service_account_dir: Path = SERVICE_ACCOUNT_DIR,
                   **kwargs: Any) -> KubePeerSource:
        """A source that talks to the API server of the cluster this pod runs in."""
        try:
            config = KubeConfig.from_service_account(service_account=service_account_dir)
            client = AsyncClient(config=config, timeout=httpx2.Timeout(REQUEST_TIMEOUT),
                                 field_manager="weavepy")
        except (ConfigError, KeyError, OSError) as exc:
            detail = f"${exc.args[0]} is not set" if isinstance(exc, KeyError) else str(exc)
            raise KubeError(f"--kube-peers needs the in-cluster service account "
                            f"({service_account_dir}, $KUBERNETES_SERVICE_HOST/PORT): "
                            f"{detail}") from None
        return cls(client, own_node, **kwargs)

    @classmethod
    def from_kubeconfig(cls, path: Path, own_node: str, **kwargs: Any) -> KubePeerSource:
        """A source that talks to the API server named by the kubeconfig file `path` (its
        current context), for an agent that runs outside a pod (`--kubeconfig`)."""
        try:
            config = KubeConfig.from_file(path)
            client = AsyncClient(config=config, timeout=httpx2.Timeout(REQUEST_TIMEOUT),
                                 field_manager="weavepy")
        except yaml.YAMLError as exc:
            raise KubeError(f"--kubeconfig {path}: not valid YAML "
                            f"({getattr(exc, 'problem', None) or type(exc).__name__})") from None
        except (ConfigError, KeyError, OSError, TypeError, ValueError) as exc:
            raise KubeError(f"--kubeconfig {path}: {exc}") from None
        return cls(client, own_node, **kwargs)

    async def __aenter__(self) -> KubePeerSource:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self.client.aclose()

    # -- peers ---------------------------------------------------------------------------------

    def _table(self) -> NodePeerTable:
        return NodePeerTable(self.own_node, exclude_addresses=self.exclude_addresses)

    async def _list_into(self, table: NodePeerTable) -> bool:
        listing = self.client.list(Node)
        nodes: list[NodeInfo] = []
        async for node in listing:
            try:
                nodes.append(NodeInfo.from_model(node))
            except ValueError:
                table.skipped["malformed"] += 1
        self.lists += 1
        for observer in self.observers:
            observer.replace_nodes(nodes)
        return table.replace(nodes, listing.resourceVersion)

    async def list_peers(self) -> frozenset[KubePeer]:
        """The current peers, from one list request; KubeError if the API says no."""
        table = self._table()
        try:
            await self._list_into(table)
        except (httpx2.HTTPError, msgspec.MsgspecError, OSError) as exc:
            raise KubeError(f"cannot list nodes: {_describe(exc)}") from None
        self._note(table)
        return table.peers

    @trio.as_safe_channel
    async def watch_nodes(self) -> AsyncGenerator[NodeChanges, None]:
        """The peers and nodes now, then again each time the peers or the listed nodes change
        or a node is deleted; runs until cancelled.

        Use as ``async with source.watch_nodes() as changes: async for change in changes:``.
        Failures never end it: they are logged, kept in `last_error`, and retried."""
        table = self._table()
        announced: tuple[frozenset[KubePeer], frozenset[KubeNode]] | None = None

        def news() -> NodeChanges | None:
            nonlocal announced
            deleted = table.take_deleted()
            now = (table.peers, table.present)
            if now == announced and not deleted:
                return None
            announced = now
            return NodeChanges(table.peers, table.present, deleted)

        while True:
            try:
                if table.resource_version is None:
                    await self._list_into(table)
                    self._note(table)
                    if (change := news()) is not None:
                        yield change
                    self.backoff.reset()
                    self.last_error = None
                self.watches += 1
                events = self.client.watch(Node, resource_version=table.resource_version,
                                           server_timeout=self.watch_timeout)
                with trio.move_on_after(self.watch_timeout + self.watch_grace):
                    # lightkube types the watch as an AsyncIterable; it is an async generator
                    async with contextlib.aclosing(events):  # type: ignore[type-var]
                        async for event, node in events:
                            try:
                                info = NodeInfo.from_model(node)
                            except ValueError:
                                table.skipped["malformed"] += 1
                                continue
                            table.apply(event, info)
                            for observer in self.observers:
                                observer.apply_node(event, info)
                            self._note(table)
                            if (change := news()) is not None:
                                yield change
                            self.backoff.reset()
                            self.last_error = None
                continue  # watch ended or timed out: resume from the last version
            except ApiError as exc:
                if exc.status is not None and exc.status.code == 410:
                    log.info("node watch: resourceVersion %s is too old; listing again",
                             table.resource_version)
                    table.forget_version()
                    continue
                failure = _describe(exc)
            except (httpx2.HTTPError, msgspec.MsgspecError, OSError) as exc:
                failure = _describe(exc)
            self.errors += 1
            self.last_error = failure
            table.forget_version()
            delay = self.backoff.next_delay()
            log.warning("Kubernetes API: %s; retrying in %.1f s", failure, delay)
            await trio.sleep(delay)

    def _note(self, table: NodePeerTable) -> None:
        self.peer_count = len(table.peers)
        self.skipped = table.skipped.copy()

    def status(self) -> dict[str, Any]:
        """For the agent's status document."""
        return {"source": "kubernetes", "peers": self.peer_count, "lists": self.lists,
                "watches": self.watches, "errors": self.errors, "last_error": self.last_error,
                "skipped": dict(self.skipped)}

    # -- node condition ------------------------------------------------------------------------

    async def set_network_available(self, node_name: str | None = None, *,
                                    now: datetime | None = None) -> None:
        """Set `NetworkUnavailable=False` (reason WeavepyIsUp) on the node (default: ours).
        One attempt; KubeError with the API's reason if it fails (the caller retries)."""
        name = node_name or self.own_node
        stamp = (now or datetime.now(UTC)).strftime("%Y-%m-%dT%H:%M:%SZ")
        patch = {"status": {"conditions": [{
            "type": CONDITION_TYPE, "status": "False", "reason": CONDITION_REASON,
            "message": CONDITION_MESSAGE, "lastTransitionTime": stamp,
            "lastHeartbeatTime": stamp}]}}
        try:
            await self.client.patch(Node.Status, name, patch)
        except (httpx2.HTTPError, msgspec.MsgspecError, OSError) as exc:
            raise KubeError(f"cannot set {CONDITION_TYPE}=False on node {name}: "
                            f"{_describe(exc)}") from None
        log.info("node %s: %s=False (%s)", name, CONDITION_TYPE, CONDITION_REASON)


def _describe(exc: BaseException) -> str:
    """One readable line for an API or transport failure."""
    if isinstance(exc, ApiError) and exc.status is not None:
        status = exc.status
        return f"{status.code} {status.reason or ''}: {status.message or ''}".strip(": ")
    if isinstance(exc, httpx2.HTTPStatusError):
        return f"HTTP {exc.response.status_code} from {exc.request.url}"
    if isinstance(exc, msgspec.MsgspecError):
        return f"a malformed answer ({exc})"
    if isinstance(exc, httpx2.HTTPError):
        return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    return str(exc) or type(exc).__name__


# -- the agent's tasks -----------------------------------------------------------------------


class NodeReclaimer(Protocol):
    """Where Node deletions go (the agent's IPAM): weavepy member names, never Node names."""

    def members(self) -> Mapping[str, str | None]:
        """Every weavepy member this node knows, with its underlay address when known."""
        ...

    def node_deleted(self, member: str, node: str) -> None:
        """Kubernetes deleted Node `node`, which was weavepy member `member`."""
        ...

    def nodes_listed(self, members: Collection[str]) -> None:
        """These members' Nodes are listed (again): an earlier deletion no longer holds."""
        ...


def member_for_node(node: KubeNode, members: Mapping[str, str | None]) -> str | None:
    """The weavepy member a Node is: the member of the same name, else the one member whose
    underlay address is the Node's peer address (the address KubeLink joins); None if neither
    (or if two members share that address)."""
    if node.name in members:
        return node.name
    if node.address is None:
        return None
    matches = [name for name, address in members.items() if address == node.address]
    return matches[0] if len(matches) == 1 else None


def route_node_changes(change: NodeChanges, reclaimer: NodeReclaimer) -> None:
    """Hand each deleted Node's member to `reclaimer`, and the members still listed."""
    members = reclaimer.members()
    for node in change.deleted:
        member = member_for_node(node, members)
        if member is None:
            log.info("Kubernetes deleted node %s; no weavepy member has that name or address "
                     "%s: nothing to reclaim", node.name, node.address or "(none)")
            continue
        reclaimer.node_deleted(member, node.name)
    listed = {member_for_node(node, members) for node in change.present}
    reclaimer.nodes_listed(sorted(m for m in listed if m is not None))


class KubeLink:
    """The agent's link to the Kubernetes API (`--kube-peers`): the node watch and the node
    condition, as tasks of the agent's nursery (`run`), and what the status shows of them."""

    def __init__(self, source: KubePeerSource) -> None:
        self.source = source
        self.network_available_set = False

    async def run(self, targets: TargetSchedule, gossip_port: int, static_peers: list[str],
                  targets_changed: Callable[[], None], is_ready: Callable[[], bool],
                  reclaimer: NodeReclaimer) -> None:
        """Follow the API's peers into `targets` and Node deletions into `reclaimer`, and set
        the node condition once `is_ready()`; runs until cancelled (the watch never ends, it
        retries)."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(follow_kube_peers, self.source, targets, gossip_port,
                               static_peers, targets_changed, reclaimer)
            nursery.start_soon(self._mark_network_available, is_ready)

    async def _mark_network_available(self, is_ready: Callable[[], bool]) -> None:
        await mark_network_available(self.source, is_ready)
        self.network_available_set = True

    def status(self) -> dict[str, Any]:
        """The `discovery` section of the agent's status."""
        return {**self.source.status(), "network_available_set": self.network_available_set}


async def follow_kube_peers(source: KubePeerSource, targets: TargetSchedule, gossip_port: int,
                            static_peers: list[str], changed: Callable[[], None],
                            reclaimer: NodeReclaimer | None = None) -> None:
    """Peers from the Kubernetes API (`source`, closed at the end): each new node set replaces
    the join targets, plus `static_peers`; `changed()` then wakes the join loop; deleted Nodes
    go to `reclaimer` (`route_node_changes`). The watch retries API failures itself and never
    ends."""
    peers: frozenset[KubePeer] | None = None
    async with source, source.watch_nodes() as changes:
        async for change in changes:
            if reclaimer is not None:
                route_node_changes(change, reclaimer)
            if change.peers == peers:
                continue
            peers = change.peers
            addresses = [f"{p.address}:{gossip_port}" for p in sorted(peers, key=lambda p: p.node)]
            targets.replace(addresses + [p for p in static_peers if p not in addresses],
                            trio.current_time())
            changed()
            log.info("Kubernetes API: %d peers", len(addresses))


async def mark_network_available(source: KubePeerSource, is_ready: Callable[[], bool], *,
                                 backoff: tuple[float, float] = NETWORK_AVAILABLE_BACKOFF,
                                 poll: float = 0.5) -> None:
    """Wait until `is_ready()`, then set the node's NetworkUnavailable=False, retrying with
    exponential backoff until the API accepts it."""
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
