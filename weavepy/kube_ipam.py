"""Kubernetes IPAM (`--ipam kubernetes`): this node's pod block is its Node's podCIDR.

Where the cluster already has a consensus, weavepy uses it instead of running its own: the
Kubernetes control plane gives each Node a podCIDR (kube-controller-manager
`--allocate-node-cidrs`, set by kubeadm's `--pod-network-cidr`), as flannel's kube-subnet-mgr
and Calico's host-local mode use it. `KubeIpam` is the agent's IPAM in that mode; it implements
`weavepy.ipam_mode.NodeIpam`, so the agent, its status, the CNI allocator and the metrics take
it as they take weavepy's own (`weavepy.ipam_link.IpamLink`).

Theory of operation
===================

* **Nodes in.** The Node list and watch of weavepy.kube (the one watch that also finds peers)
  tell it every node's `spec.podCIDRs`: `KubeIpam` is a `weavepy.kube.NodeObserver`
  (`replace_nodes`, `apply_node`). Those calls only note the API's word and wake `run`.
* **Saved, then used.** `run` saves the nodes' podCIDRs in the state directory
  (`ipam-pod-cidrs.json`, fsync) and only then adopts them: the pure
  `weavepy.ipam.podcidr.pod_cidr_table` makes the block table (this node's podCIDR is its one
  block; the other nodes' podCIDRs are theirs, by node name, and the reconciler routes to
  them), and a changed table pokes the reconciler. A restart starts from the saved table, so
  while the API is unreachable the node keeps its podCIDR, its routes and its pods, and keeps
  serving new pods (Weave crash-looped while the API was down, weave#3191).
* **Pod addresses.** `PodAllocator` hands out addresses from the podCIDR (its block size is the
  podCIDR's prefix; `.1` is the bridge's gateway) and saves them (`ipam-pods.0.json` and
  `.1.json`, `store.SlotStateFile`) before a CNI ADD is answered, as with weavepy's IPAM.
  While this node has no usable podCIDR, an ADD is refused at once with the state and its
  detail (CNI "try again later"; the kubelet retries).
* **No IPAM protocol.** No IPAM messages, voters or leases exist in this mode: the gossip
  delegate sends nothing, and counts any IPAM payload a peer sends (a peer launched with
  `--ipam weavepy`) in `dropped`. The cluster ID is `kubernetes`, so a peer of the other mode
  is left out of the data plane, with the reason in `status`.

The rules it keeps: the table in use is one that is on disk; the allocator never hands out an
address outside this node's podCIDR; allocations are forgotten only when another podCIDR is
adopted, never while the API is silent or this Node is missing (a running pod's address is
never handed out twice); every refusal is one sentence in `status`.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Collection, Mapping
from ipaddress import IPv4Network
from typing import TYPE_CHECKING, Any

import trio

from weavepy.config import AgentConfig
from weavepy.ipam.allocator import Allocation, PodAllocator, Unavailable
from weavepy.ipam.blocks import BlockError, BlockSpace
from weavepy.ipam.errors import CorruptStateError, IpamDecodeError
from weavepy.ipam.podcidr import PodCidrTable, pod_cidr_table
from weavepy.ipam.report import status_document
from weavepy.ipam.status import IpamState, IpamStatus, MemberView
from weavepy.ipam.store import SlotStateFile, StateFile
from weavepy.ipam.wire import is_ipam
from weavepy.ipam_link import (
    PODS_FILE,
    SERF_MAX_TYPE,
    IpamLinkError,
    NoAddress,
    corrupt_leftovers,
)

if TYPE_CHECKING:
    from gossip.transport import GossipService
    from weavepy.kube import NodeInfo

__all__ = ["CLUSTER_ID", "POD_CIDRS_FILE", "KubeIpam", "KubeIpamDelegate"]

log = logging.getLogger(__name__)

POD_CIDRS_FILE = "ipam-pod-cidrs.json"
CLUSTER_ID = "kubernetes"  # the cluster ID every node of this mode announces
TABLE_FORMAT = 1
SAVE_RETRY = 1.0  # seconds before saving the API's table again after a failed write

NodeTable = dict[str, tuple[str, ...]]  # node name -> its podCIDRs as the API spells them


class KubeIpamDelegate:
    """The gossip Delegate of this mode: nothing out, IPAM payloads in are counted."""

    def __init__(self, drops: Counter[str]) -> None:
        self._drops = drops

    def node_meta(self, limit: int) -> bytes:
        return b""  # the agent passes its tags to the gossip service directly

    def notify_msg(self, payload: bytes) -> None:
        if is_ipam(payload):
            self._note("ipam_message")
        elif payload and payload[0] <= SERF_MAX_TYPE:
            self._drops["serf_user_message"] += 1
        else:
            self._drops["unknown_user_message"] += 1

    def get_broadcasts(self, overhead: int, limit: int) -> list[bytes]:
        return []

    def local_state(self, join: bool) -> bytes:
        return b""  # no IPAM state to exchange

    def merge_remote_state(self, buf: bytes, join: bool) -> None:
        if is_ipam(buf):
            self._note("ipam_state")
        elif buf:
            self._drops["foreign_push_pull_state"] += 1

    def _note(self, reason: str) -> None:
        if not self._drops["ipam_message"] and not self._drops["ipam_state"]:
            log.warning("a peer speaks weavepy's IPAM protocol: it runs --ipam weavepy, this "
                        "node --ipam kubernetes; every node of a cluster needs the same --ipam")
        self._drops[reason] += 1


class _PodCidrBlock:
    """The allocator's BlockSource: this node's usable podCIDR is its one block."""

    def __init__(self, ipam: KubeIpam, space: BlockSpace) -> None:
        self._ipam = ipam
        self._space = space

    @property
    def space(self) -> BlockSpace:
        return self._space

    def held_blocks(self) -> list[int]:
        cidr = self._ipam.table.pod_cidr
        if cidr is None or cidr.prefixlen != self._space.block_prefix:
            return []
        return [self._space.index_of(cidr)]

    def usable_blocks(self, now: float) -> list[int]:
        return self.held_blocks()

    def request_block(self, now: float, count: int = 1) -> IpamState:
        state = self._ipam.table.state  # nobody to ask: the control plane sizes podCIDRs
        return IpamState.OUT_OF_SPACE if state is IpamState.READY else state

    def status(self, now: float) -> IpamStatus:
        return self._ipam.status()


class KubeIpam:
    """The agent's IPAM with `--ipam kubernetes` (see the module docstring)."""

    def __init__(self, config: AgentConfig, *, on_table_change: Callable[[], None]) -> None:
        self.config = config
        self.name = config.name
        self.on_table_change = on_table_change
        leftovers = corrupt_leftovers(config.state_dir)
        if leftovers:
            raise IpamLinkError(
                f"an earlier start found this node's IPAM state corrupt and moved it aside to "
                f"{leftovers[0]}; this node would forget its pods' addresses, so it will not "
                f"start: restore the file, or run `weavepy reset` (drain the node first)")
        self.table_file = StateFile(config.state_dir / POD_CIDRS_FILE, "ipam-pod-cidrs")
        self.pods_file = SlotStateFile(config.state_dir / PODS_FILE, "ipam-pods")
        try:
            saved = self.table_file.load()
            pods = self.pods_file.load()
            self._nodes = _read_table(saved) if saved is not None else {}
            self.table = pod_cidr_table(self._nodes, self.name, config.ipalloc_range)
            if self.table.pod_cidr is not None:
                prefix = self.table.pod_cidr.prefixlen
            elif pods is not None and isinstance(pods.get("block_prefix"), int):
                prefix = pods["block_prefix"]  # no podCIDR known: keep the pods as they are
            else:
                prefix = config.block_prefix
            self._block = _PodCidrBlock(self, BlockSpace.parse(config.ipalloc_range, prefix))
            self.allocator = PodAllocator(self._block, snapshot=pods)
        except CorruptStateError as exc:
            raise IpamLinkError(str(exc)) from None
        except (IpamDecodeError, BlockError) as exc:
            raise IpamLinkError(f"IPAM state in {config.state_dir} cannot be used ({exc}); "
                                f"restore it, or run `weavepy reset` (drain the node first)"
                                ) from None
        self.source: str | None = "saved" if saved is not None else None  # then "api"
        self.drops: Counter[str] = Counter()
        self.delegate = KubeIpamDelegate(self.drops)
        self.trio_token: trio.lowlevel.TrioToken | None = None
        self._api: NodeTable | None = None  # the API's latest word, adopted by `run`
        self._news = trio.Event()
        self._lock = trio.Lock()
        self._alive: set[str] = set()
        self._blocks = _blocks_by_node(self.table)

    # -- the Node watch (weavepy.kube.NodeObserver; synchronous, from the watch task) ----------

    def replace_nodes(self, nodes: list[NodeInfo]) -> None:
        self._api = {node.name: node.pod_cidrs for node in nodes}
        self._news.set()

    def apply_node(self, event: str, node: NodeInfo) -> None:
        api = self._api
        if api is None:
            return  # events follow a list
        if event == "DELETED":
            if node.name not in api:
                return
            del api[node.name]
        elif event in ("ADDED", "MODIFIED"):
            if api.get(node.name) == node.pod_cidrs and node.name in api:
                return  # a heartbeat: nothing for IPAM
            api[node.name] = node.pod_cidrs
        else:
            return
        self._news.set()

    # -- gossip (no IPAM protocol in this mode) --------------------------------------------------

    @property
    def cluster_id(self) -> str:
        return CLUSTER_ID

    def attach(self, svc: GossipService) -> None:
        """Nothing to send: this mode has no IPAM messages."""

    def member_alive(self, name: str, tags: Mapping[str, str]) -> None:
        self._alive.add(name)

    def member_dead(self, name: str) -> None:
        self._alive.discard(name)

    def tags(self) -> dict[str, str]:
        return {}

    # -- reading ---------------------------------------------------------------------------------

    def blocks_by_node(self) -> dict[str, list[IPv4Network]]:
        return self._blocks

    def status(self) -> IpamStatus:
        table = self.table
        state, detail = table.state, table.detail
        if self.source is None:
            state, detail = (IpamState.WAITING_FOR_POD_CIDR,
                             "waiting for the Kubernetes API to list the nodes")
        elif self.source == "saved":
            detail += (f" (saved in {self.config.state_dir}: the Kubernetes API has not "
                       f"answered since the start)")
        own = (table.pod_cidr,) if table.pod_cidr is not None else ()
        members = tuple(
            MemberView(name, 0, False, name == self.name or name in self._alive,
                       tuple(str(b) for b in blocks), None)
            for name, blocks in sorted(table.blocks.items()))
        return IpamStatus(
            node=self.name, state=state, detail=detail, cluster_id=CLUSTER_ID, era=None,
            slot=0, generation=None, voters=(), voters_reachable=0, quorum=0,
            lease_remaining=None, owned_blocks=own, held_blocks=own, members=members,
            total_blocks=len(table.blocks), free_blocks=0, quarantined_blocks=0,
            unreachable_owners=(), pending_block_requests=0, cluster_mismatches=(),
            dropped=dict(self.drops))

    def state_name(self) -> str:
        return self.status().state.value

    def status_json(self) -> dict[str, Any]:
        table = self.table
        doc = status_document(self.status(), self.allocator.usage(), {}, mode="kubernetes")
        doc["pod_cidr"] = str(table.pod_cidr) if table.pod_cidr is not None else None
        doc["pod_cidr_source"] = self.source
        doc["refused_pod_cidrs"] = dict(table.refused)
        return doc

    # -- the driver task -------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        """Adopt what the API says, each time after saving it; runs until cancelled."""
        self.trio_token = trio.lowlevel.current_trio_token()
        self._log_table(None, self.table)
        async with self._lock:
            self._fit_allocator()
            await self._persist_pods()
        task_status.started()
        while True:
            await self._news.wait()
            self._news = trio.Event()
            if self._api is None:
                continue
            nodes = dict(self._api)
            async with self._lock:
                if not await self._save_table(nodes):
                    self._news.set()
                    await trio.sleep(SAVE_RETRY)
                    continue
                self._adopt(nodes)
                await self._persist_pods()

    async def _save_table(self, nodes: NodeTable) -> bool:
        if nodes == self._nodes:
            return True
        body = {"format": TABLE_FORMAT, "node": self.name,
                "nodes": {name: list(cidrs) for name, cidrs in sorted(nodes.items())}}
        try:
            await trio.to_thread.run_sync(self.table_file.save, body)
        except OSError as exc:  # keep using the saved table; the API's is adopted once saved
            self.drops["persist_failed"] += 1
            log.error("cannot save the nodes' podCIDRs to %s: %s; retrying",
                      self.table_file.path, exc)
            return False
        return True

    def _adopt(self, nodes: NodeTable) -> None:
        before = self.table
        self._nodes, self.source = nodes, "api"
        self.table = pod_cidr_table(nodes, self.name, self.config.ipalloc_range)
        self._log_table(before, self.table)
        self._fit_allocator()
        blocks = _blocks_by_node(self.table)
        if blocks != self._blocks:
            self._blocks = blocks
            self.on_table_change()

    def _fit_allocator(self) -> None:
        """Forget the allocations outside this node's podCIDR, once it has one (caller holds
        the lock)."""
        cidr = self.table.pod_cidr
        if cidr is None:
            return  # keep every pod until a podCIDR is known: it may be the same one again
        if cidr.prefixlen == self._block.space.block_prefix:
            lost = self.allocator.drop_lost_blocks()
        else:
            self._block = _PodCidrBlock(self, BlockSpace.parse(self.config.ipalloc_range,
                                                               cidr.prefixlen))
            self.allocator, lost = self.allocator.moved_to(self._block)
        for gone in lost:
            log.warning("pod address %s of %s/%s is outside this node's podCIDR %s: forgotten",
                        gone.address, gone.container_id[:12], gone.ifname, cidr)

    def _log_table(self, before: PodCidrTable | None, after: PodCidrTable) -> None:
        """One line for each change an operator should know of."""
        if before is None or (before.state, before.detail) != (after.state, after.detail):
            if after.state is IpamState.READY:
                log.info("IPAM (kubernetes): pods get addresses from the %s", after.detail)
            elif self.source is not None:
                log.warning("IPAM (kubernetes) %s: %s", after.state.value, after.detail)
        ipv6 = after.ipv6_ignored.get(self.name)
        if ipv6 and (before is None or before.ipv6_ignored.get(self.name) != ipv6):
            log.info("node %s: IPv6 podCIDR %s ignored (weavepy is IPv4 only)", self.name,
                     ", ".join(ipv6))
        for name, why in sorted(after.refused.items()):
            if name != self.name and (before is None or before.refused.get(name) != why):
                log.warning("%s: no route to that node's pods", why)

    async def _persist_pods(self) -> None:
        if not self.allocator.persist_needed:
            return
        snapshot = self.allocator.snapshot()
        try:
            await trio.to_thread.run_sync(self.pods_file.save, snapshot)
        except OSError as exc:  # the CNI request that changed it fails (see `allocate`)
            self.drops["persist_failed"] += 1
            log.error("cannot save pod allocations in %s: %s", self.config.state_dir, exc)
            return
        self.allocator.mark_persisted(int(snapshot["seq"]))

    async def flush(self) -> None:
        async with self._lock:
            await self._persist_pods()

    async def rmpeer(self, name: str, force: bool) -> dict[str, Any]:
        raise IpamLinkError(f"with --ipam kubernetes the control plane owns the podCIDRs: "
                            f"`kubectl delete node {name}` gives {name}'s back")

    async def leave(self) -> dict[str, Any]:
        name = self.config.name
        raise IpamLinkError(f"with --ipam kubernetes the control plane owns the podCIDRs: "
                            f"`kubectl delete node {name}` gives this node's back")

    def member_names(self) -> list[str]:
        return sorted(self.blocks_by_node())

    def node_deleted(self, member: str, node: str) -> None:
        """Nothing to reclaim here: the control plane frees a deleted Node's podCIDR."""

    def nodes_listed(self, members: Collection[str]) -> None:
        """Nothing to forget: see `node_deleted`."""

    # -- pod addresses (called on the trio loop by ipam_link.CniAllocator) -----------------------

    async def allocate(self, container_id: str, ifname: str) -> Allocation:
        """The attachment's address; NoAddress (with the state and why) if there is none."""
        async with self._lock:
            result = self.allocator.add(container_id, ifname, trio.current_time())
            await self._persist_pods()
            if self.allocator.persist_needed:
                raise NoAddress(Unavailable(self.table.state, f"cannot save pod allocations "
                                                              f"in {self.config.state_dir}"))
        if isinstance(result, Allocation):
            return result
        if result.state is IpamState.OUT_OF_SPACE:
            raise NoAddress(Unavailable(result.state, (
                f"every address of podCIDR {self.table.pod_cidr} is in use; the control plane "
                f"sizes podCIDRs (kube-controller-manager --node-cidr-mask-size)")))
        raise NoAddress(result)

    async def lookup(self, container_id: str, ifname: str) -> Allocation | None:
        return self.allocator.get(container_id, ifname)

    async def release(self, container_id: str, ifname: str) -> Allocation | None:
        async with self._lock:
            released = self.allocator.release(container_id, ifname)
            await self._persist_pods()
        return released


def _read_table(body: Mapping[str, Any]) -> NodeTable:
    """The saved nodes' podCIDRs; IpamDecodeError if the file holds something else."""
    nodes = body.get("nodes")
    if body.get("format") != TABLE_FORMAT or not isinstance(nodes, dict) or not all(
            isinstance(name, str) and isinstance(cidrs, list)
            and all(isinstance(c, str) for c in cidrs) for name, cidrs in nodes.items()):
        raise IpamDecodeError("bad_pod_cidrs", "not a table of node podCIDRs")
    return {name: tuple(cidrs) for name, cidrs in nodes.items()}


def _blocks_by_node(table: PodCidrTable) -> dict[str, list[IPv4Network]]:
    return {name: list(blocks) for name, blocks in table.blocks.items()}
